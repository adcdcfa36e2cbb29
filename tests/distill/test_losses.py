"""Every kfuse.distill loss against an independent float64 NumPy computation.

Random logits / features, masks (``where``) and temperatures; the NumPy
references are written from the formulas (explicit loops where it keeps them
obviously right), not from the JAX code.
"""

import numpy as np
import pytest

import jax
import jax.extend as jex
import jax.numpy as jnp

from kfuse.distill import ensembles
from kfuse.distill import losses as raw
from kfuse.tree import KfuseError

RTOL, ATOL = 2e-5, 2e-6


class _Jitted:
  """``L.f(*args)`` runs ``raw.f`` under one ``jax.jit`` (eager op-by-op dispatch is slow on CPU).

  Bad-input tests call ``raw`` directly: some checks need concrete values.
  """

  def __getattr__(self, name):
    fn = getattr(raw, name)
    if name in ("init_regressor", "topk_from_logits") or not callable(fn):
      return fn
    return lambda *a, **k: jax.jit(lambda: fn(*a, **k))()


L = _Jitted()


# ------------------------------------------------------------------ numpy references


def np_log_softmax(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_mean(v, where):
  v = np.asarray(v, np.float64)
  if where is None:
    return v.mean()
  w = np.asarray(where, np.float64)
  return (v * w).sum() / max(w.sum(), 1.0)


def np_kl(log_p, log_q):
  p = np.exp(log_p)
  return (p * (log_p - log_q)).sum(-1)


def np_ce(z, y, where=None):
  lq = np_log_softmax(z)
  if y.shape == z.shape:
    per = -(y * lq).sum(-1)
  else:
    per = -np.take_along_axis(lq, y[..., None], -1)[..., 0]
  return np_mean(per, where)


def rand(shape, seed, scale=3.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def rand_mask(shape, seed):
  m = np.random.default_rng(seed).random(shape) > 0.3
  m.flat[0] = True
  return m


def close(a, b):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=RTOL, atol=ATOL)


CASES = [  # (positions, classes, temperature, masked)
    ((8,), 5, 1.0, False),
    ((8,), 7, 4.0, True),
    ((3, 6), 11, 2.0, True),     # tokens [B, L, V]
    ((4, 5), 3, 0.5, False),
]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}x{c[1]}-T{c[2]}-{'mask' if c[3] else 'all'}")
def case(request):
  pos, c, t, masked = request.param
  zs, zt = rand(pos + (c,), 1), rand(pos + (c,), 2)
  y = np.random.default_rng(3).integers(0, c, pos).astype(np.int32)
  where = rand_mask(pos, 4) if masked else None
  return zs, zt, y, t, where


# ------------------------------------------------------------------ logit losses


def test_cross_entropy_hard_and_soft(case):
  zs, _, y, _, where = case
  close(L.cross_entropy(zs, y, where), np_ce(zs, y, where))
  soft = np.random.default_rng(5).dirichlet(np.ones(zs.shape[-1]), zs.shape[:-1]).astype(np.float32)
  close(L.cross_entropy(zs, soft, where), np_ce(zs, soft.astype(np.float64), where))


def test_forward_and_reverse_kl(case):
  zs, zt, _, t, where = case
  ls, lt = np_log_softmax(zs, t), np_log_softmax(zt, t)
  close(L.forward_kl(zs, zt, t, where), np_mean(np_kl(lt, ls), where))
  close(L.reverse_kl(zs, zt, t, where), np_mean(np_kl(ls, lt), where))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_interior(case, beta):
  zs, zt, _, t, where = case
  ps, pt = np.exp(np_log_softmax(zs, t)), np.exp(np_log_softmax(zt, t))
  m = beta * pt + (1 - beta) * ps
  jsd = beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)
  close(L.generalized_jsd(zs, zt, beta, t, where), np_mean(jsd, where))


def test_jsd_endpoints_are_the_kls_by_convention(case):
  zs, zt, _, t, where = case
  ls, lt = np_log_softmax(zs, t), np_log_softmax(zt, t)
  close(L.generalized_jsd(zs, zt, 0.0, t, where), np_mean(np_kl(lt, ls), where))
  close(L.generalized_jsd(zs, zt, 1.0, t, where), np_mean(np_kl(ls, lt), where))


