"""kfuse.models.hf against transformers: the same logits, round trips, merges, perplexity.

Tiny random models of every family are built by transformers from configs (no
downloads) and saved with ``save_pretrained``: Llama (GQA, Llama 3 RoPE scaling),
Llama with tied embeddings, Mistral (a sliding window shorter than the input),
Qwen2 (q/k/v biases, one sliding-window layer) and GPT-2 (tied, Conv1D). Weights
are drawn N(0, 0.2) so that every layer moves the logits visibly.

Error measure: max |kfuse − transformers| / max |transformers| over all logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from .peer import require

torch = require("torch")
transformers = require("transformers")

import jax  # noqa: E402

from kfuse.io import read_hf_dir  # noqa: E402
from kfuse.models import hf  # noqa: E402

pytestmark = pytest.mark.peers

_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        num_hidden_layers=2, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **_COMMON)),
    "llama_tied": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        num_hidden_layers=2, tie_word_embeddings=True, rope_theta=500.0, **_COMMON)),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        num_hidden_layers=2, tie_word_embeddings=False, sliding_window=5, **_COMMON)),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        num_hidden_layers=2, tie_word_embeddings=False, use_sliding_window=True,
        sliding_window=6, max_window_layers=1, **_COMMON)),
    "gpt2": lambda: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=128, bos_token_id=0,
        eos_token_id=0)),
}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _build(family: str, seed: int, dtype: str = "float32"):
  cls, cfg = FAMILIES[family]()
  torch.manual_seed(seed)
  m = cls(cfg)
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0.0, 0.2)
  return m.to(_TORCH[dtype]).eval()


def _save(root, family, seed=0, dtype="float32"):
  path = os.path.join(str(root), f"{family}_{seed}_{dtype}")
  if not os.path.isdir(path):
    _build(family, seed, dtype).save_pretrained(path)
  return path


def _torch_logits(path, ids, dtype=torch.float32):
  m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
  with torch.no_grad():
    return m(torch.tensor(ids)).logits.float().numpy()


def _ids(batch=3, length=24, seed=0):
  return np.random.RandomState(seed).randint(0, 97, (batch, length)).astype(np.int32)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("hf_models")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match_transformers(root, family):
  path = _save(root, family)
  ids = _ids()
  ref = _torch_logits(path, ids)
  model = hf.load(path)
  assert model.config.family == family.split("_")[0]
  assert _rel(hf.forward(model, ids), ref) <= 1e-4


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_fp32_logits_match_transformers_over_several_query_blocks(root, family):
  """300 tokens: three of kfuse's 128-query attention blocks, windows across their borders."""
  path = _save(root, family)
  ids = _ids(1, 300, seed=5)
  assert _rel(hf.forward(hf.load(path), ids), _torch_logits(path, ids)) <= 1e-4


