"""Exact top-k selection from counts: radix select on float bit patterns.

TIES, breadcrumbs, SCE and arcee_fusion need the k largest (or smallest)
entries of a tensor, or one of its order statistics. A full sort is the
slowest thing XLA does on CPU (about 400 ns per element for a stable argsort
of 25M floats) and cannot run over an axis that is sharded across devices.
This module finds the same entries with histograms and counts only: integer
reductions, exact, independent of summation order, partitionable by XLA.

Keys. `sortable_bits` maps every value to an unsigned key whose order is the
numeric order of its float32 value (−0 and +0 equal): the bit pattern itself
for non-negative values, the usual sign flip otherwise. 16-bit floats keep
16-bit keys (one radix pass instead of two).

Cut. The k largest keys, ties at the k-th key broken by a seeded hash of
the flat index (`tie_hash`: the tied entries with the smallest hashes are
kept), are described by a *cut* ``(v, p)``: keep ``key > v`` and ``key == v``
with ``tie_hash(index, seed) <= p`` (`keep_from_cut`). Radix selection finds
``v`` from the most significant digit down: a histogram of the top 16 bits
locates the bucket holding the k-th key, a second histogram of the low 16 bits
of the keys in that bucket finds the key itself and how many keys are strictly
greater. Only when some but not all keys equal to ``v`` are kept, two more
histogram passes over the hashes of the tied entries find ``p``.

Ties. `tie_hash` is a bijection of [0, 2**31) (xor-shift / odd-multiply
rounds of MurmurHash3's fmix32, masked to 31 bits), so hashes of distinct
indices never collide and the cut keeps exactly k entries. Its order has no
relation to the position: among equal magnitudes every entry has the same
chance to be kept, wherever it lies (keeping the lowest indices instead keeps
the first rows of a tensor, which in bfloat16, where ties are everywhere,
skews a TIES merge). The seed depends only on the tensor's size and the
model's position (`tie_seed`), and the hash only on the flat index, so the
Python API, the streaming engine's chunks and a sharded run keep the same
entries. mergekit keeps ``torch.argsort(|δ|, descending=True)[:k]`` (an
unstable sort: no defined tie order), so with ties at the cut the kept
entries can differ from mergekit's.

Two implementations of the same cut:
* in-kernel (`topk_mask`, `bottomk_mask`, `kth_smallest_value`): pure `jnp`
  inside any jit, used by `kfuse.merge.merge` and every recipe by default;
* host-driven (`find_cuts`): the histograms run as small jitted kernels and
  the searches between passes run on the host in numpy. The merge engine uses
  it for checkpoints (`engine.py`): compiling the searches into every
  per-shape kernel costs about 1 s per shape on CPU, the host search costs
  nothing. With sharded inputs the histogram kernels are partitioned by XLA.
Both give bit-identical masks (tests/merge/test_select.py).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["key_bits", "sortable_bits", "from_sortable_bits", "reverse_keys",
           "magnitude_keys", "kth_largest", "topk_mask", "bottomk_mask", "topk_masks",
           "kth_smallest_value", "keep_from_cut", "find_cuts", "find_cuts_array", "Cut",
           "tie_hash", "tie_seed", "tie_seeds", "tie_keys"]

_W = 16                       # radix digit width
_NB = 1 << _W                 # bins per digit
_SIGN = 0x80000000
_HALF = (jnp.bfloat16, jnp.float16)
_HMASK = 0x7FFFFFFF           # tie hashes live in [0, 2**31)
_TOP = 1 << 31


def key_bits(dtype) -> int:
  """Width of the keys of a float dtype: 16 for bfloat16/float16, else 32."""
  return 16 if jnp.dtype(dtype) in [jnp.dtype(d) for d in _HALF] else 32


def sortable_bits(x: jax.Array, nonneg: bool = False) -> jax.Array:
  """uint32 keys ordered like the float32 values of ``x`` (−0 and +0 equal).

  16-bit floats give keys below 2**16 from their own bits (their float32 cast
  is exact and order-preserving); the bitcast also pins the rounding of ``x``
  to its dtype, so every kernel computing keys from the same inputs gets the
  same keys. ``nonneg=True`` promises ``x >= 0`` (e.g. ``|δ|``).
  """
  if key_bits(x.dtype) == 16:
    b = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    sign, ones = 0x8000, 0xFFFF
  else:
    b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign, ones = _SIGN, 0xFFFFFFFF
  if nonneg:
    return b & jnp.uint32(ones ^ sign)                 # −0 → +0
  b = jnp.where(x == 0, jnp.uint32(0), b)
  return jnp.where((b & jnp.uint32(sign)) != 0, b ^ jnp.uint32(ones), b | jnp.uint32(sign))


def from_sortable_bits(key: jax.Array) -> jax.Array:
  """Inverse of `sortable_bits` for 32-bit signed keys: the float32 value."""
  b = jnp.where((key >> 31) == 1, key & jnp.uint32(_SIGN - 1), ~key)
  return lax.bitcast_convert_type(b, jnp.float32)


def reverse_keys(u: jax.Array, bits: int) -> jax.Array:
  """Keys in the opposite order (the largest become the smallest)."""
  return u ^ jnp.uint32(0xFFFF if bits == 16 else 0xFFFFFFFF)


def magnitude_keys(delta: jax.Array) -> jax.Array:
  """Keys of ``|δ|`` per model, flattened: ``[N, ...] -> [N, n]`` (TIES ranking)."""
  return sortable_bits(jnp.abs(delta), nonneg=True).reshape(delta.shape[0], -1)


# ------------------------------------------------------------ in-kernel


def _histogram(digit: jax.Array, nbins: int) -> jax.Array:
  """Counts of ``digit`` values in [0, nbins); others (e.g. ``nbins``) are dropped,
  which XLA:CPU does faster than counting them in a spare bin."""
  return jnp.zeros((nbins,), jnp.int32).at[digit].add(1, mode="drop")


def _suffix_sums(c: jax.Array) -> jax.Array:
  """s[j] = Σ_{i >= j} c[i] for a short int vector (a masked sum, not a scan:
  XLA:CPU lowers cumsum to a log-depth scan that is slow to compile)."""
  i = lax.broadcasted_iota(jnp.int32, (c.shape[0], c.shape[0]), 0)
  j = lax.broadcasted_iota(jnp.int32, (c.shape[0], c.shape[0]), 1)
  return jnp.sum(jnp.where(j >= i, c[None, :], 0), axis=1, dtype=jnp.int32)


def _last_reaching(c: jax.Array, k: jax.Array):
  """For counts ``c`` and 1 <= k <= Σc: the largest j with Σ_{i >= j} c[i] >= k,
  and Σ_{i > j} c[i]. Two levels of √n-sized blocks."""
  n = c.shape[0]
  b = 1
  while b * b < n:
    b *= 2
  nb = -(-n // b)
  cb = jnp.pad(c, (0, nb * b - n)).reshape(nb, b)
  coarse = _suffix_sums(jnp.sum(cb, axis=1, dtype=jnp.int32))
  a = jnp.sum(coarse >= k, dtype=jnp.int32) - 1
  above = jnp.where(a + 1 < nb, coarse[jnp.minimum(a + 1, nb - 1)], 0)
  fine = _suffix_sums(lax.dynamic_index_in_dim(cb, a, 0, keepdims=False)) + above
  j = jnp.sum(fine >= k, dtype=jnp.int32) - 1
  after = jnp.where(j + 1 < b, fine[jnp.minimum(j + 1, b - 1)], above)
  return a * b + j, after


def kth_largest(keys: jax.Array, k: jax.Array, bits: int = 32):
  """The k-th largest of ``keys`` (uint32 below 2**bits), 1 <= k <= keys.size.

  Returns ``(value, n_greater, n_equal)``. One histogram pass per 16 bits.
  """
  u = keys.reshape(-1)
  kk = jnp.asarray(k, jnp.int32)
  prefix = jnp.uint32(0)
  match, eq = None, None
  for shift in range(bits - _W, -1, -_W):
    digit = ((u >> shift) & jnp.uint32(_NB - 1)).astype(jnp.int32)
    if match is not None:
      digit = jnp.where(match, digit, _NB)
    hist = _histogram(digit, _NB)
    j, gt = _last_reaching(hist, kk)
    eq = hist[j]
    kk = kk - gt
    prefix = (prefix << _W) | j.astype(jnp.uint32)
    match = (u >> shift) == prefix
  return prefix, jnp.asarray(k, jnp.int32) - kk, eq


def row_view(shape: tuple) -> tuple:
  """2-D view [R, C] of a tensor: rows follow axis 0 (the sharded axis)."""
  n = int(np.prod(shape)) if shape else 1
  if len(shape) >= 2 and shape[0] > 0:
    return shape[0], n // shape[0]
  for c in (4096, 1024, 256):
    if n % c == 0 and n > c:
      return n // c, c
  return 1, n


# ------------------------------------------------------------ ties


def _mix31(x, seed):
  """The tie permutation of [0, 2**31) on uint32 arrays (jnp or numpy): xor the
  seed, then fmix32's rounds (MurmurHash3, Appleby 2011), each masked to 31 bits
  (xor-shift right and odd multiplication mod 2**31 are bijections)."""
  m = np.uint32(_HMASK)
  x = (x ^ seed) & m
  x = ((x ^ (x >> np.uint32(16))) * np.uint32(0x85EBCA6B)) & m
  x = ((x ^ (x >> np.uint32(13))) * np.uint32(0xC2B2AE35)) & m
  return x ^ (x >> np.uint32(16))


def tie_hash(index, seed):
  """Secondary key of the top-k cut: a seeded permutation of flat indices < 2**31.

  ``index`` and ``seed`` are uint32 (jnp or numpy); returns uint32 in [0, 2**31).
  Among entries with equal keys, the cut keeps those with the smallest hashes.
  """
  return _mix31(index, seed)


def tie_seed(n: int, model: int = 0) -> int:
  """Hash seed of model ``model``'s tensor of ``n`` entries (Python int < 2**31):
  decorrelates the tie order between tensor sizes and between models."""
  x = np.array([(int(n) * 0x9E3779B1 + (int(model) + 1) * 0x7F4A7C15) & 0xFFFFFFFF], np.uint32)
  return int(_mix31(x, np.uint32(0x5BD1E995))[0])


def tie_seeds(n: int, n_models: int) -> np.ndarray:
  """`tie_seed` of each of ``n_models`` models, uint32 [n_models]."""
  return np.array([tie_seed(n, i) for i in range(n_models)], np.uint32)


def tie_keys(u: jax.Array, v, index: jax.Array, seed) -> jax.Array:
  """Keys of the tie pass: ``2**31 - tie_hash`` (in [1, 2**31]) where ``u == v``, else 0,
  so the r largest are the r tied entries with the smallest hashes."""
  return jnp.where(u == v, jnp.uint32(_TOP) - tie_hash(index, seed), jnp.uint32(0))


def _tie_threshold(s_r) -> jax.Array:
  """The hash bound ``p`` from the r-th largest tie key ``s_r``: keep ``hash <= p``."""
  return (jnp.uint32(_TOP) - s_r).astype(jnp.int32)


def _keep(u, v, p, index, seed) -> jax.Array:
  return (u > v) | ((u == v) & (tie_hash(index, seed).astype(jnp.int32) <= p))


def _topk_keys(u: jax.Array, k: jax.Array, bits: int, seed) -> jax.Array:
  """Exactly ``k`` largest keys, ties by `tie_hash` of the flat index; ``u`` any shape."""
  shape, n = u.shape, u.size
  k = jnp.asarray(k, jnp.int32)
  if n == 0:
    return jnp.zeros(shape, bool)
  seed = jnp.asarray(tie_seed(n) if seed is None else seed, jnp.uint32)
  kc = jnp.clip(k, 1, n)
  uf = u.reshape(-1)
  v, gt, eq = kth_largest(uf, kc, bits)
  r = kc - gt
  idx = lax.iota(jnp.uint32, n)

  def cut():
    s_r, _, _ = kth_largest(tie_keys(uf, v, idx, seed), r, 32)
    return _keep(uf, v, _tie_threshold(s_r), idx, seed)

  mask = lax.cond(r >= eq, lambda: uf >= v, cut).reshape(shape)
  return jnp.where(k >= n, True, jnp.where(k <= 0, False, mask))


def topk_mask(x: jax.Array, k: jax.Array, nonneg: bool = False, seed=None) -> jax.Array:
  """Exactly ``k`` largest entries of ``x`` (by float32 value; ties: smallest `tie_hash`).

  Equal to ranking ``x.ravel()`` by (value descending, ``tie_hash(index,
  seed)`` ascending) and keeping ranks < k, without sorting. ``seed``
  defaults to ``tie_seed(x.size)``. ``k`` may be traced; k <= 0 keeps
  nothing and k >= x.size keeps everything.
  """
  return _topk_keys(sortable_bits(x, nonneg), k, key_bits(x.dtype), seed)


def bottomk_mask(x: jax.Array, k: jax.Array, seed=None) -> jax.Array:
  """Exactly ``k`` smallest entries of ``x``: ranks by (value ascending,
  ``tie_hash`` ascending) below k. Nested in k: ``bottomk(k1) ⊆ bottomk(k2)``."""
  bits = key_bits(x.dtype)
  return _topk_keys(reverse_keys(sortable_bits(x), bits), k, bits, seed)


def topk_masks(x: jax.Array, k: jax.Array, nonneg: bool = False) -> jax.Array:
  """`topk_mask` for each model: ``x`` is [N, ...], ``k`` is [N]; model i's
  ties use ``tie_seed(size, i)``.

  A loop over models (`lax.map`) rather than `vmap`: each model skips its
  tie pass on its own, and the selection is compiled once, not N times.
  """
  seeds = jnp.asarray(tie_seeds(int(np.prod(x.shape[1:])), x.shape[0]))
  return lax.map(lambda a: topk_mask(a[0], a[1], nonneg, a[2]),
                 (x, jnp.asarray(k, jnp.int32), seeds))


def kth_smallest_value(x: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th smallest value of ``x`` as float32 (1-based k), i.e.
  ``sort(x.ravel().astype(float32))[k - 1]``."""
  n = x.size
  kc = jnp.clip(jnp.asarray(k, jnp.int32), 1, n)
  key, _, _ = kth_largest(sortable_bits(x.astype(jnp.float32)), n + 1 - kc, 32)
  return from_sortable_bits(key)


