"""Representation files: layout readable with NumPy only, resume after a kill, hash checks."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse.data import text
from kfuse.errors import KfuseError
from kfuse.fusion import representations as R

TEXTS = ["Hello world.\r\n\tTabs and CRLF.", "", "e\u0301 😀 combining and emoji " * 3,
         "def f(x):\n    return x + 1\n" * 4, "short"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return text.train_tokenizer("bpe", 400, True, domains=("pydoc",), max_chars=20_000,
                              cache_dir=str(tmp_path_factory.mktemp("rep_cache")))


def _model(vocab_model, seed=0):
  """A fixed random bigram 'model': logits[b, t] = W[tokens[b, t]] (float32)."""
  w = jax.random.normal(jax.random.key(seed), (vocab_model, vocab_model)) * 3
  return (lambda tokens: w[tokens]), np.asarray(w, np.float64)


def _ref(ids, w, vocab, k):
  """float64 NumPy recomputation of one sequence's representation (single window)."""
  z = w[ids][:, :vocab]
  lp = z - z.max(-1, keepdims=True)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  top = np.argsort(-lp, -1, kind="stable")[:, :k]
  ce = np.full(len(ids), np.nan)
  ce[:-1] = -lp[np.arange(len(ids) - 1), ids[1:]]
  return top, np.take_along_axis(lp, top, -1), ce


def test_layout_values_and_numpy_only_reading(tmp_path, tok):
  apply, w = _model(tok.vocab_size + 7)            # config.vocab_size > len(tokenizer) (#13)
  out = str(tmp_path / "rep")
  man = R.write(out, TEXTS, tok, apply, k=5, context=512, shard_size=2, meta={"source": "t"})
  assert man["complete"] and len(man["shards"]) == 3 and man["meta"] == {"source": "t"}
  # plain numpy + json, no kfuse
  with open(os.path.join(out, "manifest.json")) as f:
    m = json.load(f)
  seqs = []
  for s in m["shards"]:
    z = np.load(os.path.join(out, s["file"]))
    sp = z["row_splits"]
    for r in range(len(sp) - 1):
      seqs.append({k: z[k][sp[r]:sp[r + 1]] for k in ("token_ids", "topk_ids", "topk_logprobs", "token_ce")}
                  | {"seq_ce": z["seq_ce"][r], "hash": str(z["token_sha256"][r])})
  assert len(seqs) == len(TEXTS)
  for t, s in zip(TEXTS, seqs):
    ids = tok.encode(t).ids
    np.testing.assert_array_equal(s["token_ids"], ids)
    assert s["hash"] == R.token_hash(ids)
    if not len(ids):
      assert s["topk_ids"].shape == (0, 5) and np.isnan(s["seq_ce"])
      continue
    top, lp, ce = _ref(np.asarray(ids), w, tok.vocab_size, 5)
    np.testing.assert_allclose(s["topk_logprobs"], lp, atol=1e-4)
    assert (s["topk_ids"] < tok.vocab_size).all()
    np.testing.assert_allclose(s["token_ce"], ce, atol=1e-4)
    np.testing.assert_allclose(s["seq_ce"], np.nanmean(ce) if len(ids) > 1 else np.nan, atol=1e-4)
  assert [r["token_sha256"] for r in R.read(out)] == [s["hash"] for s in seqs]


def test_long_sequences_are_scored_in_context_windows(tmp_path, tok):
  apply, w = _model(tok.vocab_size)
  t = "word " * 80
  ids = np.asarray(tok.encode(t).ids)
  assert len(ids) > 20
  (rec,) = list(R.read(R.write(str(tmp_path / "r"), [t], tok, apply, k=3, context=8) and str(tmp_path / "r")))
  _, lp, ce = _ref(ids, w, tok.vocab_size, 3)        # a bigram model: windows change nothing
  np.testing.assert_allclose(rec["topk_logprobs"], lp, atol=1e-4)
  ce[7::8] = np.nan                                   # each window's last position
  np.testing.assert_allclose(rec["token_ce"], ce, atol=1e-4)


def test_killed_job_resumes_and_skips_done_shards(tmp_path, tok, monkeypatch):
  apply, _ = _model(tok.vocab_size)
  out = str(tmp_path / "rep")
  calls = {"n": 0}
  real = R._score_sequences

  def dying(*a, **kw):
    calls["n"] += 1                                   # one call per shard
    if calls["n"] == 2:
      raise KeyboardInterrupt("killed")
    return real(*a, **kw)
  monkeypatch.setattr(R, "_score_sequences", dying)
  with pytest.raises(KeyboardInterrupt):
    R.write(out, TEXTS, tok, apply, k=4, context=64, shard_size=2)
  man = R.load_manifest(out)
  assert not man["complete"] and [s["first"] for s in man["shards"]] == [0]
  assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
  with pytest.raises(KfuseError, match="incomplete"):
    list(R.read(out))
  monkeypatch.setattr(R, "_score_sequences", real)
  first = os.stat(os.path.join(out, "shard-00000.npz")).st_mtime_ns
  man = R.write(out, TEXTS, tok, apply, k=4, context=64, shard_size=2)
  assert man["complete"] and os.stat(os.path.join(out, "shard-00000.npz")).st_mtime_ns == first
  fresh = R.write(str(tmp_path / "fresh"), TEXTS, tok, apply, k=4, context=64, shard_size=2)
  for a, b in zip(R.read(out), R.read(str(tmp_path / "fresh"))):
    np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
  del fresh


def test_bad_inputs(tmp_path, tok):
  apply, _ = _model(tok.vocab_size)
  out = str(tmp_path / "rep")
  R.write(out, TEXTS[:2], tok, apply, k=4, context=64)
  with pytest.raises(KfuseError, match="different texts_sha256"):
    R.write(out, TEXTS[1:3], tok, apply, k=4, context=64)
  with pytest.raises(KfuseError, match="different k"):
    R.write(out, TEXTS[:2], tok, apply, k=3, context=64)
  R.check_tokens(out, 0, tok.encode(TEXTS[0]).ids)
  with pytest.raises(KfuseError, match="different corpus, order or tokenizer"):
    R.check_tokens(out, 0, tok.encode(TEXTS[1] + "x").ids)
  with pytest.raises(KfuseError, match="larger than the source vocabulary"):
    R.write(str(tmp_path / "k"), TEXTS, tok, apply, k=tok.vocab_size + 1)
  small, _ = _model(tok.vocab_size - 5)
  with pytest.raises(KfuseError, match="vocab_size < len"):
    R.write(str(tmp_path / "v"), TEXTS, tok, small, k=4)
  with pytest.raises(KfuseError, match="not a representation directory"):
    R.load_manifest(str(tmp_path))
