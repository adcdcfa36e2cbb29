"""A tiny GPT-style causal decoder (Flax Linen): tokens ``[B, T]`` -> logits ``[B, T, V]``.

Learned token and position embeddings, ``depth`` pre-LN `TransformerBlock`s
with a causal mask, a final LayerNorm, then an (untied) linear LM head. The
backbone / head split is the classifiers' one, so merging and distillation
code treat it alike::

    {'params': {'backbone': {'embed': {'embedding'}, 'pos_embed',
                             'layers_0': {'norm_0', 'attn', 'norm_1', 'mlp'}, ..., 'norm'},
                'head': {'kernel', 'bias'}}}      # head: [dim, vocab_size]

Position ``t``'s logits depend on tokens ``0..t`` only.

`GPTDecoder` (a Flax NNX module over the same variables) exposes a zoo GPT to
`kfuse.decode.generate` through the loop's ``init_cache`` / ``decode`` interface:
the KV cache is explicit arrays (per block ``(k, v)`` ``[B, S, heads, head_dim]``)
and positions are explicit, so left-padded rows read their own position embeddings.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from kfuse.models.base import Classifier
from kfuse.models.transformer import FeedForward, TransformerBlock
from kfuse.tree import KfuseError, check_same_structure

__all__ = ["GPTBackbone", "GPTDecoder", "make_gpt"]


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


@dataclasses.dataclass(frozen=True)
class GPTDecodeConfig:
  """What the decoding loop reads of a model (``vocab_size``, ``max_positions``)."""
  vocab_size: int
  max_positions: int
  num_heads: int
  depth: int
  dim: int


class GPTDecoder(nnx.Module):
  """A zoo GPT (`make_gpt` module + its variables) as a cached causal LM for `kfuse.decode`.

      out = generate([GPTDecoder(model, variables)], prompts, max_new_tokens=16)

  ``__call__(ids)`` is the Linen forward itself (``model.apply``); ``decode`` runs the
  same blocks one chunk of positions at a time against an explicit KV cache: pre-LN
  ``x + W_o softmax(q kᵀ / √d_head + mask) v`` then ``x + mlp(norm_1(x))`` (Vaswani et
  al., 2017; Radford et al., 2019), the LayerNorms and MLP applied with the Linen
  modules on the stored parameters. The variables are read, never modified.
  """

  def __init__(self, model: Classifier, variables):
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, GPTBackbone):
      raise KfuseError(f"GPTDecoder: expects a make_gpt model, got {type(model).__name__}"
                       f" with backbone {type(backbone).__name__}")
    params = variables["params"] if "params" in variables else variables
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    check_same_structure([like, params], ["the make_gpt model", "GPTDecoder params"],
                         check_dtype=False)
    if backbone.dropout:
      backbone = dataclasses.replace(backbone, dropout=0.0)
      model = Classifier(backbone=backbone, num_classes=model.num_classes)
    self.model = model
    self.config = GPTDecodeConfig(backbone.vocab_size, backbone.max_len, backbone.num_heads,
                                  backbone.depth, backbone.dim)
    self.params = nnx.Param(jax.tree.map(jnp.asarray, params))

  def __call__(self, ids):
    """Logits ``[B, T, vocab]`` of the Linen forward (the zoo GPT's own)."""
    return self.model.apply({"params": self.params.get_value()}, ids)

  def init_cache(self, batch: int, length: int, dtype=None) -> list:
    """Empty KV cache: per block (k, v) zeros ``[batch, length, heads, head_dim]``."""
    c = self.config
    dtype = dtype or self.params.get_value()["head"]["kernel"].dtype
    shape = (batch, length, c.num_heads, c.dim // c.num_heads)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.depth)]

  def decode(self, ids, positions, cache, start, key_valid):
    """Logits of ids ``[B, T]`` at ``positions`` [B, T], written to cache slots
    ``start``..``start``+T−1 and attending to the slots ``key_valid`` [B, S] marks
    (causally). Returns (logits [B, T, vocab], cache)."""
    from kfuse.models.hf.common import cached_attention
    p = self.params.get_value()
    bb, c = p["backbone"], self.config
    scale = 1.0 / math.sqrt(c.dim // c.num_heads)
    ln = nn.LayerNorm()
    x = jnp.take(bb["embed"]["embedding"], ids, axis=0) \
        + jnp.take(bb["pos_embed"][0], positions, axis=0)
    new = []
    for i, kv in enumerate(cache):
      lp = bb[f"layers_{i}"]
      h = ln.apply({"params": lp["norm_0"]}, x)
      a = lp["attn"]
      q, k, v = (jnp.einsum("btd,dhk->bthk", h, a[n]["kernel"]) + a[n]["bias"]
                 for n in ("query", "key", "value"))
      o, kv = cached_attention(q, k, v, kv, start, key_valid, scale)
      x = x + jnp.einsum("bthk,hkd->btd", o, a["out"]["kernel"]) + a["out"]["bias"]
      h = ln.apply({"params": lp["norm_1"]}, x)
      mlp = FeedForward(lp["mlp"]["fc_in"]["kernel"].shape[1])
      x = x + mlp.apply({"params": lp["mlp"]}, h)
      new.append(kv)
    h = ln.apply({"params": bb["norm"]}, x)
    return h @ p["head"]["kernel"] + p["head"]["bias"], new
