"""Supervised training utilities: optimizers from config, jitted steps, eval, checkpoints.

Typical use (build the jitted functions once, reuse them for every task of
the same shapes)::

    tx = make_optimizer(cfg.optimizer, total_steps=cfg.steps)
    step = make_train_step(model, tx)              # jit, donates the state
    predict = make_predict(model)                  # jit
    state = init_state(variables['params'], tx)
    state, history = fit(step, state, batches, cfg.steps, key)
    metrics = evaluate(predict, state.variables, x_test, y_test)
    save_checkpoint(path, state.variables)

Models with BatchNorm keep their running statistics in ``state.model_state``
(``init_state(params, tx, {'batch_stats': ...})`` or
`init_state_from_variables`); ``state.variables`` reassembles both.
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
    "check_types",
    "make_optimizer",
    "init_state",
    "init_state_from_variables",
    "make_train_step",
    "make_predict",
    "evaluate",
    "fit",
    "latest_step",
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


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list",
               tuple: "tuple", type(None): "None"}


def _is(value: Any, t: type) -> bool:
  if t is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if t is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if t is dict:
    return isinstance(value, Mapping) or hasattr(value, "to_dict")
  if t is list:
    return isinstance(value, (list, tuple))
  return isinstance(value, t)


def check_types(cfg: Any, schema: Mapping[str, Any], prefix: str) -> None:
  """Check ``cfg``'s fields against ``schema``; raise `KfuseError` naming the first bad field.

  ``schema`` maps a field name to a type (``int``, ``float`` -- ints accepted --,
  ``bool``, ``str``, ``dict``, ``list`` -- lists or tuples --), a tuple of
  types, or a nested schema dict for a sub-config. Fields missing from
  ``cfg`` are skipped (defaults apply); unknown fields are not checked.
  """
  for field, expected in schema.items():
    value = _get(cfg, field, _MISSING)
    if value is _MISSING:
      continue
    where = f"{prefix}.{field}" if prefix else field
    if isinstance(expected, Mapping):
      if not _is(value, dict):
        raise KfuseError(f"{where}: expected a dict of fields, got {type(value).__name__} {value!r}")
      check_types(value, expected, where)
      continue
    types = expected if isinstance(expected, tuple) else (expected,)
    if not any(_is(value, t) for t in types):
      want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
      raise KfuseError(f"{where}: expected {want}, got {type(value).__name__} {value!r}")


_MISSING = object()

OPTIMIZER_SCHEMA = {"name": str, "learning_rate": float, "schedule": str, "warmup_steps": int,
                    "clip_norm": (float, type(None)), "kwargs": (dict, type(None))}


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
  check_types(cfg, OPTIMIZER_SCHEMA, "optimizer")
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
  """Everything a train step updates. A pytree; donated to the jitted step.

  Attributes:
    step: number of steps taken (int32 scalar).
    params: the ``params`` collection.
    opt_state: the optax state.
    model_state: the other variable collections, e.g. ``{'batch_stats': ...}``
      for BatchNorm models (``{}`` for stateless ones); updated by every
      train step.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree = struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """``{'params': ..., **model_state}``: what ``model.apply`` / `make_predict` take."""
    return {"params": self.params, **self.model_state}


def init_state(params: PyTree, tx: optax.GradientTransformation,
               model_state: Mapping[str, PyTree] | None = None) -> TrainState:
  """Fresh state; copies its inputs so donation never invalidates the caller's arrays.

  Args:
    params: the ``params`` collection (not the whole variables dict).
    tx: the optimizer.
    model_state: non-parameter collections, e.g. ``{'batch_stats': ...}``.
  """
  copy = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)
  params = copy(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=copy(dict(model_state or {})))


