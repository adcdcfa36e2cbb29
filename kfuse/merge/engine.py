"""Tensor-by-tensor execution of a merge plan over lazily loaded checkpoints.

A *plan* is a list of `TensorTask`s, one per output tensor, each naming its
input tensors by (model, name) and carrying its resolved parameters. `execute`
loads only the inputs of one task at a time (memory-mapped safetensors or an
in-memory dict), runs the method's cached jit kernel and hands the result to
a writer, so peak memory is about (inputs + 1) × one tensor plus one output
shard. Both the mergekit-YAML runner and the native runner build plans.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.merge.api import merge_tensor, path_key
from kfuse.merge.core import Method, TensorInfo
from kfuse.tree import KfuseError


class TensorSource(Protocol):
  """What the engine needs from an input model (e.g. `kfuse.io.HFModel`)."""
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
  m, name = ref
  src = sources[m]
  if name not in src:
    raise KfuseError(f"{src.path}: missing tensor {name!r}")
  a = src.get(name, dtype=dtype)
  _finite_or_raise(a, f"{src.path}: tensor {name!r}")
  return a


def execute(plan: Sequence[TensorTask], sources: Sequence[TensorSource],
            write: Callable[[str, np.ndarray], None], *, key: jax.Array | None = None,
            dtype=None, out_dtype=None, progress: bool = True) -> int:
  """Run a plan; returns the number of tensors written."""
  it = plan
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(plan, desc="merge", unit="tensor", leave=False)
  count = 0
  for task in it:
    base = load_input(sources, task.base, dtype) if task.base is not None else None
    exps = [load_input(sources, r, dtype) for r in task.experts]
    shapes = {tuple(e.shape) for e in exps} | ({tuple(base.shape)} if base is not None else set())
    if len(shapes) > 1:
      refs = ([task.base] if task.base else []) + task.experts
      desc = ", ".join(f"{sources[m].path}:{n}{tuple(sources[m].shape(n))}" for m, n in refs)
      raise KfuseError(f"shape mismatch for {task.out_name!r}: {desc}")
    dts = {e.dtype for e in exps} | ({base.dtype} if base is not None else set())
    if len(dts) > 1:  # mixed stored dtypes: promote, as torch would
      common = np.result_type(*[np.float32 if d.name == "bfloat16" else d for d in dts])
      exps = [e.astype(common) for e in exps]
      base = base.astype(common) if base is not None else None
    stacked = jnp.asarray(np.stack(exps))
    b = jnp.asarray(base) if base is not None else None
    k = path_key(key, task.out_name) if key is not None else None
    out = merge_tensor(task.method, b, stacked, task.values, task.info, k)
    out = np.asarray(out)
    if out_dtype is not None:
      out = out.astype(out_dtype)
    write(task.out_name, out)
    count += 1
  return count
