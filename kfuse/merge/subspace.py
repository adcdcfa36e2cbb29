"""Subspace merges: methods that work on the singular structure of each weight matrix.

TSV-M, Iso-C, Iso-CTS, WUDI and the SVC post-step need the whole matrix (an
SVD, a matrix product), so they are not elementwise: the streaming engine hands
them whole tensors. Conventions shared by every method here (those of
FusionBench 0.2.33, `fusion_bench/method/{task_singular_vector,isotropic_merging,
wudi,singular_value_calibration}`):

- A "matrix" is a weight matrix, decided by the tensor's role (`matrix_view`):
  in PyTorch layout every 2-D tensor (FusionBench's rule); in Flax layout a
  ``kernel`` -- Dense ``[in, out]`` or a `MultiHeadDotProductAttention`
  DenseGeneral projection (``query``/``key``/``value`` ``[in, heads, head_dim]``,
  ``out`` ``[heads, head_dim, out]``), the [out, in] matrix PyTorch stores for the
  same layer -- or a 2-D ``embedding`` (stored like PyTorch's ``nn.Embedding``).
  Every other tensor (biases, DenseGeneral's 2-D ``[heads, head_dim]`` biases,
  norms, 0-d scales, convolution kernels, free parameters) is merged as the mean
  task vector, θ = θ_b + λ·(1/T)Σ τ_i, as the papers do; SVC leaves non-matrices
  as the base method made them.
- The maths is written for PyTorch ``[out, in]`` matrices. A Flax kernel is
  reshaped and transposed in and out, so the same *input* axis is used whatever
  the layout (WUDI's τ τ_iᵀ contracts the input axis, Iso-CTS and SVC project on
  the output-side singular vectors).
- SVDs are thin (``full_matrices=False``); sign and order ambiguities of the
  singular vectors cancel in every formula below, except where a singular value
  is repeated or zero (then the vectors are not unique, and neither are the
  results of the SVD methods of FusionBench).

Sharded over devices (``--config.num_devices``) the results agree with unsharded runs to a
few float32 ulps, not bit for bit: a sharded SVD or matrix product sums in another order
(tests/merge/test_subspace.py; the elementwise mask methods are bit-identical).

Methods: `tsv_m`, `iso_c`, `iso_cts`, `wudi` (Adam as in the paper, or its exact
minimiser, ``solver='closed_form'``), and the SVC post-step `svc` / `with_svc`
with registered variants ``*_svc``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.merge import stages as S
from kfuse.merge.core import NATIVE, Method, MergeState, Param, Stage, chain, get_method, register
from kfuse.merge.methods import _arr, default_prepare
from kfuse.tree import KfuseError

# ------------------------------------------------------------------ helpers


def check_finite_param(method: str, name: str, value, path: str) -> float:
  """``value`` as a float, or a one-line `KfuseError` naming the tensor if it is not finite."""
  v = float(value)
  if not math.isfinite(v):
    raise KfuseError(f"{path}: {method} parameter {name!r} must be finite, got {value!r}")
  return v


# Flax `MultiHeadDotProductAttention` (linen and nnx) names its DenseGeneral projections so:
# query / key / value contract one input axis ([in, heads, head_dim]), out contracts two
# ([heads, head_dim, out]).
ATTENTION_IN_AXES = {"query": 1, "key": 1, "value": 1, "out": 2}

# A matrix view: (k, flax). PyTorch (flax False): the tensor is [out, in] (k = 1 leading output
# axis). Flax (flax True): its first k axes are the input axes, the rest the output axes, so
# the PyTorch matrix is reshape(prod(in), prod(out))ᵀ. None: not a weight matrix.
View = tuple[int, bool] | None


def decomposes(method: Method) -> bool:
  """Whether ``method`` is one of this module's matrix merges (its recipe is defined here)."""
  return getattr(method.recipe, "__module__", None) == __name__



