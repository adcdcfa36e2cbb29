"""Model registry (`MODELS`, a `kfuse.registry.Registry`): ``get_model(name, **kwargs)`` returns a Flax Linen module.

=========  ==============================================  ====================
name       model                                           input
=========  ==============================================  ====================
``linear`` logistic regression (linear head only)          ``[B, ...]``
``mlp``    MLP (optional LayerNorm, dropout)               ``[B, ...]``
``cnn1d``  ResNet-style 1-D CNN with BatchNorm             ``[B, L(, C)]``
``cnn2d``  ResNet-style 2-D CNN with BatchNorm             ``[B, H, W(, C)]``
``vit``    small ViT (LayerNorm); ``ndim=1`` for signals   ``[B, H, W(, C)]``
``gpt``    tiny causal decoder, logits ``[B, T, V]``        tokens ``[B, T]``
=========  ==============================================  ====================

Every registered classifier's variables split into ``params/backbone``
(shared, merged) and ``params/head`` (per task); BatchNorm models add a
``batch_stats`` collection. ``model.init(key, x)`` builds the variables and
``model.apply(variables, x, train=...)`` is the pure forward pass (see
`apply` / `apply_train` for the train-mode state handling).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import flax.linen as nn

from kfuse.models.base import (Classifier, apply, apply_train, backbone_of, head_of,
                               model_state_of, state_collections, with_params)
from kfuse.models.cnn import ResNetBackbone, make_cnn1d, make_cnn2d
from kfuse.models.gpt import GPTBackbone, GPTDecoder, make_gpt
from kfuse.models.mlp import ACTIVATIONS, MLPBackbone, make_linear, make_mlp
from kfuse.models.transformer import TransformerBlock
from kfuse.models.vit import ViTBackbone, make_vit
from kfuse.registry import Registry
from kfuse.tree import KfuseError

__all__ = [
    "ACTIVATIONS", "Classifier", "MLPBackbone", "ResNetBackbone", "apply", "apply_train",
    "backbone_of", "head_of", "model_state_of", "state_collections", "with_params",
    "ViTBackbone", "GPTBackbone", "GPTDecoder", "TransformerBlock", "make_linear", "make_mlp", "make_cnn1d", "make_cnn2d",
    "make_vit", "make_gpt", "get_model", "check_kwargs", "model_names", "register_model", "MODELS",
]

MODELS = Registry("model")
for _name, _factory in (("linear", make_linear), ("mlp", make_mlp), ("cnn1d", make_cnn1d),
                        ("cnn2d", make_cnn2d), ("vit", make_vit), ("gpt", make_gpt)):
  MODELS.register(_name, _factory)   # defaults: the factory's keyword defaults, declared once


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
  """Add a model factory ``factory(num_classes=..., **kwargs) -> nn.Module`` to `MODELS`."""
  if name in MODELS:
    raise KfuseError(f"model.name: {name!r} is already registered")
  MODELS.register(name, factory)


def model_names() -> list[str]:
  return MODELS.names()


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _type_ok(value: Any, annotation: str) -> bool:
  """Does ``value`` fit a factory annotation (``int``, ``float | None``, ``Sequence[int]`` ...)?"""
  for alt in (a.strip() for a in str(annotation).split("|")):
    if alt == "None" and value is None:
      return True
    if alt in _SCALARS:
      if isinstance(value, bool) and alt != "bool":
        continue
      if isinstance(value, _SCALARS[alt]):
        return True
    elif alt.startswith(("Sequence[", "tuple[")):
      inner = alt[alt.index("[") + 1:-1].split(",")[0].strip()
      if isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value):
        return True
    elif alt not in _SCALARS and alt != "None":
      return True  # an annotation we do not check
  return False


def check_kwargs(name: str, kwargs: dict) -> None:
  """Raise `KfuseError` naming ``model.<field>`` for an unknown or mistyped argument."""
  params = inspect.signature(MODELS.get(name).fn).parameters
  for k, v in kwargs.items():
    if k not in params:
      raise KfuseError(f"model.{k}: not an argument of model {name!r}; accepted: {', '.join(params)}")
    ann = params[k].annotation
    if ann is not inspect.Parameter.empty and not _type_ok(v, ann):
      raise KfuseError(f"model.{k}: expected {ann}, got {type(v).__name__} {v!r}")


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Build the registered model ``name`` with keyword arguments ``kwargs``.

  Unknown names, unknown arguments and arguments of the wrong type (checked
  against the factory's annotations) raise `KfuseError` naming the field.
  """
  try:
    factory = MODELS.get(name).fn
  except KfuseError as e:
    raise KfuseError(f"model.name: {e}") from None
  check_kwargs(name, kwargs)
  return factory(**kwargs)
