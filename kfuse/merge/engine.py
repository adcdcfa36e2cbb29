"""Streaming, out-of-core execution of a merge plan over checkpoints.

A *plan* is a list of `TensorTask`s, one per output tensor, each naming its
input tensors by (model, name) and carrying its resolved parameters. Both the
mergekit-YAML runner and the native runner build plans. `execute` streams a
plan through three threads:

* **reader**: reads the inputs of the next tasks with positional reads
  (`HFModel.read_into`) into reusable page-aligned buffers; no memory maps,
  so the resident memory is the buffers, not the files;
* **main**: hands the buffers to XLA without a copy (or slices them over a
  device mesh, `kfuse.shard`), finds exact top-k cuts on the host for methods
  that trim (`select.find_cuts`), and dispatches the method's jit kernel,
  compiled once per (method, options, shape, dtype) and cached;
* **writer**: waits for each result, checks the inputs were finite, writes
  the result (e.g. `PlannedHFWriter.add`, straight to its place in its output
  shard) and recycles the input buffers.

Reading the next tensors, computing the current one and writing the previous
one overlap. Input buffers in flight are capped at ``prefetch_bytes`` (at
least one task), at most two results wait for the writer, so peak memory is
a small multiple of (experts + 2) × the largest tensor plus the runtime,
independent of the number of layers.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import queue
import threading
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import shard
from kfuse.merge import select
from kfuse.merge.api import path_key
from kfuse.merge.core import Method, TensorInfo
from kfuse.merge.methods import default_prepare
from kfuse.tree import KfuseError


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


@dataclasses.dataclass
class TensorTask:
  out_name: str
  method: Method
  base: Optional[tuple]            # (model index, tensor name) or None
  experts: list                    # [(model index, tensor name), ...]
  values: dict                     # resolved python parameter values
  info: TensorInfo


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
  (one request always fits when nothing is in use). Freed buffers are kept for
  reuse (already paged in) while the pool holds at most ``budget`` bytes.
  """

  def __init__(self, budget: int):
    self.budget = int(budget)
    self.in_use = 0
    self.held = 0                     # bytes allocated (in use + free)
    self.peak = 0
    self._free: dict[int, list] = {}
    self._cv = threading.Condition()
    self.closed = False

  @staticmethod
  def _alloc(nbytes: int) -> np.ndarray:
    mm = mmap.mmap(-1, max(nbytes, 1))
    try:
      mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
      pass
    return np.frombuffer(mm, np.uint8, count=nbytes)

  def take(self, nbytes: int) -> np.ndarray:
    with self._cv:
      while self.in_use and self.in_use + nbytes > self.budget and not self.closed:
        self._cv.wait(0.1)
      if self.closed:
        raise _Stopped()
      self.in_use += nbytes
      self.peak = max(self.peak, self.in_use)
      free = self._free.get(nbytes)
      if free:
        return free.pop()
      # make room: drop cached buffers of other sizes
      for size in list(self._free):
        while self._free[size] and self.held + nbytes > self.budget:
          self._free[size].pop()
          self.held -= size
      self.held += nbytes
    return self._alloc(nbytes)

  def give(self, buf: np.ndarray) -> None:
    with self._cv:
      n = buf.nbytes
      self.in_use -= n
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
  out = np.empty((hi - lo,) + tuple(shape[1:]), dtype)
  if hasattr(src, "read_into") and np.dtype(src.dtype(name)) == out.dtype:
    return src.read_into(name, out, start=lo * row * out.dtype.itemsize)
  np.copyto(out, np.asarray(src.get(name))[lo:hi], casting="unsafe")
  return out


# ------------------------------------------------------------------ tasks


@dataclasses.dataclass
class _Loaded:
  index: int
  task: TensorTask
  base: Any                 # jax.Array | None
  experts: Any              # jax.Array [N, ...]
  buffers: list             # pool buffers to recycle once the result is ready
  in_bytes: int
  dt: np.dtype              # working dtype
  out_dt: np.dtype          # result dtype


def _describe(sources, task) -> str:
  refs = ([task.base] if task.base else []) + task.experts
  return ", ".join(f"{sources[m].path}:{n}{tuple(sources[m].shape(n))}" for m, n in refs)


