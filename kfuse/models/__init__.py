"""Model registry: ``get_model(name, **kwargs)`` returns a Flax Linen module.

Every registered model is a classifier whose variables split into
``params/backbone`` (shared, merged) and ``params/head`` (per task).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import flax.linen as nn

from kfuse.models.mlp import (ACTIVATIONS, Classifier, MLPBackbone, apply, backbone_of, head_of,
                              make_mlp, with_params)
from kfuse.tree import KfuseError

__all__ = [
    "ACTIVATIONS", "Classifier", "MLPBackbone", "apply", "backbone_of", "head_of",
    "make_mlp", "with_params", "get_model", "model_names", "register_model",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": make_mlp}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
  """Add a model factory ``factory(num_classes=..., **kwargs) -> nn.Module``."""
  if name in _MODELS:
    raise KfuseError(f"model.name: {name!r} is already registered")
  _MODELS[name] = factory


def model_names() -> list[str]:
  return sorted(_MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Build the registered model ``name`` with keyword arguments ``kwargs``."""
  if name not in _MODELS:
    raise KfuseError(f"model.name: unknown model {name!r}; known: {', '.join(model_names())}")
  factory = _MODELS[name]
  accepted = inspect.signature(factory).parameters
  unknown = [k for k in kwargs if k not in accepted]
  if unknown:
    raise KfuseError(f"model.{unknown[0]}: not an argument of model {name!r};"
                     f" accepted: {', '.join(accepted)}")
  return factory(**kwargs)