def matrix_view(info) -> View:
  """How a tensor is seen as a PyTorch ``[out, in]`` weight matrix, from its role; None when it
  is not one (then the subspace methods average it).

  PyTorch layout: every 2-D tensor, as stored (FusionBench's rule). Flax layout, by leaf name:
  a 2-D ``kernel`` (Dense ``[in, out]``, transposed); a 3-D ``kernel`` of an attention
  DenseGeneral (`ATTENTION_IN_AXES`: ``[in, H, D]`` → ``[H·D, in]``, ``[H, D, out]`` →
  ``[out, H·D]``: the matrices PyTorch's ``nn.MultiheadAttention`` / CLIP store); a 2-D
  ``embedding`` (``[V, D]``, as PyTorch's ``nn.Embedding`` stores it). Biases (DenseGeneral's
  ``[H, D]`` too), scales, convolution kernels and other parameters are not matrices.
  """
  shape, path = tuple(info.shape), info.path
  if info.layout != "flax":
    return (1, False) if len(shape) == 2 else None
  parts = path.replace(".", "/").split("/")
  leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
  if leaf == "kernel" and len(shape) == 2:
    return (1, True)
  if leaf == "kernel" and len(shape) == 3 and parent in ATTENTION_IN_AXES:
    return (ATTENTION_IN_AXES[parent], True)
  if leaf == "embedding" and len(shape) == 2:
    return (1, False)
  return None


def matrix_shape(shape, view: View) -> tuple[int, int]:
  """The ``[out, in]`` shape of a tensor of ``shape`` seen through ``view``."""
  k, flax = view
  a, b = math.prod(shape[:k]), math.prod(shape[k:])
  return (b, a) if flax else (a, b)


def to_matrices(v: jax.Array, view: View) -> jax.Array:
  """Stacked tensors ``v`` [T, *shape] → PyTorch matrices [T, out, in]."""
  k, flax = view
  t, shape = v.shape[0], v.shape[1:]
  x = v.reshape((t, math.prod(shape[:k]), math.prod(shape[k:])))
  return jnp.swapaxes(x, 1, 2) if flax else x


def from_matrix(d: jax.Array, shape, view: View) -> jax.Array:
  """A PyTorch ``[out, in]`` matrix back to the tensor's own ``shape`` (`to_matrices`' inverse)."""
  return (d.T if view[1] else d).reshape(shape)


def polar(a: jax.Array) -> jax.Array:
  """The orthogonal polar factor of ``a`` (m×k): P Qᵀ from the thin SVD a = P Σ Qᵀ."""
  p, _, qt = jnp.linalg.svd(a, full_matrices=False)
  return p @ qt


def solve_dtype(dtype) -> jnp.dtype:
  """The dtype an SVD / matrix solve runs in: float16 and bfloat16 tensors are decomposed in
  float32 (LAPACK has no half-precision SVD; the result is cast back), wider floats as they are."""
  return jnp.promote_types(dtype, jnp.float32)


def matrix_stage(fn: Callable[[jax.Array, dict], jax.Array], view: View) -> Stage:
  """Stage over task vectors: a matrix (``view``, `matrix_view`) goes through
  ``fn(τ [T, out, in], hp) -> Δ [out, in]``, seen in PyTorch layout; any other tensor is
  averaged."""

  def apply(s: MergeState) -> MergeState:
    v = s.values
    if view is None or v.size == 0:   # zero-size matrices: nothing to decompose
      return s.replace(result=S.sum_models(v) / v.shape[0])
    d = fn(to_matrices(v.astype(solve_dtype(v.dtype)), view), s.hp)
    return s.replace(result=from_matrix(d, v.shape[1:], view).astype(v.dtype))

  return apply


def _subspace_prepare(method_name: str, min_rank_per_task: bool = False):
  """Static ``view`` (`matrix_view`) from the tensor's role and layout; λ (and every other
  float) checked finite."""

  def prepare(method, values, info, n, ctx=NATIVE):
    for p in method.params:
      if p.kind is float and not p.static and values.get(p.name) is not None:
        check_finite_param(method.name, p.name, values[p.name], info.path)
    view = matrix_view(info)
    if min_rank_per_task and view is not None:
      m, k = matrix_shape(info.shape, view)
      if 0 < min(m, k) < n:
        raise KfuseError(f"{info.path}: {method.name} keeps ⌊r/T⌋ singular triplets per task and"
                         f" this {m}x{k} matrix has rank r <= {min(m, k)} < T = {n} tasks (every"
                         f" task would keep none)")
    static, hp = default_prepare(method, values, info, n, ctx)
    static["view"] = view
    return static, hp

  return prepare


