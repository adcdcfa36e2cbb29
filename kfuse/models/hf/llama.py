"""Llama, Mistral and Qwen2 decoders (one module, the family differences are config fields).

For token ids x₁..x_T (Touvron et al., 2023, "Llama 2"; transformers' modeling_llama):

    h⁰ = E[x]                                                  (model.embed_tokens)
    for each layer l:
      a = RMSNorm(h)                                           (input_layernorm)
      q = a W_qᵀ (+b_q), k = a W_kᵀ (+b_k), v = a W_vᵀ (+b_v)  H query heads, K ≤ H kv heads
      q, k = RoPE(q, pos), RoPE(k, pos)
      h = h + Attn(q, k, v) W_oᵀ                               causal, GQA, optional window
      m = RMSNorm(h)                                           (post_attention_layernorm)
      h = h + (act(m W_gᵀ) ⊙ (m W_uᵀ)) W_dᵀ                    SwiGLU MLP (Shazeer, 2020)
    logits = RMSNorm(h) W_lmᵀ   (W_lm = E when tie_word_embeddings)

RoPE (Su et al., 2021) in transformers' "rotate half" layout: with
inv_freq_i = θ^(−2i/d), angle = pos · inv_freq, and x = [x₁, x₂] split in halves,
RoPE(x) = x·cos + [−x₂, x₁]·sin (cos/sin over [angle, angle]). ``rope_type``
"linear" divides inv_freq by the factor; "llama3" (Llama 3.1) keeps high
frequencies, divides low ones by ``factor`` and interpolates between:
wavelength λ = 2π / inv_freq, s = (L_orig/λ − low) / (high − low),
inv' = inv/factor if λ > L_orig/low, inv if λ < L_orig/high, else (1−s)·inv/factor + s·inv.

Family differences: Qwen2 has q/k/v biases (``attention_bias`` is Llama's switch
for all four projections); Mistral applies ``sliding_window`` to every layer,
Qwen2 to the layers ``layer_types`` marks "sliding_attention".
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kfuse.models.hf.common import (Embedding, Linear, RMSNorm, activation, cached_attention,
                                    causal_attention)
from kfuse.models.hf.config import LMConfig

__all__ = ["LlamaForCausalLM", "rope_inv_freq", "apply_rope"]


def rope_inv_freq(cfg: LMConfig) -> np.ndarray:
  """inv_freq [head_dim/2] in float32, computed as transformers does (float32 powers)."""
  d = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) **
                (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d))))
  inv = inv.astype(np.float32)
  kind = cfg.rope[0]
  if kind == "linear":
    return (inv / np.float32(cfg.rope[1])).astype(np.float32)
  if kind == "llama3":
    factor, low, high, orig = cfg.rope[1:]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(x, cos, sin):
  """x·cos + rotate_half(x)·sin; x [B, T, H, D], cos/sin [T, D] (or per row: [B, T, D])."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  if cos.ndim == 3:
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]
  return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def _rope_tables(positions, cfg: LMConfig, dtype):
  """cos, sin of RoPE angles at integer ``positions`` ([T] or [B, T]) -> [..., head_dim]."""
  angle = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
  angle = jnp.concatenate([angle, angle], axis=-1)
  return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


class LlamaAttention(nnx.Module):
  def __init__(self, cfg: LMConfig, layer: int, dtype):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.q_proj = Linear(d, cfg.num_heads * hd, cfg.qkv_bias, dtype)
    self.k_proj = Linear(d, cfg.num_kv_heads * hd, cfg.qkv_bias, dtype)
    self.v_proj = Linear(d, cfg.num_kv_heads * hd, cfg.qkv_bias, dtype)
    self.o_proj = Linear(cfg.num_heads * hd, d, cfg.o_bias, dtype)
    self.cfg, self.window = cfg, cfg.windows[layer]

  def _qkv(self, x, cos, sin):
    b, t, _ = x.shape
    cfg = self.cfg
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def __call__(self, x, cos, sin):
    b, t, _ = x.shape
    q, k, v = self._qkv(x, cos, sin)
    o = causal_attention(q, k, v, self.cfg.head_dim ** -0.5, self.window)
    return self.o_proj(o.reshape(b, t, -1))

  def decode(self, x, cos, sin, cache, start, key_valid):
    """`__call__` for new positions at cache slots start..; returns (out, cache)."""
    b, t, _ = x.shape
    q, k, v = self._qkv(x, cos, sin)
    o, cache = cached_attention(q, k, v, cache, start, key_valid, self.cfg.head_dim ** -0.5,
                                self.window)
    return self.o_proj(o.reshape(b, t, -1)), cache


class LlamaMLP(nnx.Module):
  def __init__(self, cfg: LMConfig, dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, cfg.mlp_bias, dtype)
    self.up_proj = Linear(d, f, cfg.mlp_bias, dtype)
    self.down_proj = Linear(f, d, cfg.mlp_bias, dtype)
    self.act = cfg.activation

  def __call__(self, x):
    return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LMConfig, layer: int, dtype):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.self_attn = LlamaAttention(cfg, layer, dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
    self.mlp = LlamaMLP(cfg, dtype)

  def __call__(self, h, cos, sin):
    h = h + self.self_attn(self.input_layernorm(h), cos, sin)
    return h + self.mlp(self.post_attention_layernorm(h))

  def decode(self, h, cos, sin, cache, start, key_valid):
    a, cache = self.self_attn.decode(self.input_layernorm(h), cos, sin, cache, start, key_valid)
    h = h + a
    return h + self.mlp(self.post_attention_layernorm(h)), cache


class Decoder(nnx.Module):
  def __init__(self, cfg: LMConfig, dtype):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
    self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)


class LlamaForCausalLM(nnx.Module):
  """Logits ``[B, T, vocab]`` of token ids ``[B, T]`` (positions 0..T−1)."""

  def __init__(self, cfg: LMConfig, dtype=jnp.float32):
    self.config = cfg
    self.model = Decoder(cfg, dtype)
    self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size,
                                                          False, dtype)

  def __call__(self, ids):
    h = self.model.embed_tokens(ids)
    cos, sin = _rope_tables(jnp.arange(ids.shape[1]), self.config, h.dtype)
    for layer in self.model.layers:
      h = layer(h, cos, sin)
    return self._logits(h)

  def _logits(self, h):
    h = self.model.norm(h)
    return self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

  def init_cache(self, batch: int, length: int, dtype=None) -> list:
    """Empty KV cache: per layer (k, v) zeros ``[batch, length, kv_heads, head_dim]``."""
    cfg = self.config
    dtype = dtype or self.model.embed_tokens.weight[...].dtype
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

  def decode(self, ids, positions, cache, start, key_valid):
    """Logits ``[B, T, vocab]`` of ids ``[B, T]`` at ``positions`` [B, T], written to the
    cache slots start..start+T−1; keys attended: slots ≤ each query's that ``key_valid``
    [B, S] marks. Returns (logits, cache) (`kfuse.decode.generate` drives it)."""
    h = self.model.embed_tokens(ids)
    cos, sin = _rope_tables(positions, self.config, h.dtype)
    new = []
    for layer, c in zip(self.model.layers, cache):
      h, c = layer.decode(h, cos, sin, c, start, key_valid)
      new.append(c)
    return self._logits(h), new
