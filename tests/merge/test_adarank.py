"""AdaRank: all-ones masks + frozen λ = task arithmetic (float64 NumPy), pruned components
against a NumPy SVD, gradients vs central differences (float64), the straight-through
estimator's chain rule, one step of the protocol, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse.merge import adarank as R
from kfuse.tree import KfuseError
from tests.merge.test_subspace import np_iso_cts_components
from tests.merge.tiny_net import apply_fn, models as _models


def test_matrix_split():
  assert R.matrix_split("a/kernel", (64, 256)) == 1
  assert R.matrix_split("attn/query/kernel", (64, 4, 16)) == 1      # [64, 64]
  assert R.matrix_split("attn/out/kernel", (4, 16, 64)) == 2        # [64, 64]
  assert R.matrix_split("attn/query/bias", (4, 16)) is None         # biases keep their τ
  assert R.matrix_split("pos_embed", (1, 17, 64)) is None
  assert R.matrix_split("patch/kernel", (4, 4, 1, 64)) is None
  assert R.matrix_split("b", (5,)) is None


@pytest.mark.parametrize("straight_through", [True, False])
def test_all_ones_masks_and_frozen_lambda_are_task_arithmetic_float64(straight_through):
  base, experts = _models()
  lr = R.adarank(apply_fn, base="ta", straight_through=straight_through, temperature=0.01)
  state = lr.init(base, experts)
  assert state.lambdas.shape == (3, 4) and len(state.logits) == 2       # qkv and fc1 kernels
  got = R.merged(state, straight_through=straight_through, temperature=0.01)
  for m in ("qkv", "fc1"):
    for leaf in ("kernel", "bias"):
      b = np.asarray(base[m][leaf], np.float64)
      want = b + 0.3 * sum(np.asarray(e[m][leaf], np.float64) - b for e in experts)
      np.testing.assert_allclose(got[m][leaf], want, rtol=1e-5, atol=1e-5)


def test_pruned_components_and_cart_origin_float64():
  """B = 1[m > 0] keeps exactly the chosen rank-1 components of each τ_i (NumPy SVD);
  CART's origin is the experts' mean."""
  base, experts = _models()
  state = R.adarank(apply_fn, base="cart", init=1.0, initial_rank_ratio=0.5).init(base, experts)
  e = [np.asarray(x["fc1"]["kernel"], np.float64) for x in experts]         # [6, 3]
  mean = sum(e) / 3
  # logits in flatten order: fc1 [6, 3] (r = 3, ⌈0.5·3⌉ = 2 kept), then qkv
  np.testing.assert_array_equal(state.logits[0], np.float32([[0.1, 0.1, -0.1]] * 3))
  want = mean.copy()
  for ei in e:
    u, s, vt = np.linalg.svd(ei - mean, full_matrices=False)
    want += (u[:, :2] * s[:2]) @ vt[:2]
  got = R.merged(state)
  np.testing.assert_allclose(got["fc1"]["kernel"], want, rtol=1e-5, atol=1e-5)
  mb = sum(np.asarray(x["fc1"]["bias"], np.float64) for x in experts) / 3
  want_b = mb + sum(np.asarray(x["fc1"]["bias"], np.float64) - mb for x in experts)   # τ whole
  np.testing.assert_allclose(got["fc1"]["bias"], want_b, rtol=1e-5, atol=1e-5)
  # the 3-D DenseGeneral kernel [4, 2, 3] is the [4, 6] matrix, r = 4, ⌈0.5·4⌉ = 2 kept
  assert state.logits[1].shape == (3, 4)
  q = [np.asarray(x["qkv"]["kernel"], np.float64).reshape(4, 6) for x in experts]
  qm = sum(q) / 3
  want_q = qm + sum((lambda u, s, vt: (u[:, :2] * s[:2]) @ vt[:2])(*np.linalg.svd(qi - qm, full_matrices=False))
                    for qi in q)
  np.testing.assert_allclose(np.asarray(got["qkv"]["kernel"]).reshape(4, 6), want_q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tasks", [None, 2])
def test_gradient_matches_central_differences_float64(tasks):
  with jax.enable_x64(True):
    base, experts = _models(dtype=np.float64)
    fn = (lambda p, xb, t: apply_fn(p, xb) * (1.0 + t)) if tasks else apply_fn
    st = R.adarank(fn, tasks=tasks).init(base, experts)
    x = np.random.default_rng(1).normal(size=(2, 5, 4) if tasks else (5, 4))
    obj = jax.jit(R.objective_fn(fn, tasks))
    rng = np.random.default_rng(2)
    lam = jnp.asarray(rng.uniform(0, 0.6, size=(3, 4)))
    gates = [jnp.asarray(rng.uniform(0, 1, size=m.shape)) for m in st.logits]
    g_lam, g_gates = jax.grad(obj, argnums=(0, 1))(lam, gates, st.origin, st.parts, x)
    h = 1e-6

    def fd(f, a):
      out = np.zeros(a.shape)
      for idx in np.ndindex(*a.shape):
        e = np.zeros(a.shape)
        e[idx] = h
        out[idx] = (float(f(a + e)) - float(f(a - e))) / (2 * h)
      return out

    np.testing.assert_allclose(g_lam, fd(lambda l: obj(l, gates, st.origin, st.parts, x), lam),
                               rtol=1e-6, atol=1e-9)
    for j in range(len(gates)):
      f = lambda gj: obj(lam, [gj if k == j else gates[k] for k in range(len(gates))],
                         st.origin, st.parts, x)
      np.testing.assert_allclose(g_gates[j], fd(f, gates[j]), rtol=1e-6, atol=1e-9)


def test_straight_through_gradient_is_the_gate_chain_rule_float64():
  """∂L/∂m = ∂L/∂B |_{B = 1[m > 0]} · σ(m/T)(1 − σ(m/T)) / T, ∂L/∂B by central differences."""
  with jax.enable_x64(True):
    base, experts = _models(dtype=np.float64)
    T = 10.0
    st = R.adarank(apply_fn, initial_rank_ratio=0.5, temperature=T).init(base, experts)
    x = np.random.default_rng(1).normal(size=(5, 4))
    obj = jax.jit(R.objective_fn(apply_fn))
    logits = [jnp.asarray(np.random.default_rng(3).normal(0, 0.3, size=m.shape)) for m in st.logits]

    def loss(ls):
      gates = [jax.nn.sigmoid(m / T) + jax.lax.stop_gradient((m > 0).astype(m.dtype)
                                                               - jax.nn.sigmoid(m / T)) for m in ls]
      return obj(st.lambdas.astype(jnp.float64), gates, st.origin, st.parts, x)

    g = jax.grad(loss)(logits)
    hard = [np.asarray(m > 0, np.float64) for m in logits]
    h = 1e-6
    for j, m in enumerate(logits):
      dB = np.zeros(m.shape)
      for idx in np.ndindex(*m.shape):
        e = np.zeros(m.shape)
        e[idx] = h
        at = lambda d: float(obj(st.lambdas.astype(jnp.float64),
                                 [hard[k] + d if k == j else hard[k] for k in range(len(hard))],
                                 st.origin, st.parts, x))
        dB[idx] = (at(e) - at(-e)) / (2 * h)
      s = 1.0 / (1.0 + np.exp(-np.asarray(m) / T))
      np.testing.assert_allclose(g[j], dB * s * (1 - s) / T, rtol=1e-6, atol=1e-10)


def test_one_step_moves_lambdas_and_logits_by_adams_first_step():
  base, experts = _models()
  x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
  lr = R.adarank(apply_fn)
  state = lr.init(base, experts, {"x": x})
  new, metrics = lr.step(state, {"x": x}, jax.random.key(0))
  d_lam = np.abs(np.asarray(new.lambdas) - 0.3)
  d_m = np.abs(np.asarray(new.logits[0]) - np.float32(0.1))
  np.testing.assert_allclose(d_lam[d_lam > 1e-7], 1e-3, rtol=1e-3)
  np.testing.assert_allclose(d_m[d_m > 1e-7], 1e-3, rtol=1e-3)
  assert int(new.count) == 1 and int(metrics["kept"]) == 3 * (4 + 3)
  assert np.isfinite(float(metrics["loss"]))
  assert all(a is b for a, b in zip(jax.tree.leaves(new.parts), jax.tree.leaves(state.parts)))


def test_bad_input_one_line():
  base, experts = _models(2)
  with pytest.raises(KfuseError, match="did you mean 'cart'"):
    R.adarank(apply_fn, base="carts")
  with pytest.raises(KfuseError, match=r"initial_rank_ratio must be in \[0, 1\]"):
    R.adarank(apply_fn, initial_rank_ratio=1.5)
  with pytest.raises(KfuseError, match="no experts"):
    R.adarank(apply_fn).init(base, [])
  with pytest.raises(KfuseError, match="missing key"):
    R.adarank(apply_fn).init(base, [experts[0], {"fc1": experts[1]["fc1"]}])
  bad = jax.tree.map(lambda a: a, experts[1])
  bad["fc1"]["kernel"] = np.full_like(bad["fc1"]["kernel"], np.nan)
  with pytest.raises(KfuseError, match=r"expert\[1\]"):
    R.adarank(apply_fn).init(base, [experts[0], bad])
  lr = R.adarank(lambda p, x, t: apply_fn(p, x), tasks=2)
  with pytest.raises(KfuseError, match=r"'x' must be \[T=2, B, \.\.\.\]"):
    lr.init(base, experts, {"x": np.ones((3, 4), np.float32)})
  for e in (KfuseError,):
    try:
      R.adarank(apply_fn, base="x")
    except e as err:
      assert "\n" not in str(err)


class _Body(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(5, name="fc")(x))


class _Model(nn.Module):
  """backbone + head, as the merging benchmark's models (`models.with_params`)."""
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3, name="head")(_Body(name="backbone")(x))


