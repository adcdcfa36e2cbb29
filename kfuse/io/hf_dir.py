"""Hugging Face model directories in the safetensors format, read lazily.

A model is one ``.safetensors`` file, a directory with ``model.safetensors``, or
a sharded directory with ``model.safetensors.index.json`` (lookup order as in
transformers). Only headers are parsed up front (`kfuse.io.safetensors_format`);
tensors are read on demand. Writers: `kfuse.io.hf_writers`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

from kfuse.errors import KfuseError
from kfuse.io.hf_config import CONFIG_FILE
from kfuse.io.safetensors_format import SafetensorsFile, TensorEntry, as_dtype, parse_json
from kfuse.registry import suggest

__all__ = ["SINGLE_FILE", "INDEX_FILE", "HFModel", "LazyTensors", "open_hf_dir", "read_hf_dir",
           "is_hf_dir", "read_json"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str, what: str) -> Any:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise KfuseError(f"{path}: cannot read {what}: {e.strerror or e}") from e
  return parse_json(raw, path, f"in {what}")


class HFModel:
  """Lazily readable Hugging Face safetensors model (single file, directory or shards).

  Obtain with `open_hf_dir`. Only headers are parsed up front; `get` copies one
  tensor out of a read-only memory map. Usable as a context manager.
  """

  def __init__(self, path: str, files: dict[str, SafetensorsFile],
               weight_map: dict[str, str], config: dict | None,
               metadata: dict[str, Any]):
    self.path = path
    self._files = files
    self._weight_map = weight_map
    self.config = config
    self.metadata = metadata

  # -- lookup
  @property
  def names(self) -> list[str]:
    return list(self._weight_map)

  def __contains__(self, name: object) -> bool:
    return name in self._weight_map

  def __len__(self) -> int:
    return len(self._weight_map)

  def __iter__(self) -> Iterator[str]:
    return iter(self._weight_map)

  def _info(self, name: str) -> TensorEntry:
    shard = self._weight_map.get(name)
    if shard is None:
      raise KfuseError(f"{self.path}: no tensor named {name!r} ({len(self._weight_map)} tensors)"
                       f"{suggest(name, self._weight_map)}")
    return self._files[shard].tensors[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._info(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._info(name).dtype

  def nbytes(self, name: str) -> int:
    return self._info(name).nbytes

  def shard_of(self, name: str) -> str:
    """File name (relative to the model directory) holding ``name``."""
    self._info(name)
    return self._weight_map[name]

  @property
  def shards(self) -> list[str]:
    return list(self._files)

  # -- data
  def view(self, name: str) -> np.ndarray:
    """Zero-copy read-only view into the memory map (valid while the model is open)."""
    self._info(name)
    return self._files[self._weight_map[name]].view(name)

  def read_into(self, name: str, out: np.ndarray, start: int = 0) -> np.ndarray:
    """Read tensor ``name`` (or ``out.nbytes`` of it from byte ``start``) into ``out``."""
    self._info(name)
    return self._files[self._weight_map[name]].read_into(name, out, start)

  def get(self, name: str, dtype: Any = None) -> np.ndarray:
    """A fresh, writable copy of tensor ``name``, optionally cast to ``dtype``."""
    v = self.view(name)
    dt = as_dtype(dtype)
    if dt is not None and dt != v.dtype:
      return np.asarray(v).astype(dt)
    return np.array(v, copy=True)

  def close(self) -> None:
    for f in self._files.values():
      f.close()

  def __enter__(self) -> "HFModel":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"HFModel({self.path!r}, {len(self)} tensors, {len(self._files)} file(s))"


class LazyTensors(Mapping):
  """Read-only ``{name: np.ndarray}`` mapping over an `HFModel`; loads on access."""

  def __init__(self, model: HFModel, dtype: Any = None):
    self.model = model
    self.dtype = dtype

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.model:
      raise KeyError(name)
    return self.model.get(name, self.dtype)

  def __iter__(self) -> Iterator[str]:
    return iter(self.model.names)

  def __len__(self) -> int:
    return len(self.model)

  def __contains__(self, name: object) -> bool:
    return name in self.model

  def __repr__(self) -> str:
    return f"LazyTensors({self.model.path!r}, {len(self)} tensors)"


def _open_files(directory: str, names: list[str]) -> dict[str, SafetensorsFile]:
  return {n: SafetensorsFile(os.path.join(directory, n)) for n in names}


def _map_from_files(files: dict[str, SafetensorsFile]) -> dict[str, str]:
  out: dict[str, str] = {}
  for fname, f in files.items():
    for name in f.tensors:
      if name in out:
        raise KfuseError(f"{f.path}: tensor {name!r} also present in {out[name]}")
      out[name] = fname
  return out


def _open_index(directory: str) -> tuple[dict[str, SafetensorsFile], dict[str, str], dict]:
  index_path = os.path.join(directory, INDEX_FILE)
  index = read_json(index_path, "safetensors index")
  wm = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(wm, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
    raise KfuseError(f"{index_path}: 'weight_map' must be an object of name -> file name")
  first_key: dict[str, str] = {}
  for k, shard in wm.items():
    first_key.setdefault(shard, k)
  for shard, key in first_key.items():
    if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(directory, shard)):
      raise KfuseError(f"{index_path}: shard file {shard!r} (holding {key!r}) not found"
                       f" in {directory}")
  files = _open_files(directory, list(first_key))
  for k, shard in wm.items():
    if k not in files[shard].tensors:
      raise KfuseError(f"{index_path}: key {k!r} is mapped to {shard!r} but that file"
                       " has no such tensor")
  meta = index.get("metadata") or {}
  return files, dict(wm), meta if isinstance(meta, dict) else {}


def open_hf_dir(path: str | os.PathLike) -> HFModel:
  """Open a HF safetensors model: a directory (single / sharded+index) or one file.

  Inside a directory the lookup order follows transformers: ``model.safetensors``,
  then ``model.safetensors.index.json``, then every ``*.safetensors`` file
  (sorted by name; a name present in two files is an error).
  """
  p = os.fspath(path)
  if os.path.isfile(p):
    if not p.endswith(".safetensors"):
      raise KfuseError(f"{p}: not a .safetensors file")
    directory, fname = os.path.split(os.path.abspath(p))
    files = _open_files(directory, [fname])
    return HFModel(p, files, _map_from_files(files), None, files[fname].metadata)
  if not os.path.isdir(p):
    raise KfuseError(f"model directory {p} does not exist")
  if os.path.isfile(os.path.join(p, SINGLE_FILE)):
    files = _open_files(p, [SINGLE_FILE])
    wm, meta = _map_from_files(files), files[SINGLE_FILE].metadata
  elif os.path.isfile(os.path.join(p, INDEX_FILE)):
    files, wm, meta = _open_index(p)
  else:
    found = sorted(n for n in os.listdir(p) if n.endswith(".safetensors")
                   and os.path.isfile(os.path.join(p, n)))
    if not found:
      raise KfuseError(f"{p}: no {SINGLE_FILE}, {INDEX_FILE} or other .safetensors file")
    files = _open_files(p, found)
    wm, meta = _map_from_files(files), {}
  cfg_path = os.path.join(p, CONFIG_FILE)
  config = read_json(cfg_path, "model config") if os.path.isfile(cfg_path) else None
  if config is not None and not isinstance(config, dict):
    raise KfuseError(f"{cfg_path}: model config must be a JSON object, got"
                     f" {type(config).__name__}")
  return HFModel(p, files, wm, config, meta)


def read_hf_dir(path: str | os.PathLike, dtype: Any = None) -> dict[str, np.ndarray]:
  """Eagerly load every tensor of a HF model into fresh numpy arrays (in `HFModel.names` order)."""
  with open_hf_dir(path) as m:
    return {n: m.get(n, dtype) for n in m.names}


def is_hf_dir(path: str | os.PathLike) -> bool:
  """True for a ``.safetensors`` file or a directory holding safetensors weights."""
  p = os.fspath(path)
  if os.path.isfile(p):
    return p.endswith(".safetensors")
  if not os.path.isdir(p):
    return False
  return os.path.isfile(os.path.join(p, INDEX_FILE)) or any(
      n.endswith(".safetensors") for n in os.listdir(p))

