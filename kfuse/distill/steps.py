"""Jit-compiled distillation steps around any Flax student and any set of frozen teachers.

    from kfuse import distill
    step = distill.make_step(student_module, distill.objectives.hinton(temperature=4.0),
                             optax.adam(1e-3),
                             teachers=[distill.Teacher(teacher_module, teacher_variables)])
    state = step.init(student_variables, x_example)    # DistillState: no teacher inside
    state, metrics = step(state, {"x": x, "y": y}, key)  # jitted; state donated

The step follows `kfuse.protocol`: ``step.init`` / ``step.step`` (= ``step``) form a
`kfuse.protocol.Learner` (``step.learner``), batches are mappings ``{"x", "y"}``
(optionally ``"where"``, ``"topk_indices"``, ``"topk_logits"``), the key is passed on
every call and none lives in the state.

Design
------
* **State** (`DistillState`) is an explicit pytree: step counter, student
  ``params``, the objective's learned parameters ``aux`` (e.g. the FitNets
  regressor), the student's model state (BatchNorm statistics) and the optax
  state over ``(params, aux)``. Teachers are *not* in it: their variables
  are bound to the step as a separate (non-donated) jit argument, so they are
  never optimised, never checkpointed with the student, and swapping
  teachers of the same shapes does not recompile.
* **Teachers** run in eval mode (``train=False``) under ``stop_gradient``.
  ``Teacher(model, variables, stacked=True)`` holds K same-architecture
  members as one pytree with a leading axis (a checkpoint ensemble,
  `kfuse.distill.ensembles.stack_checkpoints`), evaluated with ``vmap``.
  Several teachers are combined per position by ``combine``
  (`kfuse.distill.ensembles.teacher_weights`): objectives see the stacked
  teacher logits, the weights, and `TeacherOutputs.combined_logits(T)`, the
  weighted mean in probability space at the objective's temperature.
* **Models** are Flax Linen modules called as ``module.apply(variables, x,
  train=...)`` (intermediate outputs named by module path, e.g.
  ``"backbone"`` or ``"backbone/layers_1"``, are captured for feature
  losses), Flax NNX models (an ``nnx.GraphDef`` or ``nnx.Module``, run by
  `kfuse.nnx.apply_fn`; their ``nnx.State`` is accepted wherever variables
  are, e.g. ``Teacher(*nnx.split(teacher))``, ``step.init(state, x)``), or any callable ``fn(variables, x, train, key)`` returning logits,
  `Outputs`, or ``(logits | Outputs, new_model_state)``.
* **Mixup** (``mixup_alpha > 0``): one λ ~ Beta(α, α) and one permutation
  per step, drawn from the step key; teacher and student see the *same*
  mixed inputs (big_vision's "consistent teaching"), the cross-entropy uses
  the mixed one-hot targets.
* Randomness comes only from the ``key`` argument, folded with the step
  counter. Shapes are static: one compilation per batch shape.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from kfuse import nnx as knnx
from kfuse.distill import ensembles, losses
from kfuse.protocol import Learner, check_batch
from kfuse.registry import suggest
from kfuse.tree import KfuseError

__all__ = [
    "Outputs",
    "TeacherOutputs",
    "Teacher",
    "DistillState",
    "DistillStep",
    "flax_forward",
    "as_forward",
    "mixup",
    "make_step",
    "make_mutual_step",
    "make_predict",
    "copy_tree",
]

PyTree = Any
Array = jax.Array


class Outputs(NamedTuple):
  """What a model forward pass returns: logits and captured features by module path."""
  logits: Array
  features: Mapping[str, Array] = {}


class TeacherOutputs(NamedTuple):
  """All teachers' outputs for one batch (every member of a stacked teacher counts as one).

  Attributes:
    logits: ``[K, ..., C]``.
    weights: ``[K, ...]`` per-position convex combination weights.
    features: one ``{path: array}`` dict per member.
  """
  logits: Array
  weights: Array
  features: tuple = ()

  def combined_logits(self, temperature: float = 1.0) -> Array:
    """Logits of the weighted teacher mixture in probability space at ``temperature``."""
    return ensembles.combine_logits(self.logits, self.weights, temperature)

  @property
  def size(self) -> int:
    return self.logits.shape[0]


class Teacher(NamedTuple):
  """A frozen teacher: a Flax module (or forward callable) and its variables.

  ``stacked=True``: ``variables`` carries a leading axis of K members of the
  same architecture (e.g. a run's checkpoints), evaluated with ``vmap``.
  """
  model: Any
  variables: PyTree
  stacked: bool = False


@struct.dataclass
class DistillState:
  """Everything a distillation step updates (teachers excluded). A pytree; donated to the step."""
  step: Array
  params: PyTree
  aux: PyTree
  model_state: PyTree
  opt_state: PyTree


# ------------------------------------------------------------------ forward adapters


def _lookup_feature(intermediates: Mapping, path: str) -> Array:
  node = intermediates
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KfuseError(f"features: no module output at path {path!r} (use '/'-joined module"
                       " names, e.g. 'backbone' or 'backbone/layers_1')")
    node = node[part]
  if not isinstance(node, Mapping) or "__call__" not in node:
    raise KfuseError(f"features: no module output at path {path!r}")
  return node["__call__"][0]


def flax_forward(module: nn.Module, features: Sequence[str] = ()) -> Callable:
  """Forward callable ``fn(variables, x, train, key) -> (Outputs, new_model_state)`` of a Linen module.

  Calls ``module.apply(variables, x, train=train)``; in train mode the
  non-``params`` collections (BatchNorm statistics) are mutable and returned
  as ``new_model_state`` (empty in eval mode), ``key`` feeds dropout. The
  outputs of the submodules named by ``features`` (``'/'``-joined module
  paths) are captured with Flax's ``capture_intermediates``.
  """
  return _apply_forward(module.apply, features)


def _apply_forward(apply: Callable, features: Sequence[str] = ()) -> Callable:
  """`flax_forward` of a Linen-style ``apply`` (a Linen module's, or `kfuse.nnx.apply_fn`'s)."""
  paths = tuple(dict.fromkeys(features))

  def capture(mdl, method_name):
    return method_name == "__call__" and "/".join(mdl.path) in paths

  def forward(variables, x, train=False, key=None):
    state_cols = [c for c in variables if c != "params"]
    mutable = (state_cols if train else []) + (["intermediates"] if paths else [])
    rngs = {"dropout": key} if (train and key is not None) else None
    kw = {"capture_intermediates": capture} if paths else {}
    if mutable:
      logits, upd = apply(variables, x, train=train, rngs=rngs, mutable=mutable, **kw)
    else:
      logits, upd = apply(variables, x, train=train, rngs=rngs), {}
    feats = {p: _lookup_feature(upd.get("intermediates", {}), p) for p in paths}
    new_state = {c: upd[c] for c in state_cols if c in upd} if train else {}
    return Outputs(logits, feats), new_state

  return forward


def _normalize(out: Any) -> tuple[Outputs, dict]:
  if isinstance(out, Outputs):
    return out, {}
  if isinstance(out, tuple) and len(out) == 2 and not hasattr(out, "_fields"):
    first, state = out
    first = first if isinstance(first, Outputs) else Outputs(first, {})
    return first, dict(state or {})
  return Outputs(out, {}), {}


def as_forward(model: Any, features: Sequence[str] = ()) -> Callable:
  """`flax_forward` for a Linen module; a callable ``fn(variables, x, train, key)`` is normalised.

  A callable may return logits, `Outputs`, or ``(logits | Outputs,
  new_model_state)``; it must provide the requested ``features`` itself.
  """
  if isinstance(model, nn.Module):
    return flax_forward(model, features)
  if knnx.is_nnx(model):
    if features:
      raise KfuseError(f"features: {features[0]!r} requested from an NNX model; feature capture"
                       " by module path needs a Linen module (pass a forward callable that"
                       " returns Outputs(logits, features) instead)")
    return _apply_forward(knnx.apply_fn(model))
  if not callable(model):
    raise KfuseError(f"model: expected a flax.linen.Module or a forward callable, got {type(model)}")
  try:
    nparams = len(inspect.signature(model).parameters)
  except (TypeError, ValueError):
    nparams = 4

  def forward(variables, x, train=False, key=None):
    out = model(variables, x, train, key) if nparams >= 4 else model(variables, x, train)
    outputs, state = _normalize(out)
    missing = [p for p in features if p not in outputs.features]
    if missing:
      raise KfuseError(f"features: the forward callable returned no feature {missing[0]!r}")
    return outputs, state

  return forward


# ------------------------------------------------------------------ mixup


def mixup(key: Array, x: Array, labels: Array, num_classes: int, alpha: float):
  """Mixup (Zhang et al., ICLR 2018): x̃ = λx + (1−λ)x[π], ỹ = λ·onehot(y) + (1−λ)·onehot(y[π]).

  One λ ~ Beta(α, α) and one permutation π of the batch. Returns
  ``(x̃, ỹ, λ)``; ``labels`` may already be soft ``[B, C]``.
  """
  if not alpha > 0:
    raise KfuseError(f"mixup_alpha: must be > 0 to mix, got {alpha}")
  k_lam, k_perm = jax.random.split(key)
  lam = jax.random.beta(k_lam, alpha, alpha)
  perm = jax.random.permutation(k_perm, x.shape[0])
  xf = jnp.asarray(x, jnp.float32)
  x_mix = lam * xf + (1.0 - lam) * xf[perm]
  y = labels if labels.ndim == 2 and labels.shape[-1] == num_classes and jnp.issubdtype(
      labels.dtype, jnp.floating) else jax.nn.one_hot(labels, num_classes)
  return x_mix, lam * y + (1.0 - lam) * y[perm], lam


# ------------------------------------------------------------------ the step


def copy_tree(tree: PyTree) -> PyTree:
  """A fresh copy of every array leaf, so donating a state never invalidates the caller's arrays."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _split_variables(variables: Mapping[str, Any], name: str) -> tuple[PyTree, dict]:
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise KfuseError(f"{name}: expected Flax variables, a dict with a 'params' collection")
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


class DistillStep:
  """A built distillation step. Call it as ``state, metrics = step(state, batch, key)``.

  Attributes:
    init: ``init(student_variables, x_example, key=None) -> DistillState``.
    jitted: the compiled ``(state, teacher_variables, batch, key) -> (state, metrics)``
      (state donated); ``step(...)`` binds ``teacher_variables``.
    loss_fn: the pure loss ``(params, aux, model_state, teacher_variables, batch,
      key, step) -> (loss, (metrics, new_model_state))`` (for tests and analysis).
    teacher_variables: the bound teacher variables (a tuple, one entry per teacher).
    objective: the `kfuse.distill.objectives.Objective`.
  """

  def __init__(self, init, jitted, loss_fn, teacher_variables, objective):
    self.init = init
    self.jitted = jitted
    self.loss_fn = loss_fn
    self.teacher_variables = teacher_variables
    self.objective = objective

  def __call__(self, state: DistillState, batch: Mapping[str, Array], key: Array):
    if not isinstance(batch, Mapping):          # the keys are checked once, when tracing
      check_batch(batch, ("x", "y"))
    return self.jitted(state, self.teacher_variables, dict(batch), key)

  @property
  def step(self) -> Callable:
    """``step(state, batch, key) -> (state, metrics)`` (`kfuse.protocol`)."""
    return self.__call__

  @property
  def learner(self) -> Learner:
    """This step as a `kfuse.protocol.Learner`."""
    return Learner(self.init, self.__call__)

  def with_teachers(self, teacher_variables: Sequence[PyTree]) -> "DistillStep":
    """The same compiled step bound to other teacher variables of the same shapes."""
    return DistillStep(self.init, self.jitted, self.loss_fn,
                       tuple(knnx.as_variables(v) for v in teacher_variables), self.objective)


_BATCH_KEYS = ("x", "y", "where", "topk_indices", "topk_logits", "topk_ce")  # topk_ce: kfuse.fusion


def _check_batch(batch: Mapping[str, Any]) -> None:
  """A mapping with ``x`` and ``y`` (`kfuse.protocol.check_batch`) and no unknown key."""
  check_batch(batch, ("x", "y"))
  unknown = sorted(set(batch) - set(_BATCH_KEYS))
  if unknown:
    raise KfuseError(f"batch: unknown key {unknown[0]!r}{suggest(unknown[0], _BATCH_KEYS)};"
                     f" known: {', '.join(_BATCH_KEYS)}")


def make_step(student: Any, objective: Any, optimizer: Any,
              teachers: Sequence[Teacher] = (), *, combine: str = "mean",
              combine_temperature: float = 1.0, mixup_alpha: float = 0.0,
              donate: bool = True, total_steps: int = 0) -> DistillStep:
  """Build a jit-compiled distillation step.

  Args:
    student: the student's Flax module or forward callable (see module doc).
    objective: a `kfuse.distill.objectives.Objective` (e.g. ``hinton()``,
      ``dkd()``, ``combine(hinton(), fitnets(...))``).
    optimizer: an optax transformation, or a `kfuse.optim` config mapping
      (``{'name': 'adamw', 'learning_rate': ..., 'schedule': ...}``, decayed
      over ``total_steps``); it updates the student's ``params`` and the
      objective's ``aux`` parameters only.
    teachers: frozen `Teacher` s (or ``(model, variables)`` pairs).
    combine: multi-teacher rule of `kfuse.distill.ensembles.teacher_weights`.
    combine_temperature: temperature of the ``entropy`` rule.
    mixup_alpha: Beta(α, α) mixup applied identically to teacher and student
      inputs (0 disables it).
    donate: donate the state buffers to the step.
    total_steps: run length for a config ``optimizer``'s schedule.

  Returns:
    A `DistillStep`.
  """
  from kfuse.distill.objectives import Objective

  if not isinstance(objective, Objective):
    raise KfuseError(f"objective: expected a kfuse.distill.objectives.Objective, got {type(objective)}")
  if combine not in ensembles.RULES:
    raise KfuseError(f"combine: unknown rule {combine!r}; known: {', '.join(ensembles.RULES)}")
  losses.check_temperature(combine_temperature, "combine_temperature")
  if not (isinstance(mixup_alpha, (int, float)) and mixup_alpha >= 0):
    raise KfuseError(f"mixup_alpha: must be a number >= 0, got {mixup_alpha!r}")
  teachers = tuple(t if isinstance(t, Teacher) else Teacher(*t) for t in teachers)
  teachers = tuple(t._replace(variables=knnx.as_variables(t.variables)) for t in teachers)
  if objective.needs_teachers and not teachers:
    raise KfuseError(f"teachers: objective {objective.name!r} needs at least one teacher")
  if objective.min_teachers and sum(_members(t) for t in teachers) < objective.min_teachers:
    raise KfuseError(f"teachers: objective {objective.name!r} needs {objective.min_teachers}"
                     f" teachers, got {sum(_members(t) for t in teachers)}")
  s_forward = as_forward(student, objective.student_features)
  t_forwards = tuple(as_forward(t.model, objective.teacher_features) for t in teachers)
  stacked = tuple(bool(t.stacked) for t in teachers)
  tx = _optimizer(optimizer, total_steps)

  def teacher_outputs(teacher_vars, x, labels):
    logits, feats = [], []
    for fwd, tv, is_stacked in zip(t_forwards, teacher_vars, stacked):
      if is_stacked:
        out = jax.vmap(lambda v: fwd(v, x, False, None)[0])(tv)
        out = jax.tree.map(jax.lax.stop_gradient, out)
        for i in range(out.logits.shape[0]):
          logits.append(out.logits[i])
          feats.append({k: v[i] for k, v in out.features.items()})
      else:
        out = jax.tree.map(jax.lax.stop_gradient, fwd(tv, x, False, None)[0])
        logits.append(out.logits)
        feats.append(dict(out.features))
    if not logits:
      return None
    z = jnp.stack(logits)
    w = ensembles.teacher_weights(z, labels, combine, combine_temperature)
    return TeacherOutputs(z, jax.lax.stop_gradient(w), tuple(feats))

  def loss_fn(params, aux, model_state, teacher_vars, batch, key, step):
    k_mix, k_drop = jax.random.split(key)
    x, labels = batch["x"], jnp.asarray(batch["y"])
    where = batch.get("where")
    variables = {"params": params, **model_state}
    if mixup_alpha > 0:
      if labels.ndim != 1:
        raise KfuseError(f"mixup_alpha: mixup needs one integer label per sample ([B]),"
                         f" got labels of shape {tuple(labels.shape)}")
      num_classes = jax.eval_shape(lambda v, xx: s_forward(v, xx, False, None)[0].logits,
                                   variables, x).shape[-1]
      x, labels, _ = mixup(k_mix, x, labels, num_classes, mixup_alpha)
    s_out, new_state = s_forward(variables, x, True, k_drop)
    t_out = teacher_outputs(teacher_vars, x, labels) if t_forwards else None
    if t_out is not None and t_out.logits.shape[1:] != s_out.logits.shape:
      losses.check_pair(s_out.logits, t_out.logits[0], "student logits", "teachers' logits")
    view = dict(batch, x=x, y=labels)
    loss, metrics = objective.loss(aux, s_out, t_out, view, step)
    hard = jnp.argmax(labels, -1) if labels.shape == s_out.logits.shape else labels
    metrics = dict(metrics)
    metrics["accuracy"] = losses.masked_mean(
        (jnp.argmax(s_out.logits, -1) == hard).astype(jnp.float32), where)
    if t_out is not None:
      tz = t_out.combined_logits(1.0)
      metrics["teacher_accuracy"] = losses.masked_mean(
          (jnp.argmax(tz, -1) == hard).astype(jnp.float32), where)
      metrics["agreement"] = losses.masked_mean(
          (jnp.argmax(tz, -1) == jnp.argmax(s_out.logits, -1)).astype(jnp.float32), where)
    return loss, (metrics, new_state)

  def step_fn(state: DistillState, teacher_vars, batch, key):
    _check_batch(batch)
    key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(
        lambda pa: loss_fn(pa[0], pa[1], state.model_state, teacher_vars, batch, key, state.step),
        has_aux=True)
    (loss, (metrics, new_state)), grads = grad_fn((state.params, state.aux))
    updates, opt_state = tx.update(grads, state.opt_state, (state.params, state.aux))
    params, aux = optax.apply_updates((state.params, state.aux), updates)
    model_state = {**state.model_state, **new_state}
    metrics = dict(metrics, loss=loss)
    return DistillState(step=state.step + 1, params=params, aux=aux, model_state=model_state,
                        opt_state=opt_state), metrics

  jitted = jax.jit(step_fn, donate_argnums=(0,) if donate else ())

  def init(variables: Mapping[str, Any], x_example: Array, key: Array | None = None) -> DistillState:
    variables = knnx.as_variables(variables)
    params, model_state = _split_variables(variables, "variables")
    key = jax.random.key(0) if key is None else key
    s_shape = jax.eval_shape(lambda v, x: s_forward(v, x, False, None)[0], variables, x_example)
    t_shapes = []
    for i, (fwd, t) in enumerate(zip(t_forwards, teachers)):
      _split_variables(t.variables if not t.stacked else
                       jax.tree.map(lambda a: a[0], t.variables), f"teachers[{i}].variables")
      if t.stacked:
        out = jax.eval_shape(lambda v, x: jax.vmap(lambda m: fwd(m, x, False, None)[0])(v),
                             t.variables, x_example)
        members = [Outputs(jax.ShapeDtypeStruct(out.logits.shape[1:], out.logits.dtype),
                           {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype)
                            for k, v in out.features.items()})
                   for _ in range(out.logits.shape[0])]
      else:
        members = [jax.eval_shape(lambda v, x: fwd(v, x, False, None)[0], t.variables, x_example)]
      for m in members:
        losses.check_pair(s_shape.logits, m.logits, "student logits",
                          f"teachers[{i}] logits", what="class/vocabulary axis")
      t_shapes.extend(members)
    aux = objective.init(key, s_shape, tuple(t_shapes))
    params, model_state, aux = copy_tree(params), copy_tree(model_state), copy_tree(aux)
    return DistillState(step=jnp.zeros((), jnp.int32), params=params, aux=aux,
                        model_state=model_state, opt_state=tx.init((params, aux)))

  return DistillStep(init, jitted, loss_fn, tuple(t.variables for t in teachers), objective)