def init_state_from_variables(variables: Mapping[str, PyTree],
                              tx: optax.GradientTransformation) -> TrainState:
  """`init_state` from a whole variables dict (``params`` + e.g. ``batch_stats``)."""
  if "params" not in variables:
    raise KfuseError("variables: no 'params' collection")
  return init_state(variables["params"], tx,
                    {k: v for k, v in variables.items() if k != "params"})


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    trainable: Sequence[str] | None = None) -> Callable:
  """``step(state, x, y, key) -> (state, {'loss', 'accuracy'})``, jitted, state donated.

  ``key`` feeds dropout (folded with the step counter). Pass the same
  ``trainable`` as to `make_optimizer`: the other top-level parameter groups
  are wrapped in ``stop_gradient`` so no gradient is computed for them.
  Models with state (BatchNorm) normalise with batch statistics and the step
  stores the updated running statistics in ``state.model_state``.
  """
  trainable = tuple(trainable) if trainable is not None else None

  def loss_fn(params, model_state, x, y, key):
    if trainable is not None:
      params = {k: (v if k in trainable else jax.lax.stop_gradient(v)) for k, v in params.items()}
    variables = {"params": params, **model_state}
    if model_state:
      logits, new_state = model.apply(variables, x, train=True, rngs={"dropout": key},
                                      mutable=list(model_state))
    else:
      logits, new_state = model.apply(variables, x, train=True, rngs={"dropout": key}), {}
    return cross_entropy(logits, y), (logits, dict(new_state))

  def step(state: TrainState, x, y, key):
    key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, model_state)), grads = grad_fn(state.params, state.model_state, x, y, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     model_state=model_state)
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
        progress: bool = True, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
        max_to_keep: int = 2, meta: Mapping[str, Any] | None = None
        ) -> tuple[TrainState, list[dict[str, float]]]:
  """Run ``step`` until ``state.step == num_steps``, optionally resumable.

  Metrics are averaged over windows of ``log_every`` steps and only then
  copied to the host (no per-step sync). Shows a tqdm bar when ``progress``.

  With ``checkpoint_dir``, an Orbax ``CheckpointManager`` there saves the
  train state, the metric history and ``meta`` every ``checkpoint_every``
  steps (0: only at the end) and at the last step. If the directory already
  holds a checkpoint, the run *resumes* from the latest one: the state is
  restored (after checking that it was saved by the same model and with the
  same ``meta``, else `KfuseError` naming the field), the first
  ``restored_step`` batches of ``batches`` are skipped, and training goes on,
  so an interrupted-and-resumed run sees the same batches and dropout keys as
  an uninterrupted one. A finished checkpoint (``step == num_steps``) makes
  `fit` return the restored state at once.

  Args:
    step: from `make_train_step`.
    state: the initial state (also the restore target's structure).
    batches: an iterator of ``(x, y)`` host batches starting at step 0.
    num_steps: the total step count of the run (not the steps still to do).
    key: dropout key (folded with the step counter inside ``step``).
    desc: progress-bar label and error prefix.
    log_every: metrics window.
    progress: show a progress bar.
    checkpoint_dir: where to save / resume; None disables checkpointing.
    checkpoint_every: save interval in steps (0: at the end only).
    max_to_keep: checkpoints kept on disk.
    meta: JSON-able description of the run (e.g. the model config); a
      resumed checkpoint must carry equal values for these keys.

  Returns:
    ``(state, history)``, history a list of ``{'step', 'loss', 'accuracy'}``.
  """
  from tqdm.auto import tqdm

  history: list[dict[str, float]] = []
  mngr = None
  if checkpoint_dir:
    if int(checkpoint_every) < 0:
      raise KfuseError(f"checkpoint_every: must be >= 0, got {checkpoint_every}")
    mngr = _manager(checkpoint_dir, max_to_keep)
  try:
    if mngr is not None and mngr.latest_step() is not None:
      state, history = _restore_train_state(mngr, state, meta, num_steps)
    start = int(state.step)
    if start >= num_steps:
      return state, history
    it: Iterator = iter(batches)
    for _ in range(start):  # replay the data stream up to the restored step
      next(it, None)
    window: list[dict[str, jax.Array]] = []
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
      for i in range(start, num_steps):
        try:
          x, y = next(it)
        except StopIteration:
          raise KfuseError(f"{desc}: the batch iterator ran out after {i} of {num_steps} steps") from None
        state, metrics = step(state, x, y, key)
        window.append(metrics)
        done = i + 1
        save = mngr is not None and (done == num_steps or (checkpoint_every and done % checkpoint_every == 0))
        if window and (done % log_every == 0 or done == num_steps or save):
          history.append(_summarise(window, done))
          window = []
          bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['accuracy']:.3f}")
        if save:
          _save_train_state(mngr, state, history, meta)
        bar.update(1)
    finally:
      bar.close()
  finally:
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
  return state, history