def _check_task(task: TensorTask, sources) -> tuple:
  """Shapes and stored dtypes of the task's inputs; one-line errors for bad inputs."""
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
  """(working dtype, output dtype) of a task, as the plan will compute them.

  Inputs are cast to ``dtype`` when given; otherwise mixed stored dtypes are
  promoted (bf16 counting as float32). Non-float inputs (buffers) keep their
  dtype. The result has the working dtype unless ``out_dtype`` is given.
  """
  _, dts = _check_task(task, sources)
  loaded = [np.dtype(dtype) if dtype is not None and _is_float(d) else d for d in dts]
  dt = _promote(loaded)
  out = np.dtype(out_dtype) if out_dtype is not None and _is_float(dt) else dt
  return dt, out


def output_specs(plan: Sequence[TensorTask], sources, dtype=None, out_dtype=None) -> list:
  """``(name, shape, dtype)`` of every output tensor, in plan order (for `PlannedHFWriter`)."""
  specs = []
  for t in plan:
    shape, _ = _check_task(t, sources)
    specs.append((t.out_name, shape, task_dtypes(t, sources, dtype, out_dtype)[1]))
  return specs


# ------------------------------------------------------------------ kernels


def _nonfinite(x) -> jax.Array:
  """[rows, 2] (any NaN, any Inf) per leading-axis row of a float array."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros((x.shape[0], 2), bool)
  f = x.reshape(x.shape[0], -1)
  return jnp.stack([jnp.any(jnp.isnan(f), axis=1), jnp.any(jnp.isinf(f), axis=1)], axis=1)


@functools.lru_cache(maxsize=None)
def _program(method: Method, static_key: tuple, dt: str, out_dt: Optional[str], has_base: bool):
  """The jitted per-tensor program: cast inputs, run the kernel, cast the output,
  and flag non-finite inputs (row 0: base when present, then the experts)."""
  kern = method.kernel(dict(static_key))
  dt = jnp.dtype(dt)

  def run(base, experts, weights, hp, rng):
    b = base.astype(dt) if has_base else None
    e = experts.astype(dt)
    out = kern(b, e, weights, hp, rng)
    if out_dt is not None:
      out = out.astype(out_dt)
    bad = _nonfinite(e)
    if has_base:
      bad = jnp.concatenate([_nonfinite(b[None]), bad])
    return out, bad

  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _keyfn(kind: str, dt: str, has_base: bool) -> Callable:
  """Selection keys exactly as the recipe's trim stage computes them:
  magnitudes of δ_i = θ_i − θ_b in the working dtype (reversed for bands)."""
  dt = jnp.dtype(dt)

  def keys(base, experts):
    e = experts.astype(dt)
    d = e.astype(dt) - base.astype(dt)[None] if has_base else e
    u = select.magnitude_keys(d)
    if kind == "band":
      u = select.reverse_keys(u, select.key_bits(d.dtype))
    return u

  return keys


@functools.lru_cache(maxsize=None)
def _selection(method: Method, static_key: tuple) -> Optional[str]:
  """The host-computable selection of a method's recipe ('magnitude', 'band' or None)."""
  recipe = method.recipe(**dict(static_key))
  kinds = {getattr(s, "selection", None) for s in getattr(recipe, "stages", ())} - {None}
  return kinds.pop() if len(kinds) == 1 else None


def _cuts(kind: str, hp: dict, args, n: int, rows: int, dt, has_base: bool) -> dict:
  """Exact cuts on the host, returned as extra traced hyper-parameters."""
  keyfn = _keyfn(kind, np.dtype(dt).name, has_base)
  bits = select.key_bits(dt)
  if kind == "magnitude":
    c = select.find_cuts(keyfn, args, n, np.asarray(hp["k"]), bits, rows)
    return {"cut_v": c.v, "cut_p": c.p}
  hi = select.find_cuts(keyfn, args, n, np.asarray(hp["hi"]), bits, rows)
  lo = select.find_cuts(keyfn, args, n, np.asarray(hp["lo"]), bits, rows)
  return {"cut_hi_v": hi.v, "cut_hi_p": hi.p, "cut_lo_v": lo.v, "cut_lo_p": lo.p}


# ------------------------------------------------------------------ progress


class _Progress:
  """tqdm bar over bytes read + written: shows tensors done, GB/s and ETA."""

  def __init__(self, plan_len: int, total_bytes: int, enabled: bool):
    self.n, self.total = 0, plan_len
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                      desc="merge", leave=False, dynamic_ncols=True)

  def update(self, nbytes: int) -> None:
    self.n += 1
    if self.bar is not None:
      self.bar.set_postfix_str(f"{self.n}/{self.total} tensors", refresh=False)
      self.bar.update(nbytes)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# ------------------------------------------------------------------ execute


