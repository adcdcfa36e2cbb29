"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled test data.

    θ(λ) = θ_0 + Σ_i λ_i τ_i             (task-wise: one λ_i per expert)
    θ_p(λ) = θ_0,p + Σ_i λ_{i,p} τ_{i,p}  (layer-wise: one λ per expert and tensor p)
    L(λ) = Σ_t mean_b H(softmax(f(θ(λ); x_{t,b})))   H(p) = −Σ_c p_c log(p_c + 1e-8)

τ_i = θ_i − θ_0. λ starts at 0.3 and is trained with Adam (lr 1e-3) on one
unlabeled test batch per task per step; "layer" is every parameter tensor, as
in FusionBench (``num_layers = len(trainable params)``). Yang et al.,
"AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024;
defaults of FusionBench's ``adamerging/clip.yaml`` (init 0.3, Adam 1e-3, batch
16 per task, 1000 steps, no clamping). With λ frozen at its initial value the
merge is task arithmetic with λ = 0.3.

It follows the step protocol (`kfuse.protocol`):

    learner = adamerging.adamerging(apply_fn, granularity="layer", tasks=T)
    state = learner.init(base, experts, {"x": x_example})
    state, metrics = learner.step(state, {"x": x}, key)       # jitted
    merged = adamerging.merged(state)

``apply_fn(params, x) -> logits`` (``tasks=None``; ``batch['x']`` is ``[B, ...]``)
or ``apply_fn(params, x, t) -> logits`` with ``t`` the task index, a Python int
(``tasks=T``; ``batch['x']`` is ``[T, B, ...]``, one batch per task, each scored
by its own head). The base and task vectors live in the state (frozen; no
recompilation when they change); the key is unused (deterministic).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse import tree as T
from kfuse.protocol import Learner, check_batch
from kfuse.tree import KfuseError

PyTree = Any
Array = jax.Array

__all__ = ["AdaMergingState", "adamerging", "merged", "merge_params", "entropy",
           "objective_fn", "make_update", "check_task_batch", "GRANULARITIES"]

GRANULARITIES = ("task", "layer")


class AdaMergingState(NamedTuple):
  """lambdas ``[N]`` (task) or ``[N, P]`` (layer, P tensors in `kfuse.tree.flatten` order);
  the optimizer state; θ_0 and the stacked task vectors ``[N, ...]`` (frozen); the step."""
  lambdas: Array
  opt_state: Any
  base: PyTree
  task_vectors: PyTree
  count: Array


def entropy(logits: Array, eps: float = 1e-8) -> Array:
  """mean_b −Σ_c p_bc log(p_bc + eps), p = softmax(logits) (FusionBench ``entropy_loss``)."""
  p = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  return jnp.mean(-jnp.sum(p * jnp.log(p + eps), axis=-1))


def merge_params(base: PyTree, task_vectors: PyTree, lambdas: Array) -> PyTree:
  """θ_0 + Σ_i λ_i τ_i (``lambdas [N]``) or, per tensor p, θ_0,p + Σ_i λ_{i,p} τ_{i,p}
  (``lambdas [N, P]``, tensors in `kfuse.tree.flatten` order)."""
  leaves, treedef = jax.tree.flatten(base)
  taus = treedef.flatten_up_to(task_vectors)
  out = []
  for p, (b, tau) in enumerate(zip(leaves, taus)):
    lam = lambdas[:, p] if lambdas.ndim == 2 else lambdas
    # a contraction over the expert axis (a dot: XLA:CPU's reduce over a leading axis is ~30x slower)
    flat = tau.reshape(tau.shape[0], -1)
    out.append(b + (lam.astype(tau.dtype) @ flat).reshape(b.shape))
  return jax.tree.unflatten(treedef, out)


def merged(state: AdaMergingState) -> PyTree:
  """The merged parameters θ(λ) of ``state``."""
  return merge_params(state.base, state.task_vectors, state.lambdas)


def _optimizer(optimizer) -> optax.GradientTransformation:
  if optimizer is None:
    return optax.adam(1e-3)
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  from kfuse.optim import make_optimizer
  return make_optimizer(optimizer, total_steps=0)