def test_jsd_interior_tends_to_scaled_kls():
  """JSD(β) ≈ β·KL(T‖S) near 0 and ≈ (1−β)·KL(S‖T) near 1 (the endpoints are conventions)."""
  zs, zt = rand((8, 5), 1, 1.0), rand((8, 5), 2, 1.0)
  eps = 1e-4
  ls, lt = np_log_softmax(zs), np_log_softmax(zt)
  fwd, rev = np_kl(lt, ls).mean(), np_kl(ls, lt).mean()
  np.testing.assert_allclose(float(L.generalized_jsd(zs, zt, eps)) / eps, fwd, rtol=0.02)
  np.testing.assert_allclose(float(L.generalized_jsd(zs, zt, 1 - eps)) / eps, rev, rtol=0.02)


def test_hinton_formula_and_weights(case):
  zs, zt, y, t, where = case
  kl = np_mean(np_kl(np_log_softmax(zt, t), np_log_softmax(zs, t)), where)
  ref = 0.3 * np_ce(zs, y, where) + 0.7 * t * t * kl
  close(L.hinton(zs, zt, y, t, ce_weight=0.3, kd_weight=0.7, where=where), ref)
  # torchdistill's alpha weights the CE: KDLoss(alpha=a) == hinton(ce_weight=a, kd_weight=1-a)
  close(L.hinton(zs, zt, None, t, ce_weight=0.0, kd_weight=1.0, where=where), t * t * kl)
  # other divergences go through the same total; with_terms reports the parts
  rkl = np_mean(np_kl(np_log_softmax(zs, t), np_log_softmax(zt, t)), where)
  loss, terms = raw.hinton(jnp.asarray(zs), jnp.asarray(zt), y, t, 0.3, 0.7, where,
                           divergence=raw.reverse_kl, with_terms=True)
  close(loss, 0.3 * np_ce(zs, y, where) + 0.7 * t * t * rkl)
  close(terms["kd"], rkl)
  close(terms["ce"], np_ce(zs, y, where))


def np_dkd_terms(zs, zt, y, t):
  zs2, zt2, y2 = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]), y.reshape(-1)
  tck, nck = [], []
  for a, b, g in zip(zs2, zt2, y2):
    ps, pt = np.exp(np_log_softmax(a, t)), np.exp(np_log_softmax(b, t))
    bs, bt = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
    tck.append(t * t * (bt * np.log(bt / bs)).sum())
    keep = np.arange(len(a)) != g
    qs, qt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
    nck.append(t * t * (qt * np.log(qt / qs)).sum())
  return np.array(tck).reshape(y.shape), np.array(nck).reshape(y.shape)


def test_dkd_terms_and_total(case):
  zs, zt, y, t, where = case
  tck, nck = np_dkd_terms(zs, zt, y, t)
  jt, jn = L.dkd_terms(zs, zt, y, t)
  close(jt, tck)
  close(jn, nck)
  for epoch, factor in [(None, 1.0), (5.0, 0.25), (40.0, 1.0)]:
    ref = 1.5 * np_ce(zs, y, where) + factor * (0.5 * np_mean(tck, where) + 3.0 * np_mean(nck, where))
    got = L.dkd(zs, zt, y, alpha=0.5, beta=3.0, temperature=t, ce_weight=1.5, epoch=epoch,
                warmup_epochs=20.0, where=where)
    close(got, ref)


def test_dkd_decomposes_kd():
  """TCKD + (1 − p_t,g)·NCKD equals the classical KD (Zhao et al., Eq. 5)."""
  zs, zt = rand((16, 6), 7), rand((16, 6), 8)
  y = np.random.default_rng(9).integers(0, 6, 16)
  t = 2.0
  tck, nck = np_dkd_terms(zs, zt, y, t)
  pt_g = np.exp(np_log_softmax(zt, t))[np.arange(16), y]
  kd = t * t * np_kl(np_log_softmax(zt, t), np_log_softmax(zs, t))
  np.testing.assert_allclose(tck + (1 - pt_g) * nck, kd, rtol=1e-10)
  jt, jn = L.dkd_terms(zs, zt, y, t)
  close(np.asarray(jt) + (1 - pt_g) * np.asarray(jn), kd)


def test_dkd_gradients_finite():
  zs, zt = rand((8, 5), 1, scale=10.0), rand((8, 5), 2, scale=10.0)
  y = np.arange(8) % 5
  g = jax.jit(jax.grad(lambda z: raw.dkd(z, zt, y)))(jnp.asarray(zs))
  assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------ feature losses