def keep_from_cut(keys: jax.Array, v: jax.Array, p: jax.Array, seed: jax.Array,
                  offset=0) -> jax.Array:
  """Per-model masks from cuts: ``keys`` [N, n] flat, ``v`` [N] uint32, ``p`` [N] int32,
  ``seed`` [N] uint32 (`tie_seeds`); ``offset`` is the flat index of ``keys[:, 0]``
  (a chunk of a longer tensor).

  Keeps ``key > v`` and ``key == v`` with ``tie_hash(offset + j, seed) <= p``.
  """
  idx = lax.iota(jnp.uint32, keys.shape[1]) + jnp.asarray(offset).astype(jnp.uint32)
  return _keep(keys, v[:, None], p[:, None], idx[None, :], jnp.asarray(seed, jnp.uint32)[:, None])


# ------------------------------------------------------------ host-driven


class Cut:
  """Host-side cuts, one per model: ``v`` (uint32 [N]) and ``p`` (int32 [N])."""

  def __init__(self, v, p):
    self.v = np.asarray(v, np.uint32)
    self.p = np.asarray(p, np.int32)


def _search_desc(hist: np.ndarray, k: int):
  """Largest digit j with #{digit >= j} >= k; returns (j, #{digit > j})."""
  ge = np.cumsum(hist[::-1], dtype=np.int64)[::-1]
  j = int(np.count_nonzero(ge >= k)) - 1
  return j, int(ge[j + 1]) if j + 1 < hist.shape[0] else 0


