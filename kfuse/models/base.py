"""What every kfuse classifier shares: a backbone + linear head wrapper and pytree helpers.

Variables are plain dicts of collections. ``params`` always splits into
``backbone`` (shared across tasks, what merging operates on) and ``head``
(per task). Models with BatchNorm add a ``batch_stats`` collection (its
``backbone`` subtree mirrors the parameters'); every collection other than
``params`` is called *model state* here.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax

PyTree = Any

__all__ = [
    "Classifier",
    "apply",
    "apply_train",
    "state_collections",
    "model_state_of",
    "backbone_of",
    "head_of",
    "with_params",
]


class Classifier(nn.Module):
  """``head(backbone(x))``: shared feature extractor + task-specific linear head."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    features = self.backbone(x, train=train)
    return nn.Dense(self.num_classes, name="head")(features)


def state_collections(variables: Mapping[str, Any]) -> tuple[str, ...]:
  """Names of the non-``params`` collections (e.g. ``('batch_stats',)``), sorted."""
  return tuple(sorted(k for k in variables if k != "params"))


def model_state_of(variables: Mapping[str, Any]) -> dict:
  """The non-``params`` collections, e.g. ``{'batch_stats': ...}`` (``{}`` for an MLP)."""
  return {k: variables[k] for k in state_collections(variables)}


def apply(model: nn.Module, variables: PyTree, x: jax.Array, train: bool = False,
          key: jax.Array | None = None) -> jax.Array:
  """Logits of ``model`` (pure). ``key`` feeds dropout when ``train``.

  In train mode a BatchNorm model normalises with batch statistics, but the
  updated running statistics are discarded; use `apply_train` to keep them.
  """
  rngs = {"dropout": key} if (train and key is not None) else None
  mutable = list(state_collections(variables)) if train else []
  if not mutable:
    return model.apply(variables, x, train=train, rngs=rngs)
  return model.apply(variables, x, train=train, rngs=rngs, mutable=mutable)[0]


def apply_train(model: nn.Module, variables: PyTree, x: jax.Array,
                key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Train-mode forward pass: ``(logits, new_variables)``.

  ``new_variables`` holds the same ``params`` and the updated model state
  (BatchNorm running statistics). For a model without state it equals
  ``variables``.
  """
  rngs = {"dropout": key} if key is not None else None
  mutable = list(state_collections(variables))
  if not mutable:
    return model.apply(variables, x, train=True, rngs=rngs), dict(variables)
  logits, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=mutable)
  return logits, {**variables, **updates}


def backbone_of(variables: Mapping[str, Any]) -> PyTree:
  """The backbone parameter subtree (what merging operates on)."""
  return variables["params"]["backbone"]


def head_of(variables: Mapping[str, Any]) -> PyTree:
  """The task head parameter subtree."""
  return variables["params"]["head"]


def with_params(backbone: PyTree, head: PyTree, model_state: Mapping[str, Any] | None = None) -> dict:
  """Assemble variables from a backbone, a head and optional model state (no copies)."""
  return {"params": {"backbone": backbone, "head": head}, **dict(model_state or {})}