def test_fitnets_with_regressor():
  fs, ft = rand((6, 4, 5), 1), rand((6, 4, 3), 2)        # [B, L, d_s] / [B, L, d_t]
  reg = L.init_regressor(jax.random.key(0), 5, 3)
  w, b = np.asarray(reg["kernel"], np.float64), np.asarray(reg["bias"], np.float64)
  where = rand_mask((6, 4), 3)
  per = 0.5 * ((ft - (fs.astype(np.float64) @ w + b)) ** 2).sum(-1)
  close(L.fitnets(fs, ft, reg, where), np_mean(per, where))
  close(L.fitnets(fs[:, 0], ft[:, 0], reg), per[:, 0].mean())


def np_rkd(s, t, where=None):
  n = len(s)
  w = np.ones(n, bool) if where is None else np.asarray(where)
  idx = np.flatnonzero(w)
  s, t = s[idx].reshape(len(idx), -1).astype(np.float64), t[idx].reshape(len(idx), -1).astype(np.float64)
  huber = lambda x: np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)

  def dist(x):
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return d / d[d > 0].mean()

  def ang(x):
    m = len(x)
    out = np.zeros((m, m, m))
    for j in range(m):
      for i in range(m):
        for k in range(m):
          if i == j or k == j:
            continue
          a, b = x[i] - x[j], x[k] - x[j]
          out[j, i, k] = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    return out

  return huber(dist(s) - dist(t)).mean(), huber(ang(s) - ang(t)).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_rkd_distance_and_angle(masked):
  s, t = rand((7, 4), 1, 1.0), rand((7, 2, 3), 2, 1.0)   # different feature dims
  where = rand_mask((7,), 5) if masked else None
  d_ref, a_ref = np_rkd(s, t, where)
  close(L.rkd_distance(s, t, where), d_ref)
  close(L.rkd_angle(s, t, where), a_ref)
  close(L.rkd(s, t, 1.0, 2.0, where), d_ref + 2.0 * a_ref)
  g = jax.jit(jax.grad(lambda x: raw.rkd(x, t, where=where)))(jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(g)))


