"""Golden values (mergekit / FusionBench worked examples) and float64 NumPy references."""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import merge
from kfuse.tree import KfuseError

D1 = np.array([0.4, -0.1, 0.3, -0.05], np.float32)
D2 = np.array([-0.5, -0.3, 0.1, 0.6], np.float32)
BASE = {"w": jnp.zeros(4)}
E1, E2 = {"w": jnp.asarray(D1)}, {"w": jnp.asarray(D2)}


def run(method, experts=(E1, E2), base=BASE, **params):
  return np.asarray(merge.merge(method, list(experts), base, params=params,
                                key=jax.random.key(0))["w"])


# ------------------------------------------------- worked examples (mergekit, FusionBench)

def test_ties_worked_example_equal_weights():
  np.testing.assert_allclose(run("ties", density=0.5), [-0.5, 0, 0.3, 0.6], atol=1e-7)


def test_ties_weights_change_the_election():
  np.testing.assert_allclose(run("ties", density=0.5, weight=[2.0, 1.0]), [0.4, 0, 0.3, 0.6],
                             atol=1e-7)


def test_ties_count_rule_stage_composition():
  recipe = merge.chain(merge.stages.task_vectors(), merge.stages.trim_magnitude(),
                       merge.stages.weigh(), merge.stages.elect_sign("count"),
                       merge.stages.combine(normalize=True), merge.stages.scale(),
                       merge.stages.add_base())
  st = merge.MergeState(base=jnp.zeros(4), values=jnp.stack([D1, D2]),
                        weights=jnp.ones(2), hp={"k": jnp.array([2, 2]), "lambda": jnp.array(1.0)})
  np.testing.assert_allclose(recipe(st).result, [0.4, 0, 0.3, 0.6], atol=1e-7)


def test_ties_paper_fusionbench_example():
  # FusionBench ties_merging, K=50: 3 entries kept for d1 (one more than requested),
  # dis-sum / dis-mean.
  np.testing.assert_allclose(run("ties_paper", k=0.5, **{"lambda": 1.0}), [-0.5, -0.4, 0.3, 0.6],
                             atol=1e-7)
  np.testing.assert_allclose(run("ties_paper", k=0.5, disjoint="mean", **{"lambda": 1.0}),
                             [-0.5, -0.2, 0.3, 0.6], atol=1e-7)


def test_dare_rescale_l1_vs_inverse():
  delta = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  keep = jnp.array([[True, False, True, False]])
  st = merge.MergeState(base=jnp.zeros(4), values=delta, weights=jnp.ones(1),
                        hp={"density": jnp.array([0.5])})
  from kfuse.merge.stages import _apply_mask
  np.testing.assert_allclose(_apply_mask(st, keep, "l1").values[0], [2.5, 0, 7.5, 0])
  np.testing.assert_allclose(_apply_mask(st, keep, "inverse").values[0], [2, 0, 6, 0])


def test_all_zero_column_stays_zero():
  out = run("ties", density=0.5)
  assert out[1] == 0.0


# ------------------------------------------------------------ float64 references

rng = np.random.default_rng(0)
B64 = rng.normal(size=(6, 5))
X64 = B64[None] + rng.normal(size=(3, 6, 5)) * rng.uniform(0.1, 2, size=(3, 1, 1))


def _m(method, n=3, base=True, **params):
  ex = [{"w": jnp.asarray(X64[i], jnp.float32)} for i in range(n)]
  b = {"w": jnp.asarray(B64, jnp.float32)} if base else None
  return np.asarray(merge.merge(method, ex, b, params=params, key=jax.random.key(1),
                                layout="torch")["w"], np.float64)


def test_linear_reference():
  w = np.array([0.2, 0.5, 0.3])
  ref = np.tensordot(w, X64, 1) / w.sum()
  np.testing.assert_allclose(_m("linear", base=False, weight=list(w)), ref, rtol=1e-5)


def test_task_arithmetic_reference():
  w = np.array([1.0, 0.5, -0.3])
  ref = B64 + 0.7 * np.tensordot(w, X64 - B64, 1)
  np.testing.assert_allclose(_m("task_arithmetic", weight=list(w), **{"lambda": 0.7}), ref,
                             rtol=1e-5, atol=1e-5)


