"""The fusion benchmark's pieces: bits per character (float64 NumPy) and the fusion corpus."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kfuse.data import text
from kfuse.fusion import bench


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return text.train_tokenizer("bpe", 400, True, domains=("pydoc",), max_chars=20_000,
                              cache_dir=str(tmp_path_factory.mktemp("bench_cache")))


def test_bits_per_char_matches_float64_reference(tok):
  v = tok.vocab_size
  w = jax.random.normal(jax.random.key(0), (v, v))
  w64 = np.asarray(w, np.float64)
  texts = ["Hello there, general.\r\n\tTabs 😀 e\u0301", "x", "", "def f(x):\n  return x\n" * 5]
  seq = 8
  nll, chars = 0.0, 0
  for t in texts:
    enc = tok.encode(t)
    ids, ends = enc.ids, enc.offsets[:, 1]
    for s in range(0, len(ids) - 1, seq):
      win = ids[s:s + seq + 1]
      if len(win) < 2:
        continue
      z = w64[win[:-1]]
      lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
      nll -= lp[np.arange(len(win) - 1), win[1:]].sum()
      chars += int(ends[s + len(win) - 1] - ends[s])
  got = bench.bits_per_char(lambda x: w[x], tok, texts, seq, batch=3)
  np.testing.assert_allclose(got, nll / math.log(2) / chars, rtol=1e-5)


def test_fusion_corpus_sequences_are_target_token_blocks(tok):
  texts, ids, offs, nxt = bench.fusion_corpus(tok, ("pydoc",), 16, 5)
  assert len(texts) == 5 and ids.shape == (5, 16) and offs.shape == (5, 16, 2)
  doc = text.split("pydoc").train[0][1]
  enc = tok.encode(doc)
  np.testing.assert_array_equal(ids[0], enc.ids[:16])
  assert nxt[0] == enc.ids[16] and texts[0] == doc[enc.offsets[0, 0]:enc.offsets[15, 1]]
  for t, o in zip(texts, offs):
    assert o[0, 0] == 0 and o[-1, 1] == len(t)


@pytest.mark.slow
def test_fusellm_and_fusechat_quick_configs_run(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd(), KFUSE_CACHE=str(tmp_path / "cache"))
  for cfg in ("configs/fusellm.py:quick", "configs/fusechat.py:quick"):
    r = subprocess.run([sys.executable, "-m", "kfuse.main", f"--config={cfg}",
                        f"--config.workdir={tmp_path / 'wd'}"], env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / "wd" / "results_fusellm.json").exists()
  assert (tmp_path / "wd" / "results_fusechat.json").exists()
