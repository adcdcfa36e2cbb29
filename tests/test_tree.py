"""kfuse.tree: paths, stacking, filters, layer indices, dtype rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import tree as T


def test_flatten_unflatten_roundtrip_and_paths():
  t = {"params": {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}, "list": [jnp.ones(1)]}
  flat = T.flatten(t)
  assert set(flat) == {"params/Dense_0/kernel", "params/Dense_0/bias", "list/0"}
  back = T.unflatten(t, flat)
  assert T.paths(back) == T.paths(t)
  with pytest.raises(T.KfuseError, match="no value for key"):
    T.unflatten(t, {"list/0": 1})


def test_hf_names_stay_intact():
  assert T.paths({"model.layers.0.mlp.up_proj.weight": jnp.ones(1)}) == ["model.layers.0.mlp.up_proj.weight"]


@pytest.mark.parametrize("path,idx", [
    ("model.layers.12.self_attn.q_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
    ("params/layers_4/kernel", 4), ("params/Block_2/Dense_0/kernel", 2), ("blocks.7.norm", 7),
    ("model.embed_tokens.weight", None), ("params/head/kernel", None), ("lm_head.weight", None),
])
def test_layer_index(path, idx):
  assert T.layer_index(path) == idx


def test_stack_unstack_and_task_vectors():
  a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 5.0])}
  s = T.stack([a, b])
  assert s["w"].shape == (2, 2)
  assert [float(x["w"][1]) for x in T.unstack(s)] == [2.0, 5.0]
  np.testing.assert_array_equal(T.task_vectors(a, s)["w"], [[0, 0], [2, 3]])


def test_filters_and_regex_rules():
  assert T.matches_filter("model.layers.0.mlp.up_proj.weight", "mlp")
  assert T.matches_filter("x", None) and T.matches_filter("x", "*")
  assert not T.matches_filter("model.layers.0.self_attn.q_proj", "mlp")
  rules = T.RegexRules([(r"mlp", 1), (r"attn", 2), (r".*", 0)])
  t = {"mlp": jnp.ones(1), "attn": jnp.ones(1), "norm": jnp.ones(1)}
  assert rules.map(t) == {"mlp": 1, "attn": 2, "norm": 0}


def test_cast_only_floating_and_dtype_names():
  t = {"f": jnp.ones(2), "i": jnp.ones(2, jnp.int32)}
  c = T.cast(t, "bf16")
  assert c["f"].dtype == jnp.bfloat16 and c["i"].dtype == jnp.int32
  with pytest.raises(T.KfuseError, match="unknown dtype 'float13'"):
    T.resolve_dtype("float13")
