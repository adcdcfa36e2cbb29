"""`execute`: the reader, main (with cut-search workers) and writer threads that
stream a plan through the device programs (see the package docstring)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import shard
from kfuse.merge.api import path_key
from kfuse.merge.engine.buffers import BufferPool, _Stopped
from kfuse.merge.engine.cuts import CutSearch
from kfuse.merge.engine.plan import (TensorTask, _agreed, _check_task,
                                     _chunks, _chunkable, _is_float, _resolve, _segmented,
                                     task_dtypes)
from kfuse.merge.engine.programs import _program
from kfuse.merge.engine.sources import TensorSource, _finite_or_raise, _read, _read_rows
from kfuse.tree import KfuseError




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
  # (time.perf_counter(), time.process_time()) when execute started / the first tensor was done
  started: Optional[tuple] = None
  first_tensor: Optional[tuple] = None
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
  st = stats if stats is not None else Stats()
  st.started = (t0, time.process_time())
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
    self.search = CutSearch(chunk)   # exact cuts of declared selections (`cuts`)

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
      job.cuts = self.search.cuts(job, kind, hp, int(np.prod(job.shape)), self._views(job))
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
    if job.last and self.stats.first_tensor is None:
      self.stats.first_tensor = (time.perf_counter(), time.process_time())
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