def test_config_features_are_exercised(root):
  """The cases above really test GQA, Llama 3 RoPE, windows, biases and ties."""
  llama = hf.load(_save(root, "llama")).config
  assert llama.rope[0] == "llama3" and llama.num_kv_heads < llama.num_heads
  assert hf.load(_save(root, "mistral")).config.windows == (5, 5)
  qwen = hf.load(_save(root, "qwen2")).config
  assert qwen.qkv_bias and not qwen.o_bias and qwen.windows == (0, 6)
  assert hf.load(_save(root, "llama_tied")).lm_head is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_argmax_agrees_with_transformers(root, family):
  """bf16 weights and compute on both sides, 8 x 64 positions.

  Tolerance: logits within 3 % of their range (measured 0.75-1.05 %: kfuse keeps
  scores, softmax and norms in float32, torch's sdpa rounds more in bf16); argmax
  agreement ≥ 99 % where the float32 forward of the same bf16 weights has a clear
  winner (top-2 margin > 2 % of the largest |logit|, about 2.5x the bf16 error;
  ≥ 80 % of positions). On near-ties bf16 noise decides: over *all* positions
  transformers' bf16 agrees with its own float32 only 98.0-99.6 % of the time on
  these random models, and kfuse with transformers 98.0-99.6 % (both measured on
  two seeds per family), so the all-position bound is 97 %.
  """
  path = _save(root, family, dtype="bfloat16")
  ids = _ids(8, 64, seed=1)
  ref = _torch_logits(path, ids, torch.bfloat16)
  exact = _torch_logits(path, ids, torch.float32)
  got = np.asarray(hf.forward(hf.load(path), ids).astype(np.float32))
  top2 = np.sort(exact, -1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 0.02 * np.abs(exact).max(-1)
  assert clear.mean() >= 0.8, clear.mean()
  same = got.argmax(-1) == ref.argmax(-1)
  assert same[clear].mean() >= 0.99, same[clear].mean()
  assert same.mean() >= 0.97, same.mean()
  assert _rel(got, ref) <= 3e-2


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical(root, tmp_path, family, dtype):
  src = _save(root, family, dtype=dtype)
  out = str(tmp_path / "out")
  hf.save(hf.load(src), out)
  a, b = read_hf_dir(src), read_hf_dir(out)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["dtype"] == dtype


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_dir_loads_in_transformers_with_kfuse_logits(root, tmp_path, family):
  from kfuse import merge
  a, b = hf.load(_save(root, family, 0)), hf.load(_save(root, family, 1))
  merged = merge.merge("linear", [hf.to_hf_dict(a), hf.to_hf_dict(b)],
                       params={"weight": [0.3, 0.7]})
  model = hf.with_hf_dict(a, merged)
  out = str(tmp_path / "merged")
  hf.save(model, out)
  ids = _ids()
  ref = _torch_logits(out, ids)
  assert _rel(hf.forward(model, ids), ref) <= 1e-4
  # and the merge is the weighted mean of the two checkpoints (float64 NumPy)
  wa, wb, wm = (read_hf_dir(p) for p in (_save(root, family, 0), _save(root, family, 1), out))
  for name in wm:
    expect = 0.3 * wa[name].astype(np.float64) + 0.7 * wb[name].astype(np.float64)
    np.testing.assert_allclose(wm[name], expect, rtol=1e-6, atol=1e-7)


_SHARDED = textwrap.dedent("""
    import sys, numpy as np, jax
    from kfuse.models import hf
    assert len(jax.devices()) == 8
    mesh = hf.make_mesh(data=2, fsdp=2, tensor=2)
    out = {}
    for path in sys.argv[2:]:
      model = hf.load(path, mesh=mesh)
      params = hf.to_hf_dict(model)
      split = sum(any(a is not None for a in p.sharding.spec) for p in params.values())
      assert split >= 4, (path, split)
      ids = jax.device_put(np.load(sys.argv[1])["ids"], hf.batch_sharding(mesh, 4))
      out[path] = np.asarray(hf.forward(model, ids))
    np.savez(sys.argv[1] + ".out.npz", *[out[p] for p in sys.argv[2:]])
""")


@pytest.mark.parametrize("families", [
    ["llama"], pytest.param(sorted(set(FAMILIES) - {"llama"}), marks=pytest.mark.slow)])
def test_sharded_load_gives_the_unsharded_logits(root, tmp_path, families):
  """8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2, the families in one subprocess."""
  paths = [_save(root, f) for f in families]
  ids = _ids(4, 24, seed=2)
  np.savez(tmp_path / "ids.npz", ids=ids)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
  r = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "ids.npz"), *paths],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(str(tmp_path / "ids.npz") + ".out.npz")
  for i, path in enumerate(paths):
    want = np.asarray(hf.forward(hf.load(path), ids))
    np.testing.assert_allclose(got[f"arr_{i}"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _reference_perplexity(path, ids, seq_len):
  """transformers' mean loss (labels=input_ids) per window, weighted by predicted tokens."""
  m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for lo in range(0, len(ids), seq_len):
      w = torch.tensor(ids[lo:lo + seq_len], dtype=torch.long)[None]
      if w.shape[1] < 2:
        continue
      total += float(m(w, labels=w).loss) * (w.shape[1] - 1)
      count += w.shape[1] - 1
  return float(np.exp(total / count)), count


@pytest.mark.parametrize("family", ["qwen2", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_lm_eval_cli_perplexity_matches_transformers(root, tmp_path, family):
  """`python -m kfuse.main --config=configs/lm_eval.py:DIR`: 10 windows of 16 tokens (3 batches
  of 4, the last padded) + a 7-token tail, against transformers' loss on the same windows."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  path = str(tmp_path / family)
  _build(family, 3).save_pretrained(path)
  words = [f"w{i}" for i in range(96)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])},
                                   unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  ids = np.random.RandomState(4).randint(1, 97, 167)
  (tmp_path / "text.txt").write_text(" ".join(words[i - 1] for i in ids))
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
  work = tmp_path / "work"
  r = subprocess.run([sys.executable, "-m", "kfuse.main",
                      f"--config=configs/lm_eval.py:{path}",
                      f"--config.text_file={tmp_path / 'text.txt'}", "--config.seq_len=16",
                      "--config.eval_batch_size=4", f"--config.workdir={work}"],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(work / "results.json"))
  want, count = _reference_perplexity(path, ids, 16)
  assert res["tokens"] == count == 10 * 15 + 6 and res["windows"] == 11
  assert abs(res["perplexity"] - want) <= 1e-4 * want, (res["perplexity"], want)
