"""Composable per-tensor merge stages (pure `jnp`; shapes static; jit-able).

Each constructor returns a `Stage` (``MergeState -> MergeState``). Traced
hyper-parameters are read from ``state.hp`` by name so one compiled recipe
serves every tensor of a shape:

================  =======  ==================================================
hp key            shape    meaning
================  =======  ==================================================
``k``             [N]      magnitude top-k count per model (exact, host-made)
``density``       [N]      keep probability (random / DELLA)
``lo``, ``hi``    [N]      breadcrumbs: keep ascending ranks in [lo, hi)
``epsilon``       [N]      DELLA probability spread
``lambda``        []       final scale of the merged task vector
================  =======  ==================================================
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kfuse.merge import select
from kfuse.merge.core import MergeState, Stage
from kfuse.shard import tensor_sum

# ------------------------------------------------------------------ helpers


def bcast(w, ndim):
  """Reshape a per-model [N] vector to broadcast against [N, ...] of rank ``ndim``."""
  return w.reshape(w.shape + (1,) * (ndim - w.ndim))


def sum_models(x: jax.Array) -> jax.Array:
  """Σ over the leading model axis, unrolled: x[0] + x[1] + … (same order).

  XLA:CPU reduces over a major axis element by element, 15–40× slower than
  these fused adds for LLM-sized tensors (experiments/perf/README.md).
  """
  out = x[0]
  for i in range(1, x.shape[0]):
    out = out + x[i]
  return out


def descending_rank(x: jax.Array) -> jax.Array:
  """Rank of every entry of a flat array, 0 = largest; ties by index (stable).

  (The top-k selections break ties by a hash of the index instead, see `select`.)"""
  n = x.shape[0]
  order = jnp.argsort(x, descending=True, stable=True)
  return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def ascending_rank(x: jax.Array, axis: int = -1) -> jax.Array:
  """Rank along ``axis`` (0 = smallest), ties by index.

  rank[order[j]] = j for order = stable argsort(x): one sort, then the inverse
  permutation by a scatter (XLA:CPU sorts slowly; ``argsort(argsort(x))``, as
  mergekit's DELLA writes it, costs a second sort for the same integers).
  """
  xm = jnp.moveaxis(x, axis, -1)
  m = xm.shape[-1]
  flat = xm.reshape(math.prod(xm.shape[:-1]), m)   # not -1: a zero-size axis is allowed
  order = jnp.argsort(flat, axis=-1, stable=True)
  rows = jnp.arange(flat.shape[0], dtype=jnp.int32)[:, None]
  pos = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), flat.shape)
  rank = jnp.zeros(flat.shape, jnp.int32).at[rows, order].set(pos, unique_indices=True)
  return jnp.moveaxis(rank.reshape(xm.shape), -1, axis)


def topk_mask(x: jax.Array, k: jax.Array) -> jax.Array:
  """Exactly ``k`` largest entries of ``x`` (any shape; ``k`` traced int).

  Ranks by value descending, ties by ``select.tie_hash`` of the flat index
  (no positional bias), found by radix selection instead of a sort (`select`).
  """
  return select.topk_mask(x, k)


def rescale_to_norm(delta: jax.Array, masked: jax.Array, norm: str = "l1",
                    eps: float = 1e-7) -> jax.Array:
  """Rescale ``masked`` so its norm matches ``delta``'s (mergekit's rescale).

  If either norm is below ``eps`` the masked tensor is returned unscaled.
  """
  if norm == "l1":
    before, after = tensor_sum(jnp.abs(delta)), tensor_sum(jnp.abs(masked))
  elif norm == "l2":
    before = jnp.sqrt(tensor_sum(jnp.square(delta)))
    after = jnp.sqrt(tensor_sum(jnp.square(masked)))
  elif norm == "linf":
    before, after = jnp.max(jnp.abs(delta)), jnp.max(jnp.abs(masked))
  else:
    raise ValueError(f"unknown rescale norm {norm!r}")
  ok = (before >= eps) & (after >= eps)
  factor = jnp.where(ok, before / jnp.where(ok, after, 1), 1)
  return masked * factor.astype(masked.dtype)


def _apply_mask(state: MergeState, keep: jax.Array, rescale: str | None) -> MergeState:
  delta = state.values
  masked = delta * keep.astype(delta.dtype)
  if rescale in ("l1", "l2", "linf"):
    masked = jax.vmap(lambda d, m: rescale_to_norm(d, m, rescale))(delta, masked)
  elif rescale == "inverse":  # DARE paper / FusionBench: divide by keep prob.
    p = bcast(state.hp["density"], delta.ndim).astype(delta.dtype)
    masked = masked / jnp.where(p > 0, p, 1)
  elif rescale is not None:
    raise ValueError(f"unknown rescale {rescale!r}")
  return state.replace(values=masked)


# ------------------------------------------------------------------ stages


def task_vectors() -> Stage:
  """δ_i = θ_i − θ_b (in the base dtype)."""

  def apply(s: MergeState) -> MergeState:
    return s.replace(values=s.values.astype(s.base.dtype) - s.base[None],
                     is_delta=True)

  return apply


def trim_magnitude(rescale: str | None = None) -> Stage:
  """TIES trim: keep exactly ``hp['k'][i]`` largest-|δ| entries per model.

  Ties at the k-th magnitude are broken by a seeded hash of the flat index
  (``select.tie_hash`` with ``select.tie_seed(size, i)``): among equal
  magnitudes the kept ones are spread uniformly over the tensor, not packed
  into its first rows. Methods using it declare ``selection='magnitude'``: the
  streaming engine then finds the cut on the host (`select.find_cuts`) and
  passes it as ``state.cuts`` (``cut_v``, ``cut_p``, ``tie_seed``,
  ``tie_offset``), and the mask is one comparison; otherwise (``cuts`` None) it
  is selected here (`select.topk_masks`). Both give the same mask.
  """

  def apply(s: MergeState) -> MergeState:
    if s.cuts is not None:
      c = s.cuts
      keys = select.magnitude_keys(s.values)
      keep = select.keep_from_cut(keys, c["cut_v"], c["cut_p"], c["tie_seed"],
                                  c.get("tie_offset", 0)).reshape(s.values.shape)
    else:
      keep = select.topk_masks(jnp.abs(s.values), s.hp["k"], nonneg=True)
    return _apply_mask(s, keep, rescale)

  return apply


def drop_random(rescale: str | None = "l1") -> Stage:
  """DARE: keep each entry with probability ``hp['density'][i]`` (explicit key)."""

  def apply(s: MergeState) -> MergeState:
    n = s.values.shape[0]
    keys = jax.random.split(s.key, n)
    dens = s.hp["density"]
    keep = jax.vmap(lambda k, p: jax.random.bernoulli(k, p, s.values.shape[1:]))(keys, dens)
    keep = jnp.where(bcast(dens >= 1, s.values.ndim), True, keep)
    return _apply_mask(s, keep, rescale)

  return apply


def trim_outliers(rescale: str | None = None) -> Stage:
  """Model Breadcrumbs: drop the largest-|δ| outliers and the smallest entries.

  Keeps ascending-magnitude ranks in ``[hp['lo'][i], hp['hi'][i])`` (ties
  ordered by ``select.tie_hash``, as in `trim_magnitude`). Methods using it
  declare ``selection='band'``: the engine's host-found cuts then arrive in
  ``state.cuts`` (``cut_hi_*``, ``cut_lo_*`` of the reversed magnitude keys).
  """

  def apply(s: MergeState) -> MergeState:
    if s.cuts is not None:  # cuts of the reversed magnitude keys, found by the engine
      c = s.cuts
      bits = select.key_bits(s.values.dtype)
      keys = select.reverse_keys(select.magnitude_keys(s.values), bits)
      seed, off = c["tie_seed"], c.get("tie_offset", 0)
      keep = (select.keep_from_cut(keys, c["cut_hi_v"], c["cut_hi_p"], seed, off)
              & ~select.keep_from_cut(keys, c["cut_lo_v"], c["cut_lo_p"], seed, off))
      return _apply_mask(s, keep.reshape(s.values.shape), rescale)

    def one(d, lo, hi, i):  # ascending ranks in [lo, hi) = bottom-hi minus bottom-lo
      a, seed = jnp.abs(d), select.tie_seed(d.size, i)
      return select.bottomk_mask(a, hi, seed) & ~select.bottomk_mask(a, lo, seed)

    keep = jnp.stack([one(s.values[i], s.hp["lo"][i], s.hp["hi"][i], i)
                      for i in range(s.values.shape[0])])
    return _apply_mask(s, keep, rescale)

  return apply


def drop_magnitude_ranked(axis: int = 1, rescale: str | None = "l1") -> Stage:
  """DELLA MagPrune: keep probability rises linearly with |δ| rank along ``axis``.

  p_keep = (d − ε) + 2ε·r̂, r̂ = (rank − min)/(max − min) ∈ [0, 1] along the
  row axis (PyTorch dim 1 for ``[out, in]``; 1-D tensors are one row).
  """

  def apply(s: MergeState) -> MergeState:
    n = s.values.shape[0]
    keys = jax.random.split(s.key, n)

    def one(k, d, dens, eps):
      x = d if d.ndim >= 2 else d.reshape(1, -1)   # 0-d / 1-D: one row
      ax = axis if d.ndim >= 2 else 1
      r = ascending_rank(jnp.abs(x).astype(jnp.float32), axis=ax).astype(jnp.float32)
      m = x.shape[ax]
      rn = jnp.clip(r / max(m - 1, 1), 0, 1)
      p = (dens - eps) + rn * 2 * eps
      keep = jax.random.bernoulli(k, p)
      keep = jnp.where(dens >= 1, True, keep)
      return keep.reshape(d.shape)

    keep = jax.vmap(one)(keys, s.values, s.hp["density"], s.hp["epsilon"])
    return _apply_mask(s, keep, rescale)

  return apply


def weigh() -> Stage:
  """Multiply every model's tensor by its weight: wd_i = w_i·δ_i."""

  def apply(s: MergeState) -> MergeState:
    w = bcast(s.weights.astype(s.values.dtype), s.values.ndim)
    return s.replace(values=s.values * w)

  return apply