def _radix_desc(hist: Callable, k: np.ndarray, active: np.ndarray, bits: int):
  """Host radix search of the k[i]-th largest key of each active model from
  ``hist(shift, prefix)``; returns (value, ties still to keep, keys equal to it)."""
  kk = k.astype(np.int64).copy()
  prefix = np.zeros(k.shape[0], np.uint64)
  eq = np.zeros(k.shape[0], np.int64)
  if active.any():
    for shift in range(bits - _W, -1, -_W):
      h = hist(shift, prefix.astype(np.uint32))
      for i in np.flatnonzero(active):
        j, gt = _search_desc(h[i], int(kk[i]))
        eq[i] = h[i, j]
        kk[i] -= gt
        prefix[i] = (prefix[i] << np.uint64(_W)) | np.uint64(j)
  return prefix.astype(np.uint32), kk, eq


def find_cuts(hist: Callable, n: int, k, bits: int, tie_hist: Callable) -> Cut:
  """Exact top-k cuts of N models' keys (n each, flat), driven from the host.

  The keys live wherever the callables compute them (one device, a mesh, a
  stream of chunks); only [N, 2**16] counts come back:

  * ``hist(shift, prefix)``: counts of ``(key >> shift) & 0xFFFF`` over model
    i's keys whose bits above ``shift + 16`` equal ``prefix[i]``;
  * ``tie_hist(v, shift, prefix)``: the same over model i's `tie_keys`
    (entries with ``key == v[i]``, at their flat index, with its seed).

  ``k`` holds one count per model (k <= 0: nothing, k >= n: everything).
  """
  k = np.asarray(k, np.int64).reshape(-1)
  active = (k > 0) & (k < n)
  v, kk, eq = _radix_desc(hist, np.clip(k, 1, max(n, 1)), active, bits)
  p = np.full(k.shape[0], _HMASK, np.int64)
  cut_ties = active & (kk < eq)             # kk: ties at v still to keep
  if cut_ties.any():
    vv = v.copy()
    s_r, _, _ = _radix_desc(lambda shift, prefix: tie_hist(vv, shift, prefix),
                            np.where(cut_ties, kk, 1), cut_ties, 32)
    p = np.where(cut_ties, _TOP - s_r.astype(np.int64), p)
  v = np.where(k <= 0, 0xFFFFFFFF, np.where(k >= n, 0, v)).astype(np.uint32)
  p = np.where(k <= 0, -1, p)
  return Cut(v, p)


