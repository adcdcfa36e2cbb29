"""Orbax checkpoints of parameter pytrees, plus format detection for `load_params`.

Orbax (v0 API) already commits a save by writing ``<dir>.orbax-checkpoint-tmp*``
and renaming it, but ``force=True`` deletes the old checkpoint *before*
writing. `save_orbax` therefore saves into a fresh temporary sibling and swaps
it in with `kfuse.io.atomic.commit_dir`, so an overwrite is all-or-nothing too.

Flax NNX: an ``nnx.State`` is saved in its Linen variables layout (`kfuse.nnx.to_variables`:
``params/...``, ``batch_stats/...``; RNG keys as key data), so a Linen model's checkpoint and an NNX model's with the
same submodule names are interchangeable, and the merge CLI reads both alike.
``restore_orbax(path, target=state)`` returns an ``nnx.State`` (types and metadata of
``target``) from that layout, or from a checkpoint of ``nnx.state(model)`` written by Orbax
directly (flax's NNX checkpointing guide: ``.../value`` leaves).
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np

from kfuse import nnx as knnx
from kfuse.io.atomic import check_output_free, commit_dir, temp_sibling
from kfuse.io.hf_dir import LazyTensors, is_hf_dir, open_hf_dir
from kfuse.tree import KfuseError, flatten

__all__ = [
    "save_orbax",
    "restore_orbax",
    "orbax_metadata",
    "is_orbax_checkpoint",
    "is_hf_dir",
    "load_params",
]

PyTree = Any
_MARKERS = ("_METADATA", "manifest.ocdbt")


def _ocp():
  import orbax.checkpoint as ocp  # deferred: importing orbax is slow
  return ocp


def _one_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _is_item_dir(path: str) -> bool:
  return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _MARKERS)


def _item_dir(path: str | os.PathLike) -> str | None:
  """The directory holding the pytree: ``path`` itself or its single item subdirectory.

  The second case covers a CheckpointManager step directory (``ckpt/100/default``).
  """
  p = os.fspath(path)
  if _is_item_dir(p):
    return p
  if not os.path.isdir(p):
    return None
  subs = [os.path.join(p, n) for n in sorted(os.listdir(p))]
  items = [s for s in subs if _is_item_dir(s)]
  return items[0] if len(items) == 1 else None


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  """True when ``path`` (or its single item subdirectory) is an orbax pytree checkpoint."""
  return _item_dir(path) is not None


def _require_item_dir(path: str | os.PathLike) -> str:
  p = os.fspath(path)
  if not os.path.exists(p):
    raise KfuseError(f"orbax checkpoint {p} does not exist")
  item = _item_dir(p)
  if item is None:
    raise KfuseError(f"{p} is not an orbax checkpoint (no _METADATA / manifest.ocdbt found)")
  return os.path.abspath(item)     # orbax refuses relative paths


def orbax_metadata(path: str | os.PathLike) -> PyTree:
  """The saved tree of orbax array metadata (``.shape``, ``.dtype``, ``.sharding``)."""
  item = _require_item_dir(path)
  ocp = _ocp()
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      m = ckptr.metadata(item)
  except Exception as e:
    raise KfuseError(f"orbax checkpoint {os.fspath(path)}: cannot read metadata:"
                     f" {_one_line(e)}") from e
  m = getattr(m, "item_metadata", m)
  return getattr(m, "tree", m)


def save_orbax(path: str | os.PathLike, tree: PyTree, overwrite: bool = False) -> str:
  """Save ``tree`` as an orbax checkpoint at ``path`` atomically; blocks until committed.

  Refuses an existing ``path`` unless ``overwrite``. Returns ``path``.
  """
  p = os.fspath(path)
  check_output_free(p, overwrite)
  tree = knnx.key_data(knnx.as_variables(tree)) if knnx.is_state(tree) else tree
  _check_saveable(p, tree)
  ocp = _ocp()
  dst = os.path.abspath(p)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  multi = jax.process_count() > 1
  target = dst if multi else temp_sibling(dst)
  try:
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
      ckptr.save(target, args=ocp.args.StandardSave(tree), force=multi and overwrite)
      ckptr.wait_until_finished()
  except BaseException as e:
    if not multi:
      _remove_tree(target)
      for leftover in glob.glob(glob.escape(target) + ".orbax-checkpoint-tmp*"):
        _remove_tree(leftover)
    if isinstance(e, Exception) and not isinstance(e, KfuseError):
      raise KfuseError(f"cannot save orbax checkpoint {p}: {_one_line(e)}") from e
    raise
  if not multi:
    commit_dir(target, dst, overwrite)
  return p


def _check_saveable(path: str, tree: PyTree) -> None:
  """Orbax rejects zero-size arrays (and then races its own cleanup): fail early instead."""
  for k, v in flatten(tree).items():
    if 0 in tuple(np.shape(v)):
      raise KfuseError(f"cannot save orbax checkpoint {path}: key {k!r} has zero-size"
                       f" shape {tuple(np.shape(v))}, which orbax cannot store")


def _remove_tree(path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)


def _host_restore_args(meta_tree: PyTree) -> PyTree:
  ocp = _ocp()

  def f(m):
    if hasattr(m, "shape") and hasattr(m, "dtype"):
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.RestoreArgs()

  return jax.tree.map(f, meta_tree)


def _abstract(x: Any) -> Any:
  """Restore target leaf: jax arrays / ShapeDtypeStructs become ShapeDtypeStructs with a sharding.

  Orbax restores a ShapeDtypeStruct *without* sharding as whatever type was
  saved (numpy for host arrays), so such leaves get the default device.
  Numpy leaves stay numpy.
  """
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct) and getattr(x, "sharding", None) is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)
  return x


def _check_target(path: str, meta_tree: PyTree, target: PyTree) -> None:
  saved, want = flatten(meta_tree), flatten(target)
  for k in want:
    if k not in saved:
      raise KfuseError(f"orbax checkpoint {path}: target key {k!r} is not in the checkpoint"
                       f" ({len(saved)} saved keys)")
  for k in saved:
    if k not in want:
      raise KfuseError(f"orbax checkpoint {path}: saved key {k!r} is missing from the target")
  for k, v in want.items():
    s_shape, t_shape = tuple(getattr(saved[k], "shape", ())), tuple(np.shape(v))
    if s_shape != t_shape:
      raise KfuseError(f"orbax checkpoint {path}: key {k!r} has shape {s_shape} but the"
                       f" target asks for {t_shape}")


def restore_orbax(path: str | os.PathLike, target: PyTree | None = None) -> PyTree:
  """Restore an orbax checkpoint.

  Without ``target``: host numpy arrays in the saved tree structure. With
  ``target`` (a pytree of `jax.ShapeDtypeStruct`, optionally with ``sharding``,
  or of concrete arrays): arrays come back with the target's dtypes and
  shardings. Keys and shapes must match the checkpoint exactly.
  """
  p = os.fspath(path)
  item = _require_item_dir(p)
  if knnx.is_state(target):
    return _restore_nnx(p, target)
  ocp = _ocp()
  meta_tree = orbax_metadata(item)
  try:
    if target is None:
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return ckptr.restore(item, args=ocp.args.PyTreeRestore(
            restore_args=_host_restore_args(meta_tree)))
    _check_target(p, meta_tree, target)
    abstract = jax.tree.map(_abstract, target)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      return ckptr.restore(item, args=ocp.args.StandardRestore(abstract))
  except KfuseError:
    raise
  except Exception as e:
    raise KfuseError(f"orbax checkpoint {p}: restore failed: {_one_line(e)}") from e


def _restore_nnx(path: str, like: Any) -> Any:
  """An ``nnx.State`` shaped like ``like`` from kfuse's layout or Orbax's native NNX one."""
  variables = knnx.key_data(knnx.to_variables(like))     # RNG keys are stored as key data
  saved = set(flatten(orbax_metadata(path)))
  native = knnx.native_tree(like)
  if saved != set(flatten(variables)) and saved == set(flatten(native)):
    return knnx.from_native(restore_orbax(path, native), like)
  return knnx.to_state(restore_orbax(path, variables), like=like)


def load_params(path: str | os.PathLike) -> tuple[Mapping[str, Any], str]:
  """Open any supported parameter source as a flat ``{name: array}`` mapping.

  Returns ``(params, kind)``: kind ``"hf"`` gives a lazy `LazyTensors` over the
  safetensors files (HF names, arrays read on access); kind ``"orbax"`` gives
  host numpy arrays keyed by '/'-joined pytree paths (`kfuse.tree.flatten`).
  """
  p = os.fspath(path)
  if not os.path.exists(p):
    raise KfuseError(f"model path {p} does not exist")
  if is_hf_dir(p):
    return LazyTensors(open_hf_dir(p)), "hf"
  if is_orbax_checkpoint(p):
    return flatten(restore_orbax(p)), "orbax"
  raise KfuseError(f"{p} is neither a HF safetensors model nor an orbax checkpoint")