def elect_sign(rule: str = "sum") -> Stage:
  """TIES sign election; sets ``mask`` to entries agreeing with the elected sign.

  ``rule='sum'`` (TIES paper, mergekit default): sign of Σ_i wd_i (mass);
  ``rule='count'``: majority of per-model signs. Exact ties elect +; exact
  zeros never agree (they are pruned entries).
  """

  def apply(s: MergeState) -> MergeState:
    sign = jnp.sign(s.values)
    if rule == "sum":
      total = sum_models(s.values)
    elif rule == "count":
      total = sum_models(sign)
    else:
      raise ValueError(f"unknown sign rule {rule!r}")
    elected = jnp.where(total >= 0, 1, -1).astype(sign.dtype)
    return s.replace(mask=sign == elected[None])

  return apply


def combine(normalize: bool = True) -> Stage:
  """Sum the (weighted) task vectors; with a sign mask, only agreeing entries.

  With a mask: mixed = Σ m_i wd_i, divisor = Σ m_i w_i (0 → 1).
  Without: mixed = Σ wd_i, divisor = Σ w_i (|·| < 1e-8 → 1).
  ``normalize`` divides mixed by divisor (a weighted (disjoint) mean).
  """

  def apply(s: MergeState) -> MergeState:
    v = s.values
    w = bcast(s.weights.astype(v.dtype), v.ndim)
    if s.mask is not None:
      m = s.mask.astype(v.dtype)
      mixed = sum_models(v * m)
      div = sum_models(w * m)
      div = jnp.where(div == 0, 1, div)
    else:
      mixed = sum_models(v)
      div = jnp.sum(w, axis=0) * jnp.ones_like(mixed)
      div = jnp.where(jnp.abs(div) < 1e-8, 1, div)
    if normalize:
      mixed = mixed / div
    return s.replace(result=mixed)

  return apply


