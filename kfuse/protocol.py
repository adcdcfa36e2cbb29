"""The one step protocol every learning method in kfuse follows.

Supervised training, distillation, test-time adaptation and learned-coefficient
merges are each built as a `Learner`:

    learner = build(...)                       # static configuration: model, loss, optimizer
    state = learner.init(variables, batch, key)  # a pytree (NamedTuple / flax struct)
    state, metrics = learner.step(state, batch, key)

- ``step`` is pure and already jit-compiled by the library (callers never wrap it).
- ``batch`` is a mapping of arrays: ``{"x": inputs, "y": labels, ...}``; adaptation
  batches carry only ``"x"``.
- ``key`` is a PRNG key passed on every call; no key lives inside the state.
- ``metrics`` is a dict of arrays; adaptation puts its online predictions in
  ``metrics["logits"]``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax

Batch = Mapping[str, Any]
Metrics = dict

__all__ = ["Learner", "Batch", "Metrics", "check_batch"]


class Learner(NamedTuple):
  """``init(*args, **kwargs) -> state`` and jitted ``step(state, batch, key) -> (state, metrics)``."""
  init: Callable[..., Any]
  step: Callable[[Any, Batch, jax.Array], tuple[Any, Metrics]]


def check_batch(batch: Any, required: tuple[str, ...] = ("x",), where: str = "batch") -> None:
  """Raise `KfuseError` unless ``batch`` is a mapping holding ``required`` keys."""
  from kfuse.tree import KfuseError
  if not isinstance(batch, Mapping):
    raise KfuseError(f"{where}: expected a mapping like {{'x': ..., 'y': ...}}, "
                     f"got {type(batch).__name__}")
  missing = [k for k in required if k not in batch]
  if missing:
    raise KfuseError(f"{where}: missing key {missing[0]!r} (has {sorted(batch)})")