def _to_host(x) -> np.ndarray:
  """A (replicated or sharded) device array as numpy, also across processes."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _model_hist(u: jax.Array, shift, prefix) -> jax.Array:
  match = (u >> (shift + _W)) == prefix
  digit = jnp.where(match, ((u >> shift) & jnp.uint32(_NB - 1)).astype(jnp.int32), _NB)
  return _histogram(digit.reshape(-1), _NB)


@functools.partial(jax.jit, static_argnums=(0,))
def _array_hist(keyfn: Callable, args, shift, prefix):
  """[N, 2**16] histograms of ``keyfn(*args, i)`` per model (one model at a time)."""
  n_models = prefix.shape[0]
  return jnp.stack([_model_hist(keyfn(*args, i), shift, prefix[i]) for i in range(n_models)])


@functools.partial(jax.jit, static_argnums=(0,))
def _array_tie_hist(keyfn: Callable, args, v, seed, shift, prefix):
  """[N, 2**16] histograms of model i's `tie_keys` (one model at a time)."""
  out = []
  for i in range(v.shape[0]):
    u = keyfn(*args, i).reshape(-1)
    t = tie_keys(u, v[i], lax.iota(jnp.uint32, u.shape[0]), seed[i])
    out.append(_model_hist(t, shift, prefix[i]))
  return jnp.stack(out)


def find_cuts_array(keyfn: Callable, args, n: int, k, bits: int, rows: int = 1) -> Cut:
  """`find_cuts` for keys computed from whole (possibly sharded) arrays.

  ``keyfn(*args, i)`` returns model i's n keys (any shape, flattened row-major);
  it must be hashable (it keys the compiled kernels). Model i's ties use
  ``tie_seed(n, i)``. ``rows`` is accepted for callers that describe the
  tensor's row split; counts do not depend on it.
  """
  del rows
  seeds = jnp.asarray(tie_seeds(n, int(np.asarray(k).size)))

  def hist(shift, prefix):
    return _to_host(_array_hist(keyfn, args, jnp.uint32(shift), jnp.asarray(prefix)))

  def tie_hist(v, shift, prefix):
    return _to_host(_array_tie_hist(keyfn, args, jnp.asarray(v), seeds, jnp.uint32(shift),
                                    jnp.asarray(prefix)))

  return find_cuts(hist, n, k, bits, tie_hist)
