"""Property tests: identical experts, order symmetry, linearity, jit parity, no recompiles."""

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from kfuse import merge
from kfuse.tree import KfuseError

# averaging methods: N copies of θ merge to θ (params make them averages)
AVERAGING = {
    "linear": {}, "simple_average": {}, "ties": {"density": 1.0},
    "task_arithmetic": {"normalize": True}, "model_stock": {}, "karcher": {},
    "multislerp": {}, "sce": {}, "ram": {}, "ramplus_tl": {}, "varm": {},
    "ties_paper": {"k": 1.0, "lambda": 1.0, "disjoint": "mean"}, "della": {"density": 1.0},
}
SYMMETRIC = {
    "linear": {}, "simple_average": {}, "task_arithmetic": {}, "ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1}, "model_stock": {}, "karcher": {},
    "multislerp": {}, "sce": {"select_topk": 0.5}, "ram": {"epsilon": 0.05},
    "ramplus_tl": {"epsilon": 0.05}, "varm": {}, "ties_paper": {"k": 0.3},
}

floats = st.floats(-3, 3, allow_nan=False, width=32)
# few distinct shapes: every new shape is a new XLA compilation
arrays = hnp.arrays(np.float32, st.sampled_from([(3, 4), (2, 5)]), elements=floats)


def _tree(a):
  return {"layers_0": {"kernel": jnp.asarray(a)}, "head": jnp.asarray(a[0] * 0.5)}