def _bench_inputs():
  """Two random experts of `_Model`'s backbone and 6 unlabeled inputs per task, as the
  merging benchmark hands them to a data-informed row."""
  from kfuse.bench import merge_bench as MB
  r = np.random.default_rng(0)
  v = _Model().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  pre = jax.tree.map(np.asarray, v["backbone"])
  experts = [jax.tree.map(lambda a: a + 0.3 * r.normal(size=a.shape).astype(np.float32), pre)
             for _ in range(2)]
  tasks = ["a", "b"]
  data = {t: MB.TaskData(unlabeled=r.normal(size=(6, 4)).astype(np.float32),
                         x_val=np.zeros((0, 4), np.float32), y_val=np.zeros((0,), np.int32))
          for t in tasks}
  inputs = MB.MergeInputs(tasks=tasks, pretrained=pre, experts=experts,
                          heads={t: v["head"] for t in tasks}, model=lambda t: _Model(),
                          data=data, key=jax.random.key(0))
  return pre, experts, inputs


def test_benchmark_row_zero_steps_is_task_arithmetic_and_logs_the_budget():
  from kfuse.bench import informed_rows as IR
  from kfuse.bench import merge_bench as MB
  pre, experts, inputs = _bench_inputs()
  fn = MB.MERGERS.get("adarank_ta").fn
  got = fn(inputs, {"steps": 0})
  want = np.asarray(pre["fc"]["kernel"], np.float64) + 0.3 * sum(
      np.asarray(e["fc"]["kernel"], np.float64) - np.asarray(pre["fc"]["kernel"], np.float64)
      for e in experts)
  np.testing.assert_allclose(got["fc"]["kernel"], want, rtol=1e-5, atol=1e-6)
  fn(inputs, {"steps": 2, "log_every": 1})
  log = inputs.log[-1]
  assert log["steps"] == 2 and log["inputs_seen_per_task"] == 32 and len(log["trajectory"]) == 3
  assert log["unlabeled_per_task"] == {"a": 6, "b": 6} and log["labeled_per_task"] == 0
  assert log["total_components"] == [8] and log["trajectory"][0]["kept_fraction"] == 1.0