def _summarise(window: Sequence[Mapping[str, jax.Array]], step: int) -> dict[str, float]:
  host = jax.device_get(list(window))
  row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  row["step"] = step
  return row


# ------------------------------------------------------------------ checkpoints

_STATE, _META = "state", "meta"


def _manager(directory: str, max_to_keep: int):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=int(max_to_keep), create=True,
                                         enable_async_checkpointing=False)
  handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def _state_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "model_state": state.model_state}


def _json(x: Any) -> Any:
  """A JSON round trip (tuples -> lists), so saved and current meta compare equal."""
  import json
  return json.loads(json.dumps(x, default=str))


def _save_train_state(mngr, state: TrainState, history: list, meta: Mapping | None) -> None:
  import orbax.checkpoint as ocp

  extra = {"history": history, "meta": _json(dict(meta or {}))}
  mngr.save(int(state.step), args=ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(_state_tree(state)), _META: ocp.args.JsonSave(extra)}))


def _shapes(tree: PyTree, prefix: str) -> dict[str, tuple]:
  from kfuse.tree import flatten
  return {f"{prefix}/{k}": tuple(getattr(v, "shape", ())) for k, v in flatten(tree).items()}


def _diff_field(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> str | None:
  """One line naming the first path whose presence or shape differs, else None."""
  for path in sorted(set(saved) | set(wanted)):
    if path not in saved:
      return f"{path}: missing from the checkpoint (the model expects shape {wanted[path]})"
    if path not in wanted:
      return f"{path}: in the checkpoint (shape {saved[path]}) but not in the model"
    if saved[path] != wanted[path]:
      return f"{path}: shape {saved[path]} in the checkpoint, the model expects {wanted[path]}"
  return None


def _restore_train_state(mngr, state: TrainState, meta: Mapping | None,
                         num_steps: int) -> tuple[TrainState, list]:
  """Restore the latest checkpoint of ``mngr`` into ``state``'s structure, checking it first."""
  import orbax.checkpoint as ocp

  step = mngr.latest_step()
  where = f"checkpoint {mngr.directory}/{step}"
  try:
    saved_tree = mngr.item_metadata(step)[_STATE]
    extra = mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
  except Exception as e:  # an unreadable or foreign directory
    raise KfuseError(f"{where}: unreadable train state ({type(e).__name__}: {str(e).splitlines()[0]})") from e
  saved_meta, current = dict(extra.get("meta") or {}), _json(dict(meta or {}))
  for k in sorted(current):
    if saved_meta.get(k) != current[k]:
      raise KfuseError(f"{where}: saved with {k}={saved_meta.get(k)!r}, but this run has"
                       f" {k}={current[k]!r}; use a fresh checkpoint directory to start over")
  for collection in ("params", "model_state"):
    problem = _diff_field(_shapes(saved_tree.get(collection, {}), collection),
                          _shapes(getattr(state, collection), collection))
    if problem:
      raise KfuseError(f"{where}: saved by a different model: {problem}")
  if step > num_steps:
    raise KfuseError(f"{where}: is at step {step}, beyond num_steps={num_steps}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
  try:
    tree = mngr.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
  except ValueError as e:
    raise KfuseError(f"{where}: opt_state does not match this optimizer"
                     f" ({str(e).splitlines()[0]})") from e
  restored = TrainState(step=jnp.asarray(tree["step"], jnp.int32), params=tree["params"],
                        opt_state=tree["opt_state"], model_state=tree["model_state"])
  return restored, list(extra.get("history") or [])


def latest_step(checkpoint_dir: str) -> int | None:
  """The latest step saved by `fit` under ``checkpoint_dir`` (None if there is none)."""
  if not os.path.isdir(checkpoint_dir):
    return None
  mngr = _manager(checkpoint_dir, 2)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


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
