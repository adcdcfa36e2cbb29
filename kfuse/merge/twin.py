"""Twin-Merging: a shared expert, compressed exclusive knowledge and a per-input router.

Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging",
NeurIPS 2024 (reference implementation github.com/LZY-the-boys/Twin-Merging,
``discriminative/{twin_merge,router,sparsify}.py`` and ``scripts.sh``):

    θ*    = merge(θ_0, θ_1 … θ_N)                 shared expert (task arithmetic, λ = 0.29; or TIES)
    δ_i   = θ_i − θ*                              exclusive knowledge of task i
    δ̂_i   = U_i[:, :k] diag(s_i[:k]) V_i[:, :k]ᵀ  per matrix, k = ⌊ρ·r⌋ (ρ = 0.1: mask_rate 0.9);
                                                  other tensors keep δ_i whole
    w(x)  = softmax(R(h(θ*; x)))                  router R on the shared expert's features h
    θ(x)  = θ* + Σ_i w_i(x) δ̂_i                   one model per input, evaluated with vmap

The router is a small MLP (Linear 2d → BatchNorm → LeakyReLU → Dropout 0.5, twice, then
Linear N; the reference's ``SimpleMLP`` with hidden = 2·embedding dims), trained with
cross-entropy to predict the task id of labelled examples (AdamW lr 5e-4, batch 1024,
50 epochs, linear decay: the reference's ``transformers.Trainer`` settings). The
reference feeds it the shared expert's mean last hidden state; any feature map
``features(params, x) -> [B, d]`` can be used here. Matrices are read as in
`kfuse.merge.adarank.matrix_split` (2-D weights; 3-D DenseGeneral kernels as [d, d]).

    shared = shared_expert(pretrained, experts)                # θ*
    tw = twin(shared, experts, rank_ratio=0.1)                 # Twin(shared, exclusive [N, ...])
    router = train_router(features_val, task_ids_val, N)       # Router variables
    w = route(router, features_test)                           # [B, N]
    logits = twin_apply(apply_fn, tw, w, x)                    # θ(x_b) per input b (vmap)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kfuse import tree as T
from kfuse.merge import adamerging as AM
from kfuse.merge.adarank import matrix_split
from kfuse.tree import KfuseError

PyTree = Any
Array = jax.Array

__all__ = ["Twin", "Router", "shared_expert", "compress", "twin", "compose", "twin_apply",
           "train_router", "route", "SHARED_DEFAULTS", "RANK_RATIO"]

# discriminative/config/twin_merge.yml (scaling 0.29) and scripts.sh (mask_rate 0.9, svd)
SHARED_DEFAULTS = {"task_arithmetic": {"lambda": 0.29}, "ties": {}}
RANK_RATIO = 0.1


class Twin(NamedTuple):
  """θ* and the stacked compressed exclusive deltas δ̂ ``[N, ...]`` per tensor."""
  shared: PyTree
  exclusive: PyTree


def shared_expert(pretrained: PyTree, experts: Sequence[PyTree], method: str = "task_arithmetic",
                  params: Mapping[str, Any] | None = None) -> PyTree:
  """θ* = ``kfuse.merge.merge(method, experts, pretrained, params)`` (default: task
  arithmetic with λ = 0.29, the reference's shared expert)."""
  if params is None:
    params = SHARED_DEFAULTS.get(method, {})
  from kfuse.merge import api
  return api.merge(method, list(experts), pretrained, params=dict(params))


def compress(delta: Array, path: str, rank_ratio: float = RANK_RATIO,
             split: Callable[[str, tuple], int | None] = matrix_split) -> Array:
  """δ̂: the rank-⌊ρ·r⌋ truncated SVD of a matrix (``split``), else δ unchanged (ρ ≥ 1: δ)."""
  k = split(path, tuple(delta.shape))
  if k is None or rank_ratio >= 1.0:
    return jnp.asarray(delta)
  mat = jnp.asarray(delta).reshape(math.prod(delta.shape[:k]), -1)
  u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
  keep = int(rank_ratio * s.shape[0])
  return ((u[:, :keep] * s[:keep]) @ vt[:keep]).reshape(delta.shape)


def twin(shared: PyTree, experts: Sequence[PyTree], rank_ratio: float = RANK_RATIO,
         split: Callable[[str, tuple], int | None] = matrix_split) -> Twin:
  """`Twin` of θ* and δ̂_i = compress(θ_i − θ*) for every expert."""
  experts = list(experts)
  if not experts:
    raise KfuseError("twin: no experts")
  if not 0.0 <= float(rank_ratio) <= 1.0 or not math.isfinite(float(rank_ratio)):
    raise KfuseError(f"twin: rank_ratio must be in [0, 1], got {rank_ratio}")
  T.check_same_structure([shared] + experts,
                         ["shared"] + [f"expert[{i}]" for i in range(len(experts))])
  shared = jax.tree.map(jnp.asarray, shared)
  flat_s = T.flatten(shared)
  deltas = []
  for i, e in enumerate(experts):
    T.check_finite(e, f"expert[{i}]")
    fe = T.flatten(e)
    deltas.append({p: compress(jnp.asarray(fe[p]) - s, p, float(rank_ratio), split)
                   for p, s in flat_s.items()})
  stacked = {p: jnp.stack([d[p] for d in deltas]) for p in flat_s}
  return Twin(shared, T.unflatten(shared, stacked))


def compose(tw: Twin, weights: Array) -> PyTree:
  """θ = θ* + Σ_i w_i δ̂_i for one weight vector ``weights [N]``."""
  return AM.merge_params(tw.shared, tw.exclusive, jnp.asarray(weights))


def twin_apply(apply_fn: Callable, tw: Twin, weights: Array, x: Array) -> Array:
  """``apply_fn(θ(x_b), x_b)`` for every input b: ``weights [B, N]``, ``x [B, ...]`` ->
  ``[B, ...]``. One composed model per input, vmapped (memory: B copies of the parameters)."""
  weights = jnp.asarray(weights)
  n = jax.tree.leaves(tw.exclusive)[0].shape[0]
  if weights.ndim != 2 or weights.shape[1] != n or weights.shape[0] != np.shape(x)[0]:
    raise KfuseError(f"twin_apply: weights must be [B={np.shape(x)[0]}, N={n}],"
                     f" got {tuple(weights.shape)}")
  one = lambda w, xb: apply_fn(compose(tw, w), xb[None])[0]
  return jax.vmap(one)(weights, jnp.asarray(x))


class Router(nn.Module):
  """The reference's ``SimpleMLP``: (Dense → BatchNorm → LeakyReLU → Dropout) × 2 → Dense(N)."""
  num_tasks: int
  hidden: int
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x.astype(jnp.float32)
    for i in range(2):
      h = nn.Dense(self.hidden, name=f"fc{i}")(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(h)
      h = nn.Dropout(self.dropout, deterministic=not train)(nn.leaky_relu(h, 0.01))
    return nn.Dense(self.num_tasks, name="out")(h)


def _check_router_data(features, task_ids, num_tasks: int, where: str):
  f, y = np.asarray(features), np.asarray(task_ids)
  if f.ndim != 2 or len(f) == 0:
    raise KfuseError(f"{where}: features must be a non-empty [n, d] array, got {f.shape}")
  if y.shape != (len(f),) or not np.issubdtype(y.dtype, np.integer):
    raise KfuseError(f"{where}: task_ids must be {len(f)} integers (one per feature row),"
                     f" got {y.dtype} {y.shape}")
  if not np.all(np.isfinite(f)):
    raise KfuseError(f"{where}: features hold NaN/Inf")
  bad = sorted(set(y.tolist()) - set(range(num_tasks)))
  if bad:
    raise KfuseError(f"{where}: task ids {bad[:5]} are not tasks of the pool (0..{num_tasks - 1},"
                     f" {num_tasks} experts)")
  missing = sorted(set(range(num_tasks)) - set(y.tolist()))
  if missing:
    raise KfuseError(f"{where}: no labelled example of task(s) {missing[:5]} (the router"
                     f" would never route to them)")
  return f.astype(np.float32), y.astype(np.int32)


def train_router(features, task_ids, num_tasks: int, *, hidden: int | None = None,
                 epochs: int = 50, learning_rate: float = 5e-4, batch_size: int = 1024,
                 seed: int = 0) -> dict:
  """Router variables trained to predict ``task_ids [n]`` from ``features [n, d]``.

  Cross-entropy, AdamW(lr, linear decay) over ``epochs`` passes of ``min(batch_size, n)``
  batches (reference: hidden 2·d, lr 5e-4, batch 1024, 50 epochs)."""
  from kfuse import train
  f, y = _check_router_data(features, task_ids, int(num_tasks), "twin router")
  n, d = f.shape
  model = Router(int(num_tasks), int(hidden or 2 * d))
  key = jax.random.key(int(seed))
  variables = model.init(key, f[:2])
  bs = min(int(batch_size), n)
  steps = max(1, int(epochs) * (n // bs))
  state, _ = train.train_classifier(
      model, variables, f, y, optimizer={"name": "adamw", "learning_rate": float(learning_rate),
                                         "schedule": "linear", "kwargs": {"weight_decay": 0.0}},
      steps=steps, batch_size=bs, data_key=jax.random.fold_in(key, 1),
      dropout_key=jax.random.fold_in(key, 2))
  return {"params": state.params, **state.model_state}


def route(router: Mapping, features) -> Array:
  """w = softmax(R(features)) ``[B, N]`` (eval mode: running BatchNorm statistics)."""
  n = router["params"]["out"]["bias"].shape[0]
  hidden = router["params"]["fc0"]["bias"].shape[0]
  logits = Router(int(n), int(hidden)).apply(dict(router), jnp.asarray(features), train=False)
  return jax.nn.softmax(logits, axis=-1)
