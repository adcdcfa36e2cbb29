"""Single-stage merge rules that are not task-vector pipelines.

Each constructor returns a `Stage` that writes ``state.result`` directly from
``state.base`` / ``state.values`` (the experts, NOT task vectors) and traced
``state.hp``. Formulas follow mergekit 0.1.5 (arcee-ai/mergekit, `mergekit/merge_methods/`) unless noted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kfuse.merge.core import MergeState, Stage
from kfuse.merge.select import kth_smallest_value, topk_mask
from kfuse.merge.stages import bcast, sum_models
from kfuse.shard import tensor_norm, tensor_sum, tree_sum

# Reductions over a tensor's entries use `tensor_sum` / `tree_sum` (a fixed
# order of adds): a merge sharded over devices then gives the same bits as an
# unsharded one (tests/merge/test_sharding.py).


def _per_model_sum(x, shape):
  """[N] sums over each model's entries of ``x`` ([N, ...]), viewed as ``shape``."""
  return jnp.stack([tensor_sum(x[i].reshape(shape)) for i in range(x.shape[0])])


def _work_dtype(x):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def linear(normalize: bool = True) -> Stage:
  """Σ w_i θ_i / Σ w_i (float32 arithmetic, cast back to the input dtype)."""

  def apply(s: MergeState) -> MergeState:
    wd = _work_dtype(s.values)
    v = s.values.astype(wd)
    w = s.weights.astype(wd)
    out = sum_models(v * bcast(w, v.ndim))
    if normalize:
      out = out / jnp.sum(w)
    return s.replace(result=out.astype(s.values.dtype))

  return apply


def simple_average() -> Stage:
  """(1/N) Σ θ_i (FusionBench SimpleAverage / uniform model soup)."""

  def apply(s: MergeState) -> MergeState:
    wd = _work_dtype(s.values)
    n = s.values.shape[0]
    return s.replace(result=(sum_models(s.values.astype(wd)) / n).astype(s.values.dtype))

  return apply


def slerp(dot_threshold: float = 0.9995, eps: float = 1e-8) -> Stage:
  """Spherical interpolation from θ_b (t=0) to θ_1 (t=1) over the flattened tensor.

  Norms below eps count as 1; |cos| > dot_threshold falls back to lerp; the
  unnormalised tensors are combined (float32 arithmetic).
  """

  def apply(s: MergeState) -> MergeState:
    wd = _work_dtype(s.base)
    a = s.base.astype(wd)
    b = s.values[0].astype(wd)
    t = s.hp["t"].astype(wd)
    na = tensor_norm(a)
    nb = tensor_norm(b)
    na = jnp.where(na > eps, na, 1)
    nb = jnp.where(nb > eps, nb, 1)
    dot = jnp.clip(tensor_sum((a / na) * (b / nb)), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    st = jnp.sin(theta)
    st_safe = jnp.where(lin, 1.0, st)
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / st_safe)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / st_safe)
    out = (ca * a + cb * b).reshape(s.base.shape)
    return s.replace(result=out.astype(s.base.dtype))

  return apply


def _nuslerp_vec(t, v0, v1, eps=1e-8, whole=False):
  """Slerp of vectors along the last axis, or of whole tensors (mergekit nuslerp numerics)."""

  def dot(x, y):
    return tensor_sum(x * y) if whole else tree_sum(x * y, axis=-1, keepdims=True)

  def unit(x):
    return x / jnp.maximum(jnp.sqrt(dot(x, x)), 1e-7)

  cos = jnp.clip(dot(unit(v0), unit(v1)), -1, 1)
  colinear = (1 - cos * cos) <= eps ** 2
  theta = jnp.arccos(jnp.where(colinear, 0, cos))
  st = jnp.sin(theta)
  res = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / jnp.where(colinear, 1, st)
  return jnp.where(colinear, (1 - t) * v0 + t * v1, res)