def test_attention_transfer():
  s1, t1 = rand((5, 6, 4), 1), rand((5, 6, 9), 2)         # [B, L, C], channels differ
  s2, t2 = rand((5, 3, 3, 2), 3), rand((5, 3, 3, 7), 4)   # 2-D maps
  where = rand_mask((5,), 6)

  def at(f, p=2.0):
    a = (np.abs(f.astype(np.float64)) ** p).mean(-1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  per1 = ((at(s1) - at(t1)) ** 2).mean(-1)
  per2 = ((at(s2) - at(t2)) ** 2).mean(-1)
  close(L.attention_transfer([s1, s2], [t1, t2], 2.0, where), np_mean(per1, where) + np_mean(per2, where))
  per3 = ((at(s1, 3.0) - at(t1, 3.0)) ** 2).mean(-1)
  close(L.attention_transfer(s1, t1, 3.0), per3.mean())


def np_trg(s, t, tau, gw, cw, where):
  b, l = s.shape[:2]
  valid = np.ones((b, l), bool) if where is None else np.asarray(where)

  def rel_kl(xs, xt, groups):
    xs = xs / np.linalg.norm(xs, axis=-1, keepdims=True)
    xt = xt / np.linalg.norm(xt, axis=-1, keepdims=True)
    out = []
    for i in range(len(xs)):
      nb = [j for j in groups[i] if j != i]
      if not nb:
        out.append(0.0)
        continue
      a_s = np.array([xs[i] @ xs[j] for j in nb]) / tau
      a_t = np.array([xt[i] @ xt[j] for j in nb]) / tau
      ls, lt = np_log_softmax(a_s), np_log_softmax(a_t)
      out.append(np_kl(lt, ls))
    return np.array(out)

  ids = [(i, j) for i in range(b) for j in range(l) if valid[i, j]]
  flat_s = np.array([s[i, j] for i, j in ids], np.float64)
  flat_t = np.array([t[i, j] for i, j in ids], np.float64)
  everyone = [list(range(len(ids)))] * len(ids)
  graph = rel_kl(flat_s, flat_t, everyone).mean()
  same = [[k for k, (i2, _) in enumerate(ids) if i2 == i] for (i, _) in ids]
  ctx = rel_kl(flat_s, flat_t, same).mean()
  return gw * graph + cw * ctx


@pytest.mark.parametrize("masked", [False, True])
def test_trg_graph_and_context(masked):
  s, t = rand((3, 4, 5), 1), rand((3, 4, 6), 2)
  where = rand_mask((3, 4), 7) if masked else None
  close(L.trg(s, t, 0.5, 1.0, 0.7, where), np_trg(s, t, 0.5, 1.0, 0.7, where))
  close(L.trg(s, t, 0.2, 1.0, 0.0, where), np_trg(s, t, 0.2, 1.0, 0.0, where))
  g = jax.jit(jax.grad(lambda x: raw.trg(x, t, where=where)))(jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------ sparse top-k


def test_topk_against_dense_reference(case):
  zs, zt, _, t, where = case
  k = min(3, zs.shape[-1])
  idx, val = L.topk_from_logits(jnp.asarray(zt), k)
  idx, val = np.asarray(idx), np.asarray(val, np.float64)
  # dense reference: scatter softmax(top-k logits / T) into the vocabulary
  p = np.zeros(zs.shape, np.float64)
  lp_k = np_log_softmax(val, t)
  np.put_along_axis(p, idx, np.exp(lp_k), -1)
  ls = np_log_softmax(zs, t)
  ce = -(p * ls).sum(-1)
  kl = (p * (np.log(np.where(p > 0, p, 1.0)) - ls)).sum(-1)
  close(L.topk_cross_entropy(zs, idx, val.astype(np.float32), t, where), np_mean(ce, where))
  close(L.topk_kl(zs, idx, val.astype(np.float32), t, where), np_mean(kl, where))


def test_topk_full_vocab_is_the_dense_forward_kl(case):
  zs, zt, _, t, where = case
  idx, val = L.topk_from_logits(jnp.asarray(zt), zt.shape[-1])
  close(L.topk_kl(zs, idx, val, t, where),
        np_mean(np_kl(np_log_softmax(zt, t), np_log_softmax(zs, t)), where))


def test_topk_padding_entries_are_ignored():
  zs = rand((4, 9), 1)
  idx = np.array([[0, 3, -1], [1, 2, 5], [8, -1, -1], [4, 4 - 1, 7]], np.int32)
  val = rand((4, 3), 2)
  got = L.topk_cross_entropy(zs, idx, val)
  # rebuild per row by hand
  ls = np_log_softmax(zs)
  per = []
  for r in range(4):
    keep = idx[r] >= 0
    p = np.exp(np_log_softmax(val[r][keep]))
    per.append(-(p * ls[r, idx[r][keep]]).sum())
  close(got, np.mean(per))


def test_topk_never_builds_a_vocabulary_sized_teacher_tensor():
  """No value computed from the top-k (indices, logits) has the vocabulary's size."""
  v, k = 5003, 4
  zs, idx, val = jnp.zeros((2, 3, v)), jnp.zeros((2, 3, k), jnp.int32), jnp.zeros((2, 3, k))
  for fn in (raw.topk_kl, raw.topk_cross_entropy):
    jaxpr = jax.make_jaxpr(lambda a, b, c: fn(a, b, c, 2.0))(zs, idx, val).jaxpr
    tainted = set(jaxpr.invars[1:])
    for eqn in jaxpr.eqns:
      if any(not isinstance(i, jex.core.Literal) and i in tainted for i in eqn.invars):
        for o in eqn.outvars:
          tainted.add(o)
          assert v not in getattr(o.aval, "shape", ()), (eqn.primitive, o.aval)


# ------------------------------------------------------------------ multi-teacher mixing


def test_combine_logits_is_the_probability_mixture():
  z = rand((3, 6, 5), 1)
  w = np.random.default_rng(2).dirichlet(np.ones(3), 6).T.astype(np.float32)   # [K, B]
  for t in (1.0, 3.0):
    zbar = ensembles.combine_logits(jnp.asarray(z), jnp.asarray(w), t)
    ref = (w[..., None] * np.exp(np_log_softmax(z, t))).sum(0)
    close(np.exp(np_log_softmax(np.asarray(zbar), t)), ref)


def test_teacher_weight_rules():
  z = rand((3, 8, 4), 1)
  y = np.random.default_rng(2).integers(0, 4, 8)
  lp = np_log_softmax(z)
  ce = -np.take_along_axis(lp, np.broadcast_to(y[None, :, None], (3, 8, 1)), -1)[..., 0]
  close(ensembles.teacher_weights(z, None, "mean"), np.full((3, 8), 1 / 3))
  sm = np.exp(ce) / np.exp(ce).sum(0)
  close(ensembles.teacher_weights(z, y, "confidence"), (1 - sm) / 2)
  h = -(np.exp(lp) * lp).sum(-1)
  close(ensembles.teacher_weights(z, None, "entropy", 2.0), np.exp(-h / 2) / np.exp(-h / 2).sum(0))
  close(ensembles.teacher_weights(z, y, "min_ce"), np.eye(3)[ce.argmin(0)].T)
  close(ensembles.teacher_weights(z, None, "max_confidence"), np.eye(3)[lp.max(-1).argmax(0)].T)
  for rule in ("mean", "confidence", "entropy", "min_ce", "max_confidence"):
    np.testing.assert_allclose(np.asarray(ensembles.teacher_weights(z, y, rule)).sum(0), 1, rtol=1e-6)


def test_forgetting_and_greedy_selection():
  correct = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]], bool)
  np.testing.assert_allclose(ensembles.forgetting_scores(correct), [0.0, 0.25, 0.25])
  y = np.array([0, 1, 0, 1])
  probs = np.array([np.eye(2)[[0, 1, 1, 0]] * 0.8 + 0.1,    # 2 right
                    np.eye(2)[[0, 1, 0, 0]] * 0.8 + 0.1,    # 3 right
                    np.eye(2)[[1, 1, 1, 0]] * 0.8 + 0.1])   # final: 1 right
  members = ensembles.greedy_selection(probs, y)
  assert members[0] == 2 and 1 in members


