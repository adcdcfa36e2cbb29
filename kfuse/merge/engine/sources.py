"""Where the engine reads tensors from: the `TensorSource` protocol, in-memory and
Orbax sources, and positional reads into caller buffers (whole tensors or rows)."""

from __future__ import annotations

import threading
from typing import Any, Mapping, Protocol, Sequence

import jax
import numpy as np

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