# ------------------------------------------------------------------ AdaRank on Iso-CTS


def _iso_tree(n=3, seed=0):
  """Flax-layout params: a Dense kernel [in, out], an attention query kernel [in, H, D], biases."""
  r = np.random.default_rng(seed)
  base = {"attn": {"query": {"kernel": r.normal(size=(6, 2, 3)), "bias": r.normal(size=(2, 3))}},
          "fc1": {"kernel": r.normal(size=(6, 5)), "bias": r.normal(size=(5,))}}
  base = jax.tree.map(lambda a: a.astype(np.float32), base)
  experts = [jax.tree.map(lambda a: a + (0.3 * r.normal(size=a.shape)).astype(np.float32), base)
             for _ in range(n)]
  return base, experts


def test_iso_cts_base_masks_the_iso_cts_components_float64():
  """Frozen λ = 1 with every component kept is Iso-CTS; a pruned component is removed exactly
  (float64 NumPy restatement of Iso-CTS, PyTorch [out, in] view of the Flax kernels)."""
  base, experts = _iso_tree()
  lr = R.adarank(apply_fn, base="iso_cts")
  state = lr.init(base, experts)
  assert state.lambdas.shape == (1, 4)                      # one λ per tensor
  assert [m.shape for m in state.logits] == [(1, 6), (1, 5)]   # query [6, 6], fc1 [5, 6]: r
  np.testing.assert_array_equal(state.logits[0], np.full((1, 6), 0.1, np.float32))
  logits = [np.array(m) for m in state.logits]
  logits[1][0, [0, 3]] = -0.1                                # prune fc1 components 0 and 3
  pruned = state._replace(logits=tuple(jnp.asarray(m) for m in logits))
  f64 = lambda a: np.asarray(a, np.float64)
  for st, drop in ((state, []), (pruned, [0, 3])):
    got = R.merged(st)
    # fc1: Flax [6, 5] = [in, out] -> PyTorch [5, 6]
    tv = np.stack([f64(e["fc1"]["kernel"]).T - f64(base["fc1"]["kernel"]).T for e in experts])
    u, s, vt = np_iso_cts_components(tv)
    keep = np.setdiff1d(np.arange(5), drop)
    want = f64(base["fc1"]["kernel"]) + (s * u[:, keep] @ vt[keep]).T
    np.testing.assert_allclose(got["fc1"]["kernel"], want, rtol=1e-5, atol=1e-5)
    # attention query [in 6, H 2, D 3] -> PyTorch [H·D 6, in 6], every component kept
    tv = np.stack([(f64(e["attn"]["query"]["kernel"]) - f64(base["attn"]["query"]["kernel"]))
                   .reshape(6, 6).T for e in experts])
    u, s, vt = np_iso_cts_components(tv)
    want = f64(base["attn"]["query"]["kernel"]) + (s * u @ vt).T.reshape(6, 2, 3)
    np.testing.assert_allclose(got["attn"]["query"]["kernel"], want, rtol=1e-5, atol=1e-5)
    for m, b in (("fc1", got["fc1"]["bias"]), ("attn", got["attn"]["query"]["bias"])):
      leaf = base[m] if m == "fc1" else base[m]["query"]
      exp = [e[m] if m == "fc1" else e[m]["query"] for e in experts]
      want_b = f64(leaf["bias"]) + sum(f64(e["bias"]) - f64(leaf["bias"]) for e in exp) / 3
      np.testing.assert_allclose(b, want_b, rtol=1e-5, atol=1e-6)


