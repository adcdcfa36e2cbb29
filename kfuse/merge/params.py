"""Per-tensor parameter settings with mergekit's filter and gradient semantics.

A *setting* is one of
* a scalar / bool / str — the same value for every tensor;
* `Gradient([v0, v1, …])` — piecewise-linear over evenly spaced anchors,
  evaluated at the tensor's layer position t ∈ [0, 1] (t = layer/(L−1);
  tensors outside the layer stack — embeddings, final norm, head — use t=0);
* a list of rules ``[{"filter": "mlp", "value": …}, {"regex": r"…", "value": …},
  {"value": …}]`` — the first rule whose filter is a substring of the tensor
  name (or whose regex matches it) wins; a rule without filter matches
  everything. Rule values may themselves be gradients.

Per-model parameters take one setting per model (a list of length N in the
native API, or per-model ``parameters`` in YAML).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from kfuse.tree import KfuseError, matches_filter


@dataclasses.dataclass(frozen=True)
class Gradient:
  """Anchors of a per-layer gradient (mergekit semantics)."""
  anchors: tuple

  def __init__(self, anchors: Sequence[Any]):
    if len(anchors) == 0:
      raise KfuseError("gradient: empty list of anchors")
    object.__setattr__(self, "anchors", tuple(anchors))

  def at(self, t: float) -> Any:
    v = self.anchors
    if len(v) == 1:
      return v[0]
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
      return v[int(t * (len(v) - 1))]
    scaled = t * (len(v) - 1)
    i0 = int(scaled)
    i1 = min(len(v) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * v[i0] + frac * v[i1]


def is_rule_list(v: Any) -> bool:
  return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(r, dict) for r in v)


def evaluate(setting: Any, name: str, t: float, *, what: str = "parameter") -> Any:
  """Value of a setting for tensor ``name`` at layer position ``t``."""
  if isinstance(setting, Gradient):
    return setting.at(t)
  if is_rule_list(setting):
    for rule in setting:
      extra = set(rule) - {"filter", "regex", "value"}
      if extra:
        raise KfuseError(f"{what}: unknown key {sorted(extra)[0]!r} in a filter rule")
      if "value" not in rule:
        raise KfuseError(f"{what}: a filter rule has no 'value'")
      if "regex" in rule and rule["regex"] is not None:
        if not re.search(rule["regex"], name):
          continue
      elif not matches_filter(name, rule.get("filter")):
        continue
      return evaluate(rule["value"], name, t, what=what)
    return None
  return setting


def layer_position(layer: int | None, num_layers: int) -> float:
  """mergekit's t for a tensor: layer/(L−1) inside the stack, 0 outside."""
  if layer is None or num_layers <= 0:
    return 0.0
  if num_layers == 1:
    return 1.0
  return layer / (num_layers - 1)


# ------------------------------------------------------------ resolution


def coerce(kind: type, name: str, v: Any, where: str) -> Any:
  """pydantic-lax coercion of a scalar to a parameter's type (mergekit YAML)."""
  if v is None:
    return None
  if kind is bool:
    if isinstance(v, bool):
      return v
    if isinstance(v, (int, float)) and v in (0, 1):
      return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
      return v.lower() in ("true", "yes", "on", "1")
    raise KfuseError(f"{where}: parameter {name!r} must be a boolean, got {v!r}")
  if kind is int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
      raise KfuseError(f"{where}: parameter {name!r} must be an integer, got {v!r}")
    f = float(v)
    if f != int(f):
      raise KfuseError(f"{where}: parameter {name!r} must be an integer, got {v!r}")
    return int(f)
  if kind is float:
    try:
      return float(v)
    except (TypeError, ValueError):
      raise KfuseError(f"{where}: parameter {name!r} must be a number, got {v!r}") from None
  return v


def resolve(method, shared: Sequence[Mapping[str, Any]], per_model: Sequence[Sequence[Mapping]],
            out_name: str, t: float, n: int, *, in_names: Sequence[str] | None = None,
            where: str | None = None, required: Sequence[str] = (),
            lax: bool = False) -> dict:
  """Python values of every parameter of ``method`` for one output tensor: the one
  parameter resolver of the native API, the checkpoint runner and mergekit YAML.

  A per-model parameter of model i takes the first setting that gives a value in
  ``per_model[i]``'s levels, then in ``shared``'s (a plain list in a shared level
  holds one setting per model); a shared parameter the first in ``shared``. Settings
  are evaluated (`evaluate`) for the tensor's name (``in_names[i]`` for model i's
  input, ``out_name`` otherwise) at layer position ``t``; else the `Param` default.
  ``required`` names parameters without a usable default (mergekit's ``weight``);
  ``lax`` coerces values to the parameters' types as mergekit's pydantic does.
  """
  from kfuse.merge.core import REQUIRED
  where = where or out_name
  names = list(in_names) if in_names is not None else [out_name] * n
  values = {}

  def first(levels, p, name, i=None):
    for lvl in levels:
      if p.name in lvl:
        s = lvl[p.name]
        if i is not None and isinstance(s, (list, tuple)) and not is_rule_list(s):
          s = s[i]
        v = evaluate(s, name, t, what=p.name) if s is not None else None
        if v is not None:
          return v
    return None

  for p in method.params:
    if p.per_model:
      vals = []
      for i in range(n):
        v = first(per_model[i], p, names[i]) if per_model else None
        if v is None:
          v = first(shared, p, names[i], i)
        if v is None:
          if p.default is REQUIRED or p.name in required:
            raise KfuseError(f"{where}: missing required parameter {p.name!r} for model {i}"
                             f" tensor {names[i]!r}")
          v = p.default
        vals.append(coerce(p.kind, p.name, v, where) if lax else v)
      values[p.name] = vals
    else:
      v = first(shared, p, out_name)
      if v is None:
        if p.default is REQUIRED:
          raise KfuseError(f"{where}: missing required parameter {p.name!r} for {out_name!r}")
        v = p.default
      values[p.name] = coerce(p.kind, p.name, v, where) if lax else v
  return values