def _optimizer(optimizer: Any, total_steps: int) -> optax.GradientTransformation:
  """An optax transformation as is; a config mapping through `kfuse.optim.make_optimizer`."""
  if isinstance(optimizer, Mapping) or hasattr(optimizer, "to_dict"):
    from kfuse import optim
    return optim.make_optimizer(optimizer, int(total_steps))
  if not hasattr(optimizer, "update") or not hasattr(optimizer, "init"):
    raise KfuseError(f"optimizer: expected an optax transformation or a config mapping,"
                     f" got {type(optimizer).__name__}")
  return optimizer


def _members(t: Teacher) -> int:
  if not t.stacked:
    return 1
  leaves = jax.tree.leaves(t.variables)
  return int(leaves[0].shape[0]) if leaves else 0


# ------------------------------------------------------------------ online / mutual distillation


def make_mutual_step(students: Sequence[Any], optimizer: Any, *,
                     temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                     mixup_alpha: float = 0.0, donate: bool = True,
                     total_steps: int = 0) -> DistillStep:
  """Online (mutual) distillation of N ≥ 2 students trained together.

  Student i minimises ce_weight·CE(z_i, y) + kd_weight·T²·mean_{j≠i}
  KL(sg(p_j^T) ‖ p_i^T), sg = stop_gradient; the step minimises the sum,
  which gives every student exactly its own gradient (its peers' targets are
  constants), i.e. the simultaneous-update variant of Deep Mutual Learning
  (Zhang et al., CVPR 2018; the paper alternates updates). ``state.params``
  and ``state.model_state`` are tuples, one entry per student.

  ``init(variables_list, x_example) -> DistillState``.
  """
  if len(students) < 2:
    raise KfuseError(f"students: mutual distillation needs at least 2 students, got {len(students)}")
  losses.check_temperature(temperature)
  losses.check_weight(ce_weight, "ce_weight")
  losses.check_weight(kd_weight, "kd_weight")
  forwards = tuple(as_forward(s) for s in students)
  n = len(forwards)
  tx = _optimizer(optimizer, total_steps)

  def loss_fn(params, aux, model_state, teacher_vars, batch, key, step):
    del aux, teacher_vars, step
    k_mix, k_drop = jax.random.split(key)
    x, labels = batch["x"], jnp.asarray(batch["y"])
    where = batch.get("where")
    if mixup_alpha > 0:
      num_classes = jax.eval_shape(
          lambda v, xx: forwards[0](v, xx, False, None)[0].logits,
          {"params": params[0], **model_state[0]}, x).shape[-1]
      x, labels, _ = mixup(k_mix, x, labels, num_classes, mixup_alpha)
    outs, states = [], []
    for i, fwd in enumerate(forwards):
      o, s = fwd({"params": params[i], **model_state[i]}, x, True, jax.random.fold_in(k_drop, i))
      outs.append(o.logits)
      states.append({**model_state[i], **s})
    for i in range(1, n):
      losses.check_pair(outs[0], outs[i], "students[0] logits", f"students[{i}] logits")
    total, metrics = jnp.zeros((), jnp.float32), {}
    hard = jnp.argmax(labels, -1) if labels.shape == outs[0].shape else labels
    for i in range(n):
      # mean_j hinton(z_i, sg(z_j)) = ce_weight·CE + kd_weight·T²·mean_j KL (linear in the KL)
      li = sum(losses.hinton(outs[i], jax.lax.stop_gradient(outs[j]), labels, temperature,
                             ce_weight, kd_weight, where) for j in range(n) if j != i) / (n - 1)
      total = total + li
      metrics[f"loss_{i}"] = li
      metrics[f"accuracy_{i}"] = losses.masked_mean(
          (jnp.argmax(outs[i], -1) == hard).astype(jnp.float32), where)
    metrics["accuracy"] = metrics["accuracy_0"]
    return total, (metrics, tuple(states))

  def step_fn(state, teacher_vars, batch, key):
    _check_batch(batch)
    key = jax.random.fold_in(key, state.step)
    (loss, (metrics, new_states)), grads = jax.value_and_grad(
        lambda p: loss_fn(p, None, state.model_state, None, batch, key, state.step),
        has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return DistillState(step=state.step + 1, params=params, aux=state.aux,
                        model_state=new_states, opt_state=opt_state), dict(metrics, loss=loss)

  jitted = jax.jit(step_fn, donate_argnums=(0,) if donate else ())

  def init(variables_list: Sequence[Mapping[str, Any]], x_example: Array,
           key: Array | None = None) -> DistillState:
    del key
    if len(variables_list) != n:
      raise KfuseError(f"variables_list: {len(variables_list)} variable sets for {n} students")
    variables_list = [knnx.as_variables(v) for v in variables_list]
    split = [_split_variables(v, f"variables_list[{i}]") for i, v in enumerate(variables_list)]
    shapes = [jax.eval_shape(lambda v, x, f=f: f(v, x, False, None)[0].logits, v, x_example)
              for f, v in zip(forwards, variables_list)]
    for i in range(1, n):
      losses.check_pair(shapes[0], shapes[i], "students[0] logits", f"students[{i}] logits",
                        what="class axis")
    params = tuple(copy_tree(p) for p, _ in split)
    model_state = tuple(copy_tree(s) for _, s in split)
    return DistillState(step=jnp.zeros((), jnp.int32), params=params, aux={},
                        model_state=model_state, opt_state=tx.init(params))

  return DistillStep(init, jitted, loss_fn, (), None)


def make_predict(model: Any) -> Callable:
  """``predict(variables, x) -> logits`` in eval mode, jitted (modules or forward callables)."""
  fwd = as_forward(model)
  return jax.jit(lambda variables, x: fwd(knnx.as_variables(variables), x, False, None)[0].logits)