# ------------------------------------------------------------------ TSV-M


def tsv_m_delta(tv: jax.Array, hp=None) -> jax.Array:
  """TSV-M merged task matrix from task matrices ``tv`` [T, m, n].

  k = ⌊r/T⌋ with r = min(m, n); τ_i = U_i S_i V_iᵀ; Ū = [U_1[:, :k] … U_T[:, :k]],
  s̄ = [S_1[:k] … S_T[:k]], V̄ = [V_1[:, :k] … V_T[:, :k]];
  Δ = polar(Ū) diag(s̄) polar(V̄)ᵀ. (FusionBench pads Ū, s̄, V̄ with zero
  columns to r; those multiply s = 0 and change nothing.)
  """
  t, m, n = tv.shape
  k = min(m, n) // t
  u, s, vh = jnp.linalg.svd(tv, full_matrices=False)
  ub = jnp.concatenate([u[i, :, :k] for i in range(t)], axis=1)        # [m, T k]
  sb = jnp.concatenate([s[i, :k] for i in range(t)])                   # [T k]
  vb = jnp.concatenate([vh[i, :k, :] for i in range(t)], axis=0)       # [T k, n]
  return (polar(ub) * sb[None, :]) @ polar(vb)


def _scaled(fn):
  def build(view: View = None):
    return chain(S.task_vectors(), matrix_stage(fn, view), S.scale("lambda"), S.add_base())
  return build


_LAMBDA = Param("lambda", 1.0, mergekit=False, doc="scale λ of the merged task vector")

TSV_M = register(Method(
    name="tsv_m", recipe=_scaled(tsv_m_delta), params=(_LAMBDA,), base="required",
    prepare=_subspace_prepare("tsv_m", min_rank_per_task=True), doc="""TSV-M (Task Singular Vectors: Merge).

  Per matrix τ_i = U_i S_i V_iᵀ (PyTorch [out, in]; Flax kernels seen so),
  r = min(out, in), k = ⌊r/T⌋: stack each task's top-k triplets,
  Ū = [U_i[:, :k]]_i, s̄ = [S_i[:k]]_i, V̄ = [V_i[:, :k]]_i; orthogonalise by
  polar decomposition (Ū = PΣQᵀ → U⊥ = PQᵀ, likewise V⊥);
  θ = θ_b + λ·U⊥ diag(s̄) V⊥ᵀ. Non-matrix tensors: θ_b + λ·mean_i τ_i.
  T > r (no triplet per task) is refused naming the tensor.
  Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
  Merging", CVPR 2025; FusionBench `TaskSingularVectorMerging` (alpha = λ = 1;
  the paper picks λ on a validation set).""", elementwise=False))


# ------------------------------------------------------------------ Iso-C / Iso-CTS


def iso_c_delta(tv: jax.Array, hp=None) -> jax.Array:
  """Iso-C: M = Σ_i τ_i = U S Vᵀ; Δ = mean(S)·U Vᵀ (the spectrum flattened to its mean)."""
  u, s, vh = jnp.linalg.svd(S.sum_models(tv), full_matrices=False)
  return (u * jnp.mean(s)) @ vh


def iso_cts_split(r: int, t: int, fraction: float) -> tuple[int, int]:
  """(k_c, k_t): common-subspace rank and per-task rank of Iso-CTS for rank r, T tasks.

  k_c = ⌊f·r⌋, then moved so the task-specific rest divides by T:
  k_c = r − T·round((r − k_c)/T) (Python's round, half to even, as FusionBench);
  k_t = (r − k_c)/T.
  """
  kc = int(r * fraction)
  kc = r - round((r - kc) / t) * t
  return kc, (r - kc) // t


