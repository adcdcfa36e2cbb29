"""The cross-vocabulary benchmark's teacher-forced scorer (experiments/decode_bench/
xvocab_bench.py) against float64 NumPy restatements: each prefix run through the model on
its own, the union distribution restated over surface strings."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from kfuse import decode
from kfuse.data import text
from kfuse.errors import KfuseError
from kfuse.fusion.align import surfaces

from .test_crossvocab import _np_unite
from .tiny import tiny

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "decode_bench",
                     "xvocab_bench.py")
_SPEC = importlib.util.spec_from_file_location("xvocab_bench", _PATH)
X = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(X)

CHUNK = "def main(x):\n    return x + 1  # thou art"


@pytest.fixture(scope="module")
def setup():
  toks = (text.train_tokenizer("bpe", 300, domains=("pysource",)),
          text.train_tokenizer("bpe", 320, domains=("shakespeare",)))
  models = (tiny("llama", seed=30, scale=0.3, vocab=300),
            tiny("gpt2", seed=31, scale=0.3, vocab=320))
  vocab = decode.CrossVocab(list(toks), [300, 320])
  return toks, models, vocab, decode.unite(vocab, k=40)   # one rule: compiled once


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def _fed(toks, main, i):
  """Model i's ids for <eos> + CHUNK cut at model main's tokens, restated from surfaces:
  the token of the same surface (the first), else the tokenizer's encoding of the string."""
  main_surf = surfaces(toks[main])
  own = {}
  for t, s in enumerate(surfaces(toks[i])):
    own.setdefault(s, t)
  strings = [main_surf[t] for t in toks[main].encode(CHUNK).ids]
  ids, last = [2], []
  for s in strings:
    last.append(len(ids) - 1)
    ids.extend([own[s]] if s in own else toks[i].encode(s.decode("utf-8")).ids)
  return strings, ids, last


def _all_logits(model, ids):
  """The model's logits [T, V] over ids, one unpadded call (causal: row p sees ids[:p + 1])."""
  return np.asarray(model(np.asarray(ids, np.int32)[None])[0], np.float64)


@pytest.mark.parametrize("main", [0, 1])
def test_unite_score_matches_a_float64_restatement(setup, main):
  toks, models, vocab, unite = setup
  lp, hit = X.score_cross(models, vocab, CHUNK, unite, main, rows=16)
  strings, _, _ = _fed(toks, main, main)
  assert len(lp) == len(strings) and len(strings) > 4
  feeds = [_fed(toks, main, i) for i in range(2)]
  full = [_all_logits(m, f[1]) for m, f in zip(models, feeds)]
  finite = 0
  for j, s in enumerate(strings):
    z = [x[f[2][j]] for x, f in zip(full, feeds)]
    ref = _np_unite(z, toks, 40, (0.5, 0.5))
    if s in ref:
      finite += 1
      np.testing.assert_allclose(lp[j], np.log(ref[s]), rtol=1e-4, atol=1e-4)
    else:                               # outside the union of top-k: probability 0
      assert lp[j] < -1e20
    assert hit[j] == (max(ref, key=ref.get) == s)
  assert finite >= 3


def test_alone_and_deepen_on_the_main_model_only_score_that_model(setup):
  toks, models, vocab, _ = setup
  _, ids, last = _fed(toks, 0, 0)
  assert ids[1:] == list(toks[0].encode(CHUNK).ids)      # alone: the model's own tokenization
  full = _all_logits(models[0], ids)
  tgt = ids[1:]
  alone, hit = X.score_cross(models, vocab, CHUNK, None, 0)
  ref = np.array([_log_softmax(full[p])[t] for p, t in zip(last, tgt)])
  np.testing.assert_allclose(alone, ref, rtol=0, atol=2e-5)
  assert (hit == (full[last].argmax(1) == np.asarray(tgt))).all()
  # DeePEn with all weight on the main model gives its logits back (over the ids that have
  # a string: the byte-level byte-0 token has none), however the other model is fed
  deep, _ = X.score_cross(models, vocab, CHUNK, decode.deepen(vocab, models, weights=(1, 0)), 0)
  valid = vocab.sid[0] > 0
  ref = np.array([_log_softmax(full[p][valid])[np.flatnonzero(valid).tolist().index(t)]
                  for p, t in zip(last, tgt)])
  np.testing.assert_allclose(deep, ref, rtol=0, atol=1e-4)


def test_chunks_are_whole_test_text_and_bad_input_is_one_line(setup):
  toks, models, vocab, _ = setup
  got = X.chunks("pydoc", 50, 3)
  assert [len(c) for c in got] == [50, 50, 50]
  assert got[0] in text.split("pydoc").test[0][1]
  with pytest.raises(KfuseError, match="context of 64"):
    X.score_cross(models, vocab, CHUNK * 4, None, 0)
  other = decode.CrossVocab(list(toks), [300, 320])
  with pytest.raises(KfuseError, match="not a rule built on this CrossVocab"):
    X.score_cross(models, vocab, CHUNK, decode.unite(other), 0)
