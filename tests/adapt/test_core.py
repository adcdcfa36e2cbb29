"""kfuse.adapt.core: BatchNorm control, trainable masks, losses, bad input, the stream runner."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import adapt
from kfuse.adapt import core
from kfuse.tree import KfuseError

from tests.adapt.helpers import run_step, TinyLN, TinyMLP, logits_model, np_entropy, tiny_bn

EPS = 1e-5


def _hidden(v, x):
  p = v["params"]["dense"]
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def _head(v, h, mean, var):
  bn, head = v["params"]["bn"], v["params"]["head"]
  hn = (h - mean) / np.sqrt(var + EPS) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
  return np.maximum(hn, 0) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])


def test_forward_modes_match_hand_computation():
  model, v, x = tiny_bn()
  h = _hidden(v, x)
  mu_b, var_b = h.mean(0), h.var(0)
  mu_s = np.asarray(v["batch_stats"]["bn"]["mean"])
  var_s = np.asarray(v["batch_stats"]["bn"]["var"])
  src, _ = core.forward(model.apply, v, x, norm="source")
  np.testing.assert_allclose(src, _head(v, h, mu_s, var_s), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(src, model.apply(v, x, train=False), atol=1e-6)
  batch, _ = core.forward(model.apply, v, x, norm="batch")
  np.testing.assert_allclose(batch, _head(v, h, mu_b, var_b), rtol=1e-4, atol=1e-5)
  flax_train, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(batch, flax_train, atol=1e-5)
  mixed, _ = core.forward(model.apply, v, x, norm="batch", prior=0.25)
  np.testing.assert_allclose(
      mixed, _head(v, h, 0.25 * mu_s + 0.75 * mu_b, 0.25 * var_s + 0.75 * var_b), rtol=1e-4, atol=1e-5)
  # RobustBN: statistics updated with momentum 0.05, normalization with the updated ones
  ema_logits, stats = core.forward(model.apply, v, x, norm="ema", momentum=0.05)
  mu_e, var_e = 0.95 * mu_s + 0.05 * mu_b, 0.95 * var_s + 0.05 * var_b
  np.testing.assert_allclose(stats["bn"]["mean"], mu_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn"]["var"], var_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ema_logits, _head(v, h, mu_e, var_e), rtol=1e-4, atol=1e-5)


def test_sample_mask_restricts_batch_moments():
  model, v, x = tiny_bn(batch=8)
  mask = jnp.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
  _, stats = core.forward(model.apply, v, x, norm="ema", momentum=1.0, sample_mask=mask)
  h = _hidden(v, x)[np.asarray(mask)]
  np.testing.assert_allclose(stats["bn"]["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn"]["var"], h.var(0), rtol=1e-4, atol=1e-6)


def test_entropy_and_soft_cross_entropy_values():
  z = jnp.array([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, -1.0], [100.0, 0.0, 0.0, 0.0]])
  want, _ = np_entropy(z)
  np.testing.assert_allclose(core.entropy(z), want, rtol=1e-6, atol=1e-6)
  assert abs(float(core.entropy(z)[0]) - np.log(4)) < 1e-6
  np.testing.assert_allclose(core.soft_cross_entropy(z, z), want, rtol=1e-6, atol=1e-6)
  t = jnp.array([[0.0, 2.0, 0.0, 0.0]] * 3)
  pt = np.exp([0, 2, 0, 0]) / np.exp([0, 2, 0, 0]).sum()
  logq = np.asarray(jax.nn.log_softmax(z))
  np.testing.assert_allclose(core.soft_cross_entropy(z, t), -(pt * logq).sum(-1), rtol=1e-6)


def test_trainable_selection():
  _, v, _ = tiny_bn()
  assert core.trainable_paths(v, "norm") == ("bn/bias", "bn/scale")
  assert core.trainable_paths(v, "bn") == ("bn/bias", "bn/scale")
  assert len(core.trainable_paths(v, "all")) == 6
  assert core.trainable_paths(v, r"^head/") == ("head/bias", "head/kernel")
  assert core.trainable_paths(v, "all", exclude=("head", "dense")) == ("bn/bias", "bn/scale")
  assert core.trainable_paths(v, lambda p: p.endswith("kernel")) == ("dense/kernel", "head/kernel")
  mask = adapt.trainable_mask(v, "norm")
  assert mask["bn"] == {"scale": True, "bias": True} and mask["head"] == {"kernel": False, "bias": False}
  ln = TinyLN().init(jax.random.key(0), jnp.zeros((2, 4)))
  assert core.trainable_paths(ln, "norm") == ("ln/bias", "ln/scale")
  with pytest.raises(KfuseError, match="trainable.*BatchNorm"):
    core.trainable_paths(ln, "bn")
  mlp = TinyMLP().init(jax.random.key(0), jnp.zeros((2, 4)))
  with pytest.raises(KfuseError, match="trainable.*no normalization-layer"):
    core.trainable_paths(mlp, "norm")
  with pytest.raises(KfuseError, match="trainable"):
    core.trainable_paths(v, 3)


def test_models_without_normalization_layers_are_refused():
  mlp = TinyMLP()
  v = mlp.init(jax.random.key(0), jnp.zeros((4, 4)))
  x = jnp.ones((4, 4))
  with pytest.raises(KfuseError, match="bn_adapt needs BatchNorm"):
    adapt.bn_adapt(mlp).init(v, {"x": x})
  with pytest.raises(KfuseError, match="rotta needs BatchNorm"):
    adapt.rotta(mlp).init(v, {"x": x}, jax.random.key(0))
  for make in (adapt.tent, adapt.eta, adapt.sar):
    with pytest.raises(KfuseError, match="no normalization-layer"):
      make(mlp).init(v, {"x": x})
  # a LayerNorm model is fine for Tent (nothing to force to batch statistics)
  ln = TinyLN()
  vl = ln.init(jax.random.key(0), x)
  state = adapt.tent(ln).init(vl, {"x": x})
  assert set(core.trainable_paths(state.variables, "norm")) == {"ln/bias", "ln/scale"}


def test_batch_of_one_is_refused_or_uses_the_prior():
  model, v, _ = tiny_bn()
  x1 = jnp.ones((1, 4))
  for make in (adapt.bn_adapt, adapt.tent, adapt.eta, adapt.sar):
    with pytest.raises(KfuseError, match="batch: size 1"):
      make(model).init(v, {"x": x1})
  fisher = adapt.fisher_information(model, v, [jnp.ones((4, 4))])
  with pytest.raises(KfuseError, match="batch: size 1"):
    adapt.eata(model).init(v, {"x": x1}, fisher=fisher)
  with pytest.raises(KfuseError, match="batch: size 1"):
    adapt.cotta(model, n_augment=1).init(v, {"x": x1}, jax.random.key(0))
  tta = adapt.bn_adapt(model, prior=0.9)           # documented fallback: BN-alpha
  state = tta.init(v, {"x": x1})
  _, logits, _ = run_step(tta, state, x1)
  h = _hidden(v, x1)
  mu = 0.9 * np.asarray(v["batch_stats"]["bn"]["mean"]) + 0.1 * h.mean(0)
  var = 0.9 * np.asarray(v["batch_stats"]["bn"]["var"]) + 0.1 * h.var(0)
  np.testing.assert_allclose(logits, _head(v, h, mu, var), rtol=1e-4, atol=1e-5)
  with pytest.raises(KfuseError, match="prior"):
    adapt.bn_adapt(model, prior=1.0)


def test_nan_batch_leaves_state_unchanged_and_run_refuses_it():
  model, v, x = tiny_bn()
  tta = adapt.tent(model)
  state = tta.init(v, {"x": x})
  step = lambda s, x: run_step(tta, s, x)
  state, _, m = step(state, x)
  assert float(m["skipped"]) == 0.0
  bad = x.at[2, 1].set(jnp.nan)
  new, logits, m = step(state, bad)
  assert float(m["skipped"]) == 1.0
  assert bool(jnp.isnan(logits).any())             # the prediction shows the bad input
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  xs = np.stack([np.asarray(x), np.asarray(bad)])
  with pytest.raises(KfuseError, match="stream: batch 1 contains NaN"):
    adapt.run(tta, state, xs)


def test_episodic_and_reset_return_to_source():
  model, v, x = tiny_bn()
  tta = adapt.tent(model, episodic=True)
  state = tta.init(v, {"x": x})
  step = lambda s, x: run_step(tta, s, x)
  s1, _, _ = step(state, x)
  s2, _, _ = step(s1, x)                            # episodic: same update from the source
  for a, b in zip(jax.tree.leaves(s1.variables), jax.tree.leaves(s2.variables)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  cont = adapt.tent(model)
  c = cont.init(v, {"x": x})
  c1, _, _ = run_step(cont, c, x)
  c2, _, _ = run_step(cont, c1, x)
  assert not np.allclose(c2.variables["params"]["bn"]["scale"], s2.variables["params"]["bn"]["scale"])
  r = cont.reset(c2)
  for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(c)):
    np.testing.assert_allclose(a, b)


def test_runner_resets_per_shift():
  model, v, x = tiny_bn(batch=8)
  tta = adapt.tent(model, optimizer=optax.sgd(0.5))
  state = tta.init(v, {"x": x})
  xs = np.stack([np.asarray(x) * s for s in (1.0, 2.0, 1.0, 2.0)])
  _, lr, _ = adapt.run(tta, state, xs, resets=[True, False, True, False])
  _, lc, _ = adapt.run(tta, state, xs)
  np.testing.assert_allclose(lr[2], lr[0], atol=1e-6)   # reset: batch 2 sees the source again
  np.testing.assert_allclose(lr[3], lr[1], atol=1e-6)
  assert not np.allclose(lc[2], lc[0], atol=1e-4)       # continual: it does not
  with pytest.raises(KfuseError, match="resets"):
    adapt.run(tta, state, xs, resets=[True])


def test_apply_fn_and_variables_checks():
  with pytest.raises(KfuseError, match="apply_fn"):
    adapt.tent(3)
  apply, v = logits_model()
  with pytest.raises(KfuseError, match="variables"):
    adapt.tent(apply).init({"kernel": 1}, jnp.ones((2, 3)))
  with pytest.raises(KfuseError, match="batch: tent.init"):
    adapt.tent(apply).init(v, {"x": None})
  with pytest.raises(KfuseError, match="batch: tent.init: missing key 'x'"):
    adapt.tent(apply).init(v, {"y": jnp.ones((2, 3))})
  with pytest.raises(KfuseError, match="norm: unknown"):
    core.forward(apply, v, jnp.ones((2, 3)), norm="train")
