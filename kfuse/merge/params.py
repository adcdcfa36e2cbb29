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
from typing import Any, Sequence

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
