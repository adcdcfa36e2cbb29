"""Tests for kfuse.models: the MLP classifier and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import models
from kfuse.tree import KfuseError, flatten, layer_index


def _init(model, shape=(40,), seed=0):
  return model.init(jax.random.key(seed), jnp.zeros((1,) + shape))


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
