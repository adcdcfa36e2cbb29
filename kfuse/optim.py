"""Optimizers from config: the one schema every learner in kfuse reads.

    tx = make_optimizer({"name": "adamw", "learning_rate": 2e-3, "schedule": "cosine",
                         "warmup_steps": 100, "clip_norm": 1.0,
                         "kwargs": {"weight_decay": 1e-4}}, total_steps=3000,
                         trainable=["head"])

Fields (all optional): ``name`` (a key of `OPTIMIZERS`, default ``adam``),
``learning_rate`` (> 0, default 1e-3), ``schedule`` (``constant`` | ``cosine`` |
``linear``, after a linear warm-up of ``warmup_steps``), ``clip_norm`` (> 0:
global-norm clipping before the update), ``kwargs`` (extra keyword arguments of
the optax constructor, e.g. ``{"momentum": 0.9}`` for ``sgd``). ``trainable``
selects the updated subset of the parameters; the rest get zero updates
(``optax.multi_transform`` with ``optax.set_to_zero``). Supervised training
(`kfuse.train`), distillation (`kfuse.distill.make_step`, which also accepts
such a config) and test-time adaptation (`kfuse.adapt.make`, an unbounded
stream: ``total_steps=0``, so constant schedules only) all build their
optimizers here. Bad or unknown fields raise `kfuse.tree.KfuseError` naming
``optimizer.<field>``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import optax

from kfuse import configs
from kfuse.registry import suggest
from kfuse.tree import KfuseError

__all__ = ["OPTIMIZERS", "SCHEDULES", "OPTIMIZER_SCHEMA", "check_types", "check_fields", "make_schedule",
           "make_optimizer", "trainable_labels"]

PyTree = Any

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "lion": optax.lion,
}
SCHEDULES = ("constant", "cosine", "linear")


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list",
               tuple: "tuple", type(None): "None"}
_MISSING = object()


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
    value = configs.get(cfg, field, _MISSING)
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


def check_fields(cfg: Any, schema: Mapping[str, Any], prefix: str, hint: str = "") -> None:
  """Raise `KfuseError` naming the first field of ``cfg`` that ``schema`` does not know.

  An unknown field would otherwise be ignored silently (e.g. an old-style
  top-level ``momentum`` of an optimizer config).
  """
  if cfg is None:
    return
  for field in configs.to_dict(cfg):
    if field not in schema:
      raise KfuseError(f"{prefix}.{field}: unknown field{suggest(field, schema)};"
                       f" known: {', '.join(schema)}{hint}")


OPTIMIZER_SCHEMA = {"name": str, "learning_rate": float, "schedule": str, "warmup_steps": int,
                    "clip_norm": (float, type(None)), "kwargs": (dict, type(None))}


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Learning-rate schedule from ``cfg`` (learning_rate, schedule, warmup_steps).

  ``schedule``: ``constant`` (after linear warmup), ``cosine`` (warmup then
  cosine decay to 0 at ``total_steps``) or ``linear`` (warmup then linear decay to 0).
  ``total_steps <= 0`` means a run of unknown length (a test-time stream):
  only ``constant`` is accepted there.
  """
  lr = float(configs.get(cfg, "learning_rate", 1e-3))
  kind = configs.get(cfg, "schedule", "constant")
  warmup = int(configs.get(cfg, "warmup_steps", 0) or 0)
  if lr <= 0:
    raise KfuseError(f"optimizer.learning_rate: must be positive, got {lr}")
  if kind not in SCHEDULES:
    raise KfuseError(f"optimizer.schedule: unknown schedule {kind!r}{suggest(kind, SCHEDULES)};"
                     f" known: {', '.join(SCHEDULES)}")
  if kind != "constant" and total_steps <= 0:
    raise KfuseError(f"optimizer.schedule: {kind!r} decays over the run's length, but this run"
                     f" has none (total_steps={total_steps}); use 'constant'")
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


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def trainable_labels(params: PyTree, trainable: Sequence[str] | Callable[[str], bool]) -> PyTree:
  """``'train'`` / ``'freeze'`` per leaf: a leaf trains if its '/'-joined path is, or lies under,
  one of ``trainable`` (``'head'``, ``'backbone/layers_1'``), or if ``trainable(path)`` is true."""
  if callable(trainable):
    keep = trainable
  else:
    prefixes = tuple(trainable)
    keep = lambda p: any(p == q or p.startswith(q + "/") for q in prefixes)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if keep(_path_str(path)) else "freeze", params)


def make_optimizer(cfg: Any, total_steps: int,
                   trainable: Sequence[str] | Callable[[str], bool] | None = None
                   ) -> optax.GradientTransformation:
  """An optax optimizer from config (see the module doc for the fields).

  Args:
    cfg: dict / ConfigDict with ``name``, ``learning_rate``, ``schedule``,
      ``warmup_steps``, ``clip_norm``, ``kwargs``.
    total_steps: length of the run (for decaying schedules).
    trainable: parameter paths (or a predicate on paths) to update, e.g.
      ``['head']`` for a linear probe; None updates everything.
  """
  check_types(cfg, OPTIMIZER_SCHEMA, "optimizer")
  check_fields(cfg, OPTIMIZER_SCHEMA, "optimizer",
               hint="; arguments of the optax constructor go in optimizer.kwargs")
  name = configs.get(cfg, "name", "adam")
  if name not in OPTIMIZERS:
    raise KfuseError(f"optimizer.name: unknown optimizer {name!r}{suggest(name, OPTIMIZERS)};"
                     f" known: {', '.join(sorted(OPTIMIZERS))}")
  kwargs = configs.to_dict(configs.get(cfg, "kwargs"))
  try:
    tx = OPTIMIZERS[name](make_schedule(cfg, total_steps), **kwargs)
  except TypeError as e:
    raise KfuseError(f"optimizer.kwargs: invalid arguments {sorted(kwargs)} for {name!r}: {e}") from e
  clip = float(configs.get(cfg, "clip_norm", 0.0) or 0.0)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if trainable is not None:
    sel = trainable if callable(trainable) else tuple(trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               lambda p: trainable_labels(p, sel))
  return tx
