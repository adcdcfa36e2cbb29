"""An MLP backbone with a linear classification head (Flax Linen).

Variables are plain dict pytrees::

    {'params': {'backbone': {'layers_0': {'kernel', 'bias'}, ...},
                'head': {'kernel', 'bias'}}}

Merging touches only ``variables['params']['backbone']``; every task keeps
its own ``head``. Hidden layers are named ``layers_<i>`` so that
`kfuse.tree.layer_index` recognises them (layer-wise merge schedules).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfuse.models.base import Classifier
from kfuse.tree import KfuseError

__all__ = ["ACTIVATIONS", "MLPBackbone", "make_mlp", "make_linear"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}


class MLPBackbone(nn.Module):
  """Flatten, then ``Dense -> [LayerNorm] -> activation -> [Dropout]`` per hidden width.

  Attributes:
    hidden: widths of the hidden layers.
    activation: a key of `ACTIVATIONS`.
    dropout: dropout rate after each activation (0 disables it).
    layer_norm: apply LayerNorm before each activation.
  """
  hidden: Sequence[int] = (256, 256)  # () = no hidden layer: the flattened input
  activation: str = "gelu"
  dropout: float = 0.0
  layer_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f"layers_{i}")(x)
      if self.layer_norm:
        x = nn.LayerNorm(name=f"norm_{i}")(x)
      x = act(x)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


def make_mlp(num_classes: int, hidden: Sequence[int] = (256, 256), activation: str = "gelu",
             dropout: float = 0.0, layer_norm: bool = False) -> Classifier:
  """An `MLPBackbone` + linear head classifier."""
  if activation not in ACTIVATIONS:
    raise KfuseError(f"model.activation: unknown activation {activation!r};"
                     f" known: {', '.join(sorted(ACTIVATIONS))}")
  if not hidden or any(int(h) <= 0 for h in hidden):
    raise KfuseError(f"model.hidden: need at least one positive width, got {tuple(hidden)}")
  if not 0.0 <= dropout < 1.0:
    raise KfuseError(f"model.dropout: must be in [0, 1), got {dropout}")
  if num_classes < 2:
    raise KfuseError(f"model.num_classes: need at least 2 classes, got {num_classes}")
  backbone = MLPBackbone(hidden=tuple(int(h) for h in hidden), activation=activation,
                         dropout=float(dropout), layer_norm=bool(layer_norm))
  return Classifier(backbone=backbone, num_classes=int(num_classes))


def make_linear(num_classes: int) -> Classifier:
  """Multinomial logistic regression: the flattened input straight into the linear head.

  The backbone has no parameters, so ``params`` holds only ``head``.
  """
  if num_classes < 2:
    raise KfuseError(f"model.num_classes: need at least 2 classes, got {num_classes}")
  return Classifier(backbone=MLPBackbone(hidden=()), num_classes=int(num_classes))
