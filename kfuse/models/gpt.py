"""A tiny GPT-style causal decoder (Flax Linen): tokens ``[B, T]`` -> logits ``[B, T, V]``.

Learned token and position embeddings, ``depth`` pre-LN `TransformerBlock`s
with a causal mask, a final LayerNorm, then an (untied) linear LM head. The
backbone / head split is the classifiers' one, so merging and distillation
code treat it alike::

    {'params': {'backbone': {'embed': {'embedding'}, 'pos_embed',
                             'layers_0': {'norm_0', 'attn', 'norm_1', 'mlp'}, ..., 'norm'},
                'head': {'kernel', 'bias'}}}      # head: [dim, vocab_size]

Position ``t``'s logits depend on tokens ``0..t`` only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfuse.models.base import Classifier
from kfuse.models.transformer import TransformerBlock
from kfuse.tree import KfuseError

__all__ = ["GPTBackbone", "make_gpt"]


class GPTBackbone(nn.Module):
  """Token + position embeddings, causal transformer blocks, final LayerNorm: ``[B, T, dim]``.

  Attributes:
    vocab_size: number of token ids.
    max_len: longest sequence (size of the position table).
    dim, depth, num_heads, mlp_ratio, dropout: as in `ViTBackbone`.
  """
  vocab_size: int = 64
  max_len: int = 64
  dim: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise KfuseError(f"input: gpt expects integer tokens [B, T], got {tokens.dtype}"
                       f" {tuple(tokens.shape)}")
    t = tokens.shape[1]
    if t > self.max_len:
      raise KfuseError(f"input: sequence length {t} exceeds model.max_len={self.max_len}")
    x = nn.Embed(self.vocab_size, self.dim, embedding_init=nn.initializers.normal(0.02),
                 name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, self.max_len, self.dim))
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos[:, :t])
    mask = nn.make_causal_mask(tokens)  # [B, 1, T, T]
    for i in range(self.depth):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, name=f"layers_{i}")(
          x, mask=mask, train=train)
    return nn.LayerNorm(name="norm")(x)


def make_gpt(vocab_size: int, max_len: int = 64, dim: int = 64, depth: int = 2,
             num_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0) -> Classifier:
  """A `GPTBackbone` + linear LM head (``num_classes = vocab_size``)."""
  for field, v in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim),
                   ("depth", depth), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
    if int(v) < 1:
      raise KfuseError(f"model.{field}: must be >= 1, got {v}")
  if vocab_size < 2:
    raise KfuseError(f"model.vocab_size: need at least 2 tokens, got {vocab_size}")
  if dim % num_heads:
    raise KfuseError(f"model.num_heads: {num_heads} does not divide dim={dim}")
  if not 0.0 <= dropout < 1.0:
    raise KfuseError(f"model.dropout: must be in [0, 1), got {dropout}")
  backbone = GPTBackbone(vocab_size=int(vocab_size), max_len=int(max_len), dim=int(dim),
                         depth=int(depth), num_heads=int(num_heads), mlp_ratio=int(mlp_ratio),
                         dropout=float(dropout))
  return Classifier(backbone=backbone, num_classes=int(vocab_size))