@pytest.mark.parametrize("method", sorted(AVERAGING))
@settings(max_examples=4, deadline=None)
@given(theta=arrays, n=st.integers(2, 3), shift=st.floats(0.5, 2.0))
def test_identical_experts_merge_to_that_model(method, theta, n, shift):
  base = _tree(theta - shift)  # a base different from θ so offsets are non-zero
  if merge.get_method(method).base == "include":
    base = None  # karcher counts a given base as one more point
  out = merge.merge(method, [_tree(theta)] * n, base, params=AVERAGING[method],
                    key=jax.random.key(0))
  chex.assert_trees_all_close(out, _tree(theta), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", sorted(SYMMETRIC))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_symmetric_methods_ignore_expert_order(method, data):
  shape = data.draw(st.sampled_from([(3, 4), (2, 5)]))
  seed = data.draw(st.integers(0, 2**16))
  r = np.random.default_rng(seed)
  b = r.normal(size=shape).astype(np.float32)
  ex = [_tree(b + r.standard_t(4, size=shape).astype(np.float32)) for _ in range(3)]
  perm = data.draw(st.permutations(range(3)))
  bt = None if merge.get_method(method).base == "include" else _tree(b)
  a = merge.merge(method, ex, bt, params=SYMMETRIC[method])
  c = merge.merge(method, [ex[i] for i in perm], bt, params=SYMMETRIC[method])
  chex.assert_trees_all_close(a, c, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(base=arrays, lam=st.floats(-2, 2), s=st.floats(-2, 2))
def test_task_arithmetic_is_linear(base, lam, s):
  r = np.random.default_rng(0)
  d1 = r.normal(size=base.shape).astype(np.float32)
  d2 = r.normal(size=base.shape).astype(np.float32)
  b = {"w": jnp.asarray(base)}
  ta = lambda ds, w: merge.merge("task_arithmetic", [{"w": jnp.asarray(base + d)} for d in ds], b,
                                 params={"weight": w, "lambda": lam})["w"] - base
  both = ta([d1, d2], [1.0, s])
  np.testing.assert_allclose(both, ta([d1], [1.0]) + ta([d2], [s]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(both, lam * (d1 + s * d2), rtol=1e-4, atol=1e-4)


# data-informed methods (fisher, regmean, ...) need statistics: tests/merge/test_informed.py
DATA_FREE = [n for n in merge.names() if not merge.get_method(n).data]
JITTABLE = sorted(set(DATA_FREE) - {"passthrough", "slerp", "nearswap", "arcee_fusion",
                                        "wise_ft", "layer_swap", "nuslerp"})
PARAMS = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
          "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5},
          "della": {"density": 0.5}, "della_linear": {"density": 0.5},
          "slerp": {"t": 0.4}, "nearswap": {"t": 0.4},
          # 10 Adam steps, not 300: op by op each is ~30 dispatches; a larger lr makes them move τ
          "wudi": {"steps": 10, "lr": 1e-2}, "wudi_svc": {"steps": 10, "lr": 1e-2}}
ONE_EXPERT = ("slerp", "nearswap", "wise_ft", "arcee_fusion", "layer_swap", "passthrough")


def _jit_case(method):
  r = np.random.default_rng(1)
  b = _tree(r.normal(size=(4, 6)).astype(np.float32))
  n = 1 if method in ONE_EXPERT else (2 if method == "nuslerp" else 3)
  ex = [jax.tree.map(lambda x: x + jnp.asarray(r.normal(size=x.shape), jnp.float32), b)
        for _ in range(n)]
  base = None if merge.get_method(method).base in ("unused", "include") else b
  return ex, base, dict(PARAMS.get(method, {})), jax.random.key(2)


@pytest.mark.parametrize("method", DATA_FREE)  # op by op: up to ~5 s (arcee, DARE, Karcher)
def test_compiled_kernel_matches_a_really_eager_run(method):
  """The per-method XLA kernel against the same maths run op by op (``jax.disable_jit``):
  catches fusion / precision differences and anything that only holds while tracing."""
  ex, base, p, key = _jit_case(method)
  compiled = merge.merge(method, ex, base, params=p, key=key)
  with jax.disable_jit():
    eager = merge.merge(method, ex, base, params=p, key=key)
  chex.assert_trees_all_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", JITTABLE + ["slerp", "nearswap", "nuslerp", "wise_ft"])
def test_merge_traces_under_an_outer_jit(method):
  """``merge`` inside a user's ``jax.jit`` (host-side parameter resolution over static paths)
  gives the eager result."""
  ex, base, p, key = _jit_case(method)
  jitted = jax.jit(lambda b_, ex_, k: merge.merge(method, ex_, b_, params=p, key=k))(base, ex, key)
  with jax.disable_jit():
    eager = merge.merge(method, ex, base, params=p, key=key)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)


def _count_traces(name, max_traces):
  """The registered method with its recipe wrapped in ``chex.assert_max_traces``: tracing the
  per-tensor kernel more than ``max_traces`` times raises. Also returns a list that grows by one
  per trace, so a test can tell that tracing happened at all."""
  m = merge.get_method(name)
  traces = []

  def recipe(**static):
    stage = m.recipe(**static)

    def counted(state):
      traces.append(1)
      return stage(state)

    return chex.assert_max_traces(counted, n=max_traces)

  return dataclasses.replace(m, recipe=recipe), traces


def test_no_recompilation_across_same_shaped_leaves():
  shape = (7, 13)
  r = np.random.default_rng(0)
  mk = lambda: {f"layers_{i}": {"kernel": jnp.asarray(r.normal(size=shape), jnp.float32)}
                for i in range(6)}
  base, e1, e2 = mk(), mk(), mk()
  chex.clear_trace_counter()
  m, traces = _count_traces("ties", max_traces=1)
  # a density gradient gives every layer a different k: still one trace for all 6 layers
  merge.merge(m, [e1, e2], base, params={"density": merge.Gradient([0.2, 0.9])})
  merge.merge(m, [e2, e1], base, params={"density": 0.5, "weight": [0.3, 0.7]})
  assert len(traces) == 1
  # the counter does fire: a new shape is a new trace, which exceeds the limit of one
  with pytest.raises(AssertionError, match="traced > 1 times"):
    merge.merge(m, [{"w": jnp.ones((3, 3))}], {"w": jnp.zeros((3, 3))}, params={"density": 0.5})


def test_gradient_and_filter_resolution():
  base = {f"layers_{i}": {"mlp": jnp.zeros(2), "attn": jnp.zeros(2)} for i in range(3)}
  ex = [{f"layers_{i}": {"mlp": jnp.ones(2), "attn": jnp.ones(2)} for i in range(3)}]
  out = merge.merge("task_arithmetic", ex, base, params={
      "weight": [[{"filter": "mlp", "value": merge.Gradient([0.0, 1.0])}, {"value": 0.5}]]})
  assert [float(out[f"layers_{i}"]["mlp"][0]) for i in range(3)] == [0.0, 0.5, 1.0]
  assert [float(out[f"layers_{i}"]["attn"][0]) for i in range(3)] == [0.5, 0.5, 0.5]


def test_merge_by_path_rules():
  base = {"enc": {"w": jnp.zeros(3)}, "head": {"w": jnp.zeros(3)}}
  ex = [{"enc": {"w": jnp.full(3, 2.0)}, "head": {"w": jnp.full(3, 4.0)}}]
  out = merge.merge_by_path([(r"^enc/", "task_arithmetic", {"lambda": 0.5}),
                             (r".*", "wise_ft", {"alpha": 0.25})], ex, base)
  np.testing.assert_allclose(out["enc"]["w"], 1.0)
  np.testing.assert_allclose(out["head"]["w"], 1.0)
  with pytest.raises(KfuseError, match="no rule matches"):
    merge.merge_by_path([(r"^enc/", "task_arithmetic", {})], ex, base)


# ------------------------------------------------------------------ bad input

E = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}


@pytest.mark.parametrize("bad,msg", [
    ({"a": jnp.ones((2, 3))}, "missing key 'b'"),
    ({**E, "c": jnp.ones(1)}, "extra key 'c'"),
    ({"a": jnp.ones((3, 2)), "b": jnp.ones(3)}, r"key 'a' has shape \(3, 2\)"),
    ({"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(3)}, "key 'a' has dtype bfloat16"),
    ({"a": jnp.ones((2, 3)).at[0, 1].set(jnp.nan), "b": jnp.ones(3)}, "key 'a'.*NaN"),
    ({"a": jnp.ones((2, 3)), "b": jnp.ones(3).at[1].set(jnp.inf)}, "key 'b'.*Inf"),
])
def test_bad_trees_fail_with_one_line(bad, msg):
  with pytest.raises(KfuseError, match=msg) as ei:
    merge.merge("task_arithmetic", [E, bad], E)
  assert "\n" not in str(ei.value)


@pytest.mark.parametrize("call,msg", [
    (lambda: merge.merge("ties", [], E), "empty model list"),
    (lambda: merge.merge("ties", [E], E, params={"density": 1.5}), r"density 1.5.*\(0, 1\]"),
    (lambda: merge.merge("ties", [E], E, params={"density": 0.0}), r"density 0.0"),
    (lambda: merge.merge("nope", [E], E), "unknown merge method 'nope'"),
    (lambda: merge.merge("ties", [E], E, params={"densty": 0.5}), "unknown parameter 'densty'"),
    (lambda: merge.merge("ties", [E], None), "requires a base"),
    (lambda: merge.merge("slerp", [E, E], E, params={"t": 0.5}), "takes 1 non-base models, got 2"),
    (lambda: merge.merge("slerp", [E], E), "requires parameter 't'"),
    (lambda: merge.merge("ties", [E, E], E, params={"weight": [1.0, 2.0, 3.0]}), "3 per-model values"),
    (lambda: merge.merge("della", [E], E, params={"density": 0.1, "epsilon": 0.2}), "density±epsilon"),
])
def test_bad_arguments(call, msg):
  with pytest.raises(KfuseError, match=msg):
    call()


def _writable(tree):
  return jax.tree.map(lambda x: np.array(x), tree)  # a host copy NumPy owns and may write


@pytest.mark.parametrize("method", DATA_FREE)
def test_writable_numpy_inputs_never_modified(method):
  ex, base, p, key = _jit_case(method)
  ex, base = [_writable(e) for e in ex], None if base is None else _writable(base)
  leaves = jax.tree.leaves([ex, base])
  assert all(isinstance(x, np.ndarray) and x.flags.writeable for x in leaves)
  before = [x.tobytes() for x in leaves]
  merge.merge(method, ex, base, params=p, key=key)
  assert [x.tobytes() for x in leaves] == before


def test_cli_never_modifies_safetensors_inputs(tmp_path):
  """The CLI reads inputs through memory maps; the files' bytes and mtimes stay as they were."""
  from kfuse import io as kio
  r = np.random.default_rng(0)
  shapes = {"model.layers.0.mlp.up_proj.weight": (64, 32), "model.norm.weight": (32,)}
  dirs = []
  for name in ("base", "e1", "e2"):
    kio.write_hf_dir(str(tmp_path / name), {k: r.normal(size=s).astype(np.float32)
                                            for k, s in shapes.items()})
    dirs.append(tmp_path / name)
  files = sorted(f for d in dirs for f in d.iterdir())

  def snapshot():
    return [(f.name, f.read_bytes(), f.stat().st_mtime_ns, f.stat().st_mode) for f in files]

  before = snapshot()
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
      [sys.executable, "-m", "kfuse.main", "--config=configs/merge.py:ties",
       f"--config.models={dirs[1]},{dirs[2]}", f"--config.base={dirs[0]}",
       f"--config.output_dir={tmp_path / 'out'}", "--config.params.density=0.3",
       "--config.progress=False"], cwd=repo, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "out").is_dir()
  assert snapshot() == before
