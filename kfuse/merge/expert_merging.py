"""Expert Merging: layer-wise (or chunk-wise) coefficients learned by aligning the merged
model with each expert on a few unlabeled inputs of its task.

    θ_p(w) = θ₀,p + Σ_i α_{i,p} ⊙ τ_{i,p},   α = σ(w),   τ_i = θ_i − θ₀
    L(w) = mean_t [ T²·CE(softmax(z_t^(t)/T), softmax(z_t^(θ)/T))
                    + β·mean((h_t^(θ) − h_t^(t))²) ] + ρ·Σ|α − α₀| / C

z_t^(θ), h_t^(θ): logits and hidden representation of the merged model on a batch of task t;
z_t^(t), h_t^(t): those of expert t (θ₀ + τ_t, no gradient). α_{i,p} is one coefficient per
expert and tensor p, or K_p coefficients for tensor p split into K_p chunks of its flattened
entries (``chunks={path: K_p}``: Expert Merging++'s chunk-wise coefficients, split like
``torch.chunk``: ⌈n/K⌉ entries per chunk, so the last chunks can be shorter or absent).
C = number of coefficients per expert.

Zhang et al., "Expert Merging: Model Merging with Unsupervised Expert Alignment and
Importance-Guided Layer Chunking", arXiv 2509.25712 (ICLR 2026); reference implementation
``Littleor/ExpertMerging`` (``global_utils/expert_merging_base.py``, ``merging_utils.py``):
sigmoid coefficients initialised at α₀ = 0.1 (``weight_coeffs_init_value``), soft-target
cross-entropy at temperature T scaled by T², hidden-state MSE weighted by β = 0.1, the L1 pull
of α towards α₀ weighted by ρ = 0.1 and divided by C, AdamW (weight decay 1e-5) with the
gradient norm clipped at 1.0.

**Choices the paper / reference leave open, made here:**

- one step sums the tasks: ``batch['x']`` is ``[T, B, ...]`` (one batch per task) and the
  task losses are averaged (the reference takes one sample of one task per micro-step and
  averages 8 micro-steps by gradient accumulation); the regulariser is added once per step;
- the learning rate is a parameter (the reference's scripts use 1e-6 to 1e-4 for LLMs over
  hundreds of samples; default here 1e-4 = its trainer's default), no restart schedule;
- T = 1 (its command-line default; its trainer's default is 3);
- the hidden representation is whatever ``apply_fn`` returns beside the logits (the reference
  picks transformer layers by index); without one (``None``) only the logits are aligned;
- every floating tensor is merged by default; ``exclude`` (regexes) keeps tensors at θ₀, as
  the reference does for norms / biases / embeddings of LLMs;
- Expert Merging++'s importance-guided *allocation* of chunk counts (from the learned
  coefficients, task-vector norms and parameter counts) is not implemented: its formula is
  in neither the reference code nor the sources we had; the chunk counts are the caller's
  (``chunks``), the chunk-wise merge itself is the reference's.

It follows the step protocol (`kfuse.protocol`):

    learner = expert_merging.expert_merging(apply_fn, tasks=T)
    state = learner.init(base, experts, {"x": x_example})     # x_example [T, B, ...]
    state, metrics = learner.step(state, {"x": x}, key)        # jitted
    merged = expert_merging.merged(state)          # (with the same chunks / exclude)

``apply_fn(params, x, t) -> (logits, hidden | None)``, t the task index (a Python int).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse import tree as T
from kfuse.merge.adamerging import check_task_batch, make_update
from kfuse.protocol import Learner
from kfuse.tree import KfuseError

PyTree = Any
Array = jax.Array

__all__ = ["ExpertMergingState", "CoefficientLayout", "expert_merging", "merged", "merge_params",
           "objective_fn", "layout"]


class ExpertMergingState(NamedTuple):
  """w ``[N, C]`` (α = σ(w)); the optimizer state; θ₀ and the stacked task vectors
  ``[N, ...]`` (frozen); the step count."""
  w: Array
  opt_state: Any
  base: PyTree
  task_vectors: PyTree
  count: Array


class CoefficientLayout(NamedTuple):
  """Static: for each leaf of θ₀ (flatten order) its coefficient offset and chunk count
  (0 = not merged: kept at θ₀), and C, the coefficients per expert."""
  offsets: tuple
  chunks: tuple
  size: int


def layout(base: PyTree, chunks: Mapping[str, int] | None = None,
           exclude: Sequence[str] = ()) -> CoefficientLayout:
  """The coefficient layout of ``base``: one coefficient per merged tensor, ``chunks[path]``
  for the paths given; tensors matching an ``exclude`` regex (or not floating) get none."""
  chunks = dict(chunks or {})
  flat = T.flatten(base)
  paths = list(flat)
  leaves = jax.tree.leaves(base)
  if len(paths) != len(leaves):
    raise KfuseError("expert_merging: params tree with non-string keys")
  for p in chunks:
    if p not in flat:
      from kfuse.registry import suggest
      raise KfuseError(f"expert_merging: chunks names {p!r}, not a parameter{suggest(p, paths)}")
  pats = [re.compile(e) for e in exclude]
  offsets, ks, o = [], [], 0
  for p, leaf in zip(paths, leaves):
    floating = jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
    k = 0 if (not floating or any(r.search(p) for r in pats)) else int(chunks.get(p, 1))
    if k < 0 or (floating and p in chunks and k < 1):
      raise KfuseError(f"expert_merging: chunks[{p!r}] must be >= 1, got {chunks[p]}")
    offsets.append(o)
    ks.append(k)
    o += k
  if o == 0:
    raise KfuseError("expert_merging: every tensor is excluded; nothing to learn")
  return CoefficientLayout(tuple(offsets), tuple(ks), o)


def _chunk_index(n: int, k: int) -> np.ndarray:
  """Chunk of each flat entry, as ``torch.chunk(x, k)``: ⌈n/k⌉ entries per chunk."""
  size = max(1, math.ceil(n / k))
  return np.arange(n) // size


def merge_params(base: PyTree, task_vectors: PyTree, alphas: Array,
                 lay: CoefficientLayout) -> PyTree:
  """θ₀ + Σ_i α_i ⊙ τ_i with ``alphas [N, C]`` spread over the tensors / chunks of ``lay``."""
  leaves, treedef = jax.tree.flatten(base)
  taus = treedef.flatten_up_to(task_vectors)
  out = []
  for b, tau, o, k in zip(leaves, taus, lay.offsets, lay.chunks):
    if k == 0:
      out.append(b)
      continue
    flat = tau.reshape(tau.shape[0], -1)
    if k == 1:
      d = alphas[:, o].astype(tau.dtype) @ flat
    else:
      idx = jnp.asarray(_chunk_index(flat.shape[1], k)) + o
      d = jnp.sum(alphas[:, idx].astype(tau.dtype) * flat, axis=0)
    out.append(b + d.reshape(b.shape))
  return jax.tree.unflatten(treedef, out)


def merged(state: ExpertMergingState, chunks: Mapping[str, int] | None = None,
           exclude: Sequence[str] = ()) -> PyTree:
  """The merged parameters θ(σ(w)) of ``state`` (``chunks`` / ``exclude`` as given to
  `expert_merging`)."""
  lay = layout(state.base, chunks, exclude)
  if state.w.shape[-1] != lay.size:
    raise KfuseError(f"expert_merging.merged: the state holds {state.w.shape[-1]} coefficients"
                     f" per expert, chunks/exclude give {lay.size}; pass the learner's")
  return merge_params(state.base, state.task_vectors, jax.nn.sigmoid(state.w), lay)


def _f32(a: Array) -> Array:
  """At least float32 (float64 stays float64)."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _soft_ce(teacher: Array, student: Array, temperature: float) -> Array:
  """T²·mean_b −Σ_c softmax(z_t/T) log softmax(z_s/T) (the reference's ``compute_ce_loss``)."""
  p = jax.nn.softmax(_f32(teacher) / temperature, axis=-1)
  logq = jax.nn.log_softmax(_f32(student) / temperature, axis=-1)
  return -jnp.mean(jnp.sum(p * logq, axis=-1)) * temperature ** 2