def nuslerp(flatten: bool = True, axis: int = -1) -> Stage:
  """NuSLERP: t = w_2/(w_1+w_2) (0.5 if the sum vanishes); slerp of the two
  experts (of their task vectors when a base is given) over the flattened
  tensor or along ``axis``. Float32 arithmetic (float64 for float64 inputs):
  the norm floor 1e-7 underflows to 0 in float16, making 0/0 of zero tensors."""

  def apply(s: MergeState) -> MergeState:
    w = s.weights.astype(jnp.float32)
    tot = w[0] + w[1]
    t = jnp.where(jnp.abs(tot) < 1e-6, 0.5, w[1] / jnp.where(jnp.abs(tot) < 1e-6, 1, tot))
    wd = _work_dtype(s.values)
    v0, v1 = s.values[0].astype(wd), s.values[1].astype(wd)
    base = None if s.base is None else s.base.astype(wd)
    if base is not None:
      v0, v1 = v0 - base, v1 - base
    t = t.astype(wd)
    shape = v0.shape
    if flatten:
      out = _nuslerp_vec(t, v0, v1, whole=True).reshape(shape)
    else:
      x0, x1 = jnp.moveaxis(v0, axis, -1), jnp.moveaxis(v1, axis, -1)
      out = jnp.moveaxis(_nuslerp_vec(t, x0, x1), -1, axis)
    if base is not None:
      out = base + out
    return s.replace(result=out.astype(s.values.dtype))

  return apply


def multislerp(normalize_weights: bool = True, eps: float = 1e-8) -> Stage:
  """Barycentric interpolation on the hypersphere (tangent space at the
  weighted mean direction), rescaled by Σ w_i‖x_i‖; task vectors when a base
  is given. A vanishing weighted mean falls back to Σ w_i x_i. Float32
  arithmetic (float64 for float64 inputs): eps = 1e-8 underflows to 0 in
  float16, making 0/0 of zero tensors."""

  def apply(s: MergeState) -> MergeState:
    if s.values.shape[0] == 1:
      return s.replace(result=s.values[0])
    wd = _work_dtype(s.values)
    x = s.values.astype(wd)
    base = None if s.base is None else s.base.astype(wd)
    if base is not None:
      x = x - base[None]
    n = x.shape[0]
    xf = x.reshape(n, -1)
    w = s.weights.astype(x.dtype)
    if normalize_weights:
      w = w / jnp.sum(w)
    shape = x.shape[1:]
    norms = jnp.sqrt(_per_model_sum(jnp.square(xf), shape))[:, None]
    u = xf / (norms + eps)
    mean = sum_models(u * w[:, None])
    mn = tensor_norm(mean.reshape(shape))
    degenerate = mn < eps
    mean = mean / jnp.where(degenerate, 1, mn)
    dots = _per_model_sum(u * mean, shape)[:, None]
    tang = sum_models((u - dots * mean) * w[:, None])
    tn = tensor_norm(tang.reshape(shape)) + eps
    res = mean * jnp.cos(tn) + tang * (jnp.sin(tn) / tn)
    res = res * jnp.sum(norms[:, 0] * w)
    fallback = sum_models(xf * w[:, None])
    res = jnp.where(degenerate, fallback, res).reshape(x.shape[1:])
    if base is not None:
      res = res + base
    return s.replace(result=res.astype(s.values.dtype))

  return apply