@dataclasses.dataclass
class Stats:
  """What `execute` measured (``stats=`` argument)."""
  tensors: int = 0
  bytes_read: int = 0
  bytes_written: int = 0
  seconds: float = 0.0
  peak_buffer_bytes: int = 0


def execute(plan: Sequence[TensorTask], sources: Sequence[TensorSource],
            write: Callable[[str, np.ndarray], None], *, key: jax.Array | None = None,
            dtype=None, out_dtype=None, progress: bool = True, mesh=None,
            prefetch_bytes: Optional[int] = None, stats: Optional[Stats] = None) -> int:
  """Run a plan, streaming; returns the number of tensors written.

  Args:
    plan: tasks in output order; `write` is called in that order.
    sources: the models the tasks' (model index, name) refer to.
    write: ``write(name, array)`` for each result (numpy, valid during the call
      only when it must outlive it: copy).
    key: run key for random methods (each tensor gets ``fold_in(key, crc32(name))``).
    dtype: cast float inputs to this dtype at load (mergekit's ``dtype:``).
    out_dtype: cast float results to this dtype.
    progress: show a progress bar (tensors done, GB/s, ETA).
    mesh: a 1-D `jax.sharding.Mesh` (`kfuse.shard.make_mesh`): shard every tensor.
    prefetch_bytes: cap on input bytes held at once (default: the largest task,
      at least 512 MB); reading runs ahead of computing within it.
    stats: optional `Stats` filled in.
  """
  t0 = time.perf_counter()
  plan = list(plan)
  dt_in = np.dtype(dtype) if dtype is not None else None
  dt_out = np.dtype(out_dtype) if out_dtype is not None else None
  infos = []
  for t in plan:
    shape, _ = _check_task(t, sources)
    dt, odt = task_dtypes(t, sources, dt_in, dt_out)
    n_in = (1 if t.base is not None else 0) + len(t.experts)
    infos.append((shape, dt, odt, n_in * int(np.prod(shape)) * max(dt.itemsize, 1)))
  largest = max([b for *_, b in infos], default=0)
  pool = BufferPool(prefetch_bytes if prefetch_bytes else max(largest, 512 << 20))
  total = sum(b + int(np.prod(s)) * o.itemsize for s, _, o, b in infos)
  bar = _Progress(len(plan), total, progress)
  loaded_q: queue.Queue = queue.Queue(maxsize=64)
  done_q: queue.Queue = queue.Queue(maxsize=2)
  errors: list = []
  st = stats if stats is not None else Stats()

  def fail(e: BaseException) -> None:
    if not errors:
      errors.append(e)
    pool.close()

  def reader() -> None:
    try:
      for i, task in enumerate(plan):
        if errors:
          return
        loaded_q.put(_load(i, task, sources, infos[i], pool, mesh))
    except _Stopped:
      pass
    except BaseException as e:  # noqa: BLE001 — handed to the main thread
      fail(e)
    finally:
      loaded_q.put(None)

  def writer() -> None:
    try:
      while True:
        item = done_q.get()
        if item is None:
          return
        ld, out, bad = item
        arr = shard.to_host(out)
        bad = np.asarray(bad)
        for b in ld.buffers:
          pool.give(b)
        ld.buffers = []
        _raise_nonfinite(bad, ld.task, sources)
        if shard.is_writer():
          write(ld.task.out_name, arr)
        st.tensors += 1
        st.bytes_read += ld.in_bytes
        st.bytes_written += arr.nbytes
        bar.update(ld.in_bytes + arr.nbytes)
        del arr, out
    except BaseException as e:  # noqa: BLE001
      fail(e)
      while done_q.get() is not None:   # drain so the main thread never blocks
        pass

  threads = [threading.Thread(target=reader, name="kfuse-read", daemon=True),
             threading.Thread(target=writer, name="kfuse-write", daemon=True)]
  for th in threads:
    th.start()
  try:
    while True:
      ld = loaded_q.get()
      if ld is None or errors:
        break
      out, bad = _dispatch(ld, key, mesh)
      done_q.put((ld, out, bad))
  except BaseException as e:  # noqa: BLE001
    fail(e)
  finally:
    done_q.put(None)
    if errors:
      pool.close()
      while loaded_q.get() is not None:
        pass
    for th in threads:
      th.join()
    bar.close()
    st.seconds = time.perf_counter() - t0
    st.peak_buffer_bytes = pool.peak
  if errors:
    raise errors[0]
  return st.tensors