def objective_fn(apply_fn: Callable, lay: CoefficientLayout, tasks: int, *,
                 temperature: float = 1.0,
                 hidden_weight: float = 0.1, reg_weight: float = 0.1, init: float = 0.1,
                 task_weights: Sequence[float] | None = None) -> Callable:
  """``L(w, base, task_vectors, x)`` of the module doc (for gradient checks and custom loops)."""
  tw = [1.0] * tasks if task_weights is None else [float(a) for a in task_weights]

  def objective(w, base, taus, x):
    alphas = jax.nn.sigmoid(w)
    params = merge_params(base, taus, alphas, lay)
    total = 0.0
    for t in range(tasks):
      expert = jax.tree.map(lambda b, tv: b + tv[t], base, taus)
      z_e, h_e = jax.lax.stop_gradient(apply_fn(expert, x[t], t))
      z_m, h_m = apply_fn(params, x[t], t)
      loss = _soft_ce(z_e, z_m, temperature)
      if h_m is not None and hidden_weight:
        loss = loss + hidden_weight * jnp.mean(jnp.square(_f32(h_m) - _f32(h_e)))
      total = total + tw[t] * loss
    reg = reg_weight * jnp.sum(jnp.abs(alphas - init)) / lay.size
    return total / tasks + reg

  return objective


