"""Streaming, out-of-core execution of a merge plan over checkpoints.

A *plan* is a list of `TensorTask`s, one per output tensor, each naming its
input tensors by (model, name) and carrying its resolved parameters. Both the
mergekit-YAML runner and the native runner build plans. `execute` streams a
plan through three threads:

* **reader**: reads the inputs of the next tasks with positional reads
  (`HFModel.read_into`) into reusable page-aligned buffers; no memory maps,
  so the resident memory is the buffers, not the files. Integer and bool
  tensors are not merged: they are compared and copied here (`_agreed`);
* **main**: hands the buffers to XLA without a copy (or slices them over a
  device mesh, `kfuse.shard`), finds exact top-k cuts on the host for methods
  that trim (`select.find_cuts`), and dispatches the method's jit kernel,
  compiled once per (method, options, shape, dtype) and cached;
* **writer**: waits for each result, acts on its `FLAGS` (NaN/Inf inputs or
  results, values a down-cast would overflow), writes the result (e.g. `PlannedHFWriter.add`, straight to its place in its output
  shard) and recycles the input buffers.

Reading the next tensors, computing the current one and writing the previous
one overlap. Input buffers in flight are capped at ``prefetch_bytes`` (at
least one task), at most two results wait for the writer, so peak memory is
a small multiple of (experts + 2) × the largest tensor plus the runtime,
independent of the number of layers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import mmap
import queue
import threading
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kfuse import shard
from kfuse.merge import select
from kfuse.merge.api import path_key
from kfuse.merge.core import CUTS, NATIVE, Method, PrepareContext, TensorInfo
from kfuse.merge.methods import default_prepare
from kfuse.tree import KfuseError, path_str


class TensorSource(Protocol):
  """What the engine needs from an input model (e.g. `kfuse.io.HFModel`).

  Sources may also offer ``read_into(name, out, start=0)`` (positional reads
  into a caller buffer); others are read with ``get``.
  """
  path: Any
  names: list

  def shape(self, name: str) -> tuple: ...
  def dtype(self, name: str) -> Any: ...
  def get(self, name: str, dtype: Any = None) -> np.ndarray: ...


class DictSource:
  """A `TensorSource` over an in-memory ``{name: array}`` dict."""

  def __init__(self, tensors: Mapping[str, Any], path: str = "<memory>"):
    self._t = dict(tensors)
    self.path = path
    self.names = list(self._t)

  def __contains__(self, name):
    return name in self._t

  def shape(self, name):
    return tuple(np.shape(self._t[name]))

  def dtype(self, name):
    return np.dtype(self._t[name].dtype)

  def get(self, name, dtype=None):
    if name not in self._t:
      raise KfuseError(f"{self.path}: no tensor {name!r}")
    a = np.asarray(self._t[name])
    return a.astype(dtype) if dtype is not None else a.copy()


class OrbaxSource:
  """A `TensorSource` over an Orbax checkpoint that restores one tensor at a time.

  Shapes and dtypes come from the checkpoint metadata; `get` restores a single
  leaf (Orbax partial restore, about 20 ms each), so merging holds one tensor
  per model instead of whole models. ``tree`` is the saved structure (with
  metadata leaves) for rebuilding the output pytree.
  """

  def __init__(self, path):
    from kfuse.io import orbax_io
    self.path = str(path)
    self._item = orbax_io._require_item_dir(self.path)
    self.tree = orbax_io.orbax_metadata(self.path)
    self._leaf = {}
    for kp, m in jax.tree_util.tree_flatten_with_path(self.tree)[0]:
      if hasattr(m, "shape") and hasattr(m, "dtype"):
        self._leaf[path_str(kp)] = (kp, m)
    self.names = list(self._leaf)
    self._dict_keys = all(isinstance(k, jax.tree_util.DictKey)
                          for kp, _ in self._leaf.values() for k in kp)
    self._all = None
    self._ckptr = None
    self._lock = threading.Lock()

  def __contains__(self, name):
    return name in self._leaf

  def _meta(self, name):
    if name not in self._leaf:
      raise KfuseError(f"{self.path}: no tensor {name!r}")
    return self._leaf[name][1]

  def shape(self, name):
    return tuple(self._meta(name).shape)

  def dtype(self, name):
    return np.dtype(self._meta(name).dtype)

  def get(self, name, dtype=None):
    self._meta(name)
    with self._lock:
      a = np.asarray(self._restore(name))
    if dtype is not None and a.dtype != np.dtype(dtype):
      return a.astype(dtype)
    return a

  def _restore(self, name):
    import orbax.checkpoint as ocp
    from kfuse.io import orbax_io
    if not self._dict_keys:   # lists in the tree: partial restore needs dict paths
      if self._all is None:
        from kfuse.tree import flatten
        self._all = flatten(orbax_io.restore_orbax(self.path))
      return self._all[name]
    kp, m = self._leaf[name]
    item, args = {}, {}
    ci, ca = item, args
    for k in kp[:-1]:
      ci = ci.setdefault(k.key, {})
      ca = ca.setdefault(k.key, {})
    ci[kp[-1].key] = m
    ca[kp[-1].key] = ocp.RestoreArgs(restore_type=np.ndarray)
    if self._ckptr is None:
      self._ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
      out = self._ckptr.restore(self._item, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
    except Exception as e:  # noqa: BLE001 — one line for the user
      raise KfuseError(f"orbax checkpoint {self.path}: cannot restore {name!r}:"
                       f" {orbax_io._one_line(e)}") from e
    for k in kp:
      out = out[k.key]
    return out


@dataclasses.dataclass
class TensorTask:
  out_name: str
  method: Method
  base: Optional[tuple]            # (model index, tensor name) or None
  experts: list                    # [(model index, tensor name), ...]
  values: dict                     # resolved python parameter values
  info: TensorInfo
  context: PrepareContext = NATIVE  # for the method's prepare (dialect, whole-model stats)


def _finite_or_raise(a: np.ndarray, where: str):
  if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
    x = a.astype(np.float32) if a.dtype.name == "bfloat16" else a
    if not np.all(np.isfinite(x)):
      bad = "NaN" if np.isnan(x).any() else "Inf"
      raise KfuseError(f"{where} (shape {a.shape}) contains {bad}")


def load_input(sources: Sequence[TensorSource], ref: tuple, dtype=None) -> np.ndarray:
  """One input tensor as a checked numpy copy (the simple, non-streaming path)."""
  m, name = ref
  src = sources[m]
  if name not in src:
    raise KfuseError(f"{src.path}: missing tensor {name!r}")
  a = src.get(name, dtype=dtype)
  _finite_or_raise(a, f"{src.path}: tensor {name!r}")
  return a


# ------------------------------------------------------------------ buffers


def _is_float(dt) -> bool:
  dt = np.dtype(dt)
  return dt.kind == "f" or dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _promote(dts) -> np.dtype:
  """Common dtype of mixed stored dtypes, promoted as torch would (bf16 → f32)."""
  dts = [np.dtype(d) for d in dts]
  if len(set(dts)) == 1:
    return dts[0]
  return np.dtype(np.result_type(*[np.float32 if d.name == "bfloat16" else d for d in dts]))


class BufferPool:
  """Page-aligned host buffers, recycled by size, with a cap on bytes in use.

  `take` blocks while the bytes in use plus the request exceed ``budget``
  (one request always fits when nothing is in use) and returns a buffer of at
  least the requested size (at most twice it). Freed buffers are kept for
  reuse while the pool holds at most ``budget`` bytes: on this kind of VM
  faulting fresh pages in costs about 1 s per GB, more than reading them.
  """

  def __init__(self, budget: int):
    self.budget = int(budget)
    self.in_use = 0
    self.held = 0                     # bytes allocated (in use + free)
    self.peak = 0
    self._free: dict[int, list] = {}
    self._lent: dict[int, int] = {}
    self._cv = threading.Condition()
    self.closed = False

  @staticmethod
  def _alloc(nbytes: int) -> np.ndarray:
    # populated up front: one kernel call instead of a page fault per 4 KiB (3x cheaper here)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(-1, max(nbytes, 1), flags=flags)
    try:
      mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
      pass
    return np.frombuffer(mm, np.uint8, count=nbytes)

  def take(self, nbytes: int, wait: bool = True) -> np.ndarray:
    """A buffer of >= nbytes; ``wait=False`` for the further buffers of a task
    whose first buffer already waited (a task is admitted whole)."""
    with self._cv:
      while wait and self.in_use and self.in_use + nbytes > self.budget and not self.closed:
        self._cv.wait(0.1)
      if self.closed:
        raise _Stopped()
      self.in_use += nbytes
      self.peak = max(self.peak, self.in_use)
      fit = [size for size, free in self._free.items() if free and nbytes <= size <= 2 * nbytes]
      if fit:   # best fit: reuse pages already touched rather than fault in new ones
        buf = self._free[min(fit)].pop()
        self._lent[id(buf)] = nbytes
        return buf
      # make room: drop cached buffers of other sizes
      for size in list(self._free):
        while self._free[size] and self.held + nbytes > self.budget:
          self._free[size].pop()
          self.held -= size
      self.held += nbytes
      buf = self._alloc(nbytes)
      self._lent[id(buf)] = nbytes
    return buf

  def give(self, buf: np.ndarray) -> None:
    with self._cv:
      n = buf.nbytes
      self.in_use -= self._lent.pop(id(buf), n)
      if self.held <= self.budget:
        self._free.setdefault(n, []).append(buf)
      else:
        self.held -= n
      self._cv.notify_all()

  def close(self) -> None:
    with self._cv:
      self.closed = True
      self._free.clear()
      self._cv.notify_all()


class _Stopped(Exception):
  """Internal: another thread failed; unwind quietly."""


def _read(src, name: str, out: np.ndarray) -> np.ndarray:
  """Fill ``out`` (any dtype view) with tensor ``name`` of ``src``."""
  if hasattr(src, "read_into") and np.dtype(src.dtype(name)) == out.dtype:
    return src.read_into(name, out)
  a = np.asarray(src.get(name))
  if a.shape != out.shape:
    raise KfuseError(f"{src.path}: tensor {name!r} has shape {a.shape}, expected {out.shape}")
  np.copyto(out, a, casting="unsafe")
  return out


def _read_rows(src, name: str, shape: tuple, dtype, lo: int, hi: int) -> np.ndarray:
  """Rows [lo, hi) of a tensor (axis 0) as a fresh numpy array."""
  row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
  out = np.empty((hi - lo,) + tuple(shape[1:]) if shape else (), dtype)
  if hasattr(src, "read_into") and np.dtype(src.dtype(name)) == out.dtype:
    return src.read_into(name, out, start=lo * row * out.dtype.itemsize)
  a = np.asarray(src.get(name))
  np.copyto(out, a[lo:hi] if shape else a, casting="unsafe")
  return out


# ------------------------------------------------------------------ tasks


def _describe(sources, task) -> str:
  refs = ([task.base] if task.base else []) + task.experts
  return ", ".join(f"{sources[m].path}:{n}{tuple(sources[m].shape(n))}" for m, n in refs)


def _check_task(task: TensorTask, sources) -> tuple:
  """Shape and stored dtypes of a task's inputs; one-line errors for bad inputs."""
  refs = ([task.base] if task.base is not None else []) + list(task.experts)
  shapes, dts = [], []
  for m, name in refs:
    src = sources[m]
    if name not in src:
      raise KfuseError(f"{src.path}: missing tensor {name!r}")
    shapes.append(tuple(src.shape(name)))
    dts.append(np.dtype(src.dtype(name)))
  if len(set(shapes)) > 1:
    raise KfuseError(f"shape mismatch for {task.out_name!r}: {_describe(sources, task)}")
  return shapes[0], dts


