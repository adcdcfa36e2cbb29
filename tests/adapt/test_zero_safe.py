"""Normalisations in kfuse.adapt are gradient-safe at zero; every method survives all-zero samples."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import adapt
from kfuse.adapt import entropy as ent_lib

from tests.adapt.helpers import run_step, tiny_bn

SMALL = {"cotta": dict(n_augment=2), "rotta": dict(capacity=8, update_frequency=8),
         "vida": dict(n_augment=2, rank2=4, target="dense|head")}   # 1 update / step


def _all_finite(tree):
  leaves = [np.asarray(a) for a in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
  return all(np.isfinite(a).all() for a in leaves)


@pytest.mark.parametrize("name", [n for n in adapt.names() if n != "kff"])   # kff: ViT only, test_kff.py
def test_every_method_steps_finitely_on_zero_samples(name):
  model, v, x = tiny_bn(batch=8)
  # large learning rates so that a NaN/Inf anywhere in a gradient would reach the parameters
  opt = None if name in ("source", "bn_adapt") else dict(name="sgd", learning_rate=1.0)
  tta = adapt.make(name, model, optimizer=opt, **SMALL.get(name, {}))
  extra = {"fisher": adapt.fisher_information(model, v, [x])} if name == "eata" else {}
  state = tta.init(v, {"x": x}, jax.random.key(0), **extra)
  one_zero = x.at[3].set(0.0)                                  # one all-zero sample
  for i, batch in enumerate((one_zero, jnp.zeros_like(x), one_zero)):   # then an all-zero batch
    state, logits, metrics = run_step(tta, state, batch, jax.random.key(i))
    assert float(metrics["skipped"]) == 0.0                    # finite input: a real step
    assert _all_finite(logits), f"{name}: non-finite logits at step {i}"
    assert _all_finite(metrics), f"{name}: non-finite metrics at step {i}: {metrics}"
    assert _all_finite(state), f"{name}: non-finite state at step {i}"


def test_tree_norm_value_and_zero_gradient():
  t = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
  assert float(adapt.tree_norm(t)) == pytest.approx(5.0)
  g = jax.grad(adapt.tree_norm)(t)
  np.testing.assert_allclose(g["a"], [0.6, 0.0], rtol=1e-6)     # d‖t‖/dt = t / ‖t‖
  np.testing.assert_allclose(g["b"], [[0.8]], rtol=1e-6)
  zero = jax.tree.map(jnp.zeros_like, t)
  assert float(adapt.tree_norm(zero)) == 0.0
  gz = jax.grad(adapt.tree_norm)(zero)                          # optax.tree.norm: NaN here
  assert _all_finite(gz) and all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(gz))
  assert not _all_finite(jax.grad(optax.tree.norm)(zero))       # the hazard being guarded


def test_sar_perturbation_with_zero_gradient_is_the_identity():
  """ε = ρ g / (‖g‖ + 1e-12) with g = 0 (nothing reliable) must not move or poison θ."""
  model, v, x = tiny_bn(batch=8)
  tta = adapt.sar(model, optimizer=optax.sgd(1.0), e_margin=-1.0)   # E0 < 0: no sample reliable
  state, _, m = run_step(tta, tta.init(v, {"x": x}), x.at[0].set(0.0))
  assert float(m["num_reliable"]) == 0.0
  for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(v)):
    np.testing.assert_array_equal(a, b)


def test_eata_cosine_matches_numpy_and_has_finite_gradient_at_zero():
  rng = np.random.default_rng(0)
  a, b = rng.random(5), rng.random((4, 5))
  want = b @ a / (np.linalg.norm(a) * np.linalg.norm(b, axis=1))
  np.testing.assert_allclose(ent_lib._cosine(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-5)
  b0 = jnp.asarray(b).at[2].set(0.0)
  np.testing.assert_allclose(ent_lib._cosine(jnp.zeros(5), b0), 0.0)     # PyTorch's eps clamp
  ga = jax.grad(lambda a: ent_lib._cosine(a, b0).sum())(jnp.zeros(5))
  gb = jax.grad(lambda b: ent_lib._cosine(jnp.asarray(a), b).sum())(b0)
  assert _all_finite(ga) and _all_finite(gb)
