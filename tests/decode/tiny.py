"""Tiny random HF-family models built in memory (no torch), for the decoding tests."""

from __future__ import annotations

import numpy as np

from kfuse.models import hf

VOCAB = 61
_COMMON = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
               num_hidden_layers=2)
CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, **_COMMON),
    "llama_tied": dict(architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
                       rope_theta=500.0, **_COMMON),
    "mistral": dict(architectures=["MistralForCausalLM"], sliding_window=5, **_COMMON),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=6,
                  max_window_layers=1, **_COMMON),
    "gpt2": dict(architectures=["GPT2LMHeadModel"], n_layer=2, n_embd=32, n_head=4,
                 vocab_size=VOCAB, n_positions=64),
}


def tiny(family: str = "llama", seed: int = 0, scale: float = 0.2, like=None, vocab: int = VOCAB):
  """A random model of ``family`` (weights N(0, scale²), norms 1 + N(0, 0.1²)); with
  ``like`` (a model), ``like``'s weights plus N(0, scale²) noise (a "fine-tuned" copy);
  ``vocab``: its vocabulary size."""
  model = hf.build(hf.from_hf(dict(CONFIGS[family], vocab_size=vocab)))
  rng = np.random.default_rng(seed)
  base = hf.to_hf_dict(like) if like is not None else None
  out = {}
  for name, v in sorted(hf.to_hf_dict(model).items()):
    noise = rng.normal(0.0, scale, v.shape).astype(np.float32)
    if base is not None:
      out[name] = np.asarray(base[name]) + noise
    elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
      out[name] = 1.0 + 0.5 * noise
    else:
      out[name] = noise
  return hf.with_hf_dict(model, out)
