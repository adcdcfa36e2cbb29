"""The jitted device programs: one method kernel per tensor or per flat chunk, with
the casts to the working / output dtype and the numeric `FLAGS` they report."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kfuse.merge.core import Method


def _nonfinite(xs, valid=None) -> jax.Array:
  """Whether any float input has a NaN or Inf (inside ``valid``), as stored.
  Which input, and which of the two, is worked out on the host when it happens."""
  bad = None
  for x in xs:
    if jnp.issubdtype(x.dtype, jnp.floating):
      b = ~jnp.isfinite(x)
      bad = b if bad is None else bad | b
  if bad is None:
    return jnp.zeros((), bool)
  if valid is not None:
    bad = bad & valid
  return jnp.any(bad)


def _count(mask, valid=None) -> jax.Array:
  return jnp.sum(mask & valid if valid is not None else mask, dtype=jnp.int32)


def _narrowing(src, to) -> bool:
  """Whether casting float dtype ``src`` to float dtype ``to`` can overflow to ±inf."""
  src, to = jnp.dtype(src), jnp.dtype(to)
  return (jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(to, jnp.floating)
          and float(jnp.finfo(to).max) < float(jnp.finfo(src).max))


def _cast(x, to, valid=None, clamp: bool = False) -> tuple:
  """``x`` cast to ``to`` and the number of finite entries (inside ``valid``) the cast
  turns into ±inf; ``clamp`` writes ±finfo(to).max for those instead."""
  y = x.astype(to)
  if not _narrowing(x.dtype, to):
    return y, jnp.zeros((), jnp.int32)
  over = jnp.isfinite(x) & ~jnp.isfinite(y)
  if clamp:
    top = jnp.asarray(jnp.finfo(to).max, to)
    y = jnp.where(over, jnp.where(x > 0, top, -top), y)
  return y, _count(over, valid)


# What each program reports about a result, in this order (one int32 each):
# a NaN/Inf among the stored inputs (0/1); finite inputs that overflow the
# working dtype; a NaN/Inf in the result (0/1: counted on the host when it
# happens); finite result entries that overflow the output dtype.
# `_Run._check` turns them into errors or counts.
FLAGS = ("nonfinite_input", "input_overflow", "nonfinite_output", "output_overflow")


def _flags(xs, res, n_in_over, n_out_over, valid=None) -> jax.Array:
  nf = jnp.zeros((), jnp.int32)
  if jnp.issubdtype(res.dtype, jnp.floating):   # any, not a count: counted on the host
    b = ~jnp.isfinite(res)
    nf = jnp.any(b & valid if valid is not None else b).astype(jnp.int32)
  return jnp.stack([_nonfinite(xs, valid).astype(jnp.int32), n_in_over, nf, n_out_over])


@functools.lru_cache(maxsize=None)
def _program(method: Method, static_key: tuple, dt: str, out_dt: str, has_base: bool,
             chunk: int, clamp: bool = False):
  """The jitted program for one tensor (``chunk=0``) or one flat chunk.

  Whole tensor: ``run(base, experts[N, ...], weights, hp, rng, cuts)``. Chunk:
  ``run(slot, inputs, weights, hp, rng, cuts, lo, hi)`` with ``inputs`` the flat
  chunks of (base, experts...) and ``slot`` a donated output buffer the result
  is written into (no fresh allocation per chunk). Both cast inputs to the
  working dtype, run the method's kernel, cast the result, and return it with
  the `FLAGS` counts (``clamp``: out-of-range values become ±max instead).
  """
  kern = method.kernel(dict(static_key))
  dt, odt = jnp.dtype(dt), jnp.dtype(out_dt)

  def run_tensor(base, experts, weights, hp, rng, cuts):
    xs = ([base] if has_base else []) + [experts[i] for i in range(experts.shape[0])]
    n_in = jnp.zeros((), jnp.int32)
    b = None
    if has_base:
      b, n = _cast(base, dt, clamp=clamp)
      n_in = n_in + n
    e, n = _cast(experts, dt, clamp=clamp)
    res = kern(b, e, weights, hp, rng, cuts)
    out, n_out = _cast(res, odt, clamp=clamp)
    return out, _flags(xs, res, n_in + n, n_out)

  def run_chunk(slot, inputs, weights, hp, rng, cuts, lo, hi):
    idx = lax.iota(jnp.int32, chunk)
    valid = (idx >= lo) & (idx < hi)
    cast = [_cast(x, dt, valid, clamp) for x in inputs]
    xs = [c[0] for c in cast]
    b = xs[0] if has_base else None
    e = jnp.stack(xs[1:] if has_base else xs)
    res = kern(b, e, weights, hp, rng, cuts)
    out, n_out = _cast(res, odt, valid, clamp)
    flags = _flags(list(inputs), res, sum(c[1] for c in cast), n_out, valid)
    return lax.dynamic_update_slice(slot, out, (0,)), flags

  if chunk:
    return jax.jit(run_chunk, donate_argnums=0)
  return jax.jit(run_tensor)
