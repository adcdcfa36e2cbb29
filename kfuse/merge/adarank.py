"""AdaRank: learned binary masks over the rank-1 components of each task vector.

Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Model Merging", ICLR 2026
(arXiv 2503.22178; reference implementation github.com/david3684/AdaRank,
``vision/src/models/merge_vit/adaptive.py``). Per expert i and weight matrix p,

    τ_{i,p} = θ_{i,p} − θ_o,p = U_{i,p} diag(s_{i,p}) V_{i,p}ᵀ          (thin SVD, r = min(m, n))
    τ̂_{i,p}(B) = U_{i,p} diag(B_{i,p} ⊙ s_{i,p}) V_{i,p}ᵀ               B_{i,p} ∈ {0, 1}^r
    θ_p(λ, B) = θ_o,p + Σ_i λ_{i,p} τ̂_{i,p}(B)                        (other tensors: τ̂ = τ)
    min_{λ, B} Σ_t mean_b H(softmax(f_t(θ(λ, B); x_{t,b})))              (AdaMerging's entropy)

The mask is relaxed as the reference does: real logits m, gate g = σ(m / T) and a
**straight-through estimator** (Bengio et al. 2013) — the forward pass uses the hard
B = 1[g > 0.5] (= 1[m > 0]), the backward pass the gradient of the soft gate:

    B_ste = g + stop_gradient(1[g > 0.5] − g)      ∂L/∂m = ∂L/∂B · g(1 − g) / T

(``straight_through=False`` is the reference's ``soft_mask`` option: B = g in both passes.)
The reference has no hard-concrete noise and no sparsity penalty; the entropy alone decides
which components are pruned. Initial logits: +0.1 for the first ⌈ρ·r⌉ components
(``initial_rank_ratio`` ρ) and −0.1 for the rest (soft masks: 2.0 / 0.0), T = 10, one λ per
expert and tensor ("layer-wise", as AdaMerging), Adam lr 1e-3 on both.

Bases (``base``), the reference's two variants and Iso-CTS:
- ``'ta'``: θ_o = θ_0 (the pretrained model), τ_i = θ_i − θ_0; λ₀ = 0.3, ρ = 1 (every
  component kept at the start: with frozen λ and masks this is task arithmetic, λ = 0.3).
- ``'cart'``: θ_o = (1/N) Σ θ_i (CART, Choi et al. 2024: "Revisiting weight averaging for
  model merging"), τ_i = θ_i − θ_o; the reference's 8-task ViT-B/32 config λ₀ = 2.3, ρ = 0.16.

- ``'iso_cts'`` (kfuse's, not in the reference code, which has TA and CART only; the issue's
  "AdaRank on Iso-CTS" row): the masks act on the rank-1 components of the **Iso-CTS merged
  matrix** instead of each τ_i's. Per matrix (`kfuse.merge.subspace.iso_cts_factors`, Marczak
  et al., ICML 2025): Δ = σ̄ U⊥ V⊥ᵀ = Σ_j σ̄ u_j v_jᵀ, r = min(m, n) components in Iso-CTS's
  stacking order [task 1 … task T blocks of k_t, common block of k_c] (U⊥, V⊥ orthonormal:
  an SVD of Δ whose basis is the one Iso-CTS builds, so each component belongs to one task's
  block or to the common subspace). One "expert" (N = 1):

      θ_p(λ, B) = θ_0,p + λ_p σ̄_p U⊥,p diag(B_p) V⊥,pᵀ      (matrices: `subspace.matrix_view`)
      θ_p(λ)    = θ_0,p + λ_p (1/N) Σ_i τ_{i,p}               (other tensors, as Iso-CTS)

  λ₀ = 1 and every component kept at the start: with frozen λ and masks this is the registered
  ``iso_cts`` (λ = 1, f = ``common_space_fraction`` = 0.8). ρ < 1 keeps the first ⌈ρ·r⌉
  components in the stacking order above.

Which tensors are masked (``matrix_split``; ``'iso_cts'``: `subspace.matrix_view`'s matrices): every 2-D weight (``kernel`` / ``weight``), and a 3-D
``DenseGeneral`` attention kernel ([in, heads, dim] or [heads, dim, out]) read as the
most-square matrix (the [d, d] projection PyTorch's CLIP holds). Biases, norms, embeddings
and convolution kernels keep their whole τ (the reference masks only the attention / MLP
weights). Flax [in, out] vs PyTorch [out, in] does not matter: the SVD of the transpose has
the same rank-1 components.

Step protocol (`kfuse.protocol`), the same as `kfuse.merge.adamerging`, whose merged forward
(`adamerging.merge_params`) and entropy (`adamerging.objective_fn`) it uses:

    learner = adarank(apply_fn, base="ta", tasks=T)
    state = learner.init(pretrained, experts, {"x": x_example})
    state, metrics = learner.step(state, {"x": x}, key)     # jitted; key unused
    merged = merged(state)                                 # θ(λ, B) with the hard masks
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import tree as T
from kfuse.merge import adamerging as AM
from kfuse.merge import api
from kfuse.merge import subspace as SS
from kfuse.merge.core import TensorInfo
from kfuse.protocol import Learner
from kfuse.tree import KfuseError

PyTree = Any
Array = jax.Array

__all__ = ["AdaRankState", "adarank", "merged", "masks", "objective_fn", "matrix_split",
           "BASES", "DEFAULTS"]

BASES = ("ta", "cart", "iso_cts")
# the reference's configs: vision/configs/adarank_B_T8/adarank_{TA,CART}.yaml (+ hydra_default);
# iso_cts: Iso-CTS's own scale (FusionBench scaling_factor 1.0), every component kept at first
DEFAULTS = {"ta": {"init": 0.3, "initial_rank_ratio": 1.0},
            "cart": {"init": 2.3, "initial_rank_ratio": 0.16},
            "iso_cts": {"init": 1.0, "initial_rank_ratio": 1.0}}


class AdaRankState(NamedTuple):
  """lambdas ``[N, P]``; mask logits, one ``[N, r_p]`` per masked matrix (flatten order);
  the optimizer state; θ_o; per tensor either the SVD ``(U [N, m, r], s [N, r], Vᵀ [N, r, n])``
  of its task vectors or the stacked task vectors ``[N, ...]`` (frozen); the step."""
  lambdas: Array
  logits: tuple
  opt_state: Any
  origin: PyTree
  parts: tuple
  count: Array


def matrix_split(path: str, shape: tuple) -> int | None:
  """k such that the tensor is the matrix ``[prod(shape[:k]), prod(shape[k:])]``, or None
  (not masked). Only weights are masked (the leaf is ``kernel`` or ``weight``, as the
  reference masks the attention / MLP weights): 2-D: k = 1; 3-D (Flax DenseGeneral): the
  most square split. Everything else (biases, norms, embeddings, convolution kernels): None."""
  if path.rsplit("/", 1)[-1] not in ("kernel", "weight") or min(shape, default=0) == 0:
    return None
  if len(shape) == 2:
    return 1
  if len(shape) == 3:
    return min((1, 2), key=lambda k: abs(math.prod(shape[:k]) - math.prod(shape[k:])))
  return None


def _decompose(tau: Array, k: int):
  """Thin SVD of the stacked task matrices ``tau [N, ...]`` read at split k."""
  n = tau.shape[0]
  mat = tau.reshape(n, math.prod(tau.shape[1:k + 1]), -1)
  u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
  return (u, s, vt)


def _iso_cts_part(tau: Array, view, fraction: float):
  """The Iso-CTS 'expert' of one tensor (a leading axis of 1): for a matrix (``view``,
  `kfuse.merge.subspace.matrix_view`), the rank-1 components of Iso-CTS's merged matrix
  (`subspace.iso_cts_factors`, computed on the PyTorch ``[out, in]`` view as the registered
  ``iso_cts`` does) re-expressed in the tensor's own row-major layout ``[a, b]`` (a Flax view
  is the transpose: U' = V⊥, V'ᵀ = U⊥ᵀ); any other tensor: the mean task vector."""
  if view is None or tau.size == 0:
    return jnp.mean(tau, axis=0, keepdims=True)
  u, s, vt = SS.iso_cts_factors(SS.to_matrices(tau.astype(SS.solve_dtype(tau.dtype)), view),
                                fraction)
  if view[1]:
    u, vt = vt.T, u.T
  return (u[None], s[None], vt[None])


def _task_vectors(parts: tuple, gates: Sequence[Array], like: PyTree) -> PyTree:
  """τ̂ per tensor: U diag(gate ⊙ s) Vᵀ reshaped back, or τ (flatten order of ``like``)."""
  leaves, treedef = jax.tree.flatten(like)
  out, j = [], 0
  for b, part in zip(leaves, parts):
    if isinstance(part, tuple):
      u, s, vt = part
      out.append(((u * (gates[j] * s)[:, None, :]) @ vt).reshape((u.shape[0],) + b.shape))
      j += 1
    else:
      out.append(part)
  return jax.tree.unflatten(treedef, out)


def objective_fn(apply_fn: Callable, tasks: int | None = None) -> Callable:
  """``L(lambdas, gates, origin, parts, x)``: the entropy of θ(λ, B = gates), with
  continuous gates (for gradient checks; the learner feeds the straight-through masks)."""
  entropy_of = AM.objective_fn(apply_fn, tasks)

  def objective(lambdas, gates, origin, parts, x):
    return entropy_of(lambdas, origin, _task_vectors(parts, gates, origin), x)

  return objective


def _gates(logits: Sequence[Array], temperature: float, straight_through: bool) -> list:
  out = []
  for m in logits:
    g = jax.nn.sigmoid(m / temperature)
    out.append(g + jax.lax.stop_gradient((g > 0.5).astype(g.dtype) - g) if straight_through
               else g)
  return out


def masks(state: AdaRankState, straight_through: bool = True, temperature: float = 10.0) -> list:
  """The forward masks B (hard 0/1 with the straight-through estimator, else σ(m/T))."""
  return [np.asarray(g) for g in _gates(state.logits, temperature, straight_through)]


def merged(state: AdaRankState, straight_through: bool = True, temperature: float = 10.0
           ) -> PyTree:
  """θ(λ, B) of ``state`` with the forward masks (`masks`)."""
  gates = _gates(state.logits, temperature, straight_through)
  return AM.merge_params(state.origin, _task_vectors(state.parts, gates, state.origin),
                         state.lambdas)


def adarank(apply_fn: Callable, *, base: str = "ta", init: float | None = None,
            initial_rank_ratio: float | None = None, temperature: float = 10.0,
            straight_through: bool = True, optimizer: Any = None, tasks: int | None = None,
            split: Callable[[str, tuple], int | None] = matrix_split,
            common_space_fraction: float = 0.8) -> Learner:
  """AdaRank as a `Learner` (see the module doc).

  Args:
    apply_fn: ``(params, x) -> logits`` or, with ``tasks``, ``(params, x, t) -> logits``.
    base: 'ta' (θ_0 origin), 'cart' (the experts' mean as origin) or 'iso_cts' (masks over
      the components of the Iso-CTS merged matrix; module doc).
    init: initial λ (None: the base's default, 0.3 / 2.3 / 1.0).
    initial_rank_ratio: fraction ρ of each matrix's components kept at the start (None:
      the base's default, 1.0 / 0.16 / 1.0).
    temperature: T of the gate σ(m / T) (10).
    straight_through: hard masks forward, soft-gate gradient backward (True, the paper);
      False: soft gates σ(m/T) in both passes.
    optimizer: an optax transformation or a `kfuse.optim` config; None: Adam(1e-3).
    tasks: number of tasks T when each step scores T per-task batches ``[T, B, ...]``.
    split: ``(path, shape) -> k | None``: which tensors are masked and as what matrix ('ta' /
      'cart'; 'iso_cts' masks the matrices `kfuse.merge.subspace.matrix_view` names, as the
      registered ``iso_cts`` merges them).
    common_space_fraction: Iso-CTS's common-subspace fraction f ('iso_cts' only; 0.8).
  """
  if base not in BASES:
    from kfuse.registry import suggest
    raise KfuseError(f"adarank: unknown base {base!r}{suggest(base, BASES)};"
                     f" known: {', '.join(BASES)}")
  init = DEFAULTS[base]["init"] if init is None else float(init)
  rho = DEFAULTS[base]["initial_rank_ratio"] if initial_rank_ratio is None else float(initial_rank_ratio)
  if not 0.0 <= rho <= 1.0:
    raise KfuseError(f"adarank: initial_rank_ratio must be in [0, 1], got {rho}")
  if not (math.isfinite(float(temperature)) and float(temperature) > 0):
    raise KfuseError(f"adarank: temperature must be > 0, got {temperature}")
  if tasks is not None and int(tasks) < 1:
    raise KfuseError(f"adarank: tasks must be >= 1, got {tasks}")
  fraction = float(common_space_fraction)
  if not 0.0 < fraction <= 1.0:
    raise KfuseError(f"adarank: common_space_fraction must be in (0, 1], got {common_space_fraction}")
  tx = AM._optimizer(optimizer)
  objective = objective_fn(apply_fn, tasks)
  on, off = (2.0, 0.0) if not straight_through else (0.1, -0.1)

  def loss_fn(trainable, origin, parts, x):
    gates = _gates(trainable["logits"], temperature, straight_through)
    return objective(trainable["lambdas"], gates, origin, parts, x)


  def init_fn(pretrained: PyTree, experts: Sequence[PyTree],
              batch: Mapping[str, Any] | None = None, key: Array | None = None) -> AdaRankState:
    experts = list(experts)
    if not experts:
      raise KfuseError("adarank: no experts")
    T.check_same_structure([pretrained] + experts,
                           ["pretrained"] + [f"expert[{i}]" for i in range(len(experts))])
    for i, e in enumerate(experts):
      T.check_finite(e, f"expert[{i}]")
    stacked = jax.tree.map(lambda *e: jnp.stack([jnp.asarray(a) for a in e]), *experts)
    origin = (jax.tree.map(lambda s: jnp.mean(s, axis=0), stacked) if base == "cart"
              else jax.tree.map(jnp.asarray, pretrained))
    paths = T.paths(origin)
    leaves, treedef = jax.tree.flatten(origin)
    taus = treedef.flatten_up_to(jax.tree.map(lambda s, o: s - o[None], stacked, origin))
    layout = api.layout_of(paths)
    parts, logits = [], []
    for path, o, tau in zip(paths, leaves, taus):
      if base == "iso_cts":
        part = _iso_cts_part(tau, SS.matrix_view(TensorInfo(path, tuple(o.shape), o.dtype,
                                                              layout=layout)), fraction)
      else:
        k = split(path, tuple(o.shape))
        part = tau if k is None else _decompose(tau, k)
      parts.append(part)
      if not isinstance(part, tuple):
        continue
      n_, r = part[1].shape
      keep = min(r, int(math.ceil(rho * r)))
      m = np.full((n_, r), off, np.float32)
      m[:, :keep] = on
      logits.append(jnp.asarray(m))
    n, p = (1 if base == "iso_cts" else len(experts)), len(leaves)
    lambdas = jnp.full((n, p), init, jnp.float32)
    trainable = {"lambdas": lambdas, "logits": tuple(logits)}
    state = AdaRankState(lambdas, tuple(logits), tx.init(trainable), origin, tuple(parts),
                         jnp.zeros((), jnp.int32))
    if batch is not None:
      AM.check_task_batch(batch, tasks, "adarank.init batch")
      jax.eval_shape(_step, state, dict(batch), key)   # configuration errors surface here
    return state

  def kept(trainable):   # components whose forward mask is 1 (logit > 0), before the update
    logits = trainable["logits"]
    return {"kept": sum(jnp.sum(m > 0) for m in logits) if logits else jnp.zeros(())}

  update = AM.make_update(loss_fn, tx, kept)   # AdaMerging's step (θ_o and the SVDs: frozen)

  def _step(state: AdaRankState, batch, key):
    trainable = {"lambdas": state.lambdas, "logits": state.logits}
    trainable, opt_state, count, metrics = update(trainable, state.opt_state, state.count,
                                                  (state.origin, state.parts), batch["x"])
    return state._replace(lambdas=trainable["lambdas"], logits=tuple(trainable["logits"]),
                          opt_state=opt_state, count=count), metrics

  def step(state: AdaRankState, batch: Mapping[str, Any], key: Array | None = None):
    AM.check_task_batch(batch, tasks, "adarank batch")
    return _step(state, {"x": batch["x"]}, key)

  return Learner(init_fn, step)