def test_iso_cts_base_one_step_and_lambda_gradient_float64():
  """The shared AdaMerging step moves λ and the logits by Adam's first step (lr 1e-3); ∂L/∂λ of
  the Iso-CTS parametrisation matches central differences (float64)."""
  base, experts = _models()
  x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
  lr = R.adarank(apply_fn, base="iso_cts")
  st = lr.init(base, experts, {"x": x})
  new, metrics = lr.step(st, {"x": x})
  d_lam = np.abs(np.asarray(new.lambdas) - 1.0)
  np.testing.assert_allclose(d_lam[d_lam > 1e-7], 1e-3, rtol=1e-3)
  assert int(metrics["kept"]) == 3 and int(new.count) == 1   # fc1 [6, 3] -> [3, 6]: r = 3
  with jax.enable_x64(True):
    base, experts = _models(dtype=np.float64)
    st = R.adarank(apply_fn, base="iso_cts").init(base, experts)
    obj = jax.jit(R.objective_fn(apply_fn))
    gates = [jnp.asarray(np.random.default_rng(2).uniform(0, 1, size=m.shape)) for m in st.logits]
    lam = jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.5, size=(1, 4)))
    g = jax.grad(obj)(lam, gates, st.origin, st.parts, x.astype(np.float64))
    h, fd = 1e-6, np.zeros((1, 4))
    for j in range(4):
      e = np.zeros((1, 4))
      e[0, j] = h
      fd[0, j] = (float(obj(lam + e, gates, st.origin, st.parts, x.astype(np.float64)))
                  - float(obj(lam - e, gates, st.origin, st.parts, x.astype(np.float64)))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_iso_cts_bad_fraction_and_known_bases():
  with pytest.raises(KfuseError, match=r"common_space_fraction must be in \(0, 1\]"):
    R.adarank(apply_fn, base="iso_cts", common_space_fraction=0.0)
  with pytest.raises(KfuseError, match="known: ta, cart, iso_cts"):
    R.adarank(apply_fn, base="isocts")


def test_benchmark_row_iso_cts_zero_steps_is_iso_cts():
  from kfuse.bench import informed_rows as IR  # noqa: F401  (registers the rows)
  from kfuse.bench import merge_bench as MB
  pre, experts, inputs = _bench_inputs()
  got = MB.MERGERS.get("adarank_iso_cts").fn(inputs, {"steps": 0})
  f64 = lambda a: np.asarray(a, np.float64)
  tv = np.stack([f64(e["fc"]["kernel"]).T - f64(pre["fc"]["kernel"]).T for e in experts])
  u, s, vt = np_iso_cts_components(tv)
  np.testing.assert_allclose(got["fc"]["kernel"], f64(pre["fc"]["kernel"]) + (s * u @ vt).T,
                             rtol=1e-5, atol=1e-6)
  log = inputs.log[-1]
  assert log["total_components"] == [4] and log["steps"] == 0
  # r = 4, T = 2, f = 0.8: k_c = 4 - 2·round(0.5) = 4, k_t = 0 (Iso-CTS's split)
  assert log["total_per_block"] == [0, 0, 4] and log["kept_per_block"] == [0, 0, 4]


def test_iso_cts_blocks_counts_each_task_block_and_the_common_block():
  from kfuse.bench import informed_rows as IR
  # r = 9, T = 2, f = 0.8: k_c = 9 - 2·round((9 - 7)/2) = 7, k_t = 1: columns [t1, t2, c × 7]
  a = np.full((1, 9), 0.1, np.float32)
  a[0, [1, 5, 8]] = -0.1
  # r = 5, T = 2: k_c = 5 - 2·round((5 - 4)/2) = 5 (round half to even), k_t = 0
  b = np.full((1, 5), 0.1, np.float32)
  b[0, 0] = -0.1
  got = IR.iso_cts_blocks([a, b], 2, 0.8)
  assert got["total_per_block"] == [1, 1, 12] and got["kept_per_block"] == [1, 0, 9]