def karcher(max_iter: int = 10) -> Stage:
  """Karcher (Riemannian) mean of the unit directions, scaled by the mean norm.

  u_i = θ_i/‖θ_i‖; start at the normalised mean of the valid u_i
  (‖θ_i‖ > tol); iterate T = Σ α_i θ_i/sinθ_i (u_i − cosθ_i·u),
  u ← cos‖T‖u + sin‖T‖T/‖T‖ (renormalised) until ‖T‖ < tol or max_iter.
  Output (Σ α_i‖θ_i‖)·u with α_i = 1/N. Computed in float32 (float64 for
  float64 inputs) and cast back: in bfloat16 the iteration lands 4.7× farther
  from a float64 merge than mergekit's (which upcasts).
  """

  def apply(s: MergeState) -> MergeState:
    x = s.values
    n = x.shape[0]
    if n == 1:
      return s.replace(result=x[0])
    tol = s.hp["tol"].astype(jnp.float32)
    wd = _work_dtype(x)
    xf = x.reshape(n, -1).astype(wd)
    shape = x.shape[1:]
    norms = jnp.sqrt(_per_model_sum(jnp.square(xf.astype(wd)), shape))
    units = jnp.where(norms[:, None] == 0, 0, xf / jnp.where(norms == 0, 1, norms)[:, None].astype(xf.dtype))
    valid = norms > tol
    nvalid = jnp.sum(valid)
    alpha = jnp.where(valid, 1.0 / jnp.maximum(nvalid, 1), 0.0).astype(xf.dtype)
    mean = sum_models(alpha[:, None] * units)
    mnorm = tensor_norm(mean.astype(wd).reshape(shape))
    first = units[jnp.argmax(valid)]
    mean = jnp.where(mnorm < tol, first, mean / jnp.where(mnorm < tol, 1, mnorm).astype(mean.dtype))

    def body(_, carry):
      mean, done = carry
      dot = jnp.clip(_per_model_sum(units * mean[None], shape), -1.0, 1.0)
      theta = jnp.arccos(dot)
      active = valid & (theta >= tol)
      coef = jnp.where(active, alpha * theta / jnp.where(active, jnp.sin(theta), 1), 0)
      tang = sum_models(coef[:, None] * (units - dot[:, None] * mean[None]))
      tn = tensor_norm(tang.astype(wd).reshape(shape)).astype(mean.dtype)
      stop = tn < tol
      new = jnp.cos(tn) * mean + jnp.sin(tn) * (tang / jnp.where(stop, 1, tn))
      un = tensor_norm(new.astype(wd).reshape(shape)).astype(mean.dtype)
      new = jnp.where(un > tol, new / jnp.where(un > tol, un, 1), new)
      upd = ~(done | stop)
      return jnp.where(upd, new, mean), done | stop

    mean, _ = lax.fori_loop(0, max_iter, body, (mean, jnp.array(False)))
    scale_ = jnp.sum(norms.astype(mean.dtype) / n)
    out = jnp.where(nvalid == 0, jnp.zeros_like(mean), scale_ * mean)
    return s.replace(result=out.reshape(x.shape[1:]).astype(x.dtype))

  return apply


def model_stock(filter_wise: bool = False, axis: int = -1) -> Stage:
  """Model Stock: t = N·cosθ/(1+(N−1)cosθ), θ the mean pairwise angle between
  the fine-tuning offsets; output t·mean(θ_i) + (1−t)·θ_b (per row along
  ``axis`` when filter_wise)."""

  def apply(s: MergeState) -> MergeState:
    b, ws = s.base, s.values
    n = ws.shape[0]
    shape = b.shape
    if filter_wise:
      if b.ndim == 1:
        b, ws = b[None], ws[:, None]
      b = jnp.moveaxis(b, axis, -1)
      ws = jnp.moveaxis(ws, axis if axis < 0 else axis + 1, -1)
    else:
      b, ws = b.reshape(-1), ws.reshape(n, -1)
    off = ws - b[None]

    def red(v):  # Σ per row (filter-wise) or over the whole tensor
      return tree_sum(v, axis=-1) if filter_wise else tensor_sum(v.reshape(shape))

    cos = []
    for i in range(n):
      for j in range(i + 1, n):
        np_ = jnp.sqrt(red(jnp.square(off[i]))) * jnp.sqrt(red(jnp.square(off[j])))
        cos.append(jnp.clip(red(off[i] * off[j]) / jnp.maximum(np_, 1e-6), -1, 1))
    c = jnp.mean(jnp.stack(cos), axis=0)[..., None]
    den = 1 + (n - 1) * c
    sing = jnp.abs(den) < 1e-6
    t = jnp.where(sing, 0, n * c / jnp.where(sing, 1, den))
    out = t * (sum_models(ws) / n) + (1 - t) * b
    if filter_wise:
      out = jnp.moveaxis(out, -1, axis)
    return s.replace(result=out.reshape(shape).astype(s.base.dtype))

  return apply


