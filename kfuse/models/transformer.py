"""The pre-LayerNorm transformer block shared by `kfuse.models.vit` and `kfuse.models.gpt`.

``x + attn(norm_0(x))`` then ``x + mlp(norm_1(x))``. Parameter names inside a
block: ``norm_0``, ``attn/{query,key,value,out}``, ``norm_1``,
``mlp/{fc_in,fc_out}``. Blocks are named ``layers_<i>`` by their owners so
`kfuse.tree.layer_index` finds them.
"""

from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ["FeedForward", "TransformerBlock"]


class FeedForward(nn.Module):
  """``Dense(hidden) -> gelu -> Dense(dim) -> Dropout``."""
  hidden: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = nn.gelu(nn.Dense(self.hidden, name="fc_in")(x))
    h = nn.Dense(x.shape[-1], name="fc_out")(h)
    return nn.Dropout(self.dropout, deterministic=not train)(h)


class TransformerBlock(nn.Module):
  """Pre-LN self-attention + MLP block; ``mask`` is a boolean ``[B, 1, T, T]`` (or None).

  Attributes:
    num_heads: attention heads (must divide the model width).
    mlp_ratio: MLP hidden width / model width.
    dropout: dropout on attention weights and on both residual branches.
  """
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    h = nn.LayerNorm(name="norm_0")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout,
                                        deterministic=not train, name="attn")(h, h, mask=mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(name="norm_1")(x)
    return x + FeedForward(self.mlp_ratio * x.shape[-1], self.dropout, name="mlp")(h, train=train)
