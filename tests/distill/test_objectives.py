"""Every registered objective's total loss, read from a real `make_step`, against float64 NumPy.

The student and teachers are forward callables with known weights (logits = mean-pooled
tokens @ W, features = tokens @ P), so the reference recomputes logits, features and the
whole weighted total in NumPy from the formulas (T² factors, weights, masks included). A
wrong factor anywhere between `losses` and the step (objectives.py, steps.py) fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import distill
from kfuse.distill import objectives as O
from tests.distill.test_losses import (np_ce, np_dkd_terms, np_kl, np_log_softmax, np_mean,
                                       np_rkd, np_trg)

B, LEN, D, C = 6, 4, 3, 5
RTOL = 2e-5


def _arrays(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(D, C)).astype(np.float32) * 2,
          "p": rng.normal(size=(D, 2 + seed % 3)).astype(np.float32)}


def forward(variables, x, train=False, key=None):
  v = variables["params"]
  return distill.Outputs(x.mean(axis=1) @ v["w"], {"tok": x @ v["p"]})


def np_forward(v, x):
  x = np.asarray(x, np.float64)
  return x.mean(axis=1) @ np.asarray(v["w"], np.float64), x @ np.asarray(v["p"], np.float64)


def _batch(where=True):
  rng = np.random.default_rng(7)
  batch = {"x": jnp.asarray(rng.normal(size=(B, LEN, D)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, C, B), jnp.int32)}
  if where:
    batch["where"] = jnp.asarray([True, True, False, True, True, False])
  return batch


def _loss_from_step(obj, n_teachers=1, batch=None, at_step=0):
  batch = _batch() if batch is None else batch
  sv = {"params": _arrays(0)}
  tvs = [{"params": _arrays(i + 1)} for i in range(n_teachers)]
  step = distill.make_step(forward, obj, optax.sgd(1.0),
                           [distill.Teacher(forward, v) for v in tvs], donate=False)
  state = step.init(sv, batch["x"], jax.random.key(3))
  state = state.replace(step=jnp.asarray(at_step, jnp.int32))
  _, metrics = step(state, batch, jax.random.key(0))
  zs, fs = np_forward(sv["params"], batch["x"])
  teach = [np_forward(v["params"], batch["x"]) for v in tvs]
  y = np.asarray(batch["y"])
  where = None if "where" not in batch else np.asarray(batch["where"])
  return float(metrics["loss"]), (zs, fs), teach, y, where, state


def _kd(zs, zt, t, where):
  return np_mean(np_kl(np_log_softmax(zt, t), np_log_softmax(zs, t)), where)


def _rkl(zs, zt, t, where):
  return np_mean(np_kl(np_log_softmax(zs, t), np_log_softmax(zt, t)), where)


def _jsd(zs, zt, beta, t, where):
  ps, pt = np.exp(np_log_softmax(zs, t)), np.exp(np_log_softmax(zt, t))
  m = beta * pt + (1 - beta) * ps
  per = beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)
  return np_mean(per, where)


def test_supervised():
  got, (zs, _), _, y, where, _ = _loss_from_step(O.get("supervised", ce_weight=0.7), 0)
  np.testing.assert_allclose(got, 0.7 * np_ce(zs, y, where), rtol=RTOL)


@pytest.mark.parametrize("name,kw,ref", [
    ("hinton", dict(temperature=3.0, ce_weight=0.3, kd_weight=0.7),
     lambda zs, zt, y, w: 0.3 * np_ce(zs, y, w) + 0.7 * 9.0 * _kd(zs, zt, 3.0, w)),
    ("forward_kl", dict(temperature=2.0, ce_weight=0.2, kd_weight=0.5),
     lambda zs, zt, y, w: 0.2 * np_ce(zs, y, w) + 0.5 * 4.0 * _kd(zs, zt, 2.0, w)),
    ("reverse_kl", dict(temperature=2.0, ce_weight=0.1, kd_weight=0.6),
     lambda zs, zt, y, w: 0.1 * np_ce(zs, y, w) + 0.6 * 4.0 * _rkl(zs, zt, 2.0, w)),
    ("jsd", dict(beta=0.3, temperature=2.0, ce_weight=0.2, kd_weight=0.8),
     lambda zs, zt, y, w: 0.2 * np_ce(zs, y, w) + 0.8 * 4.0 * _jsd(zs, zt, 0.3, 2.0, w)),
    ("dkd", dict(alpha=0.5, beta=3.0, temperature=2.0, ce_weight=1.5),
     lambda zs, zt, y, w: 1.5 * np_ce(zs, y, w) + 0.5 * np_mean(np_dkd_terms(zs, zt, y, 2.0)[0], w)
     + 3.0 * np_mean(np_dkd_terms(zs, zt, y, 2.0)[1], w)),
])
def test_logit_objectives(name, kw, ref):
  got, (zs, _), teach, y, where, _ = _loss_from_step(O.get(name, **kw))
  np.testing.assert_allclose(got, ref(zs, teach[0][0], y, where), rtol=RTOL)


def test_two_teachers_distil_from_their_probability_mixture():
  got, (zs, _), teach, y, where, _ = _loss_from_step(O.hinton(temperature=2.0), 2)
  pt = np.mean([np.exp(np_log_softmax(z, 2.0)) for z, _ in teach], axis=0)
  kd = np_mean((pt * (np.log(pt) - np_log_softmax(zs, 2.0))).sum(-1), where)
  np.testing.assert_allclose(got, 0.1 * np_ce(zs, y, where) + 0.9 * 4.0 * kd, rtol=RTOL)


def test_dkd_warmup_scales_the_kd_terms():
  obj = O.dkd(alpha=0.5, beta=3.0, temperature=2.0, ce_weight=1.5, steps_per_epoch=2,
              warmup_epochs=4.0)
  got, (zs, _), teach, y, where, _ = _loss_from_step(obj, at_step=2)   # epoch 1 of 4
  tck, nck = np_dkd_terms(zs, teach[0][0], y, 2.0)
  ref = 1.5 * np_ce(zs, y, where) + 0.25 * (0.5 * np_mean(tck, where) + 3.0 * np_mean(nck, where))
  np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_topk_from_the_teacher():
  got, (zs, _), teach, y, where, _ = _loss_from_step(
      O.topk(k=3, temperature=2.0, ce_weight=0.1, kd_weight=0.5))
  zt = teach[0][0]
  idx = np.argsort(-zt, axis=-1)[:, :3]
  lp = np_log_softmax(np.take_along_axis(zt, idx, -1), 2.0)
  ls = np.take_along_axis(np_log_softmax(zs, 2.0), idx, -1)
  kl = np_mean((np.exp(lp) * (lp - ls)).sum(-1), where)
  np.testing.assert_allclose(got, 0.1 * np_ce(zs, y, where) + 0.5 * 4.0 * kl, rtol=RTOL)


@pytest.mark.parametrize("criterion", ["max_confidence", "true_class"])
def test_kl_dp_per_sample_target(criterion):
  got, (zs, _), teach, y, where, _ = _loss_from_step(
      O.kl_dp(temperature=2.0, kd_weight=0.5, ce_weight=0.1, criterion=criterion), 2)
  (zt, _), (zst, _) = teach
  if criterion == "max_confidence":
    pick = np_log_softmax(zt).max(-1) > np_log_softmax(zst).max(-1)
  else:
    at_y = lambda z: np.take_along_axis(np_log_softmax(z), y[:, None], -1)[:, 0]
    pick = at_y(zt) > at_y(zst)
    assert 0 < pick.sum() < len(y)           # both sources are used on this batch
  target = np.where(pick[:, None], zt, zst)
  ref = 0.1 * np_ce(zs, y, where) + 0.5 * 4.0 * _kd(zs, target, 2.0, where)
  np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_fitnets_uses_the_learned_regressor():
  got, (zs, fs), teach, y, _, state = _loss_from_step(
      O.fitnets("tok", "tok", feat_weight=0.5, ce_weight=0.2), batch=_batch(where=False))
  reg = state.aux["regressors"][0]
  w, b = np.asarray(reg["kernel"], np.float64), np.asarray(reg["bias"], np.float64)
  hint = (0.5 * ((teach[0][1] - (fs @ w + b)) ** 2).sum(-1)).mean()
  np.testing.assert_allclose(got, 0.2 * np_ce(zs, y) + 0.5 * hint, rtol=RTOL)


def test_rkd():
  got, (zs, fs), teach, y, _, _ = _loss_from_step(
      O.rkd("tok", "tok", distance_weight=2.0, angle_weight=3.0, ce_weight=0.2),
      batch=_batch(where=False))
  d, a = np_rkd(fs, teach[0][1])
  np.testing.assert_allclose(got, 0.2 * np_ce(zs, y) + 2.0 * d + 3.0 * a, rtol=RTOL)


def test_attention():
  got, (zs, fs), teach, y, _, _ = _loss_from_step(
      O.attention(["tok"], ["tok"], p=2.0, feat_weight=10.0, ce_weight=0.2),
      batch=_batch(where=False))

  def at(f):
    a = (f ** 2).mean(-1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  ref = 0.2 * np_ce(zs, y) + 10.0 * ((at(fs) - at(teach[0][1])) ** 2).mean()
  np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_trg():
  got, (zs, fs), teach, y, _, _ = _loss_from_step(
      O.trg("tok", "tok", temperature=0.5, graph_weight=1.0, context_weight=0.7,
            feat_weight=2.0, ce_weight=0.2), batch=_batch(where=False))
  ref = 0.2 * np_ce(zs, y) + 2.0 * np_trg(fs, teach[0][1], 0.5, 1.0, 0.7, None)
  np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_combine_sums_the_members():
  obj = O.get([{"name": "hinton", "temperature": 2.0},
               {"name": "rkd", "student_feature": "tok", "teacher_feature": "tok",
                "ce_weight": 0.0}])
  got, (zs, fs), teach, y, _, _ = _loss_from_step(obj, batch=_batch(where=False))
  d, a = np_rkd(fs, teach[0][1])
  ref = 0.1 * np_ce(zs, y) + 0.9 * 4.0 * _kd(zs, teach[0][0], 2.0, None) + 25.0 * d + 50.0 * a
  np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_every_registered_objective_has_a_reference_here():
  tested = {"supervised", "hinton", "forward_kl", "reverse_kl", "jsd", "dkd", "topk", "kl_dp",
            "fitnets", "rkd", "attention", "trg"}
  assert tested == set(O.OBJECTIVES.names())


def test_mutual_step_total():
  batch = _batch()
  va, vb = {"params": _arrays(0)}, {"params": _arrays(1)}
  step = distill.make_mutual_step([forward, forward], optax.sgd(1.0), temperature=2.0,
                                  ce_weight=0.3, kd_weight=0.6, donate=False)
  _, m = step(step.init([va, vb], batch["x"]), batch, jax.random.key(0))
  za, zb = np_forward(va["params"], batch["x"])[0], np_forward(vb["params"], batch["x"])[0]
  y, w = np.asarray(batch["y"]), np.asarray(batch["where"])
  la = 0.3 * np_ce(za, y, w) + 0.6 * 4.0 * _kd(za, zb, 2.0, w)
  lb = 0.3 * np_ce(zb, y, w) + 0.6 * 4.0 * _kd(zb, za, 2.0, w)
  np.testing.assert_allclose([float(m["loss_0"]), float(m["loss_1"]), float(m["loss"])],
                             [la, lb, la + lb], rtol=RTOL)


def test_registry_names_defaults_and_typos():
  from kfuse.registry import Registry
  from kfuse.tree import KfuseError
  assert isinstance(O.OBJECTIVES, Registry) and O.names() == O.OBJECTIVES.names()
  # mdistiller CFG.KD / CFG.DKD, declared once in the constructors' signatures
  assert O.OBJECTIVES.defaults("hinton") == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
  assert O.OBJECTIVES.defaults("dkd")["beta"] == 8.0
  with pytest.raises(KfuseError, match=r"objective: unknown distillation objective 'hintn' \(did you mean 'hinton'\?\)"):
    O.get({"name": "hintn"})
  with pytest.raises(KfuseError, match="objective.hinton: .*'temprature'"):
    O.get("hinton", temprature=2.0)