def test_ties_reference_float64():
  dens = 0.4
  d = X64 - B64
  k = int(dens * d[0].size)
  trimmed = np.zeros_like(d)
  for i in range(3):
    flat = np.abs(d[i]).ravel()
    idx = np.argsort(-flat, kind="stable")[:k]
    m = np.zeros(flat.size, bool)
    m[idx] = True
    trimmed[i] = d[i] * m.reshape(d[i].shape)
  s = np.where(trimmed.sum(0) >= 0, 1, -1)
  mask = np.sign(trimmed) == s
  ref = B64 + (trimmed * mask).sum(0) / np.where(mask.sum(0) == 0, 1, mask.sum(0))
  np.testing.assert_allclose(_m("ties", density=dens), ref, rtol=1e-5, atol=1e-5)


def test_slerp_reference():
  a, b, t = B64.ravel(), X64[0].ravel(), 0.3
  om = np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))
  ref = (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)
  np.testing.assert_allclose(_m("slerp", n=1, t=t).ravel(), ref, rtol=1e-5)


def test_slerp_endpoints():
  np.testing.assert_allclose(_m("slerp", n=1, t=0.0), B64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_m("slerp", n=1, t=1.0), X64[0], rtol=1e-5, atol=1e-6)


def test_model_stock_reference():
  off = (X64 - B64).reshape(3, -1)
  cs = [off[i] @ off[j] / np.linalg.norm(off[i]) / np.linalg.norm(off[j])
        for i in range(3) for j in range(i + 1, 3)]
  c = np.mean(cs)
  t = 3 * c / (1 + 2 * c)
  ref = t * X64.mean(0) + (1 - t) * B64
  np.testing.assert_allclose(_m("model_stock"), ref, rtol=1e-5, atol=1e-6)


def test_karcher_two_points_is_geodesic_midpoint():
  # For two points the Karcher mean direction is the normalised sum of the units.
  a, b = X64[0].ravel(), X64[1].ravel()
  ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
  u = (ua + ub) / np.linalg.norm(ua + ub)
  ref = 0.5 * (np.linalg.norm(a) + np.linalg.norm(b)) * u
  np.testing.assert_allclose(_m("karcher", n=2, base=False).ravel(), ref, rtol=1e-4)


def test_sce_reference():
  tv = X64 - B64
  var = tv.var(0)
  k = int(np.count_nonzero(var) * 0.5)
  sel = np.zeros(var.size, bool)
  sel[np.argsort(-var.ravel(), kind="stable")[:k]] = True
  tv = tv * sel.reshape(var.shape)
  s = np.where(tv.sum(0) >= 0, 1, -1)
  erase = (np.sign(tv) == s).astype(float)
  w = (tv ** 2).reshape(3, -1).mean(1)
  w = w / w.sum()
  ew = w[:, None, None] * erase
  ref = B64 + (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)
  np.testing.assert_allclose(_m("sce", select_topk=0.5), ref, rtol=1e-5, atol=1e-5)


