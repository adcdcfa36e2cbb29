"""Exact top-k selection without sorting (kfuse.merge.select) against the stable sort.

The reference is the sort-based rank of `stages.descending_rank` /
`ascending_rank`: keep exactly k entries, ties at the k-th value broken by the
lowest flat index. Every implementation (in-kernel, host-driven over whole
arrays, host-driven over engine chunks) must give the same mask bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse.merge import TensorInfo, get_method, merge, resolve_values, select
from kfuse.merge import engine as E
from kfuse.merge.engine import DictSource, TensorTask, execute
from kfuse.merge.stages import ascending_rank, descending_rank

rng = np.random.default_rng(0)


def ref_top(x, k):
  return np.asarray(descending_rank(jnp.asarray(x).reshape(-1).astype(jnp.float32)) < k).reshape(
      np.shape(x))


def ref_bottom(x, k):
  return np.asarray(ascending_rank(jnp.asarray(x).reshape(-1).astype(jnp.float32)) < k).reshape(
      np.shape(x))


def sample(kind, shape, dtype=np.float32):
  if kind == "normal":
    return rng.standard_normal(shape).astype(dtype)
  if kind == "ties":        # few distinct values: ties at every k
    return rng.integers(-3, 4, shape).astype(dtype)
  if kind == "zeros":       # +0 and -0 must tie
    x = (rng.integers(0, 3, shape) * 0.5).astype(dtype)
    x[x == 0] = -0.0
    x.reshape(-1)[::2] = np.where(x.reshape(-1)[::2] == 0, 0.0, x.reshape(-1)[::2])
    return x
  raise ValueError(kind)


top = jax.jit(select.topk_mask, static_argnums=2)
bottom = jax.jit(select.bottomk_mask)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_in_kernel_masks_equal_the_stable_sort(dtype):
  shape = (5, 9)   # one shape: one compile per function and dtype
  for kind in ("normal", "ties", "zeros"):
    x = sample(kind, shape, dtype)
    n = x.size
    for k in (-1, 0, 1, n // 3, n - 1, n, n + 2):
      np.testing.assert_array_equal(np.asarray(top(jnp.asarray(x), k, False)), ref_top(x, k))
      np.testing.assert_array_equal(np.asarray(bottom(jnp.asarray(x), k)), ref_bottom(x, k))
      a = np.abs(np.asarray(x, np.float32)).astype(dtype)
      np.testing.assert_array_equal(np.asarray(top(jnp.asarray(a), k, True)), ref_top(a, k))


def test_kth_smallest_value_is_the_sorted_entry():
  x = rng.standard_normal(1000).astype(np.float32)
  f = jax.jit(select.kth_smallest_value)
  for k in (1, 2, 250, 999, 1000):
    assert float(f(jnp.asarray(x), k)) == np.sort(x)[k - 1]


def _keys(xs, i):
  return select.magnitude_keys(xs[i][None])[0]


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_driven_cuts_equal_the_stable_sort(dtype):
  shape = (64, 33)
  for kind in ("normal", "ties"):
    x = sample(kind, shape, dtype)
    xs = jnp.asarray(np.stack([x, (np.asarray(x, np.float32) * 2).astype(dtype), -x]))
    n = x.size
    k = np.array([n // 5, 1, n - 3])
    cut = select.find_cuts_array(_keys, (xs,), n, k, select.key_bits(xs.dtype),
                                 select._rows(shape)[0])
    got = np.asarray(select.keep_from_cut(select.magnitude_keys(xs), jnp.asarray(cut.v),
                                          jnp.asarray(cut.p)))
    for i in range(3):
      np.testing.assert_array_equal(got[i], ref_top(np.abs(np.asarray(xs[i], np.float32)),
                                                    k[i]).reshape(-1))


def _all_primitives(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _all_primitives(inner)
  return out


def test_no_sort_in_the_ties_kernel():
  m = get_method("ties")
  static, hp = m.prepare(m, {"weight": [1.0] * 2, "density": [0.3] * 2, "lambda": 1.0,
                             "normalize": True, "rescale": False}, TensorInfo(
                                 "w", (16, 8), np.float32), 2)
  jaxpr = jax.make_jaxpr(m.kernel(static))(jnp.zeros((16, 8)), jnp.zeros((2, 16, 8)),
                                           jnp.ones(2), hp, jax.random.key(0))
  prims = _all_primitives(jaxpr.jaxpr)
  assert "scatter-add" in prims and not {p for p in prims if "sort" in p}, prims


def _sources(shapes, dtype, seed, tie_scale=None):
  r = np.random.default_rng(seed)
  base = {k: (r.standard_normal(s) * 0.02).astype(dtype) for k, s in shapes.items()}
  exps = []
  for _ in range(3):
    d = {}
    for k, b in base.items():
      noise = r.standard_normal(b.shape) * 0.002
      if tie_scale:
        noise = np.round(noise / tie_scale) * tie_scale
      d[k] = (b.astype(np.float32) + noise).astype(dtype)
    exps.append(d)
  return base, exps


@pytest.mark.parametrize("method,params,dtype,ties", [
    ("ties", {"density": 0.3}, np.float32, 1e-3),          # many ties at the cut
    ("ties", {"density": 0.3}, jnp.bfloat16, None),        # 16-bit keys: one radix pass
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, np.float32, None),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}, jnp.bfloat16, None)])
def test_engine_chunked_cuts_equal_the_in_kernel_selection(method, params, dtype, ties):
  """Many small chunks (with an overlapping last one) and ties at the cut."""
  shapes = {"a.weight": (40, 30), "b.weight": (257,), "c.weight": (9,)}
  base, exps = _sources(shapes, dtype, 1, ties)
  ref = merge(method, exps, base, params=params)
  m = get_method(method)
  srcs = [DictSource(base, "base")] + [DictSource(e, f"e{i}") for i, e in enumerate(exps)]
  tasks = []
  for name, shape in shapes.items():
    info = TensorInfo(name, shape, np.dtype(dtype), None, 0, "torch")
    vals = resolve_values(m, params, info, 3)
    tasks.append(TensorTask(name, m, (0, name), [(i + 1, name) for i in range(3)], vals, info))
  out, stats = {}, E.Stats()
  execute(tasks, srcs, out.__setitem__, progress=False, chunk=128, stats=stats)
  assert stats.chunked == len(shapes)
  for name in shapes:
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(ref[name]), err_msg=name)