# ------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_argument():
  zs, zt = rand((4, 5), 1), rand((4, 6), 2)
  y = np.zeros(4, np.int32)
  with pytest.raises(KfuseError, match="teacher_logits: vocabulary size 6"):
    raw.forward_kl(zs, zt)
  with pytest.raises(KfuseError, match="teacher_logits: shape"):
    raw.hinton(zs, rand((3, 5), 2), y)
  with pytest.raises(KfuseError, match="temperature"):
    raw.forward_kl(zs, zs, temperature=0.0)
  with pytest.raises(KfuseError, match="temperature"):
    raw.hinton(zs, zs, y, temperature=-1.0)
  with pytest.raises(KfuseError, match="kd_weight"):
    raw.hinton(zs, zs, y, kd_weight=-0.5)
  with pytest.raises(KfuseError, match="ce_weight"):
    raw.hinton(zs, zs, y, ce_weight=float("nan"))
  with pytest.raises(KfuseError, match="beta"):
    raw.generalized_jsd(zs, zs, beta=1.5)
  with pytest.raises(KfuseError, match="where"):
    raw.forward_kl(zs, zs, where=np.ones(3, bool))
  with pytest.raises(KfuseError, match="labels"):
    raw.cross_entropy(zs, np.zeros((4, 2), np.int32))
  with pytest.raises(KfuseError, match="topk_indices: index 9"):
    raw.topk_kl(zs, np.array([[9]] * 4, np.int32), np.zeros((4, 1), np.float32))
  with pytest.raises(KfuseError, match="topk_logits"):
    raw.topk_kl(zs, np.zeros((4, 2), np.int32), np.zeros((4, 3), np.float32))
  with pytest.raises(KfuseError, match="regressor"):
    raw.fitnets(rand((4, 3), 1), rand((4, 2), 2), raw.init_regressor(jax.random.key(0), 2, 2))
  with pytest.raises(KfuseError, match="teacher_features\\[0\\]: spatial"):
    raw.attention_transfer([rand((2, 4, 3), 1)], [rand((2, 5, 3), 2)])
  with pytest.raises(KfuseError, match="teacher_tokens"):
    raw.trg(rand((2, 4, 3), 1), rand((2, 5, 3), 2))
  with pytest.raises(KfuseError, match="combine"):
    ensembles.teacher_weights(rand((2, 4, 5), 1), rule="vote")
  with pytest.raises(KfuseError, match="labels"):
    ensembles.teacher_weights(rand((2, 4, 5), 1), rule="confidence")


def test_losses_jit_with_traced_hyperparameters():
  zs, zt = rand((4, 5), 1), rand((4, 5), 2)
  y = np.arange(4) % 5
  f = jax.jit(lambda t, b: raw.hinton(zs, zt, y, t) + raw.generalized_jsd(zs, zt, b, t))
  ls, lt = np_log_softmax(zs, 2.0), np_log_softmax(zt, 2.0)
  ps, pt = np.exp(ls), np.exp(lt)
  m = 0.3 * pt + 0.7 * ps
  jsd = (0.3 * (pt * np.log(pt / m)).sum(-1) + 0.7 * (ps * np.log(ps / m)).sum(-1)).mean()
  ref = 0.1 * np_ce(zs, y) + 0.9 * 4.0 * np_kl(lt, ls).mean() + jsd
  close(f(2.0, 0.3), ref)
