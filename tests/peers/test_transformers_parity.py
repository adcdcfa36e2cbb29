"""kfuse outputs load in transformers as the model the merge produced.

Tiny models (2-4 blocks, hidden 32) are built with transformers' own
``save_pretrained`` from random init (Llama, Qwen2, GPT-2 with tied embeddings,
fp32 and bf16). Each output is loaded with ``AutoModelForCausalLM.from_pretrained``
and checked three ways:

* nothing missing or unexpected in the loading report, the dtype the merge wrote;
* its logits equal those of a reference model: the same architecture built by
  ``from_config`` with the expected layer count and ``load_state_dict(strict=True)``
  of the merge recomputed here in float64 NumPy (weights cast like the output);
* its config's layer fields (``num_hidden_layers``, ``n_layer``, ``layer_types``)
  match the tensors.

These tests fail (never skip) when torch / transformers are installed and a check breaks.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from .peer import require

torch = require("torch")
transformers = require("transformers")

from kfuse import io as kio  # noqa: E402
from kfuse.mergekit_compat import run_yaml  # noqa: E402

pytestmark = pytest.mark.peers

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _save(model_cls, cfg, path, seed, dtype="float32", **save_kw):
  torch.manual_seed(seed)
  m = model_cls(cfg)
  with torch.no_grad():   # larger than the default init, so logits move visibly per layer
    for p in m.parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 0.2)
  m = m.to(_TORCH[dtype])
  m.save_pretrained(path, **save_kw)
  return str(path)


def _llama(path, seed, dtype="float32"):
  cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                 max_position_embeddings=64, tie_word_embeddings=False)
  return _save(transformers.LlamaForCausalLM, cfg, path, seed, dtype)


def _mistral(path, seed, dtype="float32"):
  cfg = transformers.MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=64, tie_word_embeddings=False)
  return _save(transformers.MistralForCausalLM, cfg, path, seed, dtype)


def _qwen2(path, seed):
  cfg = transformers.Qwen2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                 max_position_embeddings=64, tie_word_embeddings=False)
  return _save(transformers.Qwen2ForCausalLM, cfg, path, seed)


def _gpt2(path, seed, **save_kw):
  cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=97, n_positions=64,
                                bos_token_id=0, eos_token_id=0)   # ties lm_head to wte
  return _save(transformers.GPT2LMHeadModel, cfg, path, seed, **save_kw)


def _yaml(tmp_path, text):
  p = tmp_path / "merge.yml"
  p.write_text(textwrap.dedent(text))
  return str(p)


def _load(out):
  m, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  bad = {k: v for k, v in info.items() if v}
  assert not bad, f"transformers loading report: {bad}"
  return m.eval()


def _reference(donor_dir, weights: dict, dtype: str, **overrides):
  """The model the merge should produce: donor config (+ overrides) and ``weights``."""
  cfg = transformers.AutoConfig.from_pretrained(donor_dir)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  ref = transformers.AutoModelForCausalLM.from_config(cfg).to(_TORCH[dtype]).eval()
  sd = {k: torch.from_numpy(np.asarray(v, np.float32)).to(_TORCH[dtype]) for k, v in weights.items()}
  missing, unexpected = ref.load_state_dict(sd, strict=False)
  tied = {k for k in missing if k == "lm_head.weight" and cfg.tie_word_embeddings}
  assert not (set(missing) - tied) and not unexpected, (missing, unexpected)
  if tied:
    ref.tie_weights()
  return ref


def _logits(model):
  ids = torch.arange(24).reshape(2, 12) % 97
  with torch.no_grad():
    return model(input_ids=ids).logits.float().numpy()


def _f64(path):
  return {k: np.asarray(v, np.float64) for k, v in kio.read_hf_dir(path).items()}


def _cast(x, dtype):
  return np.asarray(torch.from_numpy(np.asarray(x, np.float64)).to(_TORCH[dtype]).float().numpy())


@pytest.mark.parametrize("make,in_dtype,out_dtype", [(_llama, "float32", "bfloat16"),
                                                     (_llama, "bfloat16", "float32"),
                                                     (_mistral, "float32", "float16")])
def test_dtype_of_a_merge_is_the_dtype_transformers_loads(tmp_path, make, in_dtype, out_dtype):
  a = make(tmp_path / "a", 1, in_dtype)
  b = make(tmp_path / "b", 2, in_dtype)
  assert json.load(open(os.path.join(a, "config.json")))["dtype"] == in_dtype
  out = str(tmp_path / "out")
  run_yaml(_yaml(tmp_path, f"""
      merge_method: linear
      models:
        - {{model: {a}, parameters: {{weight: 0.3}}}}
        - {{model: {b}, parameters: {{weight: 0.7}}}}
      dtype: {out_dtype}
  """), out, progress=False)
  got = _load(out)
  assert got.dtype == _TORCH[out_dtype]
  wa, wb = _f64(a), _f64(b)
  # mergekit's dtype is the compute dtype: inputs are cast to it before merging
  want = {k: _cast(0.3 * _cast(wa[k], out_dtype) + 0.7 * _cast(wb[k], out_dtype), out_dtype)
          for k in wa}
  ref = _reference(a, want, out_dtype)
  # logits in float32 from the stored weights: equal up to the last-bit rounding of the cast
  np.testing.assert_allclose(_logits(got.float()), _logits(ref.float()), rtol=0,
                             atol={"bfloat16": 1e-2, "float16": 2e-3}.get(out_dtype, 1e-4))


def _frankenmerge(tmp_path, make, prefix):
  a, b = make(tmp_path / "a", 1), make(tmp_path / "b", 2)
  out = str(tmp_path / "out")
  run_yaml(_yaml(tmp_path, f"""
      merge_method: passthrough
      slices:
        - sources: [{{model: {a}, layer_range: [0, 3]}}]
        - sources: [{{model: {b}, layer_range: [1, 3]}}]
        - sources: [{{model: {a}, layer_range: [2, 3]}}]
  """), out, progress=False)
  wa, wb = _f64(a), _f64(b)
  order = [(wa, 0), (wa, 1), (wa, 2), (wb, 1), (wb, 2), (wa, 2)]
  want = {k: v for k, v in wa.items() if f"{prefix}." not in k}
  for j, (w, i) in enumerate(order):
    for k, v in w.items():
      if k.startswith(f"{prefix}.{i}."):
        want[f"{prefix}.{j}." + k[len(f"{prefix}.{i}."):]] = v
  return a, out, want


def test_gpt2_frankenmerge_updates_n_layer(tmp_path):
  a, out, want = _frankenmerge(tmp_path, _gpt2, "transformer.h")
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["n_layer"] == 6
  got = _load(out)
  assert len(got.transformer.h) == 6
  ref = _reference(a, want, "float32", n_layer=6)
  np.testing.assert_allclose(_logits(got), _logits(ref), rtol=0, atol=1e-4)


def test_qwen2_frankenmerge_updates_layer_types(tmp_path):
  a, out, want = _frankenmerge(tmp_path, _qwen2, "model.layers")
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["num_hidden_layers"] == 6 and len(cfg["layer_types"]) == 6
  got = _load(out)
  assert len(got.model.layers) == 6
  ref = _reference(a, want, "float32", num_hidden_layers=6, layer_types=["full_attention"] * 6)
  np.testing.assert_allclose(_logits(got), _logits(ref), rtol=0, atol=1e-4)


def test_sharded_tied_gpt2_ties_merge_loads_as_merged(tmp_path):
  """A TIES merge of tied GPT-2s, one input sharded by transformers, written as several
  shards (index file), loads whole."""
  base, e1 = _gpt2(tmp_path / "base", 1), _gpt2(tmp_path / "e1", 2)
  e2 = _gpt2(tmp_path / "e2", 3, max_shard_size="50KB")
  assert os.path.isfile(os.path.join(e2, "model.safetensors.index.json"))
  out = str(tmp_path / "out")
  run_yaml(_yaml(tmp_path, f"""
      merge_method: ties
      base_model: {base}
      models:
        - {{model: {e1}, parameters: {{weight: 1.0, density: 1.0}}}}
        - {{model: {e2}, parameters: {{weight: 0.5, density: 1.0}}}}
      parameters: {{normalize: false}}
  """), out, progress=False, out_shard_bytes=40_000)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  got = _load(out)
  wb, w1, w2 = _f64(base), _f64(e1), _f64(e2)
  want = {}
  for k in wb:   # density 1: sign election over 1.0·δ1 + 0.5·δ2, disjoint sum of agreeing ones
    d1, d2 = w1[k] - wb[k], 0.5 * (w2[k] - wb[k])
    sign = np.sign(d1 + d2)
    want[k] = wb[k] + np.where(np.sign(d1) == sign, d1, 0) + np.where(np.sign(d2) == sign, d2, 0)
  ref = _reference(base, want, "float32")
  np.testing.assert_allclose(_logits(got), _logits(ref), rtol=0, atol=1e-3)
