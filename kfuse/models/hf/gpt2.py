"""GPT-2 (Radford et al., 2019; transformers' modeling_gpt2), in its own tensor layout.

    h⁰ = wte[x] + wpe[0..T−1]                                  learned positions
    for each block l:
      a = LayerNorm(h)                                         (ln_1)
      [q, k, v] = a W_attn + b_attn                            c_attn: Conv1D [d, 3d]
      h = h + Attn(q, k, v) W_proj + b_proj                    causal, scores · 1/√d_head
      m = LayerNorm(h)                                         (ln_2)
      h = h + gelu_tanh(m W_fc + b_fc) W_proj2 + b_proj2       c_fc [d, 4d], c_proj [4d, d]
    logits = LayerNorm(h) wteᵀ                                 (ln_f; lm_head tied to wte)

Conv1D stores ``[in, out]`` (y = x W + b), unlike torch.nn.Linear. With
``scale_attn_by_inverse_layer_idx`` the scores of block l are also divided by l + 1.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kfuse.errors import KfuseError
from kfuse.models.hf.common import (Conv1D, Embedding, LayerNorm, Linear, activation,
                                    cached_attention, causal_attention)
from kfuse.models.hf.config import LMConfig

__all__ = ["GPT2LMHeadModel"]


class GPT2Attention(nnx.Module):
  def __init__(self, cfg: LMConfig, layer: int, dtype):
    d = cfg.hidden_size
    self.c_attn = Conv1D(d, 3 * d, dtype)
    self.c_proj = Conv1D(d, d, dtype)
    scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
    self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
    self.heads = cfg.num_heads

  def _qkv(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    return tuple(y.reshape(b, t, self.heads, d // self.heads) for y in (q, k, v))

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = self._qkv(x)
    return self.c_proj(causal_attention(q, k, v, self.scale).reshape(b, t, d))

  def decode(self, x, cache, start, key_valid):
    b, t, d = x.shape
    q, k, v = self._qkv(x)
    o, cache = cached_attention(q, k, v, cache, start, key_valid, self.scale)
    return self.c_proj(o.reshape(b, t, d)), cache


class GPT2MLP(nnx.Module):
  def __init__(self, cfg: LMConfig, dtype):
    self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size, dtype)
    self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size, dtype)
    self.act = cfg.activation

  def __call__(self, x):
    return self.c_proj(activation(self.act, self.c_fc(x)))


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, layer: int, dtype):
    self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.attn = GPT2Attention(cfg, layer, dtype)
    self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.mlp = GPT2MLP(cfg, dtype)

  def __call__(self, h):
    h = h + self.attn(self.ln_1(h))
    return h + self.mlp(self.ln_2(h))

  def decode(self, h, cache, start, key_valid):
    a, cache = self.attn.decode(self.ln_1(h), cache, start, key_valid)
    h = h + a
    return h + self.mlp(self.ln_2(h)), cache


class Transformer(nnx.Module):
  def __init__(self, cfg: LMConfig, dtype):
    self.wte = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
    self.wpe = Embedding(cfg.max_positions, cfg.hidden_size, dtype)
    self.h = nnx.List([Block(cfg, i, dtype) for i in range(cfg.num_layers)])
    self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype)


class GPT2LMHeadModel(nnx.Module):
  """Logits ``[B, T, vocab]`` of token ids ``[B, T]``, T ≤ ``n_positions``."""

  def __init__(self, cfg: LMConfig, dtype=jnp.float32):
    self.config = cfg
    self.transformer = Transformer(cfg, dtype)
    self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size,
                                                          False, dtype)

  def __call__(self, ids):
    t = ids.shape[1]
    if t > self.config.max_positions:
      raise KfuseError(f"GPT-2: {t} tokens exceed n_positions = {self.config.max_positions}")
    tr = self.transformer
    h = tr.wte(ids) + tr.wpe.weight[...][:t][None]
    for block in tr.h:
      h = block(h)
    return self._logits(h)

  def _logits(self, h):
    h = self.transformer.ln_f(h)
    return self.transformer.wte.attend(h) if self.lm_head is None else self.lm_head(h)

  def init_cache(self, batch: int, length: int, dtype=None) -> list:
    """Empty KV cache: per block (k, v) zeros ``[batch, length, heads, head_dim]``."""
    cfg = self.config
    dtype = dtype or self.transformer.wte.weight[...].dtype
    shape = (batch, length, cfg.num_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

  def decode(self, ids, positions, cache, start, key_valid):
    """Logits of ids ``[B, T]`` at ``positions`` [B, T] through the KV cache (slots
    start..); see `LlamaForCausalLM.decode`. Returns (logits, cache)."""
    tr = self.transformer
    h = tr.wte(ids) + jnp.take(tr.wpe.weight[...], positions, axis=0)
    new = []
    for block, c in zip(tr.h, cache):
      h, c = block.decode(h, c, start, key_valid)
      new.append(c)
    return self._logits(h), new