def task_dtypes(task: TensorTask, sources, dtype=None, out_dtype=None) -> tuple:
  """(working dtype, output dtype) of a task, as the plan computes them.

  Float inputs are cast to ``dtype`` when given; mixed stored dtypes are
  promoted (bf16 counting as float32). The result has the working dtype
  unless ``out_dtype`` is given (floats only).
  """
  _, dts = _check_task(task, sources)
  loaded = [np.dtype(dtype) if dtype is not None and _is_float(d) else d for d in dts]
  dt = _promote(loaded)
  out = np.dtype(out_dtype) if out_dtype is not None and _is_float(dt) else dt
  return dt, out


def output_specs(plan: Sequence[TensorTask], sources, dtype=None, out_dtype=None) -> list:
  """``(name, shape, dtype)`` of every output tensor in plan order (`PlannedHFWriter`)."""
  specs = []
  for t in plan:
    shape, _ = _check_task(t, sources)
    specs.append((t.out_name, shape, task_dtypes(t, sources, dtype, out_dtype)[1]))
  return specs


def _chunkable(method: Method, static: Mapping) -> bool:
  """Methods that declare themselves elementwise (`Method.elementwise`) run on
  fixed-size flat chunks: one compiled program serves every tensor shape, and
  XLA's temporaries stay chunk-sized. (tests/test_streaming.py checks each
  against the whole-tensor kernel, bit for bit.)"""
  return method.is_elementwise(static)


