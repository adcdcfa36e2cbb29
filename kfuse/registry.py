"""One registry shape for every pillar.

Merge methods, distillation objectives, adaptation methods, models and tasks are
each a `Registry`: ``register`` adds an entry (its builder, its parameters'
defaults declared once, and a docstring with the formula and the paper),
``get`` returns it, ``names`` lists them.

    OBJECTIVES = Registry("distillation objective")

    @OBJECTIVES.register("hinton", defaults={"temperature": 4.0, "kd_weight": 1.0})
    def hinton(temperature, kd_weight): ...

    OBJECTIVES.get("hinton").fn(**OBJECTIVES.defaults("hinton"))

Unknown names raise `KfuseError` naming the closest registered ones.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional

from kfuse.errors import KfuseError

__all__ = ["Entry", "Registry", "suggest"]


def suggest(name: Any, known: Iterable[str]) -> str:
  """`` (did you mean 'x'?)`` for the closest of ``known`` to ``name``, or ``''``."""
  close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered builder with its declared defaults and its documentation."""
  name: str
  fn: Callable[..., Any]
  defaults: Mapping[str, Any]
  doc: str

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


class Registry:
  """Name -> `Entry` for one kind of thing (``kind`` appears in error messages)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Entry] = {}

  def register(self, name: Optional[str] = None, fn: Optional[Callable] = None, *,
               defaults: Optional[Mapping[str, Any]] = None, doc: Optional[str] = None):
    """Register ``fn`` under ``name``; without ``fn``, a decorator.

    ``defaults`` are the parameters' defaults, declared here once (``None``:
    the keyword defaults of ``fn``'s signature). ``doc`` defaults to ``fn``'s
    docstring.
    """
    def add(f):
      key = name or f.__name__
      if key in self._entries:
        raise ValueError(f"{self.kind} {key!r} registered twice")
      d = dict(defaults) if defaults is not None else _signature_defaults(f)
      self._entries[key] = Entry(key, f, d, inspect.cleandoc(doc or f.__doc__ or ""))
      return f
    return add(fn) if fn is not None else add

  def get(self, name: str) -> Entry:
    if name not in self._entries:
      raise KfuseError(f"unknown {self.kind} {name!r}{suggest(name, self._entries)}; "
                       f"known: {', '.join(self.names())}")
    return self._entries[name]

  def defaults(self, name: str) -> dict:
    """A deep copy of ``name``'s declared defaults (safe to modify)."""
    return copy.deepcopy(dict(self.get(name).defaults))

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self):
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)


def _signature_defaults(fn: Callable) -> dict:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return {}
  return {k: p.default for k, p in sig.parameters.items()
          if p.default is not inspect.Parameter.empty
          and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
