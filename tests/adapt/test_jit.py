"""Every method on the step protocol: the library-jitted step compiles once, keeps the state's
types, reset is pure; the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import adapt
from kfuse.adapt import augment
from kfuse.tree import KfuseError

from tests.adapt.helpers import run_step, tiny_bn

SMALL = {"cotta": dict(n_augment=2), "rotta": dict(capacity=8, update_frequency=4),
         "vida": dict(n_augment=2, rank2=4, target="dense|head")}


def _types(tree):
  return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)


@pytest.mark.parametrize("name", [n for n in adapt.names() if n != "kff"])   # kff: ViT only, test_kff.py
def test_step_compiles_once_and_keeps_state_types(name):
  model, v, x = tiny_bn(batch=8)
  params = dict(SMALL.get(name, {}))
  tta = adapt.make(name, model, **params)
  extra = {"fisher": adapt.fisher_information(model, v, [x])} if name == "eata" else {}
  state = tta.init(v, {"x": x}, jax.random.key(0), **extra)
  step = lambda s, x, i=0: run_step(tta, s, x, jax.random.key(i))
  reset = tta.reset
  types = _types(state)
  for i in range(3):
    xi = x * (1.0 + 0.5 * i) + 0.1 * i
    state, logits, metrics = step(state, xi, i)
    assert logits.shape == (8, 3) and bool(jnp.all(jnp.isfinite(logits)))
    assert all(jnp.shape(m) == () for m in metrics.values())
    assert _types(state) == types
  assert tta.step._cache_size() == 1      # no recompilation across batches
  # no PRNG key lives in the state: randomness comes from the per-call key only
  assert not any(jnp.issubdtype(jnp.result_type(a), jax.dtypes.prng_key)
                 for a in jax.tree.leaves(state))
  # NaN inputs: documented fallback for every method, the state is left unchanged
  bad_state, _, metrics = step(state, x.at[0, 0].set(jnp.nan))
  assert float(metrics["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(bad_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert tta.step._cache_size() == 1
  state = reset(state)
  assert _types(state) == types
  state, _, _ = step(state, x)
  assert tta.step._cache_size() == 1
  with pytest.raises(KfuseError, match=f"batch: {name}.step"):
    tta.step(state, x, jax.random.key(0))              # a bare array is not a batch mapping


def test_registry_defaults_and_errors():
  assert adapt.names() == sorted(["source", "bn_adapt", "tent", "eta", "eata", "sar", "cotta", "rotta",
                                       "vida", "kff"])
  assert "ICLR 2021" in adapt.REGISTRY.get("tent").doc
  assert adapt.default_config("tent") == {"optimizer": {"name": "adam", "learning_rate": 1e-3},
                                          "params": {"steps": 1, "episodic": False}}
  cfg = adapt.default_config("cotta")["params"]
  assert (cfg["mt"], cfg["rst"], cfg["ap"], cfg["n_augment"]) == (0.999, 0.01, 0.92, 32)
  cfg = adapt.default_config("eata")
  assert cfg["optimizer"]["name"] == "sgd" and cfg["params"]["fisher_alpha"] == 2000.0
  with pytest.raises(KfuseError, match="method: unknown TTA method 'tnet' \\(did you mean 'tent'"):
    adapt.make("tnet", lambda v, x: x)
  with pytest.raises(KfuseError, match="optimizer.name"):
    adapt.make("tent", lambda v, x: x, optimizer=dict(name="adagrad9"))
  with pytest.raises(KfuseError, match="params: invalid parameters"):
    adapt.make("tent", lambda v, x: x, lr=3)
  with pytest.raises(KfuseError, match="fisher_alpha"):
    adapt.eta(lambda v, x: x, fisher_alpha=1.0)


def test_augment_is_deterministic_shape_preserving_and_mild():
  x = jnp.sin(jnp.linspace(0, 6, 40))[None].repeat(4, 0)
  aug = adapt.make_augment()
  a1, a2 = aug(jax.random.key(0), x), aug(jax.random.key(0), x)
  np.testing.assert_array_equal(a1, a2)
  assert a1.shape == x.shape and not np.allclose(a1, x)
  assert float(jnp.mean(jnp.abs(a1 - x))) < 0.5
  img = jax.random.normal(jax.random.key(1), (3, 8, 8))
  assert adapt.make_augment(spatial_dims=2)(jax.random.key(2), img).shape == img.shape
  with pytest.raises(KfuseError, match="spatial_dims"):
    adapt.make_augment(spatial_dims=3)
  with pytest.raises(KfuseError, match="x: augment"):
    augment.augment(jax.random.key(0), jnp.ones((4,)))


@pytest.mark.parametrize("name", [n for n in adapt.names() if n != "kff"])   # kff: ViT only, test_kff.py
def test_every_init_checks_its_inputs_and_copies_the_variables(name):
  """One `core.make_init` behind every method: bad variables or an example batch without
  ``'x'`` are one-line errors naming the method; the state holds copies of the caller's
  arrays (equal values, other buffers), so a donated step never frees the caller's."""
  model, v, x = tiny_bn(batch=8)
  tta = adapt.make(name, model, **SMALL.get(name, {}))
  extra = {"fisher": adapt.fisher_information(model, v, [x])} if name == "eata" else {}
  with pytest.raises(KfuseError, match=rf"^variables: {name} expects Flax variables"):
    tta.init({"kernel": jnp.ones(3)}, {"x": x}, jax.random.key(0), **extra)
  with pytest.raises(KfuseError, match=rf"^batch: {name}\.init: missing key 'x'"):
    tta.init(v, {"y": x}, jax.random.key(0), **extra)
  state = tta.init(v, {"x": x}, jax.random.key(0), **extra)
  kernel = v["params"]["dense"]["kernel"]
  held = [a for a in jax.tree.leaves(state) if jnp.shape(a) == kernel.shape]
  assert held and all(np.array_equal(a, kernel) for a in held[:1])
  ptr = kernel.unsafe_buffer_pointer()
  assert all(a.unsafe_buffer_pointer() != ptr for a in held)