def sce(fork_weights_only: bool = False) -> Stage:
  """SCE (FuseChat-2.0): Select top-``select_topk`` variance positions,
  Calculate per-model weights mean(τ_i²)/Σ_j mean(τ_j²), Erase minority signs;
  θ_b + Σ ω_i m_i τ_i / max(Σ ω_i m_i, 1e-6). ``fork_weights_only`` uses the
  selection only for the weights (FuseChat's fork)."""

  def apply(s: MergeState) -> MergeState:
    b = s.base
    tv = s.values.astype(b.dtype) - b[None]
    n = tv.shape[0]
    topk = s.hp["select_topk"]
    tf = tv.astype(jnp.float32)
    var = sum_models(jnp.square(tf - sum_models(tf) / n)) / n
    nz = jnp.sum(var != 0)
    k = jnp.floor(nz.astype(jnp.float32) * topk).astype(jnp.int32)
    sel = topk_mask(var, k, nonneg=True)
    sel = jnp.where(topk >= 1, True, jnp.where(topk <= 0, False, sel))
    tv_sel = tv * sel[None].astype(tv.dtype)
    tv_w = tv_sel
    tv_use = tv if fork_weights_only else tv_sel
    total = sum_models(tv_use)
    elected = jnp.where(total >= 0, 1, -1).astype(tv.dtype)
    erase = (jnp.sign(tv_use) == elected[None]).astype(tv.dtype)
    wts = _per_model_sum(jnp.square(tv_w), tv.shape[1:]) / max(tv[0].size, 1)
    wsum = jnp.sum(wts)
    wts = jnp.where(jnp.abs(wsum) < 1e-6, jnp.ones_like(wts) / n, wts / jnp.where(jnp.abs(wsum) < 1e-6, 1, wsum))
    ew = bcast(wts, tv.ndim) * erase
    merged = sum_models(tv_use * ew) / jnp.maximum(sum_models(ew), 1e-6)
    return s.replace(result=(b + merged).astype(b.dtype))

  return apply


def ram(plus: bool = False) -> Stage:
  """RAM: entries changed by exactly one model keep its δ, shared entries are
  averaged over the contributing models; RAM+ (tensor-local) scales unique
  entries by 1 + r·clip(shared_i/unique_i, 0, α)."""

  def apply(s: MergeState) -> MergeState:
    b = s.base
    tv = s.values.astype(b.dtype) - b[None]
    eps = s.hp["epsilon"].astype(tv.dtype)
    nz = jnp.abs(tv) > eps
    cnt = sum_models(nz.astype(jnp.int32))
    overlap = cnt > 1
    unique = cnt == 1
    tvz = tv * nz.astype(tv.dtype)
    uniq_part = tvz * unique[None].astype(tv.dtype)
    if plus:
      n = tv.shape[0]
      shared_c = jnp.sum((nz & overlap[None]).reshape(n, -1), axis=1).astype(jnp.float32)
      uniq_c = jnp.sum((nz & unique[None]).reshape(n, -1), axis=1).astype(jnp.float32)
      rho = shared_c / jnp.maximum(uniq_c, s.hp["epsilon"])
      lam = 1 + s.hp["r"] * jnp.clip(rho, 0, s.hp["alpha"])
      uniq_part = uniq_part * bcast(lam.astype(tv.dtype), tv.ndim)
    shared = tvz * overlap[None].astype(tv.dtype) / jnp.maximum(cnt, 1)[None].astype(tv.dtype)
    merged = sum_models(uniq_part + shared)
    return s.replace(result=(b + merged).astype(b.dtype))

  return apply


def nearswap() -> Stage:
  """NearSwap: w = clip(t/max(|θ_b−θ_1|, 1e-6), 0, 1); w·θ_1 + (1−w)·θ_b."""

  def apply(s: MergeState) -> MergeState:
    a, b = s.base, s.values[0]
    w = jnp.clip(s.hp["t"].astype(a.dtype) / jnp.maximum(jnp.abs(a - b), 1e-6), 0, 1)
    return s.replace(result=(w * b + (1 - w) * a).astype(a.dtype))

  return apply


