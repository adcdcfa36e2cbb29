"""kfuse.distill steps: teachers frozen and outside the state, one compilation, mixup, ensembles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import chex
import optax
import pytest

from kfuse import distill
from kfuse.distill import losses as L
from kfuse.distill import objectives as O
from kfuse.tree import KfuseError

C = 5


class TinyMLP(nn.Module):
  """Dense -> relu -> Dense, the hidden layer named ``body`` (a feature path)."""
  width: int = 16
  classes: int = C

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(self.width, name="body")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes, name="head")(h)


class TinyConv(nn.Module):
  """Conv -> BatchNorm -> relu (``block``, a token map) -> mean-pool -> Dense."""
  channels: int = 4
  classes: int = C

  @nn.compact
  def __call__(self, x, train=False):
    h = Block(self.channels, name="block")(x[..., None], train)
    return nn.Dense(self.classes, name="head")(h.mean(axis=1))


class Block(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(self.channels, (3,), name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(h))


def _data(n=12, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
          jnp.asarray(rng.integers(0, C, n), jnp.int32))


def _vars(module, seed, x):
  return module.init(jax.random.key(seed), x)


def _tree_equal(a, b):
  try:
    chex.assert_trees_all_equal(a, b)
  except AssertionError:
    return False
  return True


def test_gradients_reach_the_student_only():
  x, y = _data()
  teacher, student = TinyMLP(width=24), TinyMLP()
  tv, sv = _vars(teacher, 0, x), _vars(student, 1, x)
  obj = O.combine(O.hinton(), O.fitnets("body", "body", ce_weight=0.0))
  step = distill.make_step(student, obj, optax.adam(1e-2), [distill.Teacher(teacher, tv)],
                           donate=False)
  state = step.init(sv, x)
  batch = {"x": x, "y": y}

  def loss_wrt(params, aux, teacher_vars):
    return step.loss_fn(params, aux, state.model_state, teacher_vars, batch, jax.random.key(0),
                        state.step)[0]

  g_s, g_a, g_t = jax.jit(jax.grad(loss_wrt, argnums=(0, 1, 2)))(state.params, state.aux, (tv,))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_t))   # teacher: zero
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_s))   # student: flows
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_a))   # regressor: flows
  # teachers live outside the state: the state's leaves are the student's (params, state),
  # the regressor and the optimizer's, never the teacher's
  n_student = len(jax.tree.leaves(sv["params"]))
  assert len(jax.tree.leaves(state.params)) == n_student
  before = jax.tree.map(np.asarray, tv)
  regressor0 = np.asarray(state.aux[1]["regressors"][0]["kernel"])
  for i in range(3):
    state, metrics = step(state, batch, jax.random.key(i))
  assert _tree_equal(before, tv)                                            # teacher untouched
  assert not np.allclose(regressor0, np.asarray(state.aux[1]["regressors"][0]["kernel"]))
  assert np.isfinite(float(metrics["loss"]))


def test_step_compiles_once_and_teachers_swap_without_recompiling():
  x, y = _data()
  teacher, student = TinyMLP(width=32), TinyMLP()
  traces = []

  def student_fwd(variables, xx, train, key):   # runs once per trace of the jitted step
    traces.append(train)
    return student.apply(variables, xx)

  step = distill.make_step(student_fwd, O.dkd(steps_per_epoch=2), optax.sgd(0.1),
                           [distill.Teacher(teacher, _vars(teacher, 0, x))], mixup_alpha=0.4)
  state = step.init(_vars(student, 1, x), x)
  for i in range(4):
    xb, yb = _data(seed=i + 1)
    state, _ = step(state, {"x": xb, "y": yb}, jax.random.key(i))
  other = step.with_teachers([_vars(teacher, 7, x)])
  state, _ = other(state, {"x": x, "y": y}, jax.random.key(9))
  assert traces.count(True) == 1          # one train-mode trace for five steps, two teachers
  assert int(state.step) == 5


def test_mixup_feeds_teacher_and_student_the_same_inputs():
  """Student == teacher (same params): KL is 0 only if both saw the same mixed batch."""
  x, y = _data()
  model = TinyMLP()
  v = _vars(model, 0, x)
  step = distill.make_step(model, O.forward_kl(), optax.sgd(0.0), [distill.Teacher(model, v)],
                           mixup_alpha=1.0, donate=False)
  state = step.init(v, x)
  for i in range(3):
    _, m = step(state, {"x": x, "y": y}, jax.random.key(i))
    assert abs(float(m["kd"])) < 1e-6
  # and the batch really is mixed: the CE of the mixed soft targets differs from the plain one
  plain = distill.make_step(model, O.supervised(), optax.sgd(0.0), donate=False)
  mixed = distill.make_step(model, O.supervised(), optax.sgd(0.0), mixup_alpha=1.0, donate=False)
  s0 = plain.init(v, x)
  a = float(plain(s0, {"x": x, "y": y}, jax.random.key(0))[1]["loss"])
  b = float(mixed(s0, {"x": x, "y": y}, jax.random.key(0))[1]["loss"])
  assert abs(a - b) > 1e-4


def test_multi_teacher_mean_and_stacked_members_match_by_hand():
  x, y = _data()
  teacher, student = TinyMLP(width=24), TinyMLP()
  tvs = [_vars(teacher, s, x) for s in (10, 11, 12)]
  sv = _vars(student, 1, x)
  t = 3.0
  obj = O.forward_kl(temperature=t)
  sep = distill.make_step(student, obj, optax.sgd(0.0), [distill.Teacher(teacher, v) for v in tvs],
                          donate=False)
  stk = distill.make_step(student, obj, optax.sgd(0.0),
                          [distill.Teacher(teacher, distill.stack_checkpoints(tvs), stacked=True)],
                          donate=False)
  state = sep.init(sv, x)
  batch = {"x": x, "y": y}
  kd_sep = float(sep(state, batch, jax.random.key(0))[1]["kd"])
  kd_stk = float(stk(stk.init(sv, x), batch, jax.random.key(0))[1]["kd"])
  zs = np.asarray(student.apply(sv, x), np.float64)
  pt = np.mean([jax.nn.softmax(np.asarray(teacher.apply(v, x), np.float64) / t) for v in tvs], 0)
  ls = zs / t - np.log(np.exp(zs / t).sum(-1, keepdims=True))
  ref = np.mean((pt * (np.log(pt) - ls)).sum(-1))
  np.testing.assert_allclose([kd_sep, kd_stk], [ref, ref], rtol=1e-5)


def test_confidence_weighting_prefers_the_teacher_that_knows_the_label():
  x, y = _data()
  student = TinyMLP()
  zg = 3.0 * np.eye(C)[np.asarray(y)]                   # knows the labels
  zb = 3.0 * np.eye(C)[(np.asarray(y) + 1) % C]         # always wrong
  good = lambda v, xx, train, key: jnp.asarray(zg, jnp.float32)
  bad = lambda v, xx, train, key: jnp.asarray(zb, jnp.float32)
  sv = _vars(student, 1, x)
  ls = np.asarray(student.apply(sv, x), np.float64)
  ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
  softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  ce_g = np.log(np.exp(3.0) + C - 1) - 3.0              # −log p_good(y)
  ce_b = np.log(np.exp(3.0) + C - 1)                    # −log p_bad(y)
  # Zhang et al. (ICASSP 2022), K = 2: w_k = 1 − softmax_k(CE)
  w_good = {"mean": 0.5, "min_ce": 1.0,
            "confidence": 1.0 - np.exp(ce_g) / (np.exp(ce_g) + np.exp(ce_b))}
  for rule, wg in w_good.items():
    step = distill.make_step(student, O.hinton(temperature=1.0), optax.sgd(0.0),
                             [distill.Teacher(good, {"params": {}}), distill.Teacher(bad, {"params": {}})],
                             combine=rule, donate=False)
    m = step(step.init(sv, x), {"x": x, "y": y}, jax.random.key(0))[1]
    pt = wg * softmax(zg) + (1 - wg) * softmax(zb)
    kd = np.mean((pt * (np.log(pt) - ls)).sum(-1))
    np.testing.assert_allclose(float(m["kd"]), kd, rtol=1e-5, err_msg=rule)
    if rule != "mean":
      assert wg > 0.5 and float(m["teacher_accuracy"]) == 1.0, rule


def test_kl_dp_chooses_the_more_confident_model_per_sample():
  z_s = jnp.zeros((4, 3))
  teacher = jnp.array([[9., 0, 0], [1, 0, 0], [0, 9, 0], [0, 0, 1]])
  init_student = jnp.array([[1., 0, 0], [9, 0, 0], [0, 1, 0], [0, 0, 9]])
  logits = jnp.stack([teacher, init_student])
  view = distill.TeacherOutputs(logits, jnp.full((2, 4), 0.5), ({}, {}))
  loss, m = O.kl_dp(temperature=1.0).loss({}, distill.Outputs(z_s, {}), view,
                                          {"y": jnp.zeros(4, jnp.int32)}, jnp.zeros((), jnp.int32))
  assert float(m["teacher_fraction"]) == 0.5
  target = jnp.stack([teacher[0], init_student[1], teacher[2], init_student[3]])
  np.testing.assert_allclose(float(loss), float(L.forward_kl(z_s, target)), rtol=1e-6)


def test_dkd_warmup_starts_from_plain_cross_entropy():
  x, y = _data()
  teacher, student = TinyMLP(width=24), TinyMLP()
  step = distill.make_step(student, O.dkd(steps_per_epoch=1, warmup_epochs=4), optax.sgd(0.0),
                           [distill.Teacher(teacher, _vars(teacher, 0, x))], donate=False)
  state = step.init(_vars(student, 1, x), x)
  m0 = step(state, {"x": x, "y": y}, jax.random.key(0))[1]
  np.testing.assert_allclose(float(m0["loss"]), float(m0["ce"]), rtol=1e-6)


def test_batchnorm_student_updates_its_statistics():
  x, y = _data()
  student, teacher = TinyConv(), TinyMLP(width=24)
  sv = _vars(student, 1, x)
  step = distill.make_step(student, O.combine(O.hinton(), O.trg("block", "block", ce_weight=0.0)),
                           optax.adam(1e-2),
                           [distill.Teacher(TinyConv(channels=6), _vars(TinyConv(channels=6), 3, x))])
  state = step.init(sv, x)
  state, m = step(state, {"x": x, "y": y}, jax.random.key(0))
  assert not _tree_equal(sv["batch_stats"], state.model_state["batch_stats"])
  assert np.isfinite(float(m["loss"])) and "trg/trg" in m
  del teacher


def test_mutual_learning_of_identical_students_is_twice_the_ce():
  x, y = _data()
  model = TinyMLP()
  v = _vars(model, 0, x)
  step = distill.make_mutual_step([model, model], optax.sgd(0.1), temperature=2.0, donate=False)
  state = step.init([v, v], x)
  _, m = step(state, {"x": x, "y": y}, jax.random.key(0))
  ce = float(L.cross_entropy(model.apply(v, x), y))
  np.testing.assert_allclose(float(m["loss"]), 2 * ce, rtol=1e-5)
  s2, _ = step(step.init([v, _vars(model, 5, x)], x), {"x": x, "y": y}, jax.random.key(0))
  assert not _tree_equal(s2.params[0], v["params"]) and not _tree_equal(s2.params[1], v["params"])


def test_topk_objective_from_stored_representations_needs_no_teacher():
  x, y = _data()
  student = TinyMLP()
  val, idx = jax.lax.top_k(jnp.asarray(np.random.default_rng(0).normal(size=(12, C)), jnp.float32), 2)
  step = distill.make_step(student, O.topk(k=2, ce_weight=0.1), optax.sgd(0.0), donate=False)
  state = step.init(_vars(student, 1, x), x)
  m = step(state, {"x": x, "y": y, "topk_indices": idx, "topk_logits": val}, jax.random.key(0))[1]
  ref = float(L.topk_kl(student.apply(_vars(student, 1, x), x), idx, val))
  np.testing.assert_allclose(float(m["kd"]), ref, rtol=1e-5)


def test_bad_inputs_name_the_argument():
  x, _ = _data()
  student = TinyMLP()
  with pytest.raises(KfuseError, match="temperature"):
    O.hinton(temperature=0.0)
  with pytest.raises(KfuseError, match="kd_weight"):
    O.hinton(ce_weight=0.0, kd_weight=0.0)
  with pytest.raises(KfuseError, match="alpha"):
    O.dkd(alpha=-1.0)
  with pytest.raises(KfuseError, match="beta"):
    O.jsd(beta=2.0)
  with pytest.raises(KfuseError, match="teachers"):
    distill.make_step(student, O.hinton(), optax.sgd(0.1))
  with pytest.raises(KfuseError, match="teachers"):
    distill.make_step(student, O.kl_dp(), optax.sgd(0.1),
                      [distill.Teacher(student, _vars(student, 0, x))])
  with pytest.raises(KfuseError, match="combine"):
    distill.make_step(student, O.hinton(), optax.sgd(0.1),
                      [distill.Teacher(student, _vars(student, 0, x))], combine="vote")
  with pytest.raises(KfuseError, match="mixup_alpha"):
    distill.make_step(student, O.hinton(), optax.sgd(0.1),
                      [distill.Teacher(student, _vars(student, 0, x))], mixup_alpha=-1.0)
  wide = TinyMLP(classes=C + 2)
  step = distill.make_step(student, O.hinton(), optax.sgd(0.1),
                           [distill.Teacher(wide, _vars(wide, 0, x))])
  with pytest.raises(KfuseError, match=r"teachers\[0\] logits: class/vocabulary axis size 7"):
    step.init(_vars(student, 1, x), x)
  step = distill.make_step(student, O.fitnets("nope", "body"), optax.sgd(0.1),
                           [distill.Teacher(student, _vars(student, 0, x))])
  with pytest.raises(KfuseError, match="features: no module output at path 'nope'"):
    step.init(_vars(student, 1, x), x)
  step = distill.make_step(student, O.supervised(), optax.sgd(0.1))
  state = step.init(_vars(student, 1, x), x)
  with pytest.raises(KfuseError, match="batch: missing key 'y'"):
    step(state, {"x": x}, jax.random.key(0))


def test_relation_objectives_relate_only_the_first_max_samples():
  # max_samples bounds the O(B^3) RKD angle and O((B L)^2) TRG graph cost (without it the
  # full kd_bench spent ~20 min per seed in these two rows): only the first n samples
  # enter the relation terms, which then equal the loss on those n samples.
  rng = np.random.default_rng(3)
  b, n = 16, 5
  fs, ft = rng.normal(size=(b, 6)), rng.normal(size=(b, 4))
  ts, tt = rng.normal(size=(b, 8, 3)), rng.normal(size=(b, 8, 5))
  logits = jnp.asarray(rng.normal(size=(b, C)), jnp.float32)
  batch = {"x": jnp.zeros((b, 1)), "y": jnp.asarray(rng.integers(0, C, b))}

  def run(obj, s_feats, t_feats, path):
    s = distill.Outputs(logits, {path: jnp.asarray(s_feats, jnp.float32)})
    t = distill.TeacherOutputs(logits[None], jnp.ones((1, b)),
                               ({path: jnp.asarray(t_feats, jnp.float32)},))
    return float(obj.loss({}, s, t, batch, 0)[0])

  rkd = O.rkd(distance_weight=25.0, angle_weight=50.0, ce_weight=0.0, max_samples=n)
  want = float(L.rkd(fs[:n], ft[:n], 25.0, 50.0))
  np.testing.assert_allclose(run(rkd, fs, ft, "backbone"), want, rtol=1e-5)
  fs2 = fs.copy()
  fs2[n:] = rng.normal(size=(b - n, 6))
  np.testing.assert_allclose(run(rkd, fs2, ft, "backbone"), want, rtol=1e-5)

  trg = O.trg("block", "block", ce_weight=0.0, token_pool=2, max_samples=n)
  pool = lambda x: x[:n].reshape(n, 4, 2, -1).mean(axis=2)
  want = float(L.trg(jnp.asarray(pool(ts), jnp.float32), jnp.asarray(pool(tt), jnp.float32)))
  np.testing.assert_allclose(run(trg, ts, tt, "block"), want, rtol=1e-5)
  ts2 = ts.copy()
  ts2[n:] = rng.normal(size=(b - n, 8, 3))
  np.testing.assert_allclose(run(trg, ts2, tt, "block"), want, rtol=1e-5)


def test_full_bench_config_caps_the_relation_losses():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "kd_bench.py")
  spec = importlib.util.spec_from_file_location("kd_bench_config_caps", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  methods = mod.get_config().methods
  assert methods.rkd.objective.max_samples <= 64
  trg = [o for o in methods.cnn_trg.objective if o["name"] == "trg"][0]
  assert trg["max_samples"] <= 64 and trg["token_pool"] >= 2


def test_optimizer_config_is_read_by_kfuse_optim():
  x, y = _data()
  student = TinyMLP()
  sv = _vars(student, 1, x)
  batch = {"x": x, "y": y}
  by_cfg = distill.make_step(student, O.supervised(), {"name": "sgd", "learning_rate": 0.5},
                             donate=False)
  by_tx = distill.make_step(student, O.supervised(), optax.sgd(0.5), donate=False)
  a = by_cfg(by_cfg.init(sv, x), batch, jax.random.key(0))[0]
  b = by_tx(by_tx.init(sv, x), batch, jax.random.key(0))[0]
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6)
  assert not _tree_equal(a.params, sv["params"])
  lrn = by_tx.learner
  state, m = lrn.step(lrn.init(sv, x), batch, jax.random.key(0))
  assert int(state.step) == 1 and "loss" in m
  with pytest.raises(KfuseError, match="optimizer.learning_rate"):
    distill.make_step(student, O.supervised(), {"name": "sgd", "learning_rate": 0.0})
  with pytest.raises(KfuseError, match="batch: unknown key 'labels'"):
    by_tx(by_tx.init(sv, x), {"x": x, "y": y, "labels": y}, jax.random.key(0))
