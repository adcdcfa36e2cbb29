"""config.json of written HF directories: dtype keys and layer fields agree with the tensors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kfuse.io import check_config_layers, hf_config, write_hf_dir
from kfuse.tree import KfuseError


def _layers(n, prefix="model.layers"):
  t = {"model.embed_tokens.weight": np.ones((4, 2), np.float32)}
  for i in range(n):
    t[f"{prefix}.{i}.mlp.up_proj.weight"] = np.full((2, 2), i, np.float32)
  return t


def test_dtype_sets_both_the_transformers_5_and_legacy_keys(tmp_path):
  donor = {"dtype": "float32", "torch_dtype": "float32", "num_hidden_layers": 2}
  write_hf_dir(tmp_path / "o", _layers(2), config=donor, dtype="bfloat16")
  cfg = json.load(open(tmp_path / "o" / "config.json"))
  assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
  assert donor["dtype"] == "float32"                      # the input config is not modified


def test_layer_fields_of_every_architecture_follow_the_output_blocks():
  gpt2 = {"n_layer": 3, "model_type": "gpt2"}
  assert hf_config(gpt2, layers=[(None, 0), (None, 1), (None, 1), (None, 2)])["n_layer"] == 4
  mpt = {"n_layers": 2, "num_layers": 2}
  assert hf_config(mpt, layers=[(None, 0)] * 5) == {"n_layers": 5, "num_layers": 5}
  qwen_a = {"num_hidden_layers": 3, "layer_types": ["sliding", "full", "sliding"]}
  qwen_b = {"num_hidden_layers": 2, "layer_types": ["full", "full"]}
  got = hf_config(qwen_a, layers=[(None, 0), (None, 1), (qwen_b, 1), (None, 2)])
  assert got["num_hidden_layers"] == 4
  assert got["layer_types"] == ["sliding", "full", "full", "sliding"]
  nested = {"text_config": {"num_hidden_layers": 2, "layer_types": ["a", "b"]}}
  got = hf_config(nested, layers=[(None, 1), (None, 1), (None, 0)])
  assert got["text_config"] == {"num_hidden_layers": 3, "layer_types": ["b", "b", "a"]}
  with pytest.raises(KfuseError, match="layer_types has no entry for source layer 5"):
    hf_config(qwen_a, layers=[(None, 5)])


def test_a_config_that_disagrees_with_the_tensors_is_refused_and_nothing_is_written(tmp_path):
  check_config_layers({"n_layer": 3, "layer_types": [1, 2, 3]}, _layers(3, "transformer.h"))
  check_config_layers({"num_hidden_layers": 7}, {"lm_head.weight": 0})   # no blocks: no check
  for cfg, msg in (({"n_layer": 3}, "n_layer = 3 but the tensors hold 5 layers"),
                   ({"num_hidden_layers": 5, "layer_types": ["f"] * 4},
                    "layer_types has 4 entries but the tensors hold 5 layers")):
    out = tmp_path / f"o{len(msg)}"
    with pytest.raises(KfuseError, match=msg):
      write_hf_dir(out, _layers(5), config=cfg)
    assert not os.path.exists(out)
