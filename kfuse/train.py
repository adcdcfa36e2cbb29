"""Supervised training utilities: optimizers from config, jitted steps, eval, checkpoints.

Typical use (build the jitted functions once, reuse them for every task of
the same shapes)::

    tx = make_optimizer(cfg.optimizer, total_steps=cfg.steps)
    step = make_train_step(model, tx)              # jit, donates the state
    predict = make_predict(model)                  # jit
    state = init_state(variables['params'], tx)
    state, history = fit(step, state, batches, cfg.steps, key)
    metrics = evaluate(predict, {'params': state.params}, x_test, y_test)
    save_checkpoint(path, {'params': state.params})
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from kfuse.tree import KfuseError

PyTree = Any

__all__ = [
    "TrainState",
    "OPTIMIZERS",
    "SCHEDULES",
    "make_schedule",
    "make_optimizer",
    "init_state",
    "make_train_step",
    "make_predict",
    "evaluate",
    "fit",
    "save_checkpoint",
    "restore_checkpoint",
]

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "lion": optax.lion,
}
SCHEDULES = ("constant", "cosine", "linear")


def _get(cfg: Any, field: str, default: Any = None) -> Any:
  """Read ``field`` from a dict or ConfigDict, with a default."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(field, default)
  return getattr(cfg, field, default) if hasattr(cfg, field) else default


def _to_dict(x: Any) -> dict:
  if x is None:
    return {}
  if hasattr(x, "to_dict"):
    return x.to_dict()
  return dict(x)


# ------------------------------------------------------------------ optimizer


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Learning-rate schedule from ``cfg`` (learning_rate, schedule, warmup_steps).

  ``schedule``: ``constant`` (after linear warmup), ``cosine`` (warmup then
  cosine decay to 0 at ``total_steps``) or ``linear`` (warmup then linear decay to 0).
  """
  lr = float(_get(cfg, "learning_rate", 1e-3))
  kind = _get(cfg, "schedule", "constant")
  warmup = int(_get(cfg, "warmup_steps", 0) or 0)
  if lr <= 0:
    raise KfuseError(f"optimizer.learning_rate: must be positive, got {lr}")
  if kind not in SCHEDULES:
    raise KfuseError(f"optimizer.schedule: unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
  if warmup < 0 or (total_steps > 0 and warmup >= total_steps and kind != "constant"):
    raise KfuseError(f"optimizer.warmup_steps: must be in [0, {total_steps}), got {warmup}")
  decay = max(1, total_steps - warmup)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay)
  else:
    after = optax.linear_schedule(lr, 0.0, decay)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _param_labels(params: PyTree, trainable: Sequence[str]) -> PyTree:
  return {k: jax.tree.map(lambda _: "train" if k in trainable else "freeze", v)
          for k, v in params.items()}


def make_optimizer(cfg: Any, total_steps: int,
                   trainable: Sequence[str] | None = None) -> optax.GradientTransformation:
  """An optax optimizer from config.

  Args:
    cfg: dict / ConfigDict with ``name`` (a key of `OPTIMIZERS`),
      ``learning_rate``, ``schedule``, ``warmup_steps``, optional
      ``clip_norm`` (> 0 enables global-norm clipping) and ``kwargs`` (extra
      keyword arguments of the optax constructor, e.g. ``weight_decay``).
    total_steps: length of the run (for decaying schedules).
    trainable: top-level parameter collections to update (e.g. ``['head']``
      for a linear probe); None updates everything. Frozen collections get
      zero updates.
  """
  name = _get(cfg, "name", "adam")
  if name not in OPTIMIZERS:
    raise KfuseError(f"optimizer.name: unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
  kwargs = _to_dict(_get(cfg, "kwargs"))
  try:
    tx = OPTIMIZERS[name](make_schedule(cfg, total_steps), **kwargs)
  except TypeError as e:
    raise KfuseError(f"optimizer.kwargs: invalid arguments {sorted(kwargs)} for {name!r}: {e}") from e
  clip = float(_get(cfg, "clip_norm", 0.0) or 0.0)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if trainable is not None:
    trainable = tuple(trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               lambda p: _param_labels(p, trainable))
  return tx


# ------------------------------------------------------------------ state / steps


@struct.dataclass
class TrainState:
  """Everything a train step updates. A pytree; donated to the jitted step."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


