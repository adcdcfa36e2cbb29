"""Tent, ETA / EATA and SAR: single steps against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import adapt
from kfuse.tree import KfuseError

from tests.adapt.helpers import run_step, logits_model, np_entropy, tiny_bn

EPS = 1e-5


def _explicit_tiny_bn(v, x, scale, bias):
  """The TinyBN model written out by hand, BatchNorm on batch statistics."""
  p = v["params"]
  h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
  mu, var = h.mean(0), jnp.square(h - h.mean(0)).mean(0)
  hn = (h - mu) / jnp.sqrt(var + EPS) * scale + bias
  return jax.nn.relu(hn) @ p["head"]["kernel"] + p["head"]["bias"]


def _mean_entropy(logits):
  logp = jax.nn.log_softmax(logits)
  return -(jnp.exp(logp) * logp).sum(-1).mean()


def _sgd_reference(v, x, lr, momentum):
  """Two hand-written heavy-ball SGD steps (m ← μ·m + g, θ ← θ − lr·m) on Tent's loss, the mean
  entropy of the explicit TinyBN, over its BN (scale, bias): the three iterates."""
  loss = lambda s, b: _mean_entropy(_explicit_tiny_bn(v, x, s, b))
  theta = [(v["params"]["bn"]["scale"], v["params"]["bn"]["bias"])]
  m = (0.0, 0.0)
  for _ in range(2):
    g = jax.grad(loss, (0, 1))(*theta[-1])
    m = tuple(momentum * mi + gi for mi, gi in zip(m, g))
    theta.append(tuple(t - lr * mi for t, mi in zip(theta[-1], m)))
  return theta


def test_tent_single_step_matches_hand_computation():
  model, v, x = tiny_bn(batch=8)
  lr = 1e-3
  tta = adapt.tent(model, optimizer=optax.adam(lr))
  state = tta.init(v, {"x": x})
  new, logits, m = run_step(tta, state, x)
  s0, b0 = v["params"]["bn"]["scale"], v["params"]["bn"]["bias"]
  want_logits = _explicit_tiny_bn(v, x, s0, b0)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)      # pre-update logits
  np.testing.assert_allclose(m["loss"], _mean_entropy(want_logits), rtol=1e-5)
  gs, gb = jax.grad(lambda s, b: _mean_entropy(_explicit_tiny_bn(v, x, s, b)), (0, 1))(s0, b0)
  # Adam's first step is -lr * g / (|g| + eps)
  np.testing.assert_allclose(new.variables["params"]["bn"]["scale"], s0 - lr * gs / (jnp.abs(gs) + 1e-8),
                             rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(new.variables["params"]["bn"]["bias"], b0 - lr * gb / (jnp.abs(gb) + 1e-8),
                             rtol=1e-5, atol=2e-6)
  for name in ("dense", "head"):                    # only the norm affine moves
    for a, b in zip(jax.tree.leaves(new.variables["params"][name]), jax.tree.leaves(v["params"][name])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(new.variables["batch_stats"]), jax.tree.leaves(v["batch_stats"])):
    np.testing.assert_array_equal(a, b)             # BN forced to batch stats: running stats untouched


def test_tent_steps_return_last_forward():
  model, v, x = tiny_bn(batch=8)
  lr = 0.5
  tta2 = adapt.tent(model, optimizer=optax.sgd(lr), steps=2)
  s2, l2, _ = run_step(tta2, tta2.init(v, {"x": x}), x)
  (s0, b0), (s1, b1), (want_s, want_b) = _sgd_reference(v, x, lr, 0.0)
  want = _explicit_tiny_bn(v, x, s1, b1)                 # the second forward's logits
  np.testing.assert_allclose(l2, want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(l2, _explicit_tiny_bn(v, x, s0, b0), atol=1e-3)   # not the first forward
  np.testing.assert_allclose(s2.variables["params"]["bn"]["scale"], want_s, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(s2.variables["params"]["bn"]["bias"], want_b, rtol=1e-4, atol=1e-6)
  with pytest.raises(KfuseError, match="steps"):
    adapt.tent(model, steps=0)


# ------------------------------------------------------------------ EATA / ETA

X = jnp.array([[5.0, 0.0, 0.0],    # confident -> reliable
               [0.0, 0.0, 0.0],    # uniform: H = ln 3 > E0 -> unreliable
               [0.0, 4.0, 0.0],    # reliable
               [3.0, 0.0, 0.0]])   # H = 0.367 < E0 = 0.4 ln 3 = 0.439 -> reliable


def test_eata_filters_weights_and_loss_by_hand():
  apply, v = logits_model()
  e0 = 0.4 * math.log(3)
  tta = adapt.eta(apply, optimizer=optax.sgd(0.0), d_margin=0.5)
  state = tta.init(v, {"x": X})
  step = lambda s, x: run_step(tta, s, x)
  s1, logits, m = step(state, X)
  ent, p = np_entropy(X)
  reliable = ent < e0
  assert reliable.tolist() == [True, False, True, True]
  assert float(m["num_reliable"]) == 3 and float(m["num_selected"]) == 3   # no p̄ yet
  want_loss = (ent * np.exp(-(ent - e0)))[reliable].mean()
  np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
  pbar = p[reliable].mean(0)
  np.testing.assert_allclose(s1.probs, pbar, rtol=1e-5)
  assert bool(s1.has_probs)
  np.testing.assert_allclose(logits, X)
  # second batch: redundancy filter |cos(p̄, p_i)| < d_margin on top of reliability
  s2, _, m2 = step(s1, X)
  cos = p @ pbar / (np.linalg.norm(p, axis=1) * np.linalg.norm(pbar))
  keep = reliable & (np.abs(cos) < 0.5)
  assert keep.tolist() == [False, False, True, False]     # cos = 0.89, 0.80, 0.49, 0.91
  assert float(m2["num_selected"]) == 1
  np.testing.assert_allclose(m2["loss"], (ent * np.exp(-(ent - e0)))[keep].mean(), rtol=1e-5)
  np.testing.assert_allclose(s2.probs, 0.9 * pbar + 0.1 * p[keep].mean(0), rtol=1e-5)


def test_eata_skips_update_when_nothing_survives_and_adds_ewc():
  apply, v = logits_model()
  tta = adapt.eta(apply, optimizer=optax.sgd(1.0, momentum=0.9))
  state = tta.init(v, {"x": X})
  flat = jnp.zeros((4, 3))                           # every sample has H = ln 3
  s1, _, m = run_step(tta, state, flat)
  assert float(m["num_selected"]) == 0
  for a, b in zip(jax.tree.leaves((s1.variables, s1.opt_state, s1.probs, s1.has_probs)),
                  jax.tree.leaves((state.variables, state.opt_state, state.probs, state.has_probs))):
    np.testing.assert_array_equal(a, b)
  # EATA: loss += α Σ F (θ - θ0)²
  fisher = {"ln/scale": jnp.array([1.0, 2.0, 3.0]), "ln/bias": jnp.array([0.5, 0.5, 0.5])}
  alpha = 7.0
  eata = adapt.eata(apply, optimizer=optax.sgd(0.1), fisher_alpha=alpha, d_margin=0.99)
  st = eata.init(v, {"x": X}, fisher=fisher)
  st1, _, _ = run_step(eata, st, X)
  _, _, m2 = run_step(eata, st1, X)
  p1 = {k: np.asarray(a, np.float64) for k, a in st1.variables["params"]["ln"].items()}
  ewc = alpha * sum(float(np.sum(np.asarray(fisher[f"ln/{k}"]) *
                                 np.square(p1[k] - np.asarray(v["params"]["ln"][k]))))
                    for k in ("scale", "bias"))
  assert ewc > 0                                          # the first step moved θ away from θ⁰
  # float64 reference of the second step's loss at θ1: ETA's weighted entropy + the EWC term
  e0 = 0.4 * math.log(3)
  ent1, prob1 = np_entropy(np.asarray(X, np.float64) * p1["scale"] + p1["bias"])
  assert bool(st1.has_probs)
  pbar1 = np.asarray(st1.probs, np.float64)
  cos1 = prob1 @ pbar1 / (np.linalg.norm(prob1, axis=1) * np.linalg.norm(pbar1))
  keep1 = (ent1 < e0) & (np.abs(cos1) < 0.99)
  assert keep1.any()
  want = (ent1 * np.exp(-(ent1 - e0)))[keep1].mean() + ewc
  np.testing.assert_allclose(float(m2["loss"]), want, rtol=1e-5)
  with pytest.raises(KfuseError, match="fisher"):
    eata.init(v, {"x": X})
  with pytest.raises(KfuseError, match="fisher: no entry"):
    eata.init(v, {"x": X}, fisher={"ln/scale": jnp.ones(3)})


def test_fisher_information_is_mean_squared_gradient():
  model, v, x = tiny_bn(batch=8)
  batches = [x, 2.0 * x]
  f = adapt.fisher_information(model, v, batches)

  def ce(s, b, xb):
    logits = _explicit_tiny_bn(v, xb, s, b)
    y = jnp.argmax(logits, -1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  p = v["params"]["bn"]
  g = [jax.grad(ce, (0, 1))(p["scale"], p["bias"], xb) for xb in batches]
  np.testing.assert_allclose(f["bn/scale"], (g[0][0] ** 2 + g[1][0] ** 2) / 2, rtol=1e-4, atol=1e-10)
  np.testing.assert_allclose(f["bn/bias"], (g[0][1] ** 2 + g[1][1] ** 2) / 2, rtol=1e-4, atol=1e-10)


# ------------------------------------------------------------------ SAR


def _masked_mean_entropy(logits, mask):
  logp = jax.nn.log_softmax(logits)
  ent = -(jnp.exp(logp) * logp).sum(-1)
  return jnp.sum(ent * mask) / jnp.maximum(mask.sum(), 1)


def test_sar_two_pass_update_by_hand():
  apply, v = logits_model()
  rho, lr = 0.5, 0.3
  x = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 2.5, 0.0], [0.0, 0.0, 0.1]])
  tta = adapt.sar(apply, optimizer=optax.sgd(lr), rho=rho, reset_constant=0.0)
  state = tta.init(v, {"x": x})
  new, logits, m = run_step(tta, state, x)
  e0 = 0.4 * math.log(3)
  ent, _ = np_entropy(x)
  mask1 = jnp.asarray(ent < e0)
  f = lambda s, b: x * s + b
  s0, b0 = v["params"]["ln"]["scale"], v["params"]["ln"]["bias"]
  g = jax.grad(lambda s, b: _masked_mean_entropy(f(s, b), mask1), (0, 1))(s0, b0)
  norm = jnp.sqrt(jnp.sum(g[0] ** 2) + jnp.sum(g[1] ** 2))
  s_adv, b_adv = s0 + rho * g[0] / (norm + 1e-12), b0 + rho * g[1] / (norm + 1e-12)
  ent2, _ = np_entropy(f(s_adv, b_adv))
  mask2 = mask1 & jnp.asarray(ent2 < e0)
  loss2, g2 = jax.value_and_grad(lambda s, b: _masked_mean_entropy(f(s, b), mask2), (0, 1))(s_adv, b_adv)
  np.testing.assert_allclose(logits, x)                                     # first-pass logits
  np.testing.assert_allclose(m["num_reliable"], float(mask1.sum()))
  np.testing.assert_allclose(m["loss_second"], loss2, rtol=1e-5)
  np.testing.assert_allclose(new.variables["params"]["ln"]["scale"], s0 - lr * g2[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new.variables["params"]["ln"]["bias"], b0 - lr * g2[1], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new.ema, loss2, rtol=1e-5)                     # first value: no decay
  s2, _, m2 = run_step(tta, new, x)
  np.testing.assert_allclose(s2.ema, 0.9 * new.ema + 0.1 * m2["loss_second"], rtol=1e-5)


def test_sar_model_recovery_and_ema_quirk():
  apply, v = logits_model()
  x = jnp.array([[12.0, 0.0, 0.0], [0.0, 12.0, 0.0], [0.0, 0.0, 12.0], [12.0, 0.0, 0.0]])  # H ≈ 1e-4
  for clear in (False, True):
    tta = adapt.sar(apply, optimizer=optax.sgd(1.0), reset_constant=0.2, clear_ema_on_reset=clear)
    state = tta.init(v, {"x": x})
    new, _, m = run_step(tta, state, x)
    assert float(m["reset"]) == 1.0 and int(new.num_resets) == 1
    for a, b in zip(jax.tree.leaves(new.variables), jax.tree.leaves(v)):
      np.testing.assert_array_equal(a, b)                                    # recovered to source
    # official SAR re-assigns the low EMA after reset(): it survives unless cleared
    assert bool(new.has_ema) is (not clear)
  # nothing reliable: the EMA is not updated (PyTorch's mean of nothing is NaN)
  tta = adapt.sar(apply)
  s, _, m = run_step(tta, tta.init(v, {"x": x}), jnp.zeros((4, 3)))
  assert float(m["num_selected"]) == 0 and not bool(s.has_ema)


def test_registry_optimizer_config_is_the_kfuse_optim_schema():
  """``adapt.make`` reads `kfuse.optim` configs: extra optax arguments under ``kwargs``."""
  model, v, x = tiny_bn(batch=8)
  lr = 0.5
  sgd = dict(name="sgd", learning_rate=lr, kwargs=dict(momentum=0.9))
  tta = adapt.make("tent", model, optimizer=sgd, steps=2)
  s2, _, _ = run_step(tta, tta.init(v, {"x": x}), x)
  _, _, (want_s, want_b) = _sgd_reference(v, x, lr, 0.9)
  np.testing.assert_allclose(s2.variables["params"]["bn"]["scale"], want_s, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(s2.variables["params"]["bn"]["bias"], want_b, rtol=1e-4, atol=1e-6)
  assert adapt.default_config("sar")["optimizer"] == dict(name="sgd", learning_rate=2.5e-4,
                                                          kwargs=dict(momentum=0.9))
  # the old top-level form would silently drop the momentum: it is an error naming the field
  with pytest.raises(KfuseError, match=r"optimizer.momentum: unknown field.*optimizer.kwargs"):
    adapt.make("sar", model, optimizer=dict(name="sgd", learning_rate=lr, momentum=0.9))
  # a stream has no length: decaying schedules are refused, a constant one after warm-up is fine
  with pytest.raises(KfuseError, match="optimizer.schedule: 'cosine'"):
    adapt.make("tent", model, optimizer=dict(name="adam", schedule="cosine"))
  adapt.make("tent", model, optimizer=dict(name="adam", warmup_steps=10))