def _chunks(n: int, size: int) -> list:
  """(start, lo, hi) per chunk: chunk covers flat [start, start + size), of which
  local [lo, hi) is new. The last chunk is moved back to end at n (it overlaps
  the one before; overlapped entries are computed twice, identically)."""
  if n <= size:
    return [(0, 0, n)]
  out, s = [], 0
  while s + size <= n:
    out.append((s, 0, size))
    s += size
  if s < n:
    out.append((n - size, size - (n - s), size))
  return out


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


# ------------------------------------------------------------------ progress


class _Progress:
  """tqdm bar over bytes read + written: tensors done, GB/s and ETA."""

  def __init__(self, plan_len: int, total_bytes: int, enabled: bool):
    self.n, self.total = 0, plan_len
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                      desc="merge", leave=False, dynamic_ncols=True)

  def update(self, nbytes: int, tensor_done: bool = True) -> None:
    self.n += int(tensor_done)
    if self.bar is not None:
      self.bar.set_postfix_str(f"{self.n}/{self.total} tensors", refresh=self.n == self.total)
      self.bar.update(nbytes)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# ------------------------------------------------------------------ execute

LOOKAHEAD = 2   # tasks whose cuts are being found while earlier ones compute
SEGMENT_CHUNKS = 4   # streamed tensors are read in flat segments of this many chunks


