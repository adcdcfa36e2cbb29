"""The weak-to-strong benchmark's measurement pieces, and its quick run end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kfuse import decode
from kfuse.decode import w2s_bench
from kfuse.models import hf

from .tiny import VOCAB, tiny


def _byte_bpe():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(["héllo wörld, hello world"] * 4, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<unk>", "<pad>", "<eos>"]))
  return hf.Tokenizer(raw, "bpe.json")


def test_token_stream_counts_each_character_once():
  docs = [("a", "héllo wörld ∑"), ("b", "hello  world\n")]
  ids, chars = w2s_bench.token_stream(_byte_bpe(), docs)
  assert len(ids) == len(chars) and ids[-1] == w2s_bench.EOS
  assert chars.sum() == sum(len(t) + 1 for _, t in docs)     # + one per document break
  assert (chars >= 0).all()


def test_bits_per_char_matches_float64():
  model = tiny("llama", seed=3)
  rng = np.random.default_rng(0)
  windows = rng.integers(0, VOCAB, (5, 12)).astype(np.int32)
  chars = rng.integers(1, 4, (5, 12))
  z = np.asarray(hf.forward(model, windows), np.float64)[:, :-1]
  z = z - z.max(-1, keepdims=True)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(lp, windows[:, 1:, None], -1).sum()
  ref = nll / np.log(2) / chars[:, 1:].sum()
  got = w2s_bench.bits_per_char([model], decode.identity(), windows, chars, batch=2)
  assert abs(got - ref) <= 1e-5 * ref


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  subprocess.run([sys.executable, "-m", "kfuse.main", "--config=configs/w2s_bench.py:quick",
                  f"--workdir={tmp_path}", "--config.progress=False"], check=True, env=env)
  res = json.loads((tmp_path / "results.json").read_text())
  row = res["bits_per_char"]["single"]["pysource"]
  assert set(row) >= {"large", "proxy_tuned", "dlf", "large_tuned", "dlf_gap_closed_pct"}
  assert all(np.isfinite(v) for v in row.values())
  assert set(res["bits_per_char"]["multi"]) == {"pysource", "pydoc"}
  assert "| single | pysource |" in (tmp_path / "results.md").read_text()
