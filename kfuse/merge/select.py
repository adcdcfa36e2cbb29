"""Exact top-k selection from counts: radix select on float bit patterns.

TIES, breadcrumbs, SCE and arcee_fusion need the k largest (or smallest)
entries of a tensor, or one of its order statistics. A full sort is the
slowest thing XLA does on CPU (about 400 ns per element for a stable argsort
of 25M floats) and cannot run over an axis that is sharded across devices.
This module finds the same entries with histograms and counts only, which are
integer reductions: exact, order-independent, and partitionable by XLA.

Method (`kth_largest`). Map every value to a uint32 key whose unsigned order
is the numeric order of its float32 value (`sortable_bits`). Radix-select the
k-th largest key from the most significant digit down: one histogram of the
top 16 bits locates the bucket holding the k-th key, a second histogram of
the low 16 bits of the keys in that bucket finds the key itself, together
with how many keys are strictly greater. Two passes, whatever k.

Ties (`topk_mask`). The reference semantics (`stages.descending_rank`, a
stable sort) keep exactly k entries and break ties at the k-th value by the
lowest flat index. When only some of the entries equal to the k-th key can be
kept, a third, conditional pass counts those entries per row, locates the row
holding the last kept one, and keeps the tied entries up to it in row-major
order. Results are bit-identical to the sort-based reference, also when the
tensor is sharded (`tests/merge/test_select.py`, `tests/merge/test_sharding.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["sortable_bits", "from_sortable_bits", "kth_largest", "topk_mask",
           "bottomk_mask", "topk_masks", "kth_smallest_value"]

_DIGITS = (16, 16)   # radix digit widths, most significant first (sum = 32)
_SIGN = 0x80000000


def sortable_bits(x: jax.Array, nonneg: bool = False) -> jax.Array:
  """uint32 keys ordered like the float32 values of ``x`` (−0 and +0 equal).

  ``nonneg=True`` promises ``x >= 0`` (e.g. ``|δ|``): the raw bit pattern
  is then already ordered, which saves two passes.
  """
  b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  if nonneg:
    return b & jnp.uint32(~_SIGN & 0xFFFFFFFF)     # −0 → +0
  b = jnp.where(x == 0, jnp.uint32(0), b)
  return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(_SIGN))


def from_sortable_bits(key: jax.Array) -> jax.Array:
  """Inverse of `sortable_bits` (general form): the float32 value of a key."""
  b = jnp.where((key >> 31) == 1, key & jnp.uint32(~_SIGN & 0xFFFFFFFF), ~key)
  return lax.bitcast_convert_type(b, jnp.float32)


def _histogram(digit: jax.Array, nbins: int) -> jax.Array:
  """Counts of ``digit`` values in [0, nbins); the value ``nbins`` is ignored."""
  return jnp.zeros((nbins + 1,), jnp.int32).at[digit].add(1)[:nbins]


def _suffix_sums(c: jax.Array) -> jax.Array:
  """s[j] = Σ_{i >= j} c[i] for a short int vector (a masked sum, not a scan:
  XLA:CPU lowers cumsum to a log-depth scan that is slow to compile)."""
  i = lax.broadcasted_iota(jnp.int32, (c.shape[0], c.shape[0]), 0)
  j = lax.broadcasted_iota(jnp.int32, (c.shape[0], c.shape[0]), 1)
  return jnp.sum(jnp.where(j >= i, c[None, :], 0), axis=1, dtype=jnp.int32)


def _block(n: int) -> int:
  b = 1
  while b * b < n:
    b *= 2
  return b


def _last_reaching(c: jax.Array, k: jax.Array):
  """For counts ``c`` (int, any length) and 1 <= k <= Σc: the largest j with
  Σ_{i >= j} c[i] >= k, and Σ_{i > j} c[i]. Two levels of √n-sized blocks."""
  n = c.shape[0]
  b = _block(n)
  nb = -(-n // b)
  cb = jnp.pad(c, (0, nb * b - n)).reshape(nb, b)
  coarse = _suffix_sums(jnp.sum(cb, axis=1, dtype=jnp.int32))       # [nb]
  a = jnp.sum(coarse >= k, dtype=jnp.int32) - 1                       # block holding it
  above = jnp.where(a + 1 < nb, coarse[jnp.minimum(a + 1, nb - 1)], 0)
  fine = _suffix_sums(lax.dynamic_index_in_dim(cb, a, 0, keepdims=False)) + above
  j = jnp.sum(fine >= k, dtype=jnp.int32) - 1
  after = jnp.where(j + 1 < b, fine[jnp.minimum(j + 1, b - 1)], above)
  return a * b + j, after


def _first_reaching(c: jax.Array, r: jax.Array):
  """The smallest j with Σ_{i <= j} c[i] >= r (1 <= r <= Σc), and Σ_{i < j} c[i]."""
  j, after = _last_reaching(c[::-1], r)
  return c.shape[0] - 1 - j, after


def kth_largest(keys: jax.Array, k: jax.Array):
  """The k-th largest of ``keys`` (uint32, any shape), 1 <= k <= keys.size.

  Returns ``(value, n_greater, n_equal)``: the key itself, how many keys are
  strictly greater, and how many equal it. Two histogram passes.
  """
  u = keys.reshape(-1)
  kk = jnp.asarray(k, jnp.int32)
  prefix = jnp.uint32(0)
  shift, match, eq = 32, None, None
  for width in _DIGITS:
    shift -= width
    nb = 1 << width
    digit = ((u >> shift) & jnp.uint32(nb - 1)).astype(jnp.int32)
    if match is not None:
      digit = jnp.where(match, digit, nb)
    hist = _histogram(digit, nb)
    j, gt = _last_reaching(hist, kk)          # the digit of the k-th largest
    eq = hist[j]
    kk = kk - gt
    prefix = (prefix << width) | j.astype(jnp.uint32)
    match = (u >> shift) == prefix
  k = jnp.asarray(k, jnp.int32)
  return prefix, k - kk, eq


def _rows(shape: tuple) -> tuple:
  """2-D view [R, C] used for the tie pass: rows follow axis 0 (the sharded axis)."""
  n = 1
  for d in shape:
    n *= d
  if len(shape) >= 2 and shape[0] > 0:
    return shape[0], n // shape[0]
  for c in (4096, 1024, 256):
    if n % c == 0 and n > c:
      return n // c, c
  return 1, n


def _tie_cut(u2: jax.Array, v: jax.Array, r: jax.Array) -> jax.Array:
  """Mask of keys > v plus the first ``r`` keys == v in row-major order."""
  eq = u2 == v
  per_row = jnp.sum(eq, axis=1, dtype=jnp.int32)
  i, before = _first_reaching(per_row, r)          # row holding the r-th tie
  row = lax.dynamic_index_in_dim(eq, i, axis=0, keepdims=False).astype(jnp.int32)
  j, _ = _first_reaching(row, r - before)          # its column
  ri = lax.broadcasted_iota(jnp.int32, u2.shape, 0)
  ci = lax.broadcasted_iota(jnp.int32, u2.shape, 1)
  keep_tie = (ri < i) | ((ri == i) & (ci <= j))
  return (u2 > v) | (eq & keep_tie)


def _topk_keys(u: jax.Array, k: jax.Array) -> jax.Array:
  """Exactly ``k`` largest keys, ties by lowest flat index; ``u`` any shape."""
  shape = u.shape
  n = u.size
  k = jnp.asarray(k, jnp.int32)
  if n == 0:
    return jnp.zeros(shape, bool)
  kc = jnp.clip(k, 1, n)
  v, gt, eq = kth_largest(u, kc)
  r = kc - gt                                      # how many ties at v to keep
  u2 = u.reshape(_rows(shape))
  mask = lax.cond(r >= eq, lambda: u2 >= v, lambda: _tie_cut(u2, v, r))
  mask = mask.reshape(shape)
  return jnp.where(k >= n, True, jnp.where(k <= 0, False, mask))


def topk_mask(x: jax.Array, k: jax.Array, nonneg: bool = False) -> jax.Array:
  """Exactly ``k`` largest entries of ``x`` (by float32 value; ties: lowest index).

  Equal to ``stages.descending_rank(x.ravel().astype(float32)) < k``
  reshaped, without sorting. ``k`` may be traced; k <= 0 keeps nothing and
  k >= x.size keeps everything.
  """
  return _topk_keys(sortable_bits(x, nonneg), k)


def bottomk_mask(x: jax.Array, k: jax.Array) -> jax.Array:
  """Exactly ``k`` smallest entries of ``x`` (ties: lowest index), i.e. the
  entries of stable ascending rank < k."""
  return _topk_keys(~sortable_bits(x), k)


def topk_masks(x: jax.Array, k: jax.Array, nonneg: bool = False) -> jax.Array:
  """`topk_mask` for each model: ``x`` is [N, ...], ``k`` is [N].

  Unrolled over the (small) model axis rather than vmapped, so every model
  skips the tie pass on its own when it has no partial tie.
  """
  return jnp.stack([topk_mask(x[i], k[i], nonneg) for i in range(x.shape[0])])


def kth_smallest_value(x: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th smallest value of ``x`` as float32 (1-based k), i.e.
  ``sort(x.ravel().astype(float32))[k - 1]``."""
  n = x.size
  kc = jnp.clip(jnp.asarray(k, jnp.int32), 1, n)
  key, _, _ = kth_largest(sortable_bits(x), n + 1 - kc)
  return from_sortable_bits(key)