@dataclasses.dataclass
class Stats:
  """What `execute` measured (pass ``stats=Stats()`` to get it)."""
  tensors: int = 0
  chunked: int = 0
  bytes_read: int = 0
  bytes_written: int = 0
  seconds: float = 0.0
  peak_buffer_bytes: int = 0
  clamped: dict = dataclasses.field(default_factory=dict)     # name -> values clamped
  copied: list = dataclasses.field(default_factory=list)      # integer / bool tensors copied
  nonfinite: dict = dataclasses.field(default_factory=dict)   # name -> NaN/Inf written


@dataclasses.dataclass
class _Job:
  """One task on its way through the threads."""
  index: int
  task: TensorTask
  shape: tuple
  dt: np.dtype                    # working dtype
  out_dt: np.dtype
  in_bytes: int
  chunked: bool = False
  static: dict = None
  hp: dict = None
  inputs: list = None             # chunked: flat host buffers (base first)
  base: Any = None                # whole-tensor: device arrays
  experts: Any = None
  buffers: list = None            # pool buffers to recycle
  full: Optional[np.ndarray] = None
  views: Optional[dict] = None    # chunk start -> device arrays aliasing the buffers
  static_key: tuple = ()
  cuts: Optional[dict] = None     # host-found cuts of the method's selection (`Method.selection`)
  weights: Any = None
  rng: Any = None
  seg: Optional[tuple] = None     # flat [start, stop) of a streamed segment; None: whole
  host: Optional[np.ndarray] = None   # integer / bool tensors: the agreed value (`_agreed`)
  last: bool = True               # the task's last (or only) job

  @property
  def numel(self) -> int:
    return self.seg[1] - self.seg[0] if self.seg else int(np.prod(self.shape))