def arcee_fusion(axis: int = -1, sample: int = 0) -> Stage:
  """Arcee Fusion: importance |θ_1−θ_b|·KL(softmax θ_1 ‖ softmax θ_b) (along
  ``axis``); keep the change where importance ≥ median + 1.5·IQR (quantiles by
  index into the sorted importances, from a keyed sample of ``sample``
  entries when the tensor is larger)."""

  def apply(s: MergeState) -> MergeState:
    b, p = s.base, s.values[0]
    if b.size == 0:   # no entries to rank: the merge of a zero-size tensor is itself
      return s.replace(result=b)
    if b.ndim == 0:   # a scalar is a one-entry row (torch's softmax(dim=-1) of a 0-d tensor)
      out = apply(s.replace(base=b.reshape(1), values=s.values.reshape(-1, 1)))
      return out.replace(result=out.result.reshape(()))
    diff = jnp.abs(p - b)
    eps = 1e-8
    def softmax(x):
      e = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
      return e / tree_sum(e, axis=axis, keepdims=True)

    pp = softmax(p) + eps
    qq = softmax(b) + eps
    kl = tree_sum(pp * jnp.log(pp / qq), axis=axis, keepdims=True)
    imp = diff * kl
    flat = imp.ravel()
    if sample and flat.shape[0] > sample:
      idx = jax.random.randint(s.key, (sample,), 0, flat.shape[0])
      flat = flat[idx]
    m = flat.shape[0] - 1   # sorted(flat)[i] is the (i+1)-th smallest: no sort needed
    qi = [int(np.float32(q) * np.float32(m)) for q in (0.25, 0.5, 0.75)]
    q1, med, q3 = (kth_smallest_value(flat, i + 1).astype(flat.dtype) for i in qi)
    thr = med + 1.5 * (q3 - q1)
    mask = (imp >= thr).astype(p.dtype)
    return s.replace(result=(b + (p - b) * mask).astype(b.dtype))

  return apply


def passthrough() -> Stage:
  """The single input tensor, optionally multiplied by ``scale``."""

  def apply(s: MergeState) -> MergeState:
    x = s.values[0]
    return s.replace(result=(x * s.hp["scale"].astype(x.dtype)).astype(x.dtype))

  return apply


def varm(weighting: str = "square", softmax: bool = False) -> Stage:
  """VaRM (FuseChat-1.0): per-tensor weights from the variation of each model
  against the pivot θ_b, w_i = mean(Δ_i²)/Σ_j mean(Δ_j²) (``abs``: mean|Δ_i|),
  optionally softmax(w/temperature); output Σ w_i θ_i (full weights)."""

  def apply(s: MergeState) -> MergeState:
    b = s.base
    x = s.values.astype(jnp.float32)
    n = x.shape[0]
    d = (x - b[None].astype(jnp.float32)).reshape(n, -1)
    per = jnp.square(d) if weighting == "square" else jnp.abs(d)
    v = _per_model_sum(per.reshape(x.shape), b.shape) / max(b.size, 1)
    tot = jnp.sum(v)
    w = jnp.where(tot > 0, v / jnp.where(tot > 0, tot, 1), jnp.ones_like(v) / n)
    if softmax:
      w = jax.nn.softmax(w / s.hp["temperature"])
    out = sum_models(x * bcast(w, x.ndim))
    return s.replace(result=out.astype(b.dtype))

  return apply


def select(take_expert: bool) -> Stage:
  """Layer swapping: the expert's tensor if ``take_expert`` else the base's."""

  def apply(s: MergeState) -> MergeState:
    out = s.values[0] if take_expert else s.base
    return s.replace(result=out.astype(s.base.dtype))

  return apply


def interpolate() -> Stage:
  """WiSE-FT: (1−α)·θ_b + α·θ_1 (float32 arithmetic)."""

  def apply(s: MergeState) -> MergeState:
    a = s.hp["alpha"]
    b = s.base.astype(jnp.float32)
    out = (1 - a) * b + a * s.values[0].astype(jnp.float32)
    return s.replace(result=out.astype(s.base.dtype))

  return apply