def iso_cts_delta(tv: jax.Array, hp=None, fraction: float = 0.8) -> jax.Array:
  """Iso-CTS merged task matrix from ``tv`` [T, m, n] (see `ISO_CTS`)."""
  u, s, vt = iso_cts_factors(tv, fraction)
  return (u * s) @ vt


def iso_cts_factors(tv: jax.Array, fraction: float = 0.8):
  """Iso-CTS's merged matrix as rank-1 components: (U⊥ [m, r], mean(s̄) [r], V⊥ᵀ [r, n]),
  columns in stacking order [task 1 … task T blocks, common block]; `iso_cts_delta` = U⊥ diag(s) V⊥ᵀ."""
  t, m, n = tv.shape
  kc, kt = iso_cts_split(min(m, n), t, fraction)
  u, s, vh = jnp.linalg.svd(S.sum_models(tv), full_matrices=False)
  uc, sc, vc = u[:, :kc], s[:kc], vh[:kc, :]
  ublocks, sblocks, vblocks = [], [], []
  if kt:
    ts = tv - jnp.einsum("mc,tcn->tmn", uc, jnp.einsum("mc,tmn->tcn", uc, tv))
    ut, st, vt = jnp.linalg.svd(ts, full_matrices=False)
    ublocks = [ut[i, :, :kt] for i in range(t)]
    sblocks = [st[i, :kt] for i in range(t)]
    vblocks = [vt[i, :kt, :] for i in range(t)]
  ub = jnp.concatenate(ublocks + [uc], axis=1)
  sb = jnp.concatenate(sblocks + [sc])
  vb = jnp.concatenate(vblocks + [vc], axis=0)
  return polar(ub), jnp.full(sb.shape, jnp.mean(sb)), polar(vb)


ISO_C = register(Method(
    name="iso_c", recipe=_scaled(iso_c_delta), params=(_LAMBDA,), base="required",
    prepare=_subspace_prepare("iso_c"), doc="""Iso-C (isotropic merging in the common subspace).

  Per matrix M = Σ_i τ_i = U S Vᵀ; θ = θ_b + λ·mean(S)·U Vᵀ (every singular
  value replaced by their mean). Non-matrix tensors: θ_b + λ·mean_i τ_i.
  Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025; FusionBench `ISO_C_Merge` (scaling_factor
  1.0; its docs and the paper's validation sweep use about 1.5).""", elementwise=False))


def _iso_cts_recipe(view: View = None, common_space_fraction: float = 0.8):
  fn = lambda tv, hp: iso_cts_delta(tv, hp, float(common_space_fraction))
  return chain(S.task_vectors(), matrix_stage(fn, view), S.scale("lambda"), S.add_base())


def _iso_cts_prepare(method, values, info, n, ctx=NATIVE):
  f = check_finite_param(method.name, "common_space_fraction", values["common_space_fraction"],
                         info.path)
  if not 0 < f <= 1:
    raise KfuseError(f"{info.path}: iso_cts common_space_fraction must be in (0, 1], got {f}")
  return _subspace_prepare("iso_cts")(method, values, info, n, ctx)


ISO_CTS = register(Method(
    name="iso_cts", recipe=_iso_cts_recipe, params=(
        _LAMBDA, Param("common_space_fraction", 0.8, static=True, mergekit=False,
                       doc="fraction of the rank kept as the common subspace")),
    base="required", prepare=_iso_cts_prepare, doc="""Iso-CTS (isotropic merging, common and task-specific subspaces).

  Per matrix (PyTorch [out, in]): M = Σ_i τ_i = U S Vᵀ, r = min(out, in);
  k_c = r − T·round((r − ⌊f·r⌋)/T), k_t = (r − k_c)/T (f = 0.8);
  common block (U[:, :k_c], S[:k_c], V[:, :k_c]); per task the top-k_t triplets
  of τ_i − U_c U_cᵀ τ_i; stack [task blocks…, common], orthogonalise Ū and V̄ by
  polar decomposition, flatten s̄ to its mean:
  θ = θ_b + λ·mean(s̄)·U⊥ V⊥ᵀ. Non-matrix tensors: θ_b + λ·mean_i τ_i.
  Marczak et al., ICML 2025; FusionBench `ISO_CTS_Merge` (scaling_factor 1.0,
  common_space_fraction 0.8).""", elementwise=False))


