"""KV-cache generation: cached decoding == full-context recomputation, sampling, stops."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kfuse import decode
from kfuse.models import hf

from .tiny import CONFIGS, VOCAB, tiny

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 30, 7, 7, 12, 40], [33]]
NEW = 8


def _full_context_logits(model, prompts, tokens):
  """Logits of each generated position by a no-cache forward over prompt + generated
  tokens (right-padded to one length: causal, so the padding changes nothing before it)."""
  seqs = [list(p) + list(map(int, t)) for p, t in zip(prompts, tokens)]
  n = max(len(s) for s in seqs)
  ids = np.array([s + [0] * (n - len(s)) for s in seqs], np.int32)
  z = np.asarray(hf.forward(model, ids), np.float64)
  return np.stack([z[i, len(p) - 1:len(p) - 1 + tokens.shape[1]] for i, p in enumerate(prompts)])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_kv_cache_decoding_equals_full_context_recomputation(family):
  model = tiny(family, seed=1)
  out = decode.generate(model, PROMPTS, NEW, return_logits=True)
  assert out.tokens.shape == (3, NEW) and (out.lengths == NEW).all()
  ref = _full_context_logits(model, PROMPTS, out.tokens)
  scale = np.abs(ref).max()
  assert np.abs(out.logits - ref).max() <= 1e-4 * scale
  np.testing.assert_array_equal(out.tokens, ref.argmax(-1))   # greedy, step by step
  # the longest row crosses Mistral's (5) and Qwen2's (6) sliding windows
  assert len(PROMPTS[1]) + NEW > max(CONFIGS["qwen2"]["sliding_window"], 5)


def test_a_row_decodes_as_it_would_alone():
  model = tiny("qwen2", seed=2)
  both = decode.generate(model, PROMPTS, NEW)
  for i, p in enumerate(PROMPTS):
    alone = decode.generate(model, [p], NEW)
    np.testing.assert_array_equal(alone.tokens[0], both.tokens[i])


def test_sampling_is_deterministic_under_a_key_and_top_k_1_is_greedy():
  model = tiny("llama", seed=3, scale=0.05)     # flat distributions: samples differ
  greedy = decode.generate(model, PROMPTS, NEW)
  a = decode.generate(model, PROMPTS, NEW, temperature=1.0, key=jax.random.key(7))
  b = decode.generate(model, PROMPTS, NEW, temperature=1.0, key=jax.random.key(7))
  c = decode.generate(model, PROMPTS, NEW, temperature=1.0, key=jax.random.key(8))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any() and (a.tokens != greedy.tokens).any()
  k1 = decode.generate(model, PROMPTS, NEW, temperature=1.0, top_k=1, key=jax.random.key(7))
  np.testing.assert_array_equal(k1.tokens, greedy.tokens)
  p0 = decode.generate(model, PROMPTS, NEW, temperature=1.0, top_p=1e-6, key=jax.random.key(7))
  np.testing.assert_array_equal(p0.tokens, greedy.tokens)


def test_sampling_frequencies_follow_the_softmax():
  """One step, 4000 rows of the same prompt: token frequencies vs softmax(z / T) in float64."""
  model = tiny("gpt2", seed=4, scale=0.05)
  out = decode.generate(model, [[3, 4]] * 4000, 1, temperature=0.7, key=jax.random.key(0),
                        return_logits=True)
  p = np.exp(out.logits[0, 0].astype(np.float64) / 0.7)
  p /= p.sum()
  freq = np.bincount(out.tokens[:, 0], minlength=VOCAB) / 4000
  assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / 4000)


def test_stop_tokens_end_rows_and_pad_the_rest():
  model = tiny("mistral", seed=5)
  free = decode.generate(model, PROMPTS, NEW)
  stop = int(free.tokens[1, 3])
  first = [int(np.argmax(row == stop)) if (row == stop).any() else None for row in free.tokens]
  out = decode.generate(model, PROMPTS, NEW, stop_tokens=[stop], pad_id=VOCAB - 1)
  for i, f in enumerate(first):
    n = NEW if f is None else f + 1
    assert out.lengths[i] == n
    np.testing.assert_array_equal(out.tokens[i, :n], free.tokens[i, :n])
    assert (out.tokens[i, n:] == VOCAB - 1).all()


def _np_top_p(z, p):
  order = np.argsort(-z, kind="stable")
  q = np.exp(z[order] - z.max())
  q /= q.sum()
  keep = np.zeros(z.shape, bool)
  keep[order[(np.cumsum(q) - q) < p]] = True
  return keep


def test_top_k_and_top_p_keep_the_reference_sets():
  z = np.random.default_rng(0).normal(0, 2, (5, 40)).astype(np.float32)
  kz, _ = decode.top_k(7).apply((z,), None)
  for row, k in zip(z, np.asarray(kz)):
    np.testing.assert_array_equal(k > -1e29, row >= np.sort(row)[-7])
  for p in (0.05, 0.5, 0.9, 1.0):
    pz, _ = decode.top_p(p).apply((z,), None)
    for row, k in zip(z.astype(np.float64), np.asarray(pz)):
      np.testing.assert_array_equal(k > -1e29, _np_top_p(row, p))


def test_repeated_calls_reuse_the_compiled_loop():
  from kfuse.decode import loop
  model = tiny("gpt2", seed=6)
  decode.generate(model, PROMPTS, 3)
  n = loop._run._cache_size()
  decode.generate(model, PROMPTS, 3)
  decode.generate(tiny("gpt2", seed=7), PROMPTS, 3)     # same shapes, other weights
  assert loop._run._cache_size() == n
