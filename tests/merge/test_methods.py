"""Golden values (SPEC §A.2 / §B.2.3 worked examples) and float64 NumPy references."""

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


# ------------------------------------------------------------ SPEC worked examples

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
  # SPEC §B.2.3, K=50: 3 entries kept for d1 (one more than requested), dis-sum / dis-mean.
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


def test_every_method_has_docstring_with_formula():
  for name in merge.names():
    m = merge.get_method(name)
    assert len(m.doc) > 40, name
