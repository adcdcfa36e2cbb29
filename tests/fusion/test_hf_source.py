"""HF causal-LM directories (random tiny Llama / GPT-2 written by transformers) as fusion
sources: the representation files against the transformers (PyTorch) model in float64."""

import os

import numpy as np
import pytest

from kfuse.data import text
from kfuse.errors import KfuseError
from kfuse.fusion import bench
from kfuse.fusion import representations as R

from tests.peers.peer import require

torch = require("torch")   # skips without the peers extra, fails with it
transformers = require("transformers")

TEXTS = ["def f(x):\n    return x + 1\n" * 3, "", "Hello world.\r\n\tTabs and CRLF."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return text.train_tokenizer("bpe", 320, True, domains=("pydoc",), max_chars=20_000,
                              cache_dir=str(tmp_path_factory.mktemp("hf_src_cache")))


def _hf_dir(path, family: str, vocab: int, tok):
  if family == "gpt2":
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab,
                                  n_positions=64, bos_token_id=0, eos_token_id=0)
    cls = transformers.GPT2LMHeadModel
  else:
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=vocab, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    cls = transformers.LlamaForCausalLM
  torch.manual_seed(0)
  m = cls(cfg).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0.0, 0.3)
  m.save_pretrained(path, safe_serialization=True)
  tok._tok.save(os.path.join(path, "tokenizer.json"))
  return m


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_source_representations_match_transformers(tmp_path, tok, family):
  vocab = tok.vocab_size + 5                        # padded embedding (FuseAI #13)
  m = _hf_dir(str(tmp_path / "hf"), family, vocab, tok)
  apply, src_tok = bench.hf_source(str(tmp_path / "hf"))
  assert src_tok.vocab_size == tok.vocab_size
  ctx, k = 16, 5
  R.write(str(tmp_path / "rep"), TEXTS, src_tok, apply, k=k, context=ctx, shard_size=2)
  for t, rec in zip(TEXTS, R.read(str(tmp_path / "rep"))):
    ids = tok.encode(t).ids
    np.testing.assert_array_equal(rec["token_ids"], ids)
    if not len(ids):
      assert rec["topk_ids"].shape == (0, k)
      continue
    lps, ces = [], []
    for s in range(0, len(ids), ctx):                # the same windows, in float64
      w = ids[s:s + ctx]
      with torch.no_grad():
        z = m(torch.tensor(w[None], dtype=torch.long)).logits[0].double().numpy()[:, :tok.vocab_size]
      lp = z - z.max(-1, keepdims=True)
      lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
      ce = np.full(len(w), np.nan)
      ce[:-1] = -lp[np.arange(len(w) - 1), w[1:]]
      lps.append(lp)
      ces.append(ce)
    lp, ce = np.concatenate(lps), np.concatenate(ces)
    np.testing.assert_allclose(rec["topk_logprobs"], -np.sort(-lp, -1)[:, :k], atol=2e-4)
    np.testing.assert_allclose(np.take_along_axis(lp, rec["topk_ids"], -1), rec["topk_logprobs"],
                               atol=2e-4)
    np.testing.assert_allclose(rec["token_ce"], ce, atol=2e-4)


def test_hf_source_refuses_a_larger_tokenizer(tmp_path, tok):
  _hf_dir(str(tmp_path / "hf"), "gpt2", tok.vocab_size - 10, tok)
  with pytest.raises(KfuseError, match="tokenizer has .* tokens but .*config.json has vocab_size"):
    bench.hf_source(str(tmp_path / "hf"))
