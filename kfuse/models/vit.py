"""A small Vision Transformer (LayerNorm, pre-LN blocks) with a linear head (Flax Linen).

Inputs are cut into non-overlapping patches, linearly embedded, prefixed with
a learned ``[CLS]`` token, given learned position embeddings and passed
through ``depth`` `TransformerBlock`s. The backbone returns the final
LayerNorm of the ``[CLS]`` token (``pool='cls'``) or the mean over patch
tokens (``pool='mean'``); the shared `Classifier` adds the task head::

    {'params': {'backbone': {'patch_embed': {'kernel', 'bias'}, 'cls', 'pos_embed',
                             'layers_0': {'norm_0', 'attn', 'norm_1', 'mlp'}, ..., 'norm'},
                'head': {'kernel', 'bias'}}}

``ndim=2`` (``vit``): images ``[B, H, W]`` or ``[B, H, W, C]`` with square
``patch_size`` patches; ``ndim=1``: signals ``[B, L]`` / ``[B, L, C]`` with
patches of ``patch_size`` samples (MNIST-1D). Spatial sizes must be
multiples of ``patch_size``. No batch statistics: variables are ``params`` only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfuse.models.base import Classifier
from kfuse.models.transformer import TransformerBlock
from kfuse.tree import KfuseError

__all__ = ["ViTBackbone", "make_vit"]

POOLS = ("cls", "mean")


class ViTBackbone(nn.Module):
  """Patch embedding + ``[CLS]`` + position embeddings + transformer blocks + LayerNorm.

  Attributes:
    ndim: spatial dimensions of the input (1 or 2).
    patch_size: patch side (samples for ``ndim=1``).
    dim: token width.
    depth: number of transformer blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / ``dim``.
    dropout: dropout rate inside the blocks (train mode only).
    pool: ``cls`` or ``mean``.
  """
  ndim: int = 2
  patch_size: int = 4
  dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.0
  pool: str = "cls"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == self.ndim + 1:
      x = x[..., None]
    spatial = x.shape[1:1 + self.ndim]
    if x.ndim != self.ndim + 2 or any(s % self.patch_size for s in spatial):
      raise KfuseError(f"input: vit (ndim={self.ndim}) expects [B, {self.ndim} spatial axes(, C)]"
                       f" with sizes divisible by patch_size={self.patch_size}, got {tuple(x.shape)}")
    p = (self.patch_size,) * self.ndim
    x = nn.Conv(self.dim, p, strides=p, padding="VALID", name="patch_embed")(x)
    x = x.reshape((x.shape[0], -1, self.dim))                        # [B, N, D]
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos)
    for i in range(self.depth):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, name=f"layers_{i}")(
          x, train=train)
    x = nn.LayerNorm(name="norm")(x)
    return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(axis=1)


def make_vit(num_classes: int, ndim: int = 2, patch_size: int = 4, dim: int = 64, depth: int = 4,
             num_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0,
             pool: str = "cls") -> Classifier:
  """A `ViTBackbone` + linear head classifier."""
  if num_classes < 2:
    raise KfuseError(f"model.num_classes: need at least 2 classes, got {num_classes}")
  if ndim not in (1, 2):
    raise KfuseError(f"model.ndim: must be 1 (signals) or 2 (images), got {ndim}")
  for field, v in (("patch_size", patch_size), ("dim", dim), ("depth", depth),
                   ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
    if int(v) < 1:
      raise KfuseError(f"model.{field}: must be >= 1, got {v}")
  if dim % num_heads:
    raise KfuseError(f"model.num_heads: {num_heads} does not divide dim={dim}")
  if not 0.0 <= dropout < 1.0:
    raise KfuseError(f"model.dropout: must be in [0, 1), got {dropout}")
  if pool not in POOLS:
    raise KfuseError(f"model.pool: unknown pooling {pool!r}; known: {', '.join(POOLS)}")
  backbone = ViTBackbone(ndim=int(ndim), patch_size=int(patch_size), dim=int(dim),
                         depth=int(depth), num_heads=int(num_heads), mlp_ratio=int(mlp_ratio),
                         dropout=float(dropout), pool=pool)
  return Classifier(backbone=backbone, num_classes=int(num_classes))
