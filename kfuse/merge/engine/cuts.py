"""Exact top-k cuts found on the host, for methods that declare a `Method.selection`.

The selection keys of each model (|δ| as sortable bits, `select.sortable_bits`)
are counted by 16-bit histogram passes (`select.find_cuts`): over the whole
tensor, or chunk by chunk with jitted passes that accumulate into donated
counters. The cuts (`core.CUTS`) go to the kernel as ``state.cuts``.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kfuse.merge import select
from kfuse.merge.core import CUTS
from kfuse.merge.engine.plan import _chunks


@functools.lru_cache(maxsize=None)
def _keyfn(kind: str, dt: str, has_base: bool) -> Callable:
  """Selection keys of one model exactly as the recipe's trim stage computes
  them: |δ| with δ = θ_i − θ_b in the working dtype (reversed for bands)."""
  dt = jnp.dtype(dt)

  def keys(base, expert):
    d = expert.astype(dt)
    if has_base:
      d = d - base.astype(dt)
    u = select.sortable_bits(jnp.abs(d), nonneg=True).reshape(-1)
    if kind == "band":
      u = select.reverse_keys(u, select.key_bits(dt))
    return u

  return keys


@functools.lru_cache(maxsize=None)
def _array_keyfn(kind: str, dt: str, has_base: bool) -> Callable:
  keys = _keyfn(kind, dt, has_base)
  return lambda base, experts, i: keys(base, experts[i])


def _materialized(x: jax.Array) -> jax.Array:
  """``x`` computed by vectorized code before a scatter uses it as indices:
  XLA:CPU would otherwise fuse the index maths into the scalar scatter loop."""
  return lax.optimization_barrier(x)


@functools.lru_cache(maxsize=None)
def _chunk_kernels(kind: str, dt: str, has_base: bool, n_models: int, chunk: int):
  """Jitted per-chunk selection passes over (base, experts...) flat chunks.

  Histograms accumulate in place into a donated flat counter array (a last
  slot takes what is not counted), reset by the first chunk of each pass.
  """
  keys = _keyfn(kind, dt, has_base)
  nb = 1 << 16

  def model_keys(inputs):
    b = inputs[0] if has_base else None
    es = inputs[1:] if has_base else inputs
    return [keys(b, e) for e in es]

  def valid(lo, hi):
    idx = lax.iota(jnp.int32, chunk)
    return (idx >= lo) & (idx < hi)

  # Entries not counted get an out-of-range index and are dropped: XLA:CPU adds
  # them at a fraction of the cost of a shared "other" bin, whose increments
  # would form one long dependency chain.
  def hist(acc, inputs, shift, prefix, lo, hi):
    ok = valid(lo, hi)
    digits = []
    for i, u in enumerate(model_keys(inputs)):
      match = ok & ((u >> (shift + 16)) == prefix[i])
      d = ((u >> shift) & jnp.uint32(nb - 1)).astype(jnp.int32) + i * nb
      digits.append(jnp.where(match, d, n_models * nb))
    return acc.at[_materialized(jnp.concatenate(digits))].add(1, mode="drop")

  def tie_hist(acc, inputs, v, seed, shift, prefix, start, lo, hi):
    """`hist` of the tie keys (`select.tie_keys` at flat index start + j)."""
    ok = valid(lo, hi)
    idx = lax.iota(jnp.uint32, chunk) + start.astype(jnp.uint32)
    digits = []
    for i, u in enumerate(model_keys(inputs)):
      t = select.tie_keys(u, v[i], idx[:u.shape[0]], seed[i])
      match = ok[:u.shape[0]] & ((t >> (shift + 16)) == prefix[i])
      d = ((t >> shift) & jnp.uint32(nb - 1)).astype(jnp.int32) + i * nb
      digits.append(jnp.where(match, d, n_models * nb))
    return acc.at[_materialized(jnp.concatenate(digits))].add(1, mode="drop")

  return jax.jit(hist, donate_argnums=0), jax.jit(tie_hist, donate_argnums=0)


_zero_in_place = jax.jit(lambda acc: jnp.zeros_like(acc), donate_argnums=0)


class CutSearch:
  """The cuts of one `execute` call's tasks; its counters are reused across passes
  and tasks (no fresh pages per pass). Thread-safe: worker threads search the
  next tasks while the main thread dispatches."""

  def __init__(self, chunk: int):
    self.chunk = chunk
    self._accs: dict = {}
    self.acc_lock = threading.Lock()

  def cuts(self, job, kind: str, hp: dict, n: int, views: Callable) -> dict:
    """Exact cuts from the host (``state.cuts`` for the recipe's selecting stage)."""
    has_base = job.task.base is not None
    bits = select.key_bits(job.dt)
    out = {}
    for name, kname in CUTS[kind]:
      k = np.asarray(hp[kname])
      if job.chunked:
        cut = self._chunk_cuts(job, kind, n, k, bits, views)
      else:
        rows = select.row_view(tuple(job.shape))[0]
        cut = select.find_cuts_array(_array_keyfn(kind, job.dt.name, has_base),
                                     (job.base, job.experts), n, k, bits, rows)
      out[f"{name}_v"], out[f"{name}_p"] = cut.v, cut.p
    out["tie_seed"] = select.tie_seeds(n, len(job.task.experts))
    return out

  def _chunk_cuts(self, job, kind: str, n: int, k, bits: int, views: Callable) -> select.Cut:
    has_base = job.task.base is not None
    n_models = len(job.task.experts)
    hist_k, tie_k = _chunk_kernels(kind, job.dt.name, has_base, n_models, self.chunk)
    chunks = _chunks(n, self.chunk)
    accs = self._accs

    def run_pass(kernel, size, *args, start=False):
      """One pass over all chunks on two alternating counter chains (they can run
      concurrently); returns the summed counts. Counters are reused across passes.
      ``start``: the kernel also takes the chunk's flat start."""
      with self.acc_lock:
        free = accs.setdefault(size, [])
        chains = [free.pop() if free else None for _ in range(2)]
      chains = [jnp.zeros((size,), jnp.int32) if c is None else _zero_in_place(c)
                for c in chains]
      for j, (s, lo, hi) in enumerate(chunks):
        c = j % 2
        at = (np.int32(s),) if start else ()
        chains[c] = kernel(chains[c], views(s), *args, *at, np.int32(lo), np.int32(hi))
      total = np.asarray(chains[0], np.int64) + np.asarray(chains[1])
      with self.acc_lock:
        accs[size].extend(chains)
      return total

    def hist(shift, prefix):
      t = run_pass(hist_k, n_models * (1 << 16), np.uint32(shift),
                   np.asarray(prefix, np.uint32))
      return t.reshape(n_models, 1 << 16)

    seeds = select.tie_seeds(n, n_models)

    def tie_hist(v, shift, prefix):
      t = run_pass(tie_k, n_models * (1 << 16), np.asarray(v, np.uint32), seeds,
                   np.uint32(shift), np.asarray(prefix, np.uint32), start=True)
      return t.reshape(n_models, 1 << 16)

    return select.find_cuts(hist, n, k, bits, tie_hist)

