"""CoTTA, RoTTA and the CSTU memory: EMA, restore, anchor threshold, memory rules by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import adapt
from kfuse.adapt import memory as mem
from kfuse.tree import KfuseError

from tests.adapt.helpers import run_step, logits_model, tiny_bn

X = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.2, 0.1, 0.0], [0.0, 0.0, 1.5]])


def _plus_one(key, x):
  return x + 1.0


def _soft_ce(s, t):
  return -(jax.nn.softmax(t) * jax.nn.log_softmax(s)).sum(-1).mean()


def _cotta_expected(v, x, target, lr, mt):
  p = v["params"]["ln"]
  g = jax.grad(lambda s, b: _soft_ce(x * s + b, target), (0, 1))(p["scale"], p["bias"])
  student = {"scale": p["scale"] - lr * g[0], "bias": p["bias"] - lr * g[1]}
  teacher = {k: mt * p[k] + (1 - mt) * student[k] for k in p}
  return student, teacher


@pytest.mark.parametrize("ap, augmented", [(0.0, False), (1.01, True)])
def test_cotta_anchor_threshold_ema_and_output(ap, augmented):
  apply, v = logits_model()
  lr, mt = 0.5, 0.9
  tta = adapt.cotta(apply, optimizer=optax.sgd(lr), mt=mt, rst=0.0, ap=ap, n_augment=3,
                    augment=_plus_one)
  state = tta.init(v, {"x": X}, jax.random.key(0))
  new, logits, m = run_step(tta, state, X)
  probs = jax.nn.softmax(X)
  np.testing.assert_allclose(m["anchor_prob"], probs.max(-1).mean(), rtol=1e-6)
  assert float(m["augmented"]) == float(augmented)
  target = X + 1.0 if augmented else X          # teacher = source at step 0; aug views all x + 1
  np.testing.assert_allclose(logits, target, rtol=1e-6)        # CoTTA returns the teacher's output
  student, teacher = _cotta_expected(v, X, target, lr, mt)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(new.variables["params"]["ln"][k], student[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.teacher["params"]["ln"][k], teacher[k], rtol=1e-5, atol=1e-7)


def test_cotta_stochastic_restore():
  apply, v = logits_model(classes=1000)
  x = jax.random.normal(jax.random.key(1), (8, 1000))
  lr, mt = 0.5, 0.9
  double = lambda key, x: 2.0 * x                    # augmented target differs from the student
  full = adapt.cotta(apply, optimizer=optax.sgd(lr), mt=mt, rst=1.0, ap=1.01, n_augment=2,
                     augment=double)
  s, _, _ = run_step(full, full.init(v, {"x": x}, jax.random.key(0)), x)
  for a, b in zip(jax.tree.leaves(s.variables), jax.tree.leaves(v)):       # everything restored
    np.testing.assert_array_equal(a, b)
  student, teacher = _cotta_expected(v, x, 2.0 * x, lr, mt)
  # the teacher EMA uses the student before the restore
  np.testing.assert_allclose(s.teacher["params"]["ln"]["scale"], teacher["scale"], rtol=1e-5)
  student, _ = _cotta_expected(v, x, 2.0 * x, 1000.0, mt)                  # big steps: all elements move
  half = adapt.cotta(apply, optimizer=optax.sgd(1000.0), mt=mt, rst=0.3, ap=1.01, n_augment=2,
                     augment=double)
  s, _, _ = run_step(half, half.init(v, {"x": x}, jax.random.key(0)), x)
  restored = np.asarray(s.variables["params"]["ln"]["scale"]) == np.asarray(v["params"]["ln"]["scale"])
  moved = np.isclose(s.variables["params"]["ln"]["scale"], student["scale"], rtol=1e-5)
  assert np.all(restored | moved)
  distinct = np.abs(np.asarray(student["scale"]) - np.asarray(v["params"]["ln"]["scale"])) > 1e-3
  assert distinct.sum() > 800
  assert abs(restored[distinct].mean() - 0.3) < 0.07                       # Bernoulli(0.3) mask
  tree = {"a": jnp.ones(5000)}
  out = adapt.stochastic_restore(jax.random.key(3), tree, {"a": jnp.zeros(5000)}, 0.01)
  assert abs(float(1 - out["a"].mean()) - 0.01) < 0.006


def test_cotta_needs_a_key_and_valid_hyperparameters():
  apply, v = logits_model()
  tta = adapt.cotta(apply)
  with pytest.raises(KfuseError, match="key: cotta.step needs a PRNG key"):
    tta.step(tta.init(v, {"x": X}), {"x": X}, None)
  with pytest.raises(KfuseError, match="rst"):
    adapt.cotta(apply, rst=2.0)


# ------------------------------------------------------------------ CSTU memory


def _score(age, u, k, c):
  return 1 / (1 + math.exp(-age / k)) + u / math.log(c)


def test_memory_rules_by_hand():
  k, c = 4, 2                                        # quota K/C = 2 per class
  m = mem.init_memory(k, (1,))
  add = lambda m, v, y, u: mem.add(m, jnp.array([v], jnp.float32), jnp.int32(y), jnp.float32(u),
                                   num_classes=c)
  m = add(m, 1.0, 0, 0.1)
  m = add(m, 2.0, 0, 0.2)
  np.testing.assert_array_equal(m.valid, [1, 1, 0, 0])
  np.testing.assert_array_equal(m.age, [2, 1, 0, 0])
  # class 0 is at quota: its highest-scoring item (slot 1, 0.85 > 0.77) is replaced (score > new 0.57)
  assert _score(1, 0.2, k, c) > _score(2, 0.1, k, c) > _score(0, 0.05, k, c)
  m = add(m, 3.0, 0, 0.05)
  np.testing.assert_array_equal(m.x[:, 0], [1, 3, 0, 0])
  np.testing.assert_array_equal(m.age, [3, 1, 0, 0])
  m = add(m, 4.0, 1, 0.9)                            # class 1 under quota, free slot
  m = add(m, 5.0, 1, 0.3)
  np.testing.assert_array_equal(m.x[:, 0], [1, 3, 4, 5])
  np.testing.assert_array_equal(m.label, [0, 0, 1, 1])
  np.testing.assert_array_equal(m.age, [5, 3, 2, 1])
  # a very uncertain newcomer of a full class loses against every stored item: rejected, all age
  assert _score(0, math.log(2) * 3, k, c) > max(_score(2, 0.9, k, c), _score(1, 0.3, k, c))
  m2 = add(m, 6.0, 1, math.log(2) * 3)
  np.testing.assert_array_equal(m2.x[:, 0], [1, 3, 4, 5])
  np.testing.assert_array_equal(m2.age, [6, 4, 3, 2])
  m3 = add(m, 6.0, 1, 0.0)                           # confident newcomer replaces slot 2 (1.92)
  np.testing.assert_array_equal(m3.x[:, 0], [1, 3, 6, 5])


def test_memory_full_under_quota_evicts_from_majority_classes():
  k, c = 4, 3                                        # quota 4/3: at most one item per class... per rule
  m = mem.init_memory(k, (1,))
  add = lambda m, v, y, u: mem.add(m, jnp.array([v], jnp.float32), jnp.int32(y), jnp.float32(u),
                                   num_classes=c)
  for v_, y, u in [(1.0, 0, 0.5), (2.0, 1, 0.1), (3.0, 1, 0.2), (4.0, 0, 0.0)]:
    m = add(m, v_, y, u)
  # (3, class 1) arrives with class 1 at 1 item < 1.33: free slot; (4, class 0) likewise
  np.testing.assert_array_equal(m.label, [0, 1, 1, 0])
  np.testing.assert_array_equal(m.age, [4, 3, 2, 1])
  # class 2 is under quota, the bank is full: majority classes {0, 1} (2 items each);
  # the highest score among them is slot 0 (age 4, u 0.5) > newcomer (age 0, u 0.1)
  scores = [_score(4, 0.5, k, c), _score(3, 0.1, k, c), _score(2, 0.2, k, c), _score(1, 0.0, k, c)]
  assert int(np.argmax(scores)) == 0 and scores[0] > _score(0, 0.1, k, c)
  m = add(m, 5.0, 2, 0.1)
  np.testing.assert_array_equal(m.x[:, 0], [5, 2, 3, 4])
  np.testing.assert_array_equal(m.label, [2, 1, 1, 0])


def test_memory_admission_bound_does_not_decay_with_age():
  """Age saturates (σ(a/K) < 1), so a newcomer whose entropy exceeds a stored item's by
  more than ½·(λ_t/λ_u)·ln C never replaces it, however old: the bank can freeze (the
  mechanism behind RoTTA's continual-stream failure in experiments/tta_bench/README.md)."""
  k, c = 4, 2
  m = mem.init_memory(k, (1,))
  for i in range(k):
    m = mem.add(m, jnp.array([float(i)]), jnp.int32(i % c), jnp.float32(0.0), num_classes=c)
  m = m._replace(age=jnp.full((k,), 1e6, jnp.float32))        # stored scores -> 1 + 0/ln C = 1
  bound = 0.5 * math.log(c)                                    # newcomer: 0.5 + u/ln C
  add = lambda u: mem.add(m, jnp.array([9.0]), jnp.int32(0), jnp.float32(u), num_classes=c)
  np.testing.assert_array_equal(add(bound + 0.01).x[:, 0], [0, 1, 2, 3])   # rejected
  assert 9.0 in np.asarray(add(bound - 0.01).x[:, 0])                      # accepted
  lambda_u0 = mem.add(m, jnp.array([9.0]), jnp.int32(0), jnp.float32(5.0), num_classes=c,
                      lambda_u=0.0)
  assert 9.0 in np.asarray(lambda_u0.x[:, 0])                  # age-only score: always accepted


def test_timeliness_weights():
  np.testing.assert_allclose(mem.timeliness(jnp.array([0.0, 64.0, 128.0]), 64),
                             [0.5, math.exp(-1) / (1 + math.exp(-1)), math.exp(-2) / (1 + math.exp(-2))],
                             rtol=1e-6)


# ------------------------------------------------------------------ RoTTA


def test_rotta_step_teacher_output_rbn_and_ema():
  model, v, x = tiny_bn(batch=8)
  nu, alpha = 0.1, 0.05
  tta = adapt.rotta(model, optimizer=optax.sgd(0.5), nu=nu, alpha=alpha, capacity=8,
                    update_frequency=8, augment=lambda k, x: 2.0 * x)
  state = tta.init(v, {"x": x}, jax.random.key(0))
  new, logits, m = run_step(tta, state, x)
  np.testing.assert_allclose(logits, model.apply(v, x, train=False), rtol=1e-5, atol=1e-6)
  assert float(m["num_updates"]) == 1
  memory = new.memory
  valid = np.asarray(memory.valid)
  assert valid.sum() == m["memory_size"] and valid.sum() >= 1
  assert m["memory_new"] == valid.sum()              # every stored item came from this batch
  # teacher RobustBN: μ ← (1-α)μ + α μ_memory, over the valid memory rows
  p = v["params"]["dense"]
  h = (np.asarray(memory.x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"]))[valid]
  bs = v["batch_stats"]["bn"]
  np.testing.assert_allclose(new.teacher["batch_stats"]["bn"]["mean"],
                             (1 - alpha) * np.asarray(bs["mean"]) + alpha * h.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new.teacher["batch_stats"]["bn"]["var"],
                             (1 - alpha) * np.asarray(bs["var"]) + alpha * h.var(0), rtol=1e-4, atol=1e-6)
  # student moved (norm affine only), teacher = (1-ν) θ′ + ν θ
  s_new = new.variables["params"]["bn"]["scale"]
  assert not np.allclose(s_new, v["params"]["bn"]["scale"])
  np.testing.assert_allclose(new.teacher["params"]["bn"]["scale"],
                             (1 - nu) * v["params"]["bn"]["scale"] + nu * s_new, rtol=1e-6)
  np.testing.assert_array_equal(new.variables["params"]["dense"]["kernel"], v["params"]["dense"]["kernel"])


def test_rotta_update_clock_across_batches():
  model, v, x = tiny_bn(batch=8)
  tta = adapt.rotta(model, capacity=8, update_frequency=3)
  state = tta.init(v, {"x": x}, jax.random.key(0))
  step = lambda s, x: run_step(tta, s, x)
  s1, _, m1 = step(state, x)                         # samples 1..8: updates after 3, 6
  s2, _, m2 = step(s1, x)                            # samples 9..16: after 9, 12, 15
  assert float(m1["num_updates"]) == 2 and float(m2["num_updates"]) == 5
  assert int(s2.seen) == 16


def test_randomness_comes_from_the_per_call_key_only():
  """Same state + batch + key: the same step; another key: other augmentations / restore mask."""
  apply, v = logits_model(classes=50)
  x = jax.random.normal(jax.random.key(1), (8, 50))
  noisy = lambda key, x: x + jax.random.normal(key, x.shape)
  cotta = adapt.cotta(apply, optimizer=optax.sgd(100.0), rst=0.5, ap=1.01, n_augment=2,
                      augment=noisy)
  model, vb, xb = tiny_bn(batch=8)
  rotta = adapt.rotta(model, optimizer=optax.sgd(0.5), capacity=8, update_frequency=8,
                      augment=noisy)
  for tta, variables, batch in ((cotta, v, x), (rotta, vb, xb)):
    state = tta.init(variables, {"x": batch})
    a, la, _ = run_step(tta, state, batch, jax.random.key(7))
    b, lb, _ = run_step(tta, state, batch, jax.random.key(7))
    c, _, _ = run_step(tta, state, batch, jax.random.key(8))
    for p, q in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
      np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(la, lb)
    assert any(not np.array_equal(p, q)
               for p, q in zip(jax.tree.leaves(a.variables), jax.tree.leaves(c.variables)))
