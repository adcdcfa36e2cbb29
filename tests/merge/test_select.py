"""Exact top-k selection without sorting (kfuse.merge.select) against a sort.

The reference ranks with NumPy's `lexsort` by (value, `select.tie_hash` of the
flat index): keep exactly k entries, ties at the k-th value broken by the
smallest hash. Every implementation (in-kernel, host-driven over whole arrays,
host-driven over engine chunks) must give the same mask bit for bit, and the
tie rule must not favour any position (`test_ties_are_kept_uniformly_*`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse.merge import TensorInfo, get_method, merge, resolve_values, select
from kfuse.merge import engine as E
from kfuse.merge.engine import DictSource, TensorTask, execute

rng = np.random.default_rng(0)


def _rank(primary, seed):
  """Rank (0 first) by ``primary`` ascending, then by tie hash ascending."""
  idx = np.arange(primary.size, dtype=np.uint32)
  h = select.tie_hash(idx, np.uint32(seed))
  order = np.lexsort((h, primary))
  r = np.empty(primary.size, np.int64)
  r[order] = np.arange(primary.size)
  return r


def ref_top(x, k, seed=None):
  x32 = np.asarray(x, np.float32).reshape(-1)
  seed = select.tie_seed(x32.size) if seed is None else seed
  return (_rank(-x32.astype(np.float64), seed) < k).reshape(np.shape(x))


def ref_bottom(x, k, seed=None):
  x32 = np.asarray(x, np.float32).reshape(-1)
  seed = select.tie_seed(x32.size) if seed is None else seed
  return (_rank(x32.astype(np.float64), seed) < k).reshape(np.shape(x))


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
                                 select.row_view(shape)[0])
    got = np.asarray(select.keep_from_cut(select.magnitude_keys(xs), jnp.asarray(cut.v),
                                          jnp.asarray(cut.p), select.tie_seeds(n, 3)))
    for i in range(3):
      np.testing.assert_array_equal(got[i], ref_top(np.abs(np.asarray(xs[i], np.float32)),
                                                    k[i], select.tie_seed(n, i)).reshape(-1))


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


def _block_fractions(mask, blocks):
  return mask.reshape(blocks, -1).mean(axis=1)


def _assert_uniform(mask, k, blocks=8):
  """Kept entries of an all-ties tensor per row block ~ hypergeometric(n, k, n/blocks):
  every block within 5 standard deviations of k/blocks (old rule: the first rows take all)."""
  n = mask.size
  m = n // blocks
  p = k / n
  sd = np.sqrt(m * p * (1 - p) * (n - m) / (n - 1))
  counts = mask.reshape(blocks, -1).sum(axis=1)
  assert mask.sum() == k
  assert np.all(np.abs(counts - m * p) <= 5 * sd), (counts, m * p, sd)


def test_ties_are_kept_uniformly_over_the_rows():
  x = jnp.ones((64, 64), jnp.float32)        # every magnitude equal
  for k in (64 * 64 // 4, 64 * 64 // 10):
    _assert_uniform(np.asarray(top(x, k, True)), k)
    _assert_uniform(np.asarray(bottom(x, k)), k)
  xs = jnp.ones((3, 64, 64), jnp.bfloat16)
  masks = np.asarray(select.topk_masks(xs, jnp.array([1000, 2000, 3000]), nonneg=True))
  for i, k in enumerate((1000, 2000, 3000)):
    _assert_uniform(masks[i], k)
  assert (masks[0] != masks[1][:, :]).any()   # per-model seeds: not the same positions


def test_engine_chunked_ties_are_uniform_and_equal_the_api():
  """bf16 deltas with few distinct values: the streaming engine's chunked cut keeps
  the same entries as `kfuse.merge.merge`, spread evenly over the rows."""
  shape = (64, 48)
  base = {"w": np.zeros(shape, jnp.bfloat16)}
  exps = [{"w": np.full(shape, 0.5, jnp.bfloat16)}, {"w": np.full(shape, -0.25, jnp.bfloat16)}]
  params = {"density": 0.3, "weight": 1.0}
  ref = np.asarray(merge("ties", exps, base, params=params)["w"], np.float32)
  m = get_method("ties")
  info = TensorInfo("w", shape, np.dtype(jnp.bfloat16), None, 0, "torch")
  task = TensorTask("w", m, (0, "w"), [(1, "w"), (2, "w")], resolve_values(m, params, info, 2),
                    info)
  srcs = [DictSource(base, "base"), DictSource(exps[0], "e0"), DictSource(exps[1], "e1")]
  out, stats = {}, E.Stats()
  execute([task], srcs, out.__setitem__, progress=False, chunk=256, stats=stats)
  assert stats.chunked == 1
  got = np.asarray(out["w"], np.float32)
  np.testing.assert_array_equal(got, ref)
  k = int(0.3 * got.size)             # the prepare step's exact k: floor(density · n)
  # model 1 (+0.5) wins the sign election where kept; model 2 (-0.25) only where 1 was trimmed
  _assert_uniform(got > 0, k)


def test_tie_hash_is_a_permutation_of_31_bit_indices():
  for seed in (0, select.tie_seed(10), 0x7FFFFFFF):
    for lo in (0, (1 << 31) - (1 << 20)):
      idx = np.arange(lo, lo + (1 << 20), dtype=np.uint32)
      h = select.tie_hash(idx, np.uint32(seed))
      assert h.max() < (1 << 31) and np.unique(h).size == idx.size