# ------------------------------------------------------------------ WUDI


def _wudi_terms(tv: jax.Array):
  """c_i = 1/‖τ_i‖²_F (0 for an all-zero task vector, whose loss term is identically 0)."""
  nrm = jnp.sum(jnp.square(tv), axis=(1, 2))
  return jnp.where(nrm > 0, 1.0 / jnp.where(nrm > 0, nrm, 1.0), 0.0).astype(tv.dtype)


def wudi_loss(tau: jax.Array, tv: jax.Array) -> jax.Array:
  """L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F for PyTorch-layout [out, in] matrices."""
  c = _wudi_terms(tv)
  prod = jnp.einsum("tmn,tkn->tmk", tau[None] - tv, tv)
  return jnp.sum(c * jnp.sum(jnp.square(prod), axis=(1, 2)))


def wudi_grad_fn(tv: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """∇L(τ) = 2 Σ_i c_i (τ − τ_i) τ_iᵀ τ_i, in whichever form costs fewer flops per step:
  Gram form 2(τ A − B) with A = Σ c_i τ_iᵀτ_i [in, in], B = Σ c_i τ_i τ_iᵀ τ_i
  (m·n² per step), or per task (4·T·m²·n per step)."""
  t, m, n = tv.shape
  c = _wudi_terms(tv)
  if n <= 2 * t * m:
    a = jnp.einsum("t,tmi,tmj->ij", c, tv, tv)
    b = jnp.einsum("t,tmk,tnk,tnj->mj", c, tv, tv, tv)
    return lambda tau: 2.0 * (tau @ a - b)

  def grad(tau):
    prod = jnp.einsum("tmn,tkn->tmk", tau[None] - tv, tv)
    return 2.0 * jnp.einsum("t,tmk,tkn->mn", c, prod, tv)

  return grad


def wudi_adam(tv: jax.Array, steps: int = 300, lr: float = 1e-5) -> jax.Array:
  """WUDI by Adam (β = (0.9, 0.999), ε = 1e-8, PyTorch's defaults) from τ = Σ_i τ_i:
  ``steps`` updates in one `lax.fori_loop` (one compiled program)."""
  import optax  # here, not at module level: only WUDI needs it, and every merge job imports this module
  grad = wudi_grad_fn(tv)
  opt = optax.adam(lr)
  tau0 = S.sum_models(tv)

  def body(_, carry):
    tau, st = carry
    upd, st = opt.update(grad(tau), st, tau)
    return optax.apply_updates(tau, upd), st

  tau, _ = jax.lax.fori_loop(0, steps, body, (tau0, opt.init(tau0)))
  return tau


def wudi_closed_form(tv: jax.Array) -> jax.Array:
  """The exact minimiser of the WUDI loss (a convex quadratic): ∇L = 0 ⇔ τ A = B, so
  τ* = B A⁺ (the minimum-norm solution when A is singular), computed as
  τ* = Y (X Xᵀ)⁺ X with X = [√c_i τ_i]_i ([T·out, in]) when T·out < in (same value)."""
  t, m, n = tv.shape
  c = _wudi_terms(tv)
  b = jnp.einsum("t,tmk,tnk,tnj->mj", c, tv, tv, tv)
  if n <= t * m:
    a = jnp.einsum("t,tmi,tmj->ij", c, tv, tv)
    return b @ jnp.linalg.pinv(a, hermitian=True)
  x = (jnp.sqrt(c)[:, None, None] * tv).reshape(t * m, n)
  y = jnp.einsum("t,tmk,tnk->mtn", jnp.sqrt(c), tv, tv).reshape(m, t * m)
  return y @ jnp.linalg.pinv(x @ x.T, hermitian=True) @ x


def _wudi_recipe(view: View = None, steps: int = 300, solver: str = "adam"):
  def fn(tv, hp):
    if solver == "closed_form":
      return wudi_closed_form(tv)
    return wudi_adam(tv, int(steps), hp["lr"])
  return chain(S.task_vectors(), matrix_stage(fn, view), S.scale("lambda"), S.add_base())


def _wudi_prepare(method, values, info, n, ctx=NATIVE):
  if values["solver"] not in ("adam", "closed_form"):
    raise KfuseError(f"{info.path}: wudi solver must be 'adam' or 'closed_form', got"
                     f" {values['solver']!r}")
  if int(values["steps"]) < 0:
    raise KfuseError(f"{info.path}: wudi steps must be >= 0, got {values['steps']}")
  return _subspace_prepare("wudi")(method, values, info, n, ctx)


WUDI = register(Method(
    name="wudi", recipe=_wudi_recipe, params=(
        _LAMBDA,
        Param("steps", 300, static=True, kind=int, mergekit=False, doc="Adam steps"),
        Param("lr", 1e-5, mergekit=False, doc="Adam learning rate"),
        Param("solver", "adam", static=True, kind=str, mergekit=False,
              doc="'adam' (paper) or 'closed_form' (the exact minimiser)")),
    base="required", prepare=_wudi_prepare, doc="""WUDI-Merging (task vectors as a proxy for the data).

  Per matrix (PyTorch [out, in]: τ τ_iᵀ contracts the input axis; Flax kernels
  seen so, `matrix_view`), minimise L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F from
  τ = Σ_i τ_i with Adam (lr 1e-5, 300 steps, PyTorch's β, ε) in one compiled
  loop; an all-zero τ_i contributes nothing. ``solver='closed_form'``: the exact
  minimiser τ* = B A⁺, A = Σ c_i τ_iᵀ τ_i, B = Σ c_i τ_i τ_iᵀ τ_i, c_i = 1/‖τ_i‖²
  (the closed-form reading of ACE-Merging, CVPR 2026; Adam at lr 1e-5 does not
  reach it in 300 steps, so the two differ). θ = θ_b + λ·τ (λ = 1: the paper
  has no scale). Non-matrix tensors: θ_b + λ·mean_i τ_i.
  Cheng et al., "Whoever Started the Interference Should End It: Guiding
  Data-Free Model Merging via Task Vectors", ICML 2025; FusionBench
  `WUDIMerging` (its config: 400 steps; the official code: 300).""",
    elementwise=False))


# ------------------------------------------------------------------ SVC


def svc_calibrate(delta: jax.Array, tv: jax.Array, alpha) -> jax.Array:
  """Singular Value Calibration of a merged task matrix ``delta`` [m, n] given the task
  matrices ``tv`` [T, m, n] (PyTorch layout).

  ΔW = U Σ Vᵀ; a_r = u_rᵀ ΔW, a_r^i = u_rᵀ τ_i; s_r^i = ⟨a_r, a_r^i⟩ / max(‖a_r^i‖², 1e-12);
  γ_r = T / Σ_i max(α, s_r^i); result U diag(γ ⊙ Σ) Vᵀ.
  """
  t = tv.shape[0]
  u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
  merged = u.T @ delta                                       # [r, n]
  total = jnp.zeros_like(s)
  for i in range(t):                                         # one [r, n] response at a time
    a = u.T @ tv[i]
    coef = jnp.sum(merged * a, axis=1) / jnp.maximum(jnp.sum(a * a, axis=1), 1e-12)
    total = total + jnp.maximum(coef, alpha)
  gamma = t / total
  return (u * (gamma * s)[None, :]) @ vh


def svc(view: View = None, name: str = "svc_alpha") -> Callable[[Stage], Stage]:
  """Wrap a recipe with the SVC post-step: the wrapped recipe's merged matrix θ_m gives
  ΔW = θ_m − θ_b, calibrated against the original task vectors θ_i − θ_b (`svc_calibrate`,
  α = ``hp[name]``, in PyTorch layout through ``view``); θ = θ_b + calibrated ΔW.
  Non-matrix tensors (``view`` None) are left as merged."""

  def wrap(inner: Stage) -> Stage:
    def apply(s: MergeState) -> MergeState:
      out = inner(s)
      if view is None or s.values.size == 0:
        return out
      w = solve_dtype(s.base.dtype)
      base = s.base.astype(w)
      tv = to_matrices(s.values.astype(w) - base[None], view)
      delta = to_matrices((out.result.astype(w) - base)[None], view)[0]
      cal = svc_calibrate(delta, tv, s.hp[name].astype(w))
      return out.replace(result=(base + from_matrix(cal, base.shape, view)).astype(s.base.dtype))
    return apply

  return wrap


def with_svc(method, name: str | None = None, alpha: float = 0.1,
             defaults: Mapping[str, object] | None = None, doc: str | None = None) -> Method:
  """``method`` followed by the SVC post-step, as a new (unregistered) `Method`.

  It takes the method's parameters plus ``svc_alpha`` (default ``alpha``);
  ``defaults`` overrides other parameters' defaults (e.g. λ). It needs a base.
  """
  m = get_method(method)
  if m.base != "required":
    raise KfuseError(f"with_svc: method {m.name!r} does not take a base model, which SVC needs")
  over = dict(defaults or {})
  unknown = set(over) - set(m.param_map)
  if unknown:
    raise KfuseError(f"with_svc: unknown parameter(s) {sorted(unknown)} for method {m.name!r}")
  params = tuple(dataclasses.replace(p, default=over[p.name]) if p.name in over else p
                 for p in m.params)
  params += (Param("svc_alpha", alpha, mergekit=False,
                   doc="SVC's α: projection coefficients below α count as α"),)
  inner_prepare = m.prepare or default_prepare

  def prepare(method_, values, info, n, ctx=NATIVE):
    a = check_finite_param(method_.name, "svc_alpha", values["svc_alpha"], info.path)
    static, hp = inner_prepare(method_, values, info, n, ctx)
    hp["svc_alpha"] = _arr(a)
    return {**static, "svc_view": matrix_view(info)}, hp

  def recipe(svc_view: View = None, **static):
    return svc(svc_view)(m.recipe(**static))

  name = name or f"{m.name}_svc"
  text = doc or (f"{m.name} followed by Singular Value Calibration (α = {alpha}).\n\n  "
                 + SVC_DOC + "\n\n  Base method:\n  " + m.doc)
  return dataclasses.replace(m, name=name, recipe=recipe, params=params, prepare=prepare,
                             elementwise=False, doc=text)


SVC_DOC = """SVC post-step, per matrix (PyTorch [out, in]; Flax kernels seen so, `matrix_view`):
  ΔW = θ_m − θ_b = U Σ Vᵀ; for each left singular vector u_r and task i,
  s_r^i = ⟨u_rᵀΔW, u_rᵀτ_i⟩ / ‖u_rᵀτ_i‖²; γ_r = T / Σ_i max(α, s_r^i);
  θ = θ_b + U diag(γ ⊙ Σ) Vᵀ. Non-matrix tensors are left as merged.
  "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging"
  (arXiv:2602.05536); FusionBench `SingularValueCalibration` (α per base method:
  0.1 for TA, TIES, Iso-C; 0.2 for Iso-CTS; 1.0 for TSV-M and WUDI). After a
  flat-spectrum merge (Iso-C, Iso-CTS) the singular vectors are not unique and
  neither is the calibration."""

# The registered variants, with FusionBench's defaults for each base method. Not after
# iso_c / iso_cts: their merged matrix has one repeated singular value (a flat spectrum), so
# its singular vectors -- and SVC's γ_r -- are not unique: rounding picks the basis (a
# compiled and an op-by-op run differ by 40%, so do kfuse and FusionBench).
# `with_svc("iso_cts", alpha=0.2)` still builds it, for that reason unregistered.
SVC_VARIANTS = {
    "task_arithmetic_svc": ("task_arithmetic", 0.1, {"lambda": 0.3}),
    "ties_svc": ("ties", 0.1, {"density": 0.2, "normalize": False, "lambda": 0.3}),
    "tsv_m_svc": ("tsv_m", 1.0, {}),
    "wudi_svc": ("wudi", 1.0, {}),
}

for _name, (_of, _alpha, _defaults) in SVC_VARIANTS.items():
  register(with_svc(_of, _name, _alpha, _defaults))