def adamerging(apply_fn: Callable, *, granularity: str = "layer", init: float = 0.3,
               optimizer: Any = None, tasks: int | None = None, clamp: bool = False,
               vmap_tasks: bool = False) -> Learner:
  """AdaMerging as a `Learner` (see the module doc).

  Args:
    apply_fn: ``(params, x) -> logits`` or, with ``tasks``, ``(params, x, t) -> logits``.
    granularity: 'layer' (one λ per expert and tensor) or 'task' (one λ per expert).
    init: initial λ (0.3).
    optimizer: an optax transformation or a `kfuse.optim` config; None: Adam(1e-3).
    tasks: number of tasks T when each step scores T per-task batches ``[T, B, ...]``.
    clamp: clip λ to [0, 1] in the merge (FusionBench ``clamp_weights``, off by default).
    vmap_tasks: ``apply_fn`` accepts ``t`` as a traced int32 scalar (e.g. it indexes
      stacked heads ``W[t]``, not a Python list): the T task batches then go through one
      ``jax.vmap``-ed forward (see `objective_fn`); same objective, faster step.
  """
  if granularity not in GRANULARITIES:
    from kfuse.registry import suggest
    raise KfuseError(f"adamerging: unknown granularity {granularity!r}"
                     f"{suggest(granularity, GRANULARITIES)}; known: task, layer")
  if tasks is not None and int(tasks) < 1:
    raise KfuseError(f"adamerging: tasks must be >= 1, got {tasks}")
  tx = _optimizer(optimizer)

  entropy_of = objective_fn(apply_fn, tasks, vmap_tasks=vmap_tasks)

  def objective(lambdas, base, taus, x):
    return entropy_of(jnp.clip(lambdas, 0.0, 1.0) if clamp else lambdas, base, taus, x)

  # θ_0 and τ go in but never come out: returning them would copy them every step
  update = make_update(objective, tx)

  def init_fn(base: PyTree, experts: Sequence[PyTree], batch: Mapping[str, Any] | None = None,
              key: Array | None = None) -> AdaMergingState:
    experts = list(experts)
    if not experts:
      raise KfuseError("adamerging: no experts")
    T.check_same_structure([base] + experts, ["base"] + [f"expert[{i}]" for i in range(len(experts))])
    base = jax.tree.map(jnp.asarray, base)
    taus = jax.tree.map(lambda *e: jnp.stack([x - b for x, b in zip(e[1:], [e[0]] * (len(e) - 1))]),
                        base, *experts)
    n, p = len(experts), len(jax.tree.leaves(base))
    shape = (n,) if granularity == "task" else (n, p)
    lambdas = jnp.full(shape, init, jnp.float32)
    state = AdaMergingState(lambdas, tx.init(lambdas), base, taus, jnp.zeros((), jnp.int32))
    if batch is not None:
      check_task_batch(batch, tasks, "adamerging.init batch")
      jax.eval_shape(_step, state, dict(batch), key)   # configuration errors surface here
    return state

  def _step(state: AdaMergingState, batch, key):
    lambdas, opt_state, count, metrics = update(state.lambdas, state.opt_state, state.count,
                                                (state.base, state.task_vectors), batch["x"])
    return state._replace(lambdas=lambdas, opt_state=opt_state, count=count), metrics

  def step(state: AdaMergingState, batch: Mapping[str, Any], key: Array | None = None):
    check_task_batch(batch, tasks, "adamerging batch")
    return _step(state, {"x": batch["x"]}, key)

  return Learner(init_fn, step)


def make_update(loss_fn: Callable, tx: optax.GradientTransformation,
                extra_metrics: Callable | None = None) -> Callable:
  """The one optimisation step of the learned-coefficient merges (AdaMerging,
  `kfuse.merge.adarank`, `kfuse.merge.expert_merging`), jitted: ``update(params, opt_state,
  count, frozen, x) -> (params', opt_state', count + 1, metrics)`` with ``loss, g = value_and_grad(loss_fn)(params, *frozen, x)``, the optax update
  of ``tx`` applied to ``params`` (any pytree of coefficients) and ``metrics`` = {"loss",
  "grad_norm" (‖g‖ over the whole pytree)} plus ``extra_metrics(params)``. ``frozen`` (θ_0, τ,
  SVD factors, …) goes in but never comes out: returning it would copy it every step."""

  def update(params, opt_state, count, frozen, x):
    loss, g = jax.value_and_grad(loss_fn)(params, *frozen, x)
    updates, opt_state = tx.update(g, opt_state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(g)}
    if extra_metrics is not None:
      metrics.update(extra_metrics(params))
    return optax.apply_updates(params, updates), opt_state, count + 1, metrics

  return jax.jit(update)


def check_task_batch(batch: Any, tasks: int | None, where: str) -> None:
  """``batch`` is a mapping with 'x' (`kfuse.protocol.check_batch`) and, with ``tasks`` = T,
  'x' is ``[T, B, ...]`` (one batch per task); else a one-line `KfuseError`."""
  check_batch(batch, ("x",), where=where)
  x = batch["x"]
  if tasks is not None and (np.ndim(x) < 2 or np.shape(x)[0] != int(tasks)):
    raise KfuseError(f"{where}: 'x' must be [T={tasks}, B, ...] (one batch per task),"
                     f" got shape {tuple(np.shape(x))}")


def objective_fn(apply_fn: Callable, tasks: int | None = None,
                 vmap_tasks: bool = False) -> Callable:
  """``L(lambdas, base, task_vectors, x)``, the entropy objective `adamerging` minimises
  (for gradient checks and custom loops).

  With ``tasks`` = T the per-task entropies are summed. ``vmap_tasks=False`` calls
  ``apply_fn(params, x[t], t)`` once per task with ``t`` a Python int; ``vmap_tasks=True``
  maps it over ``(x, arange(T))`` with `jax.vmap` (``t`` traced). The numbers are the same;
  the vmapped backward computes each weight gradient ``Σ_t X_tᵀ dY_t`` as one matmul over
  all T·B rows instead of T small matmuls and their sum (on XLA:CPU, width 512, T = 4,
  B = 16: 4.4 vs 5.8 ms per step; experiments/perf/README.md)."""
  def objective(lambdas, base, taus, x):
    params = merge_params(base, taus, lambdas)
    if tasks is None:
      return entropy(apply_fn(params, x))
    if vmap_tasks:
      per_task = jax.vmap(lambda xt, t: entropy(apply_fn(params, xt, t)))
      return jnp.sum(per_task(x, jnp.arange(int(tasks), dtype=jnp.int32)))
    return sum(entropy(apply_fn(params, x[t], t)) for t in range(int(tasks)))
  return objective
