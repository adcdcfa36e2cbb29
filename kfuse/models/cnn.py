"""ResNet-style 1-D and 2-D CNNs with BatchNorm and a linear head (Flax Linen).

Variables are plain dict pytrees with two collections::

    {'params':      {'backbone': {'stem': {'kernel'}, 'stem_norm': {'scale', 'bias'},
                                  'layers_0': {'conv_0', 'norm_0', 'conv_1', 'norm_1',
                                               ['proj', 'proj_norm']}, ...},
                     'head': {'kernel', 'bias'}},
     'batch_stats': {'backbone': {'stem_norm': {'mean', 'var'},
                                  'layers_0': {'norm_0': {...}, 'norm_1': {...}}, ...}}}

As for the MLP, merging touches ``params/backbone`` and every task keeps its
own ``head``. Residual blocks are named ``layers_<i>`` (recognised by
`kfuse.tree.layer_index`), every BatchNorm is named ``*norm*`` and holds
``scale`` / ``bias`` params plus ``mean`` / ``var`` batch statistics (what
BN-adapt and Tent touch).

Modes (the Flax convention)::

    logits = model.apply(variables, x, train=False)              # running statistics
    logits, upd = model.apply(variables, x, train=True,          # batch statistics;
                              mutable=['batch_stats'])           # upd['batch_stats'] = new EMA

Inputs: ``cnn1d`` takes ``[B, L]`` (one channel) or ``[B, L, C]``; ``cnn2d``
takes ``[B, H, W]`` or ``[B, H, W, C]``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfuse.models.mlp import Classifier
from kfuse.tree import KfuseError

__all__ = ["ResidualBlock", "ResNetBackbone", "make_cnn1d", "make_cnn2d"]

POOLS = ("avg", "flatten")


class ResidualBlock(nn.Module):
  """``relu(x + BN(conv(relu(BN(conv(x))))))``; a 1x1 conv + BN projects the skip if needed."""
  features: int
  kernel_size: tuple
  strides: tuple
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5)
    conv = functools.partial(nn.Conv, self.features, use_bias=False, padding="SAME")
    y = conv(self.kernel_size, self.strides, name="conv_0")(x)
    y = nn.relu(norm(name="norm_0")(y))
    y = conv(self.kernel_size, name="conv_1")(y)
    y = norm(name="norm_1")(y)
    if x.shape[-1] != self.features or any(s != 1 for s in self.strides):
      x = conv((1,) * len(self.strides), self.strides, name="proj")(x)
      x = norm(name="proj_norm")(x)
    return nn.relu(x + y)


class ResNetBackbone(nn.Module):
  """Stem ``conv -> BN -> relu``, one residual stage per width, then pooling.

  With ``residual=False`` it is a plain CNN instead: no stem, and each layer
  ``layers_<i>`` is ``conv(stride) -> [BN] -> relu`` (``stride`` on every
  layer), e.g. the MNIST-1D paper's 3-layer CNN.

  Attributes:
    ndim: spatial dimensions (1 for signals, 2 for images).
    widths: channels of each stage; stages after the first downsample by
      ``stride``.
    blocks_per_stage: residual blocks per stage.
    kernel_size: convolution window (per spatial axis).
    stem_width: channels of the stem convolution (default: ``widths[0]``).
    stride: downsampling factor at the start of stages 1, 2, ...
    pool: ``avg`` (global average pooling, translation invariant) or
      ``flatten`` (keeps positions, like the MNIST-1D paper's CNN).
    bn_momentum: BatchNorm running-average momentum.
    residual: residual blocks with a stem (True) or a plain conv stack.
    batch_norm: use BatchNorm (False: convolutions get biases, no batch_stats).
  """
  ndim: int = 1
  widths: Sequence[int] = (32, 64)
  blocks_per_stage: int = 1
  kernel_size: int = 5
  stem_width: int | None = None
  stride: int = 2
  pool: str = "avg"
  bn_momentum: float = 0.9
  residual: bool = True
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == self.ndim + 1:  # no channel axis
      x = x[..., None]
    if x.ndim != self.ndim + 2:
      dims = "L" if self.ndim == 1 else "H, W"
      raise KfuseError(f"input: cnn{self.ndim}d expects [B, {dims}] or [B, {dims}, C] inputs,"
                       f" got shape {tuple(x.shape)}")
    k = (self.kernel_size,) * self.ndim
    if not self.residual:
      return self._pool(self._plain(x, k, train))
    x = nn.Conv(self.stem_width or self.widths[0], k, use_bias=False, padding="SAME", name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                     name="stem_norm")(x)
    x = nn.relu(x)
    i = 0
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        stride = self.stride if (s > 0 and b == 0) else 1
        x = ResidualBlock(int(width), k, (stride,) * self.ndim, self.bn_momentum,
                          name=f"layers_{i}")(x, train=train)
        i += 1
    return self._pool(x)

  def _plain(self, x: jax.Array, k: tuple, train: bool) -> jax.Array:
    i = 0
    for width in self.widths:
      for _ in range(self.blocks_per_stage):
        x = nn.Conv(int(width), k, (self.stride,) * self.ndim, padding="SAME",
                    use_bias=not self.batch_norm, name=f"layers_{i}")(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                           epsilon=1e-5, name=f"norm_{i}")(x)
        x = nn.relu(x)
        i += 1
    return x

  def _pool(self, x: jax.Array) -> jax.Array:
    if self.pool == "avg":
      return x.mean(axis=tuple(range(1, self.ndim + 1)))
    return x.reshape((x.shape[0], -1))


def _check(num_classes, widths, blocks_per_stage, kernel_size, stride, pool, bn_momentum):
  if num_classes < 2:
    raise KfuseError(f"model.num_classes: need at least 2 classes, got {num_classes}")
  if not widths or any(int(w) <= 0 for w in widths):
    raise KfuseError(f"model.widths: need at least one positive width, got {tuple(widths)}")
  if int(blocks_per_stage) < 1:
    raise KfuseError(f"model.blocks_per_stage: must be >= 1, got {blocks_per_stage}")
  if int(kernel_size) < 1:
    raise KfuseError(f"model.kernel_size: must be >= 1, got {kernel_size}")
  if int(stride) < 1:
    raise KfuseError(f"model.stride: must be >= 1, got {stride}")
  if pool not in POOLS:
    raise KfuseError(f"model.pool: unknown pooling {pool!r}; known: {', '.join(POOLS)}")
  if not 0.0 <= bn_momentum < 1.0:
    raise KfuseError(f"model.bn_momentum: must be in [0, 1), got {bn_momentum}")


def _make(ndim, num_classes, widths, blocks_per_stage, kernel_size, stem_width, stride, pool,
          bn_momentum, residual, batch_norm) -> Classifier:
  _check(num_classes, widths, blocks_per_stage, kernel_size, stride, pool, bn_momentum)
  if residual and not batch_norm:
    raise KfuseError("model.batch_norm: the residual CNN always uses BatchNorm;"
                     " batch_norm=False needs residual=False")
  backbone = ResNetBackbone(ndim=ndim, widths=tuple(int(w) for w in widths),
                            blocks_per_stage=int(blocks_per_stage), kernel_size=int(kernel_size),
                            stem_width=int(stem_width) if stem_width else None, stride=int(stride),
                            pool=pool, bn_momentum=float(bn_momentum), residual=bool(residual),
                            batch_norm=bool(batch_norm))
  return Classifier(backbone=backbone, num_classes=int(num_classes))


def make_cnn1d(num_classes: int, widths: Sequence[int] = (32, 64), blocks_per_stage: int = 1,
               kernel_size: int = 5, stem_width: int | None = None, stride: int = 2,
               pool: str = "avg", bn_momentum: float = 0.9, residual: bool = True,
               batch_norm: bool = True) -> Classifier:
  """A ResNet-style 1-D CNN (signals ``[B, L]`` / ``[B, L, C]``) + linear head."""
  return _make(1, num_classes, widths, blocks_per_stage, kernel_size, stem_width, stride, pool,
               bn_momentum, residual, batch_norm)


def make_cnn2d(num_classes: int, widths: Sequence[int] = (32, 64), blocks_per_stage: int = 1,
               kernel_size: int = 3, stem_width: int | None = None, stride: int = 2,
               pool: str = "avg", bn_momentum: float = 0.9, residual: bool = True,
               batch_norm: bool = True) -> Classifier:
  """A ResNet-style 2-D CNN (images ``[B, H, W]`` / ``[B, H, W, C]``) + linear head."""
  return _make(2, num_classes, widths, blocks_per_stage, kernel_size, stem_width, stride, pool,
               bn_momentum, residual, batch_norm)
