"""Tests for kfuse.models: MLP, CNNs (BatchNorm), ViT, GPT and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import models
from kfuse.tree import KfuseError, flatten, layer_index


def _key(seed=0):
  # 'rbg' keys compile much faster than threefry on CPU (seconds per conv model)
  return jax.random.key(seed, impl="rbg")


def _init(model, shape=(40,), seed=0):
  return jax.jit(model.init)(_key(seed), jnp.zeros((1,) + shape))


def test_mlp_variables_are_plain_dicts_split_backbone_head():
  model = models.get_model("mlp", num_classes=7, hidden=(16, 8))
  variables = _init(model)
  assert set(variables) == {"params"}
  params = variables["params"]
  assert isinstance(params, dict) and set(params) == {"backbone", "head"}
  shapes = {k: v.shape for k, v in flatten(params).items()}
  assert shapes == {
      "backbone/layers_0/kernel": (40, 16), "backbone/layers_0/bias": (16,),
      "backbone/layers_1/kernel": (16, 8), "backbone/layers_1/bias": (8,),
      "head/kernel": (8, 7), "head/bias": (7,),
  }
  assert layer_index("backbone/layers_1/kernel") == 1
  assert models.backbone_of(variables) is params["backbone"]
  assert models.head_of(variables) is params["head"]
  rebuilt = models.with_params(params["backbone"], params["head"])
  x = jnp.ones((3, 40))
  np.testing.assert_array_equal(model.apply(rebuilt, x), model.apply(variables, x))


def test_apply_shapes_and_image_inputs():
  model = models.get_model("mlp", num_classes=10, hidden=(32,), layer_norm=True)
  variables = _init(model, (8, 8))
  logits = models.apply(model, variables, jnp.ones((5, 8, 8)))
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32
  assert "norm_0" in variables["params"]["backbone"]


def test_same_backbone_different_heads_share_structure():
  model = models.get_model("mlp", num_classes=10, hidden=(16,))
  a, b = _init(model, seed=0), _init(model, seed=1)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert not np.allclose(a["params"]["head"]["kernel"], b["params"]["head"]["kernel"])


def test_dropout_only_in_train_mode():
  model = models.get_model("mlp", num_classes=3, hidden=(64,), dropout=0.5)
  variables = _init(model, (4,))
  x = jnp.ones((2, 4))
  e1, e2 = model.apply(variables, x), model.apply(variables, x, train=False)
  np.testing.assert_array_equal(e1, e2)
  t1 = models.apply(model, variables, x, train=True, key=jax.random.key(0))
  t2 = models.apply(model, variables, x, train=True, key=jax.random.key(1))
  assert not np.allclose(t1, t2)


def test_registry_errors():
  with pytest.raises(KfuseError, match="model.name.*unknown model 'resnet'.*mlp"):
    models.get_model("resnet", num_classes=10)
  with pytest.raises(KfuseError, match="model.depth"):
    models.get_model("mlp", num_classes=10, depth=3)
  with pytest.raises(KfuseError, match="model.activation"):
    models.get_model("mlp", num_classes=10, activation="swish2")
  with pytest.raises(KfuseError, match="model.hidden"):
    models.get_model("mlp", num_classes=10, hidden=())
  with pytest.raises(KfuseError, match="model.dropout"):
    models.get_model("mlp", num_classes=10, dropout=1.0)
  assert "mlp" in models.model_names()


# ------------------------------------------------------------------ CNNs (BatchNorm)


@pytest.mark.parametrize("name,shape,channels_last", [
    ("cnn1d", (40,), False), ("cnn1d", (40, 3), True),
    ("cnn2d", (8, 8), False), ("cnn2d", (8, 8, 2), True)])
def test_cnn_shapes_and_collections(name, shape, channels_last):
  model = models.get_model(name, num_classes=5, widths=(4, 8), blocks_per_stage=1)
  variables = _init(model, shape)
  assert set(variables) == {"params", "batch_stats"}
  assert models.state_collections(variables) == ("batch_stats",)
  params, stats = variables["params"], variables["batch_stats"]
  assert set(params) == {"backbone", "head"} and set(stats) == {"backbone"}
  ndim = 1 if name == "cnn1d" else 2
  cin = shape[-1] if channels_last else 1
  k = 5 if ndim == 1 else 3
  flat = {n: a.shape for n, a in flatten(params).items()}
  assert flat["backbone/stem/kernel"] == (k,) * ndim + (cin, 4)
  assert flat["backbone/layers_1/conv_0/kernel"] == (k,) * ndim + (4, 8)
  assert flat["backbone/layers_1/proj/kernel"] == (1,) * ndim + (4, 8)  # stride-2 skip
  assert "proj" not in params["backbone"]["layers_0"]
  assert flat["head/kernel"] == (8, 5)
  assert layer_index("backbone/layers_1/conv_0/kernel") == 1
  # every BatchNorm has scale/bias params and mean/var statistics of the same shape
  norms = [n[:-len("/scale")] for n in flatten(params) if n.endswith("/scale")]
  assert len(norms) == 6 and all("norm" in n for n in norms)
  sflat = flatten(stats)
  for n in norms:
    assert sflat[n + "/mean"].shape == sflat[n + "/var"].shape == flat[n + "/scale"]
  logits = model.apply(variables, jnp.ones((3,) + shape))
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32


def test_cnn_train_mode_uses_and_updates_batch_stats():
  model = models.get_model("cnn1d", num_classes=3, widths=(4,), bn_momentum=0.5)
  variables = _init(model, (16,))
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (8, 16))
  # eval mode uses the running statistics, train mode the batch's: they differ
  ev = model.apply(variables, x, train=False)
  tr = models.apply(model, variables, x, train=True)
  assert not np.allclose(ev, tr)
  logits, new = models.apply_train(model, variables, x)
  np.testing.assert_allclose(logits, tr, rtol=1e-5, atol=1e-5)
  assert new["params"] is variables["params"]
  old_m = variables["batch_stats"]["backbone"]["stem_norm"]["mean"]
  new_m = new["batch_stats"]["backbone"]["stem_norm"]["mean"]
  assert not np.allclose(old_m, new_m)
  # the flax convention directly
  logits2, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(upd["batch_stats"]["backbone"]["stem_norm"]["mean"], new_m)
  # the stem's batch mean with momentum 0.5: 0.5 * 0 + 0.5 * mean(conv(x))
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_cnn_flatten_pool_and_head_split():
  model = models.get_model("cnn1d", num_classes=4, widths=(4, 8), pool="flatten")
  variables = _init(model, (40,))
  assert variables["params"]["head"]["kernel"].shape == (20 * 8, 4)  # 40 / stride 2
  rebuilt = models.with_params(models.backbone_of(variables), models.head_of(variables),
                               models.model_state_of(variables))
  x = jnp.ones((2, 40))
  np.testing.assert_array_equal(model.apply(rebuilt, x), model.apply(variables, x))


def test_cnn_errors_name_the_field():
  with pytest.raises(KfuseError, match="model.pool"):
    models.get_model("cnn1d", num_classes=10, pool="max")
  with pytest.raises(KfuseError, match="model.widths"):
    models.get_model("cnn2d", num_classes=10, widths=())
  with pytest.raises(KfuseError, match="model.bn_momentum"):
    models.get_model("cnn2d", num_classes=10, bn_momentum=1.0)
  model = models.get_model("cnn2d", num_classes=10)
  with pytest.raises(KfuseError, match="input: cnn2d expects"):
    model.init(jax.random.key(0), jnp.zeros((2, 40)))
  assert {"cnn1d", "cnn2d"} <= set(models.model_names())


# ------------------------------------------------------------------ transformers


@pytest.mark.parametrize("ndim,shape,patches", [(2, (8, 8), 4), (2, (8, 8, 3), 4), (1, (40,), 10)])
def test_vit_shapes(ndim, shape, patches):
  model = models.get_model("vit", num_classes=6, ndim=ndim, patch_size=4,
                           dim=16, depth=2, num_heads=2)
  variables = _init(model, shape)
  assert set(variables) == {"params"}
  bb = variables["params"]["backbone"]
  assert set(bb) == {"patch_embed", "cls", "pos_embed", "layers_0", "layers_1", "norm"}
  assert bb["pos_embed"].shape == (1, patches + 1, 16)
  assert {"norm_0", "norm_1", "attn", "mlp"} == set(bb["layers_0"])
  assert variables["params"]["head"]["kernel"].shape == (16, 6)
  logits = jax.jit(model.apply)(variables, jnp.ones((3,) + shape))
  assert logits.shape == (3, 6)
  with pytest.raises(KfuseError, match="patch_size"):
    model.apply(variables, jnp.ones((3,) + tuple(s + 1 for s in shape[:ndim])))


def test_gpt_shapes_and_causality():
  model = models.get_model("gpt", vocab_size=11, max_len=12, dim=16, depth=2, num_heads=2)
  variables = jax.jit(model.init)(_key(), jnp.zeros((1, 12), jnp.int32))
  params = variables["params"]
  assert set(variables) == {"params"} and set(params) == {"backbone", "head"}
  assert params["backbone"]["embed"]["embedding"].shape == (11, 16)
  assert params["head"]["kernel"].shape == (16, 11)
  assert layer_index("backbone/layers_1/attn/query/kernel") == 1
  apply = jax.jit(model.apply)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 11)
  logits = apply(variables, tokens)
  assert logits.shape == (2, 9, 11)
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % 11)  # edit the future only
  other = apply(variables, changed)
  np.testing.assert_allclose(logits[:, :6], other[:, :6], atol=1e-5)
  assert not np.allclose(logits[:, 6:], other[:, 6:])
  with pytest.raises(KfuseError, match="max_len"):
    model.apply(variables, jnp.zeros((1, 13), jnp.int32))
  with pytest.raises(KfuseError, match="integer tokens"):
    model.apply(variables, jnp.zeros((1, 4)))


def test_transformer_errors_name_the_field():
  with pytest.raises(KfuseError, match="model.num_heads"):
    models.get_model("vit", num_classes=10, dim=30, num_heads=4)
  with pytest.raises(KfuseError, match="model.ndim"):
    models.get_model("vit", num_classes=10, ndim=3)
  with pytest.raises(KfuseError, match="model.vocab_size"):
    models.get_model("gpt", vocab_size=1)
  assert {"vit", "gpt"} <= set(models.model_names())


def test_wrong_types_name_the_field():
  with pytest.raises(KfuseError, match="model.hidden: expected Sequence"):
    models.get_model("mlp", num_classes=10, hidden="256")
  with pytest.raises(KfuseError, match="model.dropout: expected float, got str"):
    models.get_model("mlp", num_classes=10, dropout="0.1")
  with pytest.raises(KfuseError, match="model.layer_norm: expected bool"):
    models.get_model("mlp", num_classes=10, layer_norm=1)
  with pytest.raises(KfuseError, match="model.widths"):
    models.get_model("cnn1d", num_classes=10, widths=(8.5,))
  with pytest.raises(KfuseError, match="model.num_classes: expected int"):
    models.get_model("cnn2d", num_classes=10.0)
  # lists for tuples, ints for floats and None where allowed are fine
  models.get_model("mlp", num_classes=10, hidden=[8, 8], dropout=0)
  models.get_model("cnn1d", num_classes=10, stem_width=None)


def test_linear_and_plain_cnn_variants():
  lin = models.get_model("linear", num_classes=4)
  v = _init(lin, (40,))
  assert jax.tree.map(jnp.shape, v) == {"params": {"head": {"kernel": (40, 4), "bias": (4,)}}}
  plain = models.get_model("cnn1d", num_classes=4, widths=(5, 5, 5), residual=False,
                           batch_norm=False, pool="flatten")
  v = _init(plain, (40,))
  assert set(v) == {"params"}  # no BatchNorm, no batch_stats
  assert set(v["params"]["backbone"]) == {"layers_0", "layers_1", "layers_2"}
  assert v["params"]["head"]["kernel"].shape == (5 * 5, 4)  # 40 -> 20 -> 10 -> 5
  with pytest.raises(KfuseError, match="model.batch_norm"):
    models.get_model("cnn1d", num_classes=4, batch_norm=False)


def test_models_live_in_a_kfuse_registry():
  from kfuse.registry import Registry
  assert isinstance(models.MODELS, Registry)
  assert models.MODELS.names() == models.model_names()
  assert models.MODELS.defaults("mlp")["activation"] == "gelu"   # the factory's own default
  with pytest.raises(KfuseError, match=r"model.name: unknown model 'mpl' \(did you mean 'mlp'\?\)"):
    models.get_model("mpl", num_classes=3)
  name = "test_tiny_linear"
  models.register_model(name, models.make_linear)
  assert isinstance(models.get_model(name, num_classes=2), models.Classifier)
  with pytest.raises(KfuseError, match="already registered"):
    models.register_model(name, models.make_linear)