def execute(plan: Sequence[TensorTask], sources: Sequence[TensorSource],
            write: Callable[[str, np.ndarray], None], *, key: jax.Array | None = None,
            dtype=None, out_dtype=None, progress: bool = True, mesh=None,
            prefetch_bytes: Optional[int] = None, chunk: Optional[int] = None,
            write_part: Optional[Callable[[str, int, np.ndarray], None]] = None,
            stats: Optional[Stats] = None, allow_nonfinite: bool = False,
            overflow: str = "error") -> int:
  """Run a plan, streaming; returns the number of tensors written.

  Args:
    plan: tasks in output order; ``write`` is called in that order.
    sources: the models that the tasks' (model index, name) pairs refer to.
    write: ``write(name, array)`` per result.
    key: run key for random methods (each tensor gets ``fold_in(key, crc32(name))``).
    dtype: cast float inputs to this dtype at load (mergekit's ``dtype:``).
    out_dtype: cast float results to this dtype.
    progress: show a progress bar (tensors done, GB/s, ETA).
    mesh: a 1-D `jax.sharding.Mesh` (`kfuse.shard.make_mesh`): shard every tensor.
    prefetch_bytes: cap on input bytes held at once (default: the largest
      task, at least 512 MB); reading runs ahead of computing within it.
    chunk: flat chunk length for elementwise recipes (default 2**18, or 2**20
      when most tensors exceed 4M entries; 0 disables chunking).
    write_part: ``write_part(name, start, flat_values)`` writes part of a
      result (e.g. `PlannedHFWriter.add_part`); chunked results then go
      straight to it instead of being assembled for ``write``.
    stats: optional `Stats` to fill in.
    allow_nonfinite: write results holding NaN/Inf (counted in ``stats.nonfinite``)
      instead of refusing them.
    overflow: 'error' refuses finite values that a cast to the working or output
      dtype would turn into ±inf (naming the tensor, the count and the dtype);
      'clamp' writes ±max of that dtype instead (counted in ``stats.clamped``).
  """
  t0 = time.perf_counter()
  check_overflow(overflow)
  plan = list(plan)
  dt_in = np.dtype(dtype) if dtype is not None else None
  dt_out = np.dtype(out_dtype) if out_dtype is not None else None
  jobs = []
  for i, t in enumerate(plan):
    shape, _ = _check_task(t, sources)
    dt, odt = task_dtypes(t, sources, dt_in, dt_out)
    n_in = (1 if t.base is not None else 0) + len(t.experts)
    jobs.append(_Job(i, t, shape, dt, odt, n_in * int(np.prod(shape)) * dt.itemsize))
  sizes = sorted(int(np.prod(j.shape)) for j in jobs)
  if chunk is None:
    chunk = (1 << 20) if sizes and sizes[len(sizes) // 2] >= (1 << 22) else (1 << 18)
  if write_part is not None and mesh is None and chunk > 0:
    jobs = _segmented(jobs, sources, SEGMENT_CHUNKS * chunk)
  largest = max([j.in_bytes for j in jobs], default=0)
  pool = BufferPool(prefetch_bytes if prefetch_bytes else max(largest, 512 << 20))
  total = sum(j.in_bytes + j.numel * j.out_dt.itemsize for j in jobs)
  bar = _Progress(len(plan), total, progress)
  st = stats if stats is not None else Stats()
  run = _Run(sources, write, write_part, key, mesh, pool, chunk, bar, st,
             allow_nonfinite=allow_nonfinite, overflow=overflow)
  run.x64 = any(np.float64 in (j.dt, j.out_dt) for j in jobs)
  gc_was_on = gc.isenabled()
  gc.freeze()     # full collections would rescan every long-lived JAX object
  gc.disable()    # per dispatched chunk; nothing here makes reference cycles
  try:
    with run.scope():
      run.go(jobs)
  finally:
    if gc_was_on:
      gc.enable()
    gc.unfreeze()
    bar.close()
    st.seconds = time.perf_counter() - t0
    st.peak_buffer_bytes = pool.peak
  return st.tensors


OVERFLOW = ("error", "clamp")


def check_overflow(overflow: str) -> None:
  if overflow not in OVERFLOW:
    from kfuse.registry import suggest
    raise KfuseError(f"overflow: unknown mode {overflow!r} (error|clamp)"
                     f"{suggest(str(overflow), OVERFLOW)}")


def _agreed(task: TensorTask, sources, dt: np.dtype) -> np.ndarray:
  """An integer or bool tensor is not merged: its value when every input agrees
  (base first), else a one-line `KfuseError` naming two models that differ.

  Integer buffers (position ids, masks, counters) have no meaningful average, and
  float arithmetic would truncate them. Compared on the host, vectorised.
  """
  refs = ([task.base] if task.base is not None else []) + list(task.experts)
  (m0, n0), ref = refs[0], np.asarray(sources[refs[0][0]].get(refs[0][1]))
  for m, name in refs[1:]:
    a = np.asarray(sources[m].get(name))
    if not np.array_equal(a, ref):
      raise KfuseError(
          f"{task.out_name!r}: {ref.dtype} tensor differs between {sources[m0].path}:{n0} and"
          f" {sources[m].path}:{name} ({int(np.count_nonzero(a != ref))} entries); integer"
          f" and bool tensors are copied, not merged, so all models must agree")
  return ref.astype(dt, copy=False)


def _resolve(task: TensorTask) -> tuple:
  """The method's (static options, hyper-parameters) for one task."""
  prep = task.method.prepare or default_prepare
  return prep(task.method, dict(task.values), task.info, len(task.experts), task.context)


def _streamable(task: TensorTask, static: Mapping, sources) -> bool:
  """Whether a task can be computed segment by segment: an elementwise recipe
  with no whole-tensor selection and no randomness, over sources that read
  byte ranges."""
  method = task.method
  if method.random:
    return False
  refs = ([task.base] if task.base is not None else []) + list(task.experts)
  if not all(hasattr(sources[m], "read_into") for m, _ in refs):
    return False
  if not _chunkable(method, static):
    return False
  return task.base is None or method.selection is None


def _segmented(jobs: list, sources, seg: int) -> list:
  """Split large streamable tasks into flat segments of ``seg`` entries.

  Each segment is read, computed and written on its own (results go to
  ``write_part`` at their flat offset), so the input buffers in flight are a
  few segments, not whole tensors: no fresh pages for the largest tensors and
  reads overlap computing within one tensor.
  """
  out = []
  for j in jobs:
    n = int(np.prod(j.shape))
    static, hp = _resolve(j.task) if n > seg else (None, None)
    if n <= seg or not _is_float(j.dt) or not _streamable(j.task, static, sources):
      out.append(j)
      continue
    for a in range(0, n, seg):   # resolved once, shared by the segments
      b = min(n, a + seg)
      out.append(dataclasses.replace(j, in_bytes=j.in_bytes * (b - a) // n, seg=(a, b),
                                     last=b == n, static=static, hp=hp))
  return out


class _Run:
  """The three threads of one `execute` call (see the module docstring)."""

  def __init__(self, sources, write, write_part, key, mesh, pool, chunk, bar, stats,
               allow_nonfinite=False, overflow="error"):
    self.sources, self.write, self.write_part = sources, write, write_part
    self.allow_nonfinite, self.clamp = allow_nonfinite, overflow == "clamp"
    self.x64 = False   # float64 tasks: every thread traces and runs under `jax.enable_x64`
    self.key, self.mesh, self.pool, self.chunk = key, mesh, pool, chunk
    self.bar, self.stats = bar, stats
    self.loaded: queue.Queue = queue.Queue(maxsize=64)
    self.done: queue.Queue = queue.Queue(maxsize=6)
    self.errors: list = []
    self.in_flight = threading.Semaphore(LOOKAHEAD + 2)   # tasks read, not yet written
    self.slots: dict = {}
    self.slot_lock = threading.Lock()
    self._accs: dict = {}       # reusable selection counters (no fresh pages per pass)
    self.acc_lock = threading.Lock()

  def scope(self):
    """`jax.enable_x64` (thread-local) when the plan holds float64 tensors."""
    return jax.enable_x64(True) if self.x64 else contextlib.nullcontext()

  def fail(self, e: BaseException) -> None:
    if not self.errors:
      self.errors.append(e)
    self.pool.close()

  # -- threads
  def go(self, jobs) -> None:
    threads = [threading.Thread(target=self.reader, args=(jobs,), name="kfuse-read", daemon=True),
               threading.Thread(target=self.writer, name="kfuse-write", daemon=True)]
    for th in threads:
      th.start()
    job = True
    pending: collections.deque = collections.deque()
    # Several processes must issue their collectives in the same order: with one task
    # ahead, each task is prepared only while the main thread waits for it.
    lookahead = 1 if jax.process_count() > 1 else LOOKAHEAD
    ex = concurrent.futures.ThreadPoolExecutor(lookahead, thread_name_prefix="kfuse-select")
    try:
      # Exact cuts need host round trips between histogram passes. Preparing the
      # next tasks on worker threads keeps XLA busy during those round trips.
      while True:
        while job is not None and len(pending) < lookahead and not self.errors:
          try:
            job = self.loaded.get(block=not pending)
          except queue.Empty:
            break
          if job is not None:
            pending.append((job, ex.submit(self.prepare, job)))
        if not pending or self.errors:
          break
        ready, fut = pending.popleft()
        fut.result()
        self.dispatch(ready)
    except _Stopped:
      pass
    except BaseException as e:  # noqa: BLE001 — re-raised below
      self.fail(e)
    finally:
      ex.shutdown(wait=True, cancel_futures=True)
      self.done.put(None)
      if self.errors:
        self.pool.close()
        while job is not None:          # until the reader's end marker
          job = self.loaded.get()
      for th in threads:
        th.join()
      self.slots.clear()
    if self.errors:
      raise self.errors[0]

  def reader(self, jobs) -> None:
    try:
      with self.scope():
        self._read_all(jobs)
    except _Stopped:
      pass
    except BaseException as e:  # noqa: BLE001
      self.fail(e)
    finally:
      self.loaded.put(None)

  def _read_all(self, jobs) -> None:
    for job in jobs:
      while not self.in_flight.acquire(timeout=0.1):
        if self.errors:
          return
      if self.errors:
        return
      self.load(job)
      self.loaded.put(job)

  def writer(self) -> None:
    try:
      while True:
        item = self.done.get()
        if item is None:
          return
        self.finish(*item)
    except BaseException as e:  # noqa: BLE001
      self.fail(e)
      while self.done.get() is not None:   # never leave the main thread blocked
        pass

  # -- reading (reader thread)
  def load(self, job: _Job) -> None:
    task, src = job.task, self.sources
    method = task.method
    if not _is_float(job.dt):
      job.host = _agreed(task, src, job.dt)
      return
    if job.static is None:
      job.static, job.hp = _resolve(task)
    n = job.numel
    job.chunked = (self.mesh is None and self.chunk > 0 and n > 0
                   and _chunkable(method, job.static))
    if job.seg is not None and not job.chunked:
      raise AssertionError(f"{task.out_name}: a segmented task must be chunkable")
    refs = ([task.base] if task.base is not None else []) + list(task.experts)
    stored = [np.dtype(src[m].dtype(nm)) for m, nm in refs]
    if self.mesh is not None:
      return self._load_sharded(job, stored)
    job.buffers = []
    if job.chunked:
      size = max(n, self.chunk)
      job.inputs = []
      for j, ((m, nm), sdt) in enumerate(zip(refs, stored)):
        buf = self.pool.take(size * sdt.itemsize, wait=j == 0)
        job.buffers.append(buf)
        flat = buf[:size * sdt.itemsize].view(sdt)
        if job.seg is not None:
          src[m].read_into(nm, flat[:n], start=job.seg[0] * sdt.itemsize)
        else:
          _read(src[m], nm, flat[:n].reshape(job.shape))
        job.inputs.append(flat)
      return
    if task.base is not None:
      m, nm = task.base
      buf = self.pool.take(n * stored[0].itemsize)
      job.buffers.append(buf)
      view = buf[:n * stored[0].itemsize].view(stored[0]).reshape(job.shape)
      job.base = jax.device_put(_read(src[m], nm, view), may_alias=True)
    e_stored = stored[1:] if task.base is not None else stored
    e_dt = e_stored[0] if len(set(e_stored)) == 1 else job.dt   # mixed: cast on the host
    nbytes = len(task.experts) * n * e_dt.itemsize
    buf = self.pool.take(nbytes, wait=task.base is None)
    job.buffers.append(buf)
    stack = buf[:nbytes].view(e_dt).reshape((len(task.experts),) + tuple(job.shape))
    for j, (m, nm) in enumerate(task.experts):
      _read(src[m], nm, stack[j, ...])   # `...`: a view even for 0-d tensors (stack[j] copies)
    job.experts = jax.device_put(stack, may_alias=True)

  def _load_sharded(self, job: _Job, stored) -> None:
    """Each device's rows straight from disk (`shard.read_global`)."""
    task, src, shape, mesh = job.task, self.sources, tuple(job.shape), self.mesh
    job.buffers = []
    if task.base is not None:
      m, nm = task.base

      def read_base(index, m=m, nm=nm):
        lo, hi = shard.rows_of(index, shape)
        return _read_rows(src[m], nm, shape, stored[0], lo, hi)

      job.base = shard.read_global(shape, stored[0], shard.tensor_sharding(mesh, shape),
                                   read_base)
    e_stored = stored[1:] if task.base is not None else stored
    e_dt = e_stored[0] if len(set(e_stored)) == 1 else job.dt

    def read_experts(index):
      lo, hi = shard.rows_of(index[1:], shape)
      return np.stack([_read_rows(src[m], nm, shape, e_dt, lo, hi) for m, nm in task.experts])

    job.experts = shard.read_global((len(task.experts),) + shape, e_dt,
                                    shard.stacked_sharding(mesh, shape), read_experts)

  # -- computing (main thread)
  def prepare(self, job: _Job) -> None:
    """Hyper-parameters of a task, with its exact cuts (a worker thread)."""
    with self.scope():
      self._prepare(job)

  def _prepare(self, job: _Job) -> None:
    task = job.task
    method = task.method
    if job.host is not None:
      return
    n_models = len(task.experts)
    job.static_key = tuple(sorted(job.static.items()))
    hp = dict(job.hp)
    if "weight" in method.param_map:
      job.weights = np.asarray(task.values["weight"], np.float32)
    else:
      job.weights = np.ones((n_models,), np.float32)
    if method.random and self.key is None:
      raise KfuseError(f"method {method.name!r} is random: pass key=jax.random.key(seed)")
    job.rng = path_key(self.key, task.out_name) if self.key is not None else jax.random.key(0)
    kind = method.selection if task.base is not None else None
    if kind is not None:
      job.cuts = self._cuts(job, kind, hp, int(np.prod(job.shape)))
    job.hp = hp

  def dispatch(self, job: _Job) -> None:
    if job.host is not None:
      return self.done.put(("host", job, None, None, None))
    task = job.task
    method = task.method
    has_base = task.base is not None
    static_key, hp, weights, rng = job.static_key, job.hp, job.weights, job.rng
    if job.chunked:
      return self._dispatch_chunks(job, static_key, weights, hp, rng, has_base)
    hp = {k: jnp.asarray(v) for k, v in hp.items()}
    cuts = None if job.cuts is None else {k: jnp.asarray(v) for k, v in job.cuts.items()}
    if self.mesh is not None:
      weights, hp, rng, cuts = shard.put_replicated((weights, hp, rng, cuts), self.mesh)
    prog = _program(method, static_key, job.dt.name, job.out_dt.name, has_base, 0, self.clamp)
    if self.mesh is not None:
      with jax.set_mesh(self.mesh):   # lets kernels pin reductions (`shard.tensor_sum`)
        out, bad = prog(job.base, job.experts, weights, hp, rng, cuts)
      if jax.process_count() > 1:     # gathers are collectives: keep them in this thread's order
        out, bad = shard.to_host(out), shard.to_host(bad)
    else:
      out, bad = prog(job.base, job.experts, weights, hp, rng, cuts)
    self.done.put(("tensor", job, None, out, bad))

  def _cuts(self, job: _Job, kind: str, hp: dict, n: int) -> dict:
    """Exact cuts from the host (``state.cuts`` for the recipe's selecting stage)."""
    has_base = job.task.base is not None
    bits = select.key_bits(job.dt)
    out = {}
    for name, kname in CUTS[kind]:
      k = np.asarray(hp[kname])
      if job.chunked:
        cut = self._chunk_cuts(job, kind, n, k, bits)
      else:
        rows = select._rows(tuple(job.shape))[0]
        cut = select.find_cuts_array(_array_keyfn(kind, job.dt.name, has_base),
                                     (job.base, job.experts), n, k, bits, rows)
      out[f"{name}_v"], out[f"{name}_p"] = cut.v, cut.p
    out["tie_seed"] = select.tie_seeds(n, len(job.task.experts))
    return out

  def _chunk_cuts(self, job: _Job, kind: str, n: int, k, bits: int) -> select.Cut:
    has_base = job.task.base is not None
    n_models = len(job.task.experts)
    hist_k, tie_k = _chunk_kernels(kind, job.dt.name, has_base, n_models, self.chunk)
    chunks = _chunks(n, self.chunk)
    accs = self._accs

    views = self._views(job)

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

  def _views(self, job: _Job) -> Callable:
    """Device arrays aliasing each chunk of the task's host buffers, made once per
    task (numpy arguments to jit would be copied into fresh pages per call)."""
    cache = job.views = job.views if job.views is not None else {}

    def views(start):
      if start not in cache:
        cache[start] = [jax.device_put(x[start:start + self.chunk], may_alias=True)
                        for x in job.inputs]
      return cache[start]

    return views

  def _slot(self, size: int, dt: np.dtype):
    with self.slot_lock:
      free = self.slots.get((size, dt.name))
      if free:
        return free.pop()
    return jnp.zeros((size,), dt)

  def _dispatch_chunks(self, job, static_key, weights, hp, rng, has_base) -> None:
    task = job.task
    prog = _program(task.method, static_key, job.dt.name, job.out_dt.name, has_base,
                    self.chunk, self.clamp)
    n = job.numel
    chunks = _chunks(n, self.chunk)
    fixed = {k: jnp.asarray(v) for k, v in hp.items()}
    cuts = None if job.cuts is None else {k: jnp.asarray(v) for k, v in job.cuts.items()}
    weights = jnp.asarray(weights)
    if self.write_part is None:
      job.full = np.empty((n,), job.out_dt)
    views = self._views(job)
    for s, lo, hi in chunks:
      cc = None
      if cuts is not None:         # ties hash the flat index: the chunk's start
        cc = dict(cuts, tie_offset=np.int32(s))
      inputs = views(s)
      out, bad = prog(self._slot(self.chunk, job.out_dt), inputs, weights, fixed, rng, cc,
                      np.int32(lo), np.int32(hi))
      self.done.put(("part", job, (s, lo, hi), out, bad))
    self.done.put(("end", job, None, None, None))

  # -- writing (writer thread)
  def finish(self, kind: str, job: _Job, where, out, bad) -> None:
    task = job.task
    if kind == "part":
      s, lo, hi = where
      arr = np.asarray(out)
      self._check(job, np.asarray(bad), arr[lo:hi])
      if job.full is not None:
        job.full[s + lo:s + hi] = arr[lo:hi]
      elif shard.is_writer():
        off = job.seg[0] if job.seg is not None else 0
        self.write_part(task.out_name, off + s + lo, arr[lo:hi])
      del arr
      with self.slot_lock:
        self.slots.setdefault((self.chunk, job.out_dt.name), []).append(out)
      return
    if kind == "tensor":
      arr = shard.to_host(out)
      self._check(job, np.asarray(bad), arr)
    elif kind == "host":
      arr = job.host
      self.stats.copied.append(task.out_name)
    else:  # "end" of a chunked task
      arr = job.full.reshape(job.shape) if job.full is not None else None
    for b in job.buffers or []:
      self.pool.give(b)
    job.buffers, job.inputs, job.base, job.experts, job.views = [], None, None, None, None
    self.in_flight.release()
    if arr is not None and shard.is_writer():
      self.write(task.out_name, arr)
    out_bytes = job.numel * job.out_dt.itemsize
    self.stats.tensors += int(job.last)
    self.stats.chunked += int(job.chunked and job.last)
    self.stats.bytes_read += job.in_bytes
    self.stats.bytes_written += out_bytes
    self.bar.update(job.in_bytes + out_bytes, tensor_done=job.last)
    job.full = None

  def _check(self, job: _Job, flags: np.ndarray, result: np.ndarray) -> None:
    """Act on a program's `FLAGS`: name the first input holding a NaN (else an Inf);
    refuse values out of the working / output dtype's range (or count them when
    clamping) and NaN/Inf results (unless ``allow_nonfinite``)."""
    if not flags.any():
      return
    task = job.task
    bad_in, in_over, nonfinite, out_over = (int(x) for x in flags)
    if bad_in:
      refs = ([task.base] if task.base is not None else []) + list(task.experts)
      for m, name in refs:
        src = self.sources[m]
        _finite_or_raise(np.asarray(src.get(name)),
                         f"{src.path}: tensor {name!r} (shape {tuple(src.shape(name))})")
      raise KfuseError(f"{task.out_name!r}: non-finite input")
    for n, to, what in ((in_over, job.dt, "input values"), (out_over, job.out_dt, "results")):
      if not n:
        continue
      if not self.clamp:
        raise KfuseError(
            f"{task.out_name!r}: {n} {what} out of the range of {to.name} (|x| >"
            f" {float(jnp.finfo(to).max):.6g}) would become inf; use a wider dtype or"
            f" overflow='clamp' (--config.overflow=clamp) to clamp them to ±max")
      self.stats.clamped[task.out_name] = self.stats.clamped.get(task.out_name, 0) + n
    if nonfinite:   # rare: count on the host
      r = result.astype(np.float32) if result.dtype.itemsize < 4 else result
      nonfinite = int(np.count_nonzero(~np.isfinite(r)))
    if nonfinite and not self.allow_nonfinite:
      raise KfuseError(
          f"{task.out_name!r}: method {task.method.name!r} gave {nonfinite} NaN/Inf values"
          f" from finite inputs (e.g. weights summing to 0); pass allow_nonfinite=True"
          f" (--config.allow_nonfinite=True) to write them anyway")
    if nonfinite:
      self.stats.nonfinite[task.out_name] = self.stats.nonfinite.get(task.out_name, 0) + nonfinite
