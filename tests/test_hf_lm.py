"""kfuse.models.hf without peers: bad input (one KfuseError line each), tokenizer offsets,
the lm_eval CLI's errors. Parity with transformers: tests/peers/test_hf_models.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from kfuse.errors import KfuseError
from kfuse.io import open_hf_dir
from kfuse.models import hf

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
         "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 50, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
WORDS = "the cat sat on a mat while dogs ran far away and birds sang songs , . !".split()


def _model_dir(path, config=LLAMA, seed=0, **save_kw):
  """A random model of ``config`` written by kfuse (names and shapes from the family module)."""
  cfg = hf.from_hf(config)
  model = hf.build(cfg)
  keys = jax.random.split(jax.random.key(seed), 64)
  params = {n: 0.2 * jax.random.normal(k, a.shape)
            for k, (n, a) in zip(keys, hf.to_hf_dict(model).items())}
  hf.save(hf.with_hf_dict(model, params), str(path), **save_kw)
  return str(path)


def _tokenizer(path, words=WORDS):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return str(path)


def test_tokenizer_ids_and_offsets(tmp_path):
  """Offsets against an independent regex split of the same text (Whitespace = \\w+|[^\\w\\s]+)."""
  tok = hf.load_tokenizer(_tokenizer(tmp_path / "tokenizer.json"))
  text = "the cat  sat, on a  zebra!"
  enc = tok.encode(text)
  spans = [(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]+", text)]
  assert enc.offsets.tolist() == [list(s) for s in spans]
  words = ["[UNK]", *WORDS]
  assert enc.ids.tolist() == [words.index(text[a:b]) if text[a:b] in words else 0
                              for a, b in spans]
  assert tok.vocab_size == len(WORDS) + 1


def test_save_then_load_keeps_every_tensor(tmp_path):
  path = _model_dir(tmp_path / "m")
  model = hf.load(path)
  with open_hf_dir(path) as m:
    for name, arr in hf.to_hf_dict(model).items():
      np.testing.assert_array_equal(np.asarray(arr), m.get(name))
  assert json.load(open(os.path.join(path, "config.json")))["dtype"] == "float32"


def _one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
  path = _model_dir(tmp_path / "m")
  cfg = dict(LLAMA, architectures=["FalconForCausalLM"], model_type="falcon")
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(KfuseError) as e:
    hf.load(path)
  msg = _one_line(e)
  assert "'FalconForCausalLM'" in msg and "config.json" in msg
  assert all(a in msg for a in hf.ARCHITECTURES)


def test_unsupported_rope_type_is_named(tmp_path):
  cfg = dict(LLAMA, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(KfuseError, match="RoPE type 'yarn'.*supported: default, linear, llama3"):
    hf.from_hf(cfg)


def test_vocab_size_that_disagrees_with_the_embedding_rows(tmp_path):
  path = _model_dir(tmp_path / "m")
  json.dump(dict(LLAMA, vocab_size=64), open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(KfuseError) as e:
    hf.load(path)
  assert re.search(r"config\.json: vocab_size = 64 but model\.embed_tokens\.weight has 50 rows",
                   _one_line(e))


def test_config_with_fewer_layers_than_the_weights(tmp_path):
  path = _model_dir(tmp_path / "m")
  json.dump(dict(LLAMA, num_hidden_layers=1), open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(KfuseError) as e:
    hf.load(path)
  assert "'model.layers.1." in _one_line(e) and "unexpected" in str(e.value)


def test_missing_tensor_is_named(tmp_path):
  path = _model_dir(tmp_path / "m")
  json.dump(dict(LLAMA, num_hidden_layers=3), open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(KfuseError) as e:
    hf.load(path)
  assert "no tensor 'model.layers.2." in _one_line(e)


def test_missing_shard_is_named(tmp_path):
  path = _model_dir(tmp_path / "m", max_shard_bytes=4000)
  shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  assert len(shards) > 2
  os.remove(os.path.join(path, shards[1]))
  with pytest.raises(KfuseError) as e:
    hf.load(path)
  assert f"shard file {shards[1]!r}" in _one_line(e) and "not found" in str(e.value)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
  big = [f"w{i}" for i in range(60)]
  tok = hf.load_tokenizer(_tokenizer(tmp_path / "tokenizer.json", big))
  with pytest.raises(KfuseError) as e:
    tok.check_model(50, "m/config.json")
  assert "61 tokens but m/config.json has vocab_size = 50" in _one_line(e)


@pytest.mark.parametrize("axes,field", [((1, 1, 4), "num_key_value_heads = 2"),
                                        ((1, 2, 3), "num_attention_heads = 4")])
def test_mesh_that_does_not_divide_the_heads(tmp_path, axes, field):
  path = _model_dir(tmp_path / "m")
  mesh = AbstractMesh(axes, hf.MESH_AXES)
  with pytest.raises(KfuseError) as e:
    hf.load(path, mesh=mesh)
  assert f"mesh axis 'tensor' of size {axes[2]} does not divide {field}" in _one_line(e)


def test_partition_rules_split_only_dividing_axes():
  mesh = AbstractMesh((1, 2, 4), hf.MESH_AXES)
  P = jax.sharding.PartitionSpec
  assert hf.partition_spec("model.layers.0.self_attn.q_proj.weight", (32, 16), mesh) == \
      P("tensor", "fsdp")
  assert hf.partition_spec("model.layers.0.mlp.down_proj.weight", (16, 32), mesh) == \
      P("fsdp", "tensor")
  assert hf.partition_spec("model.embed_tokens.weight", (50, 16), mesh) == P(None, "fsdp")
  assert hf.partition_spec("model.norm.weight", (16,), mesh) == P()


def _cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "kfuse.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_lm_eval_cli_refuses_a_foreign_tokenizer_in_one_line(tmp_path):
  path = _model_dir(tmp_path / "m")
  _tokenizer(os.path.join(path, "tokenizer.json"), [f"w{i}" for i in range(60)])
  (tmp_path / "t.txt").write_text("w1 w2 w3")
  r = _cli(f"--config={os.getcwd()}/configs/lm_eval.py:{path}",
           f"--config.text_file={tmp_path / 't.txt'}", f"--config.workdir={tmp_path / 'w'}",
           cwd=tmp_path)
  assert r.returncode != 0
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kfuse: error:")]
  assert len(lines) == 1 and "61 tokens but" in lines[0] and "vocab_size = 50" in lines[0], \
      r.stderr[-2000:]


def test_mixed_dtype_checkpoint_round_trips_bit_for_bit(tmp_path):
  """bf16 matrices with float32 norms (as some checkpoints ship): dtype=None keeps each."""
  import ml_dtypes
  from kfuse.io import read_hf_dir, write_hf_dir
  src = read_hf_dir(_model_dir(tmp_path / "f32"))
  mixed = {n: a if "norm" in n else a.astype(ml_dtypes.bfloat16) for n, a in src.items()}
  write_hf_dir(tmp_path / "mixed", mixed, config=LLAMA)
  model = hf.load(tmp_path / "mixed")
  hf.save(model, tmp_path / "out")
  out = read_hf_dir(tmp_path / "out")
  assert sorted(out) == sorted(mixed)
  for n, a in mixed.items():
    assert out[n].dtype == a.dtype and out[n].tobytes() == a.tobytes(), n
  assert np.isfinite(np.asarray(hf.forward(model, np.zeros((1, 5), np.int32)))).all()



@pytest.mark.parametrize("window", [0, 5, 130])
def test_blocked_causal_attention_equals_float64_reference(window):
  """T = 300 (three query blocks of 128), GQA 4 query / 2 kv heads, with and without a window
  that crosses block boundaries, against the full masked softmax in float64 NumPy."""
  from kfuse.models.hf.common import causal_attention
  rng = np.random.default_rng(0)
  b, t, h, kv, d = 2, 300, 4, 2, 8
  q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
  got = np.asarray(causal_attention(q, k, v, d ** -0.5, window))
  kr, vr = (np.repeat(x.astype(np.float64), h // kv, axis=2) for x in (k, v))
  s = np.einsum("bqhd,bshd->bhqs", q.astype(np.float64), kr) * d ** -0.5
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = (j <= i) & ((j > i - window) if window else True)
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhqs,bshd->bqhd", p, vr)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_with_hf_dict_names_a_wrong_shape(tmp_path):
  model = hf.load(_model_dir(tmp_path / "m"))
  params = dict(hf.to_hf_dict(model))
  params["model.norm.weight"] = np.zeros(17, np.float32)
  with pytest.raises(KfuseError) as e:
    hf.with_hf_dict(model, params)
  assert "'model.norm.weight' has shape (17,), the model's is (16,)" in _one_line(e)
