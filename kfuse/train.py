"""Supervised training: jitted steps on the `kfuse.protocol` step protocol, eval, checkpoints.

Typical use (build the jitted functions once, reuse them for every task of
the same shapes)::

    tx = optim.make_optimizer(cfg.optimizer, total_steps=cfg.steps)
    step = make_train_step(model, tx)              # jit, donates the state
    predict = make_predict(model)                  # jit
    state = init_state(variables['params'], tx)
    state, metrics = step(state, {"x": x, "y": y}, key)
    state, history = fit(step, state, batches(key, x, y, 128), cfg.steps, key)
    metrics = evaluate(predict, state.variables, x_test, y_test)
    save_checkpoint(path, state.variables)

or in one call, ``state, history = train_classifier(model, variables, x, y, optimizer=cfg,
steps=..., batch_size=..., key=key)``. Optimizers come from `kfuse.optim` (one
schema for every learner); the loss is `kfuse.distill.losses.cross_entropy`.

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

from kfuse import nnx as knnx
from kfuse.data import iterate
from kfuse.distill.losses import cross_entropy
from kfuse.distill.steps import copy_tree, make_predict
from kfuse.optim import make_optimizer, trainable_labels
from kfuse.protocol import Learner, check_batch
from kfuse.tree import KfuseError

PyTree = Any

__all__ = [
    "TrainState",
    "init_state",
    "init_state_from_variables",
    "make_train_step",
    "learner",
    "make_predict",
    "batches",
    "evaluate",
    "fit",
    "train_classifier",
    "add_label_noise",
    "latest_step",
    "save_checkpoint",
    "restore_checkpoint",
]

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
  params = copy_tree(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=copy_tree(dict(model_state or {})))


def init_state_from_variables(variables: Mapping[str, PyTree],
                              tx: optax.GradientTransformation) -> TrainState:
  """`init_state` from a whole variables dict (``params`` + e.g. ``batch_stats``)."""
  if "params" not in variables:
    raise KfuseError("variables: no 'params' collection")
  return init_state(variables["params"], tx,
                    {k: v for k, v in variables.items() if k != "params"})


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    trainable: Sequence[str] | None = None) -> Callable:
  """``step(state, batch, key) -> (state, {'loss', 'accuracy'})``, jitted, state donated.

  ``batch`` is a mapping ``{"x": inputs, "y": integer labels}`` (`kfuse.protocol`);
  the loss is `kfuse.distill.losses.cross_entropy`. ``key`` feeds dropout
  (folded with the step counter). Pass the same ``trainable`` as to
  `kfuse.optim.make_optimizer`: the other parameters are wrapped in
  ``stop_gradient`` so no gradient is computed for them. Models with state
  (BatchNorm) normalise with batch statistics and the step stores the updated
  running statistics in ``state.model_state``.
  """
  trainable = tuple(trainable) if trainable is not None else None
  apply = knnx.apply_fn(model) if knnx.is_nnx(model) else model.apply   # NNX: its graphdef

  def loss_fn(params, model_state, x, y, key):
    if trainable is not None:
      labels = trainable_labels(params, trainable)
      params = jax.tree.map(lambda v, lab: v if lab == "train" else jax.lax.stop_gradient(v),
                            params, labels)
    variables = {"params": params, **model_state}
    if model_state:
      logits, new_state = apply(variables, x, train=True, rngs={"dropout": key},
                                mutable=list(model_state))
    else:
      logits, new_state = apply(variables, x, train=True, rngs={"dropout": key}), {}
    return cross_entropy(logits, y), (logits, dict(new_state))

  def step(state: TrainState, batch, key):
    x, y = batch["x"], batch["y"]
    key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, model_state)), grads = grad_fn(state.params, state.model_state, x, y, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     model_state=model_state)
    return new, {"loss": loss, "accuracy": acc}

  jitted = jax.jit(step, donate_argnums=0)

  def checked(state: TrainState, batch, key):
    check_batch(batch, ("x", "y"))
    return jitted(state, {"x": batch["x"], "y": batch["y"]}, key)

  return checked


def learner(model: nn.Module, tx: optax.GradientTransformation,
            trainable: Sequence[str] | None = None) -> Learner:
  """Supervised training as a `kfuse.protocol.Learner`: ``init(variables) -> TrainState``, the jitted step."""
  return Learner(lambda variables: init_state_from_variables(knnx.as_variables(variables), tx),
                 make_train_step(model, tx, trainable))


def batches(key: jax.Array, x: np.ndarray, y: np.ndarray, batch_size: int,
            epochs: int | None = None, **kwargs: Any) -> Iterator[dict]:
  """`kfuse.data.iterate` as protocol batches ``{"x": ..., "y": ...}`` (forever by default)."""
  for xb, yb in iterate(key, x, y, batch_size, epochs=epochs, **kwargs):
    yield {"x": xb, "y": yb}


def add_label_noise(y: np.ndarray, num_classes: int, rate: float, seed: int,
                    name: str = "noise") -> np.ndarray:
  """Symmetric noise: each label is replaced, with probability ``rate``, by a uniformly drawn *other* class.

  Deterministic in ``seed``; ``name`` is the config field named by the error
  for a rate outside [0, 1).
  """
  if not 0.0 <= rate < 1.0:
    raise KfuseError(f"{name}: must be in [0, 1), got {rate}")
  rng = np.random.default_rng([seed, 77])
  flip = rng.random(len(y)) < rate
  other = (y + rng.integers(1, num_classes, len(y))) % num_classes
  return np.where(flip, other, y).astype(y.dtype)


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


def fit(step: Callable, state: TrainState, batches: Iterable[Mapping[str, np.ndarray]],
        num_steps: int, key: jax.Array, *, desc: str = "train", log_every: int = 100,
        progress: bool = True, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
        max_to_keep: int = 2, meta: Mapping[str, Any] | None = None,
        on_step: Callable[[int, TrainState], Any] | None = None
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
    batches: an iterator of ``{"x": ..., "y": ...}`` host batches starting at step 0
      (e.g. `batches`).
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
    on_step: called as ``on_step(steps_done, state)`` after every step (not
      for steps restored from a checkpoint); the state is donated to the next
      step, so copy what you keep (``jax.device_get``).

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
          batch = next(it)
        except StopIteration:
          raise KfuseError(f"{desc}: the batch iterator ran out after {i} of {num_steps} steps") from None
        check_batch(batch, ("x", "y"), where=f"{desc}: batch {i}")
        state, metrics = step(state, batch, key)
        window.append(metrics)
        done = i + 1
        if on_step is not None:
          on_step(done, state)
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


def train_classifier(model: nn.Module, variables: Mapping[str, PyTree], x: np.ndarray,
                     y: np.ndarray, *, optimizer: Any, steps: int, batch_size: int,
                     data_key: jax.Array, dropout_key: jax.Array,
                     trainable: Sequence[str] | None = None,
                     step: tuple[optax.GradientTransformation, Callable] | None = None,
                     **fit_kwargs: Any) -> tuple[TrainState, list[dict[str, float]]]:
  """Train ``model`` from ``variables`` on ``(x, y)`` with cross-entropy; the one "train a classifier".

  Builds the optimizer from the `kfuse.optim` config ``optimizer`` (``steps``
  long, only ``trainable`` updated), the jitted step, the state, and runs `fit`
  over shuffled ``batch_size`` batches drawn with ``data_key`` (dropout from
  ``dropout_key``). ``step=(tx, jitted_step)`` reuses an already built step
  (one compilation for many runs of the same shapes). ``fit_kwargs`` go to
  `fit` (desc, log_every, progress, checkpoint_dir, checkpoint_every, meta,
  on_step).
  Returns ``(state, history)``.
  """
  if step is None:
    tx = make_optimizer(optimizer, int(steps), trainable)
    step = (tx, make_train_step(model, tx, trainable))
  tx, jitted = step
  state = init_state_from_variables(variables, tx)
  data = batches(data_key, x, y, int(batch_size), epochs=None)
  return fit(jitted, state, data, int(steps), dropout_key, **fit_kwargs)


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