def init_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """Fresh state; copies ``params`` so donation never invalidates the caller's arrays."""
  params = jax.tree.map(lambda a: jnp.array(a, copy=True), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    trainable: Sequence[str] | None = None) -> Callable:
  """``step(state, x, y, key) -> (state, {'loss', 'accuracy'})``, jitted, state donated.

  ``key`` feeds dropout (folded with the step counter). Pass the same
  ``trainable`` as to `make_optimizer`: the other collections are wrapped in
  ``stop_gradient`` so no gradient is computed for them.
  """
  trainable = tuple(trainable) if trainable is not None else None

  def loss_fn(params, x, y, key):
    if trainable is not None:
      params = {k: (v if k in trainable else jax.lax.stop_gradient(v)) for k, v in params.items()}
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
    return cross_entropy(logits, y), logits

  def step(state: TrainState, x, y, key):
    key = jax.random.fold_in(key, state.step)
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, y, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "accuracy": acc}

  return jax.jit(step, donate_argnums=0)


def make_predict(model: nn.Module) -> Callable:
  """``predict(variables, x) -> logits`` in eval mode, jitted."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def evaluate(predict: Callable, variables: PyTree, x: np.ndarray, y: np.ndarray,
             batch_size: int = 512) -> dict[str, float]:
  """Accuracy and mean loss of ``predict`` on ``(x, y)``.

  Inputs are processed in fixed ``batch_size`` chunks (the last one padded),
  so any dataset size reuses one compilation.
  """
  n = len(y)
  if n == 0:
    raise KfuseError("evaluate: empty evaluation set")
  pad = (-n) % batch_size
  xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
  logits = [np.asarray(predict(variables, xp[i:i + batch_size]))
            for i in range(0, len(xp), batch_size)]
  logits = np.concatenate(logits)[:n].astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  loss = float(np.mean(logz - logits[np.arange(n), y]))
  acc = float(np.mean(logits.argmax(-1) == y))
  return {"accuracy": acc, "loss": loss}


def fit(step: Callable, state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]],
        num_steps: int, key: jax.Array, *, desc: str = "train", log_every: int = 100,
        progress: bool = True) -> tuple[TrainState, list[dict[str, float]]]:
  """Run ``num_steps`` steps of ``step`` over ``batches``.

  Metrics are averaged over windows of ``log_every`` steps and only then
  copied to the host (no per-step sync). Shows a tqdm bar when ``progress``.

  Returns:
    ``(state, history)``, history a list of ``{'step', 'loss', 'accuracy'}``.
  """
  from tqdm.auto import tqdm

  if num_steps <= 0:
    return state, []
  it: Iterator = iter(batches)
  history: list[dict[str, float]] = []
  window: list[dict[str, jax.Array]] = []
  bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
  try:
    for i in range(num_steps):
      try:
        x, y = next(it)
      except StopIteration:
        raise KfuseError(f"{desc}: the batch iterator ran out after {i} of {num_steps} steps") from None
      state, metrics = step(state, x, y, key)
      window.append(metrics)
      if len(window) == log_every or i == num_steps - 1:
        host = jax.device_get(window)
        row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        row["step"] = i + 1
        history.append(row)
        window = []
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
      bar.update(1)
  finally:
    bar.close()
  return state, history


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str, tree: PyTree, *, force: bool = True) -> str:
  """Save ``tree`` with Orbax's StandardCheckpointer (atomic); wait until it is on disk.

  Returns the absolute checkpoint path. ``force`` overwrites an existing one.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(path, tree, force=force)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  return path


def restore_checkpoint(path: str, like: PyTree | None = None) -> PyTree:
  """Restore a tree saved by `save_checkpoint` (``like`` gives the target structure)."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise KfuseError(f"checkpoint: no checkpoint directory at {path!r}")
  ckptr = ocp.StandardCheckpointer()
  try:
    if like is None:
      return ckptr.restore(path)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return ckptr.restore(path, abstract)
  finally:
    ckptr.close()