def _raise_nonfinite(bad: np.ndarray, task: TensorTask, sources) -> None:
  refs = ([task.base] if task.base is not None else []) + list(task.experts)
  for row, (m, name) in zip(bad, refs):
    if row.any():
      src = sources[m]
      what = "NaN" if row[0] else "Inf"
      raise KfuseError(f"{src.path}: tensor {name!r} (shape {tuple(src.shape(name))})"
                       f" contains {what}")


def _load(i: int, task: TensorTask, sources, info: tuple, pool: BufferPool, mesh) -> _Loaded:
  """Read one task's inputs (reader thread) and place them on the device(s)."""
  shape, dt, _, in_bytes = info
  refs = [task.base] if task.base is not None else []
  n = len(task.experts)
  stored = [np.dtype(sources[m].dtype(nm)) for m, nm in refs + list(task.experts)]
  # buffers hold stored dtypes (cast inside the kernel); mixed experts: host cast
  e_dt = stored[-1] if len(set(stored[len(refs):])) == 1 else dt
  b_dt = stored[0] if refs else None
  if mesh is not None:
    ld = _load_sharded(i, task, sources, shape, dt, e_dt, b_dt, in_bytes, mesh)
    ld.out_dt = info[2]
    return ld
  numel = int(np.prod(shape))
  bufs = []
  base = None
  if refs:
    raw = pool.take(numel * b_dt.itemsize)
    bufs.append(raw)
    m, nm = task.base
    base = jax.device_put(_read(sources[m], nm, raw.view(b_dt).reshape(shape)), may_alias=True)
  raw = pool.take(n * numel * e_dt.itemsize)
  bufs.append(raw)
  stack = raw.view(e_dt).reshape((n,) + tuple(shape))
  for j, (m, nm) in enumerate(task.experts):
    _read(sources[m], nm, stack[j])
  experts = jax.device_put(stack, may_alias=True)
  return _Loaded(i, task, base, experts, bufs, in_bytes, dt, info[2])


def _load_sharded(i, task, sources, shape, dt, e_dt, b_dt, in_bytes, mesh) -> _Loaded:
  """Each device's rows read straight from disk (`shard.read_global`)."""
  shape = tuple(shape)
  base = None
  if task.base is not None:
    m, nm = task.base

    def read_base(index, m=m, nm=nm):
      lo, hi = shard.rows_of(index, shape)
      return _read_rows(sources[m], nm, shape, b_dt, lo, hi)

    base = shard.read_global(shape, b_dt, shard.tensor_sharding(mesh, shape), read_base)
  stack_shape = (len(task.experts),) + shape

  def read_experts(index):
    lo, hi = shard.rows_of(index[1:], shape)
    return np.stack([_read_rows(sources[m], nm, shape, e_dt, lo, hi)
                     for m, nm in task.experts])

  experts = shard.read_global(stack_shape, e_dt, shard.stacked_sharding(mesh, shape),
                              read_experts)
  return _Loaded(i, task, base, experts, [], in_bytes, dt, dt)


def _dispatch(ld: _Loaded, key, mesh):
  """Prepare parameters, find cuts, and launch the kernel (main thread, async)."""
  task = ld.task
  method, info = task.method, task.info
  n = ld.experts.shape[0]
  prep = method.prepare or default_prepare
  static, hp = prep(method, dict(task.values), info, n)
  static_key = tuple(sorted(static.items()))
  has_base = ld.base is not None
  kind = _selection(method, static_key)
  if kind is not None and has_base:
    numel = int(np.prod(info.shape)) if info.shape else 1
    rows = select._rows(tuple(ld.experts.shape[1:]))[0]
    hp = dict(hp)
    hp.update(_cuts(kind, hp, (ld.base, ld.experts), numel, rows, ld.dt, has_base))
  if "weight" in method.param_map:
    weights = np.asarray(task.values["weight"], np.float32)
  else:
    weights = np.ones((n,), np.float32)
  if method.random and key is None:
    raise KfuseError(f"method {method.name!r} is random: pass key=jax.random.key(seed)")
  rng = path_key(key, task.out_name) if key is not None else jax.random.key(0)
  hp = {k: jnp.asarray(v) for k, v in hp.items()}
  if mesh is not None:
    rep = shard.replicated(mesh)
    weights, hp, rng = jax.device_put((weights, hp, rng), rep)
  out_dt = ld.out_dt.name if ld.out_dt != ld.dt else None
  prog = _program(method, static_key, ld.dt.name, out_dt, has_base)
  return prog(ld.base, ld.experts, weights, hp, rng)