def expert_merging(apply_fn: Callable, *, tasks: int, init: float = 0.1,
                   temperature: float = 1.0, hidden_weight: float = 0.1,
                   reg_weight: float = 0.1, learning_rate: float = 1e-4,
                   weight_decay: float = 1e-5, clip_norm: float = 1.0,
                   chunks: Mapping[str, int] | None = None, exclude: Sequence[str] = (),
                   task_weights: Sequence[float] | None = None,
                   optimizer: Any = None) -> Learner:
  """Expert Merging as a `Learner` (see the module doc).

  Args:
    apply_fn: ``(params, x, t) -> (logits, hidden or None)``.
    tasks: T, the number of experts / tasks (one batch per task per step).
    init: α₀ in (0, 1). temperature: T > 0. hidden_weight: β. reg_weight: ρ.
    learning_rate, weight_decay, clip_norm: AdamW and the gradient-norm clip (the
      reference's); ``optimizer`` (an optax transformation or a `kfuse.optim` config)
      replaces all three.
    chunks: ``{path: K}`` chunk-wise coefficients (Expert Merging++). exclude: regexes of
      paths kept at θ₀.
    task_weights: per-task loss weights (the reference's ``loss_alphas``), default 1.
  """
  if tasks is None or int(tasks) < 1:
    raise KfuseError(f"expert_merging: tasks must be >= 1, got {tasks}")
  tasks = int(tasks)
  if not 0.0 < float(init) < 1.0:
    raise KfuseError(f"expert_merging: init (α₀ = σ(w₀)) must be in (0, 1), got {init}")
  if not float(temperature) > 0:
    raise KfuseError(f"expert_merging: temperature must be > 0, got {temperature}")
  if task_weights is not None and len(task_weights) != tasks:
    raise KfuseError(f"expert_merging: {len(task_weights)} task_weights for {tasks} tasks")
  if optimizer is None:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(learning_rate, b1=0.9, b2=0.999, weight_decay=weight_decay))
  elif isinstance(optimizer, optax.GradientTransformation):
    tx = optimizer
  else:
    from kfuse.optim import make_optimizer
    tx = make_optimizer(optimizer, total_steps=0)
  holder: dict = {}

  def init_fn(base: PyTree, experts: Sequence[PyTree], batch: Mapping[str, Any] | None = None,
              key: Array | None = None) -> ExpertMergingState:
    experts = list(experts)
    if len(experts) != tasks:
      raise KfuseError(f"expert_merging: {len(experts)} experts for tasks={tasks}")
    T.check_same_structure([base] + experts, ["base"] + [f"expert[{i}]" for i in range(tasks)])
    base = jax.tree.map(jnp.asarray, base)
    lay = layout(base, chunks, exclude)
    holder["layout"] = lay
    # the learned-coefficient step shared with AdaMerging (θ₀ and τ go in, not out)
    holder["step"] = make_update(objective_fn(
        apply_fn, lay, tasks, temperature=float(temperature), hidden_weight=float(hidden_weight),
        reg_weight=float(reg_weight), init=float(init), task_weights=task_weights), tx)
    taus = jax.tree.map(lambda b, *e: jnp.stack([x - b for x in e]), base, *experts)
    w = jnp.full((tasks, lay.size), math.log(init / (1 - init)), jnp.float32)
    state = ExpertMergingState(w, tx.init(w), base, taus, jnp.zeros((), jnp.int32))
    if batch is not None:
      check_task_batch(batch, tasks, "expert_merging.init batch")
      jax.eval_shape(holder["step"], state.w, state.opt_state, state.count,
                     (state.base, state.task_vectors), jnp.asarray(batch["x"]))
    return state

  def step(state: ExpertMergingState, batch: Mapping[str, Any], key: Array | None = None):
    if "step" not in holder:
      raise KfuseError("expert_merging: call init before step")
    check_task_batch(batch, tasks, "expert_merging batch")
    w, opt_state, count, metrics = holder["step"](state.w, state.opt_state, state.count,
                                                  (state.base, state.task_vectors),
                                                  jnp.asarray(batch["x"]))
    return state._replace(w=w, opt_state=opt_state, count=count), metrics

  return Learner(init_fn, step)