def disjoint(reduce: str = "sum") -> Stage:
  """Paper TIES disjoint merge over agreeing entries (unweighted).

  ``sum``: Σ agreeing; ``mean``: Σ agreeing / #agreeing non-zero; ``max``:
  the agreeing entry of largest magnitude.
  """

  def apply(s: MergeState) -> MergeState:
    v = s.values
    m = s.mask if s.mask is not None else jnp.ones(v.shape, bool)
    sel = jnp.where(m, v, 0)
    if reduce == "sum":
      out = sum_models(sel)
    elif reduce == "mean":
      cnt = sum_models((sel != 0).astype(v.dtype))
      out = sum_models(sel) / jnp.maximum(cnt, 1)
    elif reduce == "max":
      idx = jnp.argmax(jnp.abs(sel), axis=0)
      out = jnp.take_along_axis(sel, idx[None], axis=0)[0]
    else:
      raise ValueError(f"unknown disjoint reduce {reduce!r}")
    return s.replace(result=out)

  return apply


def scale(name: str = "lambda") -> Stage:
  """result ← hp[name]·result (λ)."""

  def apply(s: MergeState) -> MergeState:
    return s.replace(result=s.result * s.hp[name].astype(s.result.dtype))

  return apply


def add_base() -> Stage:
  """result ← (θ_b + result) cast to the base dtype."""

  def apply(s: MergeState) -> MergeState:
    return s.replace(result=(s.base + s.result.astype(s.base.dtype)).astype(s.base.dtype))

  return apply
