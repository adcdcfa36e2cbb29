"""A merge plan: one `TensorTask` per output tensor, its shapes and dtypes, and how
the engine cuts it up (flat chunks for elementwise methods, streamed segments).

Every front end (`merge_checkpoints`, mergekit YAML) builds a plan; `execute`
runs it. What a task's method allows (chunks, host-found cuts, segments) comes
from what the method declares (`Method.elementwise`, `Method.selection`,
`Method.random`), never from its name.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from kfuse.merge.core import NATIVE, Method, PrepareContext, TensorInfo
from kfuse.merge.methods import default_prepare
from kfuse.tree import KfuseError


@dataclasses.dataclass
class TensorTask:
  out_name: str
  method: Method
  base: Optional[tuple]            # (model index, tensor name) or None
  experts: list                    # [(model index, tensor name), ...]
  values: dict                     # resolved python parameter values
  info: TensorInfo
  context: PrepareContext = NATIVE  # for the method's prepare (dialect, whole-model stats)


def _is_float(dt) -> bool:
  dt = np.dtype(dt)
  return dt.kind == "f" or dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _promote(dts) -> np.dtype:
  """Common dtype of mixed stored dtypes, promoted as torch would (bf16 → f32)."""
  dts = [np.dtype(d) for d in dts]
  if len(set(dts)) == 1:
    return dts[0]
  return np.dtype(np.result_type(*[np.float32 if d.name == "bfloat16" else d for d in dts]))




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