def test_ram_reference():
  tv = X64 - B64
  tv[0, :2] = 0.0
  tv[1, :3] = 0.0
  ex = B64[None] + tv
  nz = np.abs(tv) > 1e-5
  c = nz.sum(0)
  ref = B64 + (tv * nz * (c == 1) + tv * nz * (c > 1) / np.maximum(c, 1)).sum(0)
  out = merge.merge("ram", [{"w": jnp.asarray(e, jnp.float32)} for e in ex],
                    {"w": jnp.asarray(B64, jnp.float32)})["w"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_nearswap_reference():
  t = 0.5
  w = np.clip(t / np.maximum(np.abs(B64 - X64[0]), 1e-6), 0, 1)
  np.testing.assert_allclose(_m("nearswap", n=1, t=t), w * X64[0] + (1 - w) * B64, rtol=1e-5)


def test_breadcrumbs_keeps_band_below_outliers():
  d = np.arange(1, 101, dtype=np.float32)  # |δ| = 1..100
  out = merge.merge("breadcrumbs", [{"w": jnp.asarray(d)}], {"w": jnp.zeros(100)},
                    params={"density": 0.3, "gamma": 0.05})["w"]
  kept = np.nonzero(np.asarray(out))[0] + 1
  np.testing.assert_array_equal(kept, np.arange(66, 96))  # drop top 5, keep next 30


def test_varm_weights():
  out = _m("varm")
  v = ((X64 - B64) ** 2).reshape(3, -1).mean(1)
  w = v / v.sum()
  np.testing.assert_allclose(out, np.tensordot(w, X64, 1), rtol=1e-5)


def test_task_negation_and_wise_ft():
  np.testing.assert_allclose(_m("task_negation", n=1), 2 * B64 - X64[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_m("wise_ft", n=1, alpha=0.25), 0.75 * B64 + 0.25 * X64[0],
                             rtol=1e-5, atol=1e-6)


def test_layer_swap_top_layers():
  base = {f"layers_{i}": {"w": jnp.zeros(2)} for i in range(4)}
  other = {f"layers_{i}": {"w": jnp.ones(2)} for i in range(4)}
  out = merge.merge("layer_swap", [other], base, params={"num_layers": 2, "side": "top"})
  assert [float(out[f"layers_{i}"]["w"][0]) for i in range(4)] == [0, 0, 1, 1]


# ------------------------------------ float64 references: spherical, RAM+, arcee, sparsifiers
#
# Each reference below re-derives the method from its paper / mergekit 0.1.5 definition in NumPy
# float64. kfuse computes in float32 (unit roundoff 6e-8); on these 30..400-entry tensors the
# accumulated relative error stays below ~1e-6, so rtol = atol = 1e-5 leaves a 10x margin while
# still catching any wrong term (those move the result by >= 1e-2).

TOL = dict(rtol=1e-5, atol=1e-5)


def _slerp64(t, v0, v1):
  """Slerp of the vectors along the last axis (mergekit nuslerp: unit norms clamped at 1e-7)."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
  cos = np.clip(np.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)
  th = np.arccos(cos)
  assert np.all(np.sin(th) > 1e-3)  # not the colinear (lerp) branch
  return (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)


@pytest.mark.parametrize("flatten,row_wise,base", [(True, False, True), (True, False, False),
                                                   (False, False, True), (False, True, False)])
def test_nuslerp_reference(flatten, row_wise, base):
  w = np.array([0.3, 0.9])
  t = w[1] / w.sum()
  v0, v1 = (X64[0] - B64, X64[1] - B64) if base else (X64[0], X64[1])
  if flatten:
    ref = _slerp64(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
  elif row_wise:  # mergekit: vectors along dim 0 of the PyTorch [out, in] tensor
    ref = _slerp64(t, v0.T, v1.T).T
  else:  # vectors along dim -1
    ref = _slerp64(t, v0, v1)
  if base:
    ref = B64 + ref
  out = _m("nuslerp", n=2, base=base, weight=list(w), nuslerp_flatten=flatten,
           nuslerp_row_wise=row_wise)
  np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("base", [True, False])
def test_multislerp_reference(base):
  w = np.array([0.5, 1.5, 1.0])
  x = (X64 - B64 if base else X64).reshape(3, -1)
  wn = w / w.sum()
  norms = np.linalg.norm(x, axis=1)
  u = x / norms[:, None]
  mu = wn @ u
  mu /= np.linalg.norm(mu)
  tang = wn @ (u - (u @ mu)[:, None] * mu[None])  # tangent space at the weighted mean direction
  tn = np.linalg.norm(tang)
  ref = (np.cos(tn) * mu + np.sin(tn) * tang / tn) * (wn @ norms)  # exponential map, mean norm
  ref = ref.reshape(B64.shape) + (B64 if base else 0)
  np.testing.assert_allclose(_m("multislerp", base=base, weight=list(w)), ref, **TOL)


def test_ramplus_tl_reference():
  r_, alpha, eps = 0.5, 2.5, 1e-5  # ρ = shared/unique = 3, 15/ε, 2: clipped and unclipped
  tv = X64 - B64
  tv[0, :2] = 0.0   # model 0 unchanged on rows 0-1
  tv[1, 1:4] = 0.0  # model 1 unchanged on rows 1-3: row 1 changed by model 2 only
  tv[2, 3:] = 0.0   # model 2 unchanged on rows 3-5
  act = np.abs(tv) > eps
  cnt = act.sum(0)
  shared = (act & (cnt > 1)).reshape(3, -1).sum(1)
  unique = (act & (cnt == 1)).reshape(3, -1).sum(1)
  lam = 1 + r_ * np.clip(shared / np.maximum(unique, eps), 0, alpha)
  assert len(set(np.round(lam, 6))) > 1  # the per-model factors differ: a wrong count shows
  merged = (lam[:, None, None] * tv * act * (cnt == 1)).sum(0) + (tv * act * (cnt > 1)).sum(0) \
      / np.maximum(cnt, 1)
  out = merge.merge("ramplus_tl", [{"w": jnp.asarray(B64 + tv[i], jnp.float32)} for i in range(3)],
                    {"w": jnp.asarray(B64, jnp.float32)},
                    params={"r": r_, "alpha": alpha, "epsilon": eps}, layout="torch")["w"]
  np.testing.assert_allclose(out, B64 + merged, **TOL)


def test_arcee_fusion_reference():
  r = np.random.default_rng(7)
  b = r.normal(size=(16, 24))
  x = b + r.standard_t(3, size=b.shape) * 0.3
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(
      -1, keepdims=True)
  p, q = sm(x) + 1e-8, sm(b) + 1e-8
  imp = np.abs(x - b) * np.sum(p * np.log(p / q), -1, keepdims=True)  # |δ|·KL(p‖q) per row
  srt = np.sort(imp.ravel())
  q1, med, q3 = (srt[int(f * (srt.size - 1))] for f in (0.25, 0.5, 0.75))
  thr = med + 1.5 * (q3 - q1)
  keep = imp >= thr
  assert 0 < keep.sum() < keep.size // 4  # a real cut: some outliers kept, most entries not
  assert np.min(np.abs(imp - thr)) > 1e-4 * thr  # no entry within float32 noise of the cut
  out = merge.merge("arcee_fusion", [{"w": jnp.asarray(x, jnp.float32)}],
                    {"w": jnp.asarray(b, jnp.float32)}, key=jax.random.key(0), layout="torch")["w"]
  np.testing.assert_allclose(out, np.where(keep, x, b), **TOL)


def _consensus64(trimmed, w, normalize):
  """TIES sum election on weighted task vectors (ties to +; zeros never agree), then mix."""
  wd = w[:, None, None] * trimmed
  s = np.where(wd.sum(0) >= 0, 1.0, -1.0)
  m = np.sign(wd) == s
  mixed = (wd * m).sum(0)
  if not normalize:
    return mixed
  div = (w[:, None, None] * m).sum(0)
  return mixed / np.where(div == 0, 1, div)


def test_breadcrumbs_ties_reference():
  dens, gamma, lam = 0.5, 0.1, 0.8
  w = np.array([1.0, 0.5, 0.8])
  d = X64 - B64
  n = d[0].size
  n_top, target = int(gamma * n), int(dens * n)  # 3 outliers dropped, 15 entries kept
  n_bot = n - target - n_top
  trimmed = np.zeros_like(d)
  for i in range(3):
    order = np.argsort(np.abs(d[i]).ravel(), kind="stable")  # ascending |δ|
    keep = np.zeros(n, bool)
    keep[order[n_bot:n - n_top]] = True
    trimmed[i] = d[i] * keep.reshape(d[i].shape)
  ref = B64 + lam * _consensus64(trimmed, w, normalize=False)
  out = _m("breadcrumbs_ties", density=dens, gamma=gamma, weight=list(w), **{"lambda": lam})
  np.testing.assert_allclose(out, ref, **TOL)


def _della64(d, keep, w):
  """DELLA after its mask: L1 rescale per model, TIES sum election, weighted disjoint mean."""
  masked = d * keep
  l1 = np.abs(d).reshape(3, -1).sum(1) / np.abs(masked).reshape(3, -1).sum(1)
  return _consensus64(masked * l1[:, None, None], w, normalize=True)


def test_della_reference_density_one_is_deterministic():
  # density 1: every entry kept whatever the draw, rescale factor 1 -> weighted TIES disjoint mean
  w = np.array([1.0, 0.4, 0.7])
  d = X64 - B64
  ref = B64 + _della64(d, np.ones_like(d), w)
  np.testing.assert_allclose(_m("della", density=1.0, weight=list(w)), ref, **TOL)


def test_della_reference_with_the_documented_key_derivation():
  """The keep masks are re-drawn from the documented derivation: the tensor key is
  fold_in(key, crc32(name)), split into one key per model, and entry j of model i is kept
  when uniform < p_keep (jax.random.bernoulli). Ranks, p_keep, the L1 rescale, the sign
  election and the disjoint mean are float64 NumPy."""
  dens, eps = 0.5, 0.3
  w = np.array([1.0, 0.4, 0.7])
  d = X64 - B64  # PyTorch [out=6, in=5]: DELLA ranks along dim 1 (each row of 5)
  rank = np.argsort(np.argsort(np.abs(d), axis=2, kind="stable"), axis=2)
  p_keep = (dens - eps) + 2 * eps * rank / (d.shape[2] - 1)  # 0.2 .. 0.8 by |δ| rank
  tkey = jax.random.fold_in(jax.random.key(1), zlib.crc32(b"w") & 0x7FFFFFFF)
  keys = jax.random.split(tkey, 3)
  keep = np.stack([np.asarray(jax.random.bernoulli(keys[i], jnp.asarray(p_keep[i], jnp.float32)))
                   for i in range(3)]).astype(np.float64)
  assert 0.3 < keep.mean() < 0.7 and keep.min(axis=(1, 2)).max() == 0  # every model drops some
  ref = B64 + _della64(d, keep, w)
  out = _m("della", density=dens, epsilon=eps, weight=list(w))
  np.testing.assert_allclose(out, ref, **TOL)


def test_della_keep_probability_rises_with_rank():
  """Statistical moment of the MagPrune draw: the kept fraction at |δ| rank r along a row is
  p_keep(r) = (d−ε) + 2ε·r/(m−1). 4000 rows give a standard error below 0.008 per rank."""
  dens, eps, m = 0.5, 0.3, 11
  r = np.random.default_rng(4)
  d = r.normal(size=(4000, m)).astype(np.float32)
  out = np.asarray(merge.merge("della_linear", [{"w": jnp.asarray(d)}], {"w": jnp.zeros_like(d)},
                               params={"density": dens, "epsilon": eps}, key=jax.random.key(9),
                               layout="torch")["w"])
  rank = np.argsort(np.argsort(np.abs(d), axis=1), axis=1)
  kept = np.array([(out[rank == k] != 0).mean() for k in range(m)])
  np.testing.assert_allclose(kept, (dens - eps) + 2 * eps * np.arange(m) / (m - 1), atol=0.03)


# ------------------------------------------------------------ random methods: statistics

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear"])
def test_dare_della_keep_fraction_and_l1(method):
  r = np.random.default_rng(3)
  d = r.standard_t(3, size=(64, 128)).astype(np.float32)
  out = merge.merge(method, [{"w": jnp.asarray(d)}], {"w": jnp.zeros_like(d)},
                    params={"density": 0.3, "epsilon": 0.1} if "della" in method else {"density": 0.3},
                    key=jax.random.key(5))["w"]
  out = np.asarray(out)
  assert abs((out != 0).mean() - 0.3) < 0.02
  np.testing.assert_allclose(np.abs(out).sum(), np.abs(d).sum(), rtol=1e-4)


def test_random_methods_need_a_key():
  with pytest.raises(KfuseError, match="key"):
    merge.merge("dare_linear", [E1], BASE, params={"density": 0.5})


def test_random_methods_reproducible_from_key():
  a = merge.merge("dare_ties", [E1, E2], BASE, params={"density": 0.5}, key=jax.random.key(3))
  b = merge.merge("dare_ties", [E1, E2], BASE, params={"density": 0.5}, key=jax.random.key(3))
  np.testing.assert_array_equal(a["w"], b["w"])


# A formula states an equation or inequality; a reference is an arXiv id, an author list, a
# venue/author with its year, or the reference implementation's address.
FORMULA = re.compile(r"[=≥≤]")
REFERENCE = re.compile(r"arXiv:\d{4}\.\d{4,5}|et al\.|https?://\S+|"
                       r"(?:ICML|ICLR|NeurIPS|ECCV|CVPR|EMNLP|SIGGRAPH)\s+(?:19|20)\d{2}|"
                       r"[A-Z][a-z]+,\s+(?:19|20)\d{2}\b|\((?:19|20)\d{2}\)")


def test_every_method_doc_states_a_formula_and_a_reference():
  problems = []
  for name in merge.names():
    doc = merge.get_method(name).doc
    if not FORMULA.search(doc):
      problems.append(f"{name}: no formula (no '=', '≥' or '≤')")
    if not REFERENCE.search(doc):
      problems.append(f"{name}: no paper / reference")
    if "SPEC" in doc:
      problems.append(f"{name}: cites an internal note instead of the paper")
  assert not problems, problems


def test_doc_checks_reject_vague_docs():
  assert not FORMULA.search("NuSLERP: slerp of two models over the flattened tensor.")
  assert not REFERENCE.search("Simple average (uniform soup) (FusionBench SimpleAverage).")
  assert REFERENCE.search('Goddard et al., "MergeKit", arXiv:2403.13257')
