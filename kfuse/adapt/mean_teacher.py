"""Mean-teacher methods for continual test-time adaptation: CoTTA and RoTTA.

Both keep a student θ (updated by the optimizer) and an EMA teacher θ′, and
return the **teacher's** logits as the online prediction.

* `cotta` — Wang et al., *Continual test-time domain adaptation*, CVPR 2022
  (qinenergy/cotta). Per batch, all three models normalize with batch statistics:

  1. ``a = mean_i max_c softmax(f_src(x))_ic`` (anchor confidence);
  2. target ``t = mean_{n=1..N} f_θ′(aug_n(x))`` if ``a < AP`` else ``f_θ′(x)`` (logits);
  3. student loss ``mean_i -Σ_c softmax(t)_ic log softmax(f_θ(x))_ic`` (symmetric for
     ImageNet: ``½ CE(t→s) + ½ CE(s→t)``), one optimizer step on θ;
  4. teacher ``θ′ ← m θ′ + (1-m) θ`` over all parameters;
  5. stochastic restore: ``θ ← M ⊙ θ_src + (1-M) ⊙ θ`` with ``M ~ Bernoulli(p)``
     elementwise over the trainable parameters.

  Defaults: m = 0.999, p = 0.01, AP = 0.92 (CIFAR-10), N = 32, Adam 1e-3, every
  parameter trainable. Reproduces CIFAR-10-C sev-5 16.2-16.5 (continual).
* `rotta` — Yuan et al., *Robust test-time adaptation in dynamic scenarios*,
  CVPR 2023 (BIT-DA/RoTTA). BatchNorm becomes RobustBN: running statistics updated
  by ``μ ← (1-α)μ + α μ_B`` (same for σ²) and used to normalize. Per batch:
  teacher in eval mode gives ``ema_out``, pseudo-labels and entropies; each sample
  is offered to the CSTU memory (`kfuse.adapt.memory`); every ``update_frequency``
  samples, ``L = mean_{j ∈ mem} w_j · CE(softmax(f_θ′(x_j)) → f_θ(strong_aug(x_j)))``
  with timeliness weights ``w_j``, both forwards in RobustBN train mode (statistics
  updated on the memory), one optimizer step on the student's norm-layer affine,
  then ``θ′ ← (1-ν) θ′ + ν θ``. Defaults: α = 0.05, ν = 0.001, capacity 64,
  update every 64 samples, λ_t = λ_u = 1, Adam 1e-3, bs 64 (19.3 continual).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from kfuse.adapt import augment as aug_lib
from kfuse.adapt import core
from kfuse.adapt import memory as mem_lib
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["CottaState", "RottaState", "cotta", "rotta", "stochastic_restore"]


def stochastic_restore(key: jax.Array, params: Mapping[str, jax.Array],
                       source: Mapping[str, jax.Array], p: float) -> dict[str, jax.Array]:
  """``θ ← M ⊙ θ_src + (1-M) ⊙ θ``, ``M ~ Bernoulli(p)`` per element (CoTTA)."""
  keys = jax.random.split(key, len(params))
  out = {}
  for k, (path, theta) in zip(keys, sorted(params.items())):
    m = jax.random.uniform(k, theta.shape) < p
    out[path] = jnp.where(m, source[path], theta)
  return out


# ------------------------------------------------------------------ CoTTA


class CottaState(NamedTuple):
  """CoTTA state.

  Attributes:
    variables: the student's variables.
    teacher: the EMA teacher's variables.
    opt_state: optimizer state over the student's trainable subset.
    source: the source (anchor) variables, also the restore target.
    count: steps since the last reset.

  The augmentations and the restore mask are drawn from the per-call key.
  """
  variables: PyTree
  teacher: PyTree
  opt_state: PyTree
  source: PyTree
  count: jax.Array


def cotta(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
          mt: float = 0.999, rst: float = 0.01, ap: float = 0.92, n_augment: int = 32,
          augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
          symmetric: bool = False, episodic: bool = False, trainable: Any = "all",
          exclude: Sequence[str] = (), apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """CoTTA: EMA teacher, augmentation-averaged targets below the anchor threshold, restore.

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    optimizer: default ``optax.adam(1e-3)`` (CIFAR).
    mt: teacher EMA decay m.
    rst: stochastic-restore probability p.
    ap: anchor-confidence threshold AP (0.92 CIFAR-10, 0.72 CIFAR-100, 0.1 ImageNet).
    n_augment: N augmented teacher views.
    augment: ``aug(key, x) -> x`` (default `kfuse.adapt.augment.make_augment()` for
      signals ``[B, L]``; use ``make_augment(spatial_dims=2)`` for images).
    symmetric: symmetric cross-entropy (CoTTA's ImageNet variant).
    episodic, trainable, exclude, apply_kwargs: as `kfuse.adapt.tent`; default
      ``trainable="all"`` (CoTTA updates every weight and bias).
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx = optimizer if optimizer is not None else optax.adam(1e-3)
  aug = augment if augment is not None else aug_lib.make_augment()
  if not 0.0 <= mt <= 1.0:
    raise KfuseError(f"mt: must be in [0, 1], got {mt}")
  if not 0.0 <= rst <= 1.0:
    raise KfuseError(f"rst: must be in [0, 1], got {rst}")
  if int(n_augment) < 1:
    raise KfuseError(f"n_augment: must be >= 1, got {n_augment}")

  sel = core.Trainable(trainable, tuple(exclude))

  def fresh(source):
    return CottaState(source, source, sel.init(tx, source), source, jnp.zeros((), jnp.int32))

  def reset(state: CottaState) -> CottaState:
    return fresh(state.source)

  def fwd(variables, x):
    return core.forward(apply_fn, variables, x, norm="batch", apply_kwargs=apply_kwargs)[0]

  def step(state: CottaState, x, key):
    k_aug, k_rst = jax.random.split(core.need_key(key, "cotta"))
    finite = core.is_finite(x)
    start = reset(state) if episodic else state
    anchor_prob = jnp.max(jax.nn.softmax(fwd(start.source, x).astype(jnp.float32), -1), -1).mean()
    teacher_x = fwd(start.teacher, x)

    def averaged():
      def body(total, k):
        return total + fwd(start.teacher, aug(k, x)).astype(jnp.float32), None
      total, _ = jax.lax.scan(body, jnp.zeros(teacher_x.shape, jnp.float32),
                              jax.random.split(k_aug, int(n_augment)))
      return total / int(n_augment)

    target = jax.lax.cond(anchor_prob < ap, averaged, lambda: teacher_x.astype(jnp.float32))
    target = jax.lax.stop_gradient(target)

    def loss_fn(v):
      logits = fwd(v, x)
      loss = core.soft_cross_entropy(logits, target)
      if symmetric:
        loss = 0.5 * loss + 0.5 * core.soft_cross_entropy(target, logits)
      return loss.mean()

    loss, grads = sel.value_and_grad(loss_fn, start.variables, has_aux=False)
    student, opt_state = sel.update(tx, grads, start.opt_state, start.variables)
    teacher_params = core.ema(start.teacher["params"], student["params"], mt)
    restored = stochastic_restore(k_rst, sel.get(student), sel.get(start.source), rst)
    variables = sel.put(student, restored)
    teacher = core.with_params(start.teacher, teacher_params)
    new = CottaState(variables, teacher, opt_state, start.source, start.count + 1)
    new = core.guard(finite, new, state)
    metrics = {"loss": loss, "anchor_prob": anchor_prob,
               "augmented": (anchor_prob < ap).astype(jnp.float32),
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return new, target, metrics

  return core.adapter("cotta", core.make_init("cotta", lambda v, _: fresh(v), step), step, reset)


# ------------------------------------------------------------------ RoTTA


class RottaState(NamedTuple):
  """RoTTA state.

  Attributes:
    variables: the student's variables (``batch_stats`` = its RobustBN statistics).
    teacher: the teacher's variables (its own RobustBN statistics).
    opt_state: optimizer state over the student's trainable subset.
    memory: the CSTU bank (`kfuse.adapt.memory.Memory`).
    seen: samples offered to the memory so far (the update clock).
    source: the source variables.
    count: steps since the last reset.
    num_updates: student updates since the last reset.

  The strong augmentations are drawn from the per-call key.
  """
  variables: PyTree
  teacher: PyTree
  opt_state: PyTree
  memory: mem_lib.Memory
  seen: jax.Array
  source: PyTree
  count: jax.Array
  num_updates: jax.Array


def rotta(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
          alpha: float = 0.05, nu: float = 0.001, capacity: int = 64, update_frequency: int = 64,
          lambda_t: float = 1.0, lambda_u: float = 1.0,
          augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
          episodic: bool = False, trainable: Any = "norm", exclude: Sequence[str] = (),
          apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """RoTTA: RobustBN, CSTU memory, timeliness-weighted teacher→student CE, EMA teacher.

  Args:
    apply_fn: Flax ``Module`` or its ``apply`` (with BatchNorm layers).
    optimizer: default ``optax.adam(1e-3)``.
    alpha: RobustBN statistics momentum α.
    nu: teacher EMA rate ν (``θ′ ← (1-ν)θ′ + νθ``).
    capacity: memory slots K.
    update_frequency: samples between two student updates.
    lambda_t, lambda_u: weights of age and uncertainty in the memory score.
    augment: strong augmentation ``aug(key, x)`` (default
      ``make_augment(kfuse.adapt.augment.ROTTA)``).
    episodic, trainable, exclude, apply_kwargs: as `kfuse.adapt.tent`.
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx = optimizer if optimizer is not None else optax.adam(1e-3)
  aug = augment if augment is not None else aug_lib.make_augment(aug_lib.ROTTA)
  if not 0.0 < alpha <= 1.0:
    raise KfuseError(f"alpha: must be in (0, 1], got {alpha}")
  if not 0.0 <= nu <= 1.0:
    raise KfuseError(f"nu: must be in [0, 1], got {nu}")
  if int(capacity) < 1 or int(update_frequency) < 1:
    raise KfuseError(f"capacity/update_frequency: must be >= 1, got {capacity}/{update_frequency}")

  sel = core.Trainable(trainable, tuple(exclude))

  def fresh(source, x_shape, x_dtype):
    return RottaState(source, source, sel.init(tx, source),
                      mem_lib.init_memory(capacity, x_shape, x_dtype), jnp.zeros((), jnp.int32),
                      source, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def build(variables, example):
    if not core.batch_norm_paths(variables):
      raise KfuseError("variables: rotta needs BatchNorm layers (RobustBN); the model has none")
    return fresh(variables, example.shape[1:], example.dtype)

  def reset(state: RottaState) -> RottaState:
    return fresh(state.source, state.memory.x.shape[1:], state.memory.x.dtype)

  def update_model(variables, teacher, opt_state, memory, k_aug):
    """One student update on the memory bank, then the teacher EMA."""
    valid = memory.valid
    n = valid.sum()
    weights = mem_lib.timeliness(memory.age, capacity) * valid
    t_logits, t_stats = core.forward(apply_fn, teacher, memory.x, norm="ema", momentum=alpha,
                                     sample_mask=valid, apply_kwargs=apply_kwargs, require_bn=True)
    t_logits = jax.lax.stop_gradient(t_logits)
    x_strong = aug(k_aug, memory.x)

    def loss_fn(v):
      logits, stats = core.forward(apply_fn, v, x_strong, norm="ema", momentum=alpha,
                                   sample_mask=valid, apply_kwargs=apply_kwargs, require_bn=True)
      ce = core.soft_cross_entropy(logits, t_logits)
      return jnp.sum(ce * weights) / jnp.maximum(n, 1).astype(jnp.float32), stats

    (loss, s_stats), grads = sel.value_and_grad(loss_fn, variables)
    has = n > 0                                  # an empty bank: no loss, no step
    student, opt_state = sel.update(tx, grads, opt_state, variables, has)
    s_stats = core.tree_where(has, s_stats, variables["batch_stats"])
    t_stats = core.tree_where(has, t_stats, teacher["batch_stats"])
    student_params = student["params"]
    variables = {**variables, "params": student_params, "batch_stats": s_stats}
    teacher = {**teacher, "params": core.ema(teacher["params"], student_params, 1.0 - nu),
               "batch_stats": t_stats}
    return variables, teacher, opt_state, loss

  def step(state: RottaState, x, key):
    key = core.need_key(key, "rotta")
    finite = core.is_finite(x)
    start = reset(state) if episodic else state
    ema_out, _ = core.forward(apply_fn, start.teacher, x, norm="source", apply_kwargs=apply_kwargs)
    num_classes = int(ema_out.shape[-1])
    probs = jax.nn.softmax(ema_out.astype(jnp.float32), -1)
    pseudo = jnp.argmax(probs, -1)
    unc = -jnp.sum(probs * jnp.log(probs + 1e-6), -1)
    # The bank only depends on (x, pseudo-label, entropy), all fixed before any update, so
    # one scan fills it and keeps a snapshot after each sample that triggers an update
    # (sample i triggers one when (seen + i + 1) % F == 0). At most K = ceil(B / F) do.
    b, f = x.shape[0], int(update_frequency)
    k_max = -(-b // f)
    first = f - 1 - start.seen % f
    positions = first + f * jnp.arange(k_max)          # [K] sample index of each update

    def per_sample(carry, inp):
      memory, snaps = carry
      i, xi, yi, ui = inp
      memory = mem_lib.add(memory, xi, yi, ui, num_classes=num_classes,
                           lambda_t=lambda_t, lambda_u=lambda_u)
      snaps = jax.tree.map(lambda s, m: jnp.where((positions == i).reshape((-1,) + (1,) * m.ndim),
                                                  m[None], s), snaps, memory)
      return (memory, snaps), None

    snaps0 = jax.tree.map(lambda m: jnp.broadcast_to(m, (k_max,) + m.shape), start.memory)
    (memory, snaps), _ = jax.lax.scan(per_sample, (start.memory, snaps0),
                                      (jnp.arange(b), x, pseudo, unc))
    variables, teacher, opt_state = start.variables, start.teacher, start.opt_state
    num_updates, loss = start.num_updates, jnp.zeros((), jnp.float32)
    for j in range(k_max):
      snap = jax.tree.map(lambda s, j=j: s[j], snaps)
      # Computed unconditionally and selected: XLA:CPU runs convolution gradients inside a
      # lax.cond several times slower than the update itself (with B % F == 0 nothing is wasted).
      due = positions[j] < b
      new_vars, new_teacher, new_opt, new_loss = update_model(variables, teacher, opt_state, snap,
                                                              jax.random.fold_in(key, j))
      variables, teacher, opt_state, loss = core.tree_where(
          due, (new_vars, new_teacher, new_opt, new_loss), (variables, teacher, opt_state, loss))
      num_updates = num_updates + due.astype(jnp.int32)
    new = RottaState(variables, teacher, opt_state, memory, start.seen + b, start.source,
                     start.count + 1, num_updates)
    new = core.guard(finite, new, state)
    n_valid = memory.valid.sum()
    mean_age = jnp.sum(memory.age * memory.valid) / jnp.maximum(n_valid, 1)
    # Items stored during this step have age <= B (older ones were >= 1 and aged by B).
    memory_new = jnp.sum(memory.valid & (memory.age <= b)).astype(jnp.float32)
    metrics = {"loss": loss, "memory_size": n_valid.astype(jnp.float32), "memory_age": mean_age,
               "memory_new": memory_new,
               "num_updates": num_updates.astype(jnp.float32),
               "uncertainty": unc.mean(), "skipped": 1.0 - finite.astype(jnp.float32)}
    return new, ema_out, metrics

  return core.adapter("rotta", core.make_init("rotta", build, step), step, reset)
