"""Generation for the zoo GPT (`kfuse.models.gpt.GPTDecoder`): KV-cache decoding equals the
Linen forward recomputed over the full context, and proxy-tuning with α = 0 is the large model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import decode
from kfuse.errors import KfuseError
from kfuse.models import GPTDecoder, make_gpt   # the package exports the zoo decoder

VOCAB, MAX_LEN = 29, 24
PROMPTS = [[5, 17, 3], [9, 1, 24, 2, 20, 7, 7, 12, 28], [13]]
NEW = 7


def _zoo_gpt(seed: int):
  """A tiny zoo GPT with random N(0, 0.3²) weights (LayerNorm scales 1 + N(0, 0.3²)), drawn
  in NumPy on the shapes of ``model.init`` (no eager init: seconds on a busy CPU). The
  position table is as large as the rest, so left-padding bugs move the logits."""
  model = make_gpt(VOCAB, max_len=MAX_LEN, dim=16, depth=2, num_heads=2, mlp_ratio=2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    w = rng.normal(0.0, 0.3, x.shape).astype(np.float32)
    return w + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else w

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _full_context_logits(model, variables, prompts, tokens):
  """Each generated position's logits from the Linen forward over prompt + generated
  (right-padded: causal, so padding after a position changes nothing at it), float64."""
  seqs = [list(p) + list(map(int, t)) for p, t in zip(prompts, tokens)]
  n = max(len(s) for s in seqs)
  ids = np.array([s + [0] * (n - len(s)) for s in seqs], np.int32)
  z = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)), np.float64)   # eager: ~5 s
  return np.stack([z[i, len(p) - 1:len(p) - 1 + tokens.shape[1]] for i, p in enumerate(prompts)])


def test_kv_cache_greedy_decoding_equals_full_context_recomputation():
  model, variables = _zoo_gpt(0)
  out = decode.generate([GPTDecoder(model, variables)], PROMPTS, NEW, return_logits=True)
  assert out.tokens.shape == (3, NEW) and (out.lengths == NEW).all()
  ref = _full_context_logits(model, variables, PROMPTS, out.tokens)
  # the reference has no left padding: rows 0 and 2 (padded by 6 and 8) match it only if
  # their positions count from their first real token and the padded slots are masked
  assert np.abs(out.logits - ref).max() <= 1e-4 * np.abs(ref).max()
  np.testing.assert_array_equal(out.tokens, ref.argmax(-1))   # greedy, token by token


def test_proxy_tuning_with_alpha_zero_is_the_first_model():
  trio = [GPTDecoder(*_zoo_gpt(s)) for s in (1, 2, 3)]
  fused = decode.generate(trio, PROMPTS, NEW, processor=decode.proxy_tune(0.0),
                          return_logits=True)
  alone = decode.generate(trio[:1], PROMPTS, NEW, return_logits=True)
  np.testing.assert_array_equal(fused.tokens, alone.tokens)
  np.testing.assert_allclose(fused.logits, alone.logits, rtol=0, atol=1e-5)
  other = decode.generate(trio[1:2], PROMPTS, NEW)   # the check can fail: the models differ
  assert (other.tokens != alone.tokens).any()


def test_score_of_the_zoo_gpt_matches_a_float64_log_softmax():
  model, variables = _zoo_gpt(4)
  ids = np.array([[3, 8, 1, 22, 5], [0, 14, 9, 9, 27]], np.int32)
  got = decode.score([GPTDecoder(model, variables)], ids)
  z = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)), np.float64)[:, :-1]
  lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - z.max(-1, keepdims=True)
  np.testing.assert_allclose(got, np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0],
                             atol=1e-5)


def test_bad_input_is_one_line_naming_the_zoo_gpt():
  model, variables = _zoo_gpt(0)
  with pytest.raises(KfuseError, match="GPTDecoder"):
    decode.generate([model], PROMPTS, NEW)               # a bare Linen module
  with pytest.raises(KfuseError, match="context of 24"):
    decode.generate([GPTDecoder(model, variables)], PROMPTS, MAX_LEN)
  with pytest.raises(KfuseError, match="make_gpt"):
    GPTDecoder(decode, variables)
  bad = jax.tree.map(lambda x: x, variables)
  bad["params"]["backbone"]["pos_embed"] = np.zeros((1, MAX_LEN - 1, 16), np.float32)
  with pytest.raises(KfuseError, match=r"pos_embed.*shape \(1, 23, 16\)"):
    GPTDecoder(model, bad)


def test_proxy_tuning_of_three_zoo_gpts_matches_their_full_context_logits():
  """α = 1: every step's fused logits are z_large + (z_tuned − z_base), each z from its own
  model's Linen forward over the full context (so no model's cache leaks into another's)."""
  pairs = [_zoo_gpt(s) for s in (1, 2, 3)]
  out = decode.generate([GPTDecoder(m, v) for m, v in pairs], PROMPTS, NEW,
                        processor=decode.proxy_tune(1.0), return_logits=True)
  z = [_full_context_logits(m, v, PROMPTS, out.tokens) for m, v in pairs]
  ref = z[0] + (z[2] - z[1])
  assert np.abs(out.logits - ref).max() <= 1e-4 * np.abs(ref).max()
  np.testing.assert_array_equal(out.tokens, ref.argmax(-1))
