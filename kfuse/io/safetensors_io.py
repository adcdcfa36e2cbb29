"""Hugging Face model directories in the safetensors format, read and written natively.

File layout (https://github.com/huggingface/safetensors): an 8-byte
little-endian uint64 ``N``, then ``N`` bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and then the raw little-endian tensor bytes, offsets relative to the end of the
header.

Reads go through a read-only `np.memmap`, so opening a model costs only its
headers and `HFModel.get` touches just the bytes of one tensor. bfloat16 and
float8 are handled with `ml_dtypes`. Files are validated strictly and every
problem is reported as a one-line `KfuseError` naming the file and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import fnmatch
import json
import math
import os
import shutil
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from kfuse.io.atomic import (atomic_output_dir, atomic_write_bytes, atomic_write_text,
                             remove_stale_outputs)
from kfuse.tree import KfuseError, resolve_dtype

__all__ = [
    "TensorInfo",
    "SafetensorsFile",
    "read_safetensors_header",
    "write_safetensors",
    "HFModel",
    "LazyTensors",
    "open_hf_dir",
    "read_hf_dir",
    "HFWriter",
    "PlannedHFWriter",
    "remove_stale_outputs",
    "write_hf_dir",
    "copy_aux_files",
    "is_hf_dir",
    "hf_config",
    "config_num_layers",
    "check_config_layers",
    "LAYER_COUNT_KEYS",
    "PER_LAYER_KEYS",
    "SINGLE_FILE",
    "INDEX_FILE",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in _ST_TO_NP.items()}
_ML_FLOATS = frozenset(("bfloat16", "float8_e4m3fn", "float8_e5m2"))
_TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16",
                      "bfloat16": "bfloat16", "float64": "float64"}

# Files `copy_aux_files` carries over (weights never match these).
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "*.txt",
    "chat_template.jinja", "preprocessor_config.json",
)

# ----------------------------------------------------------------- one file


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives inside a safetensors file (offsets relative to the data)."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


@dataclasses.dataclass(frozen=True)
class _Header:
  tensors: dict[str, TensorInfo]  # ordered by data offset
  metadata: dict[str, Any]
  data_start: int
  data_size: int


def _parse_entry(path: str, name: str, entry: Any, data_size: int) -> TensorInfo:
  """Validate one header entry; raise a one-line KfuseError naming file and key."""
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
    raise KfuseError(f"{path}: header entry {name!r} must have dtype, shape and data_offsets")
  dt = _ST_TO_NP.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
  if dt is None:
    raise KfuseError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
  shape, offs = entry["shape"], entry["data_offsets"]
  if not isinstance(shape, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    raise KfuseError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
  if (not isinstance(offs, list) or len(offs) != 2 or not all(
      isinstance(o, int) and not isinstance(o, bool) for o in offs)
      or offs[0] < 0 or offs[1] < offs[0]):
    raise KfuseError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
  begin, end = offs
  need = math.prod(shape) * dt.itemsize
  if end - begin != need:
    raise KfuseError(f"{path}: tensor {name!r} data_offsets {offs} span {end - begin} bytes"
                     f" but {entry['dtype']} x {shape} needs {need}")
  if end > data_size:
    raise KfuseError(f"{path}: tensor {name!r} data_offsets {offs} end beyond the"
                     f" {data_size} data bytes present (file truncated?)")
  return TensorInfo(name, dt, tuple(shape), begin, end)


def _check_overlaps(path: str, infos: list[TensorInfo]) -> None:
  prev = None
  for t in infos:
    if t.nbytes == 0:
      continue
    if prev is not None and t.begin < prev.end:
      raise KfuseError(f"{path}: tensors {prev.name!r} and {t.name!r} have overlapping"
                       f" data_offsets {[prev.begin, prev.end]} and {[t.begin, t.end]}")
    prev = t


def read_safetensors_header(path: str | os.PathLike) -> _Header:
  """Parse and validate the header of one safetensors file (reads no tensor data)."""
  path = os.fspath(path)
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if size < 8 or len(head) < 8:
        raise KfuseError(f"{path}: file of {size} bytes is too small to be safetensors")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise KfuseError(f"{path}: header length {n} exceeds file size {size}"
                         " (truncated or not a safetensors file)")
      raw = f.read(n)
  except OSError as e:
    raise KfuseError(f"{path}: cannot read safetensors file: {e.strerror or e}") from e
  header = _parse_json(raw, path, "header")
  if not isinstance(header, dict):
    raise KfuseError(f"{path}: header must be a JSON object, got {type(header).__name__}")
  meta = header.pop("__metadata__", None) or {}
  if not isinstance(meta, dict):
    raise KfuseError(f"{path}: __metadata__ must be a JSON object")
  data_size = size - 8 - n
  infos = sorted((_parse_entry(path, k, v, data_size) for k, v in header.items()),
                 key=lambda t: (t.begin, t.end))
  _check_overlaps(path, infos)
  return _Header({t.name: t for t in infos}, meta, 8 + n, data_size)


class SafetensorsFile:
  """One safetensors file, memory-mapped read-only on first tensor access."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._header = read_safetensors_header(self.path)
    self._buf: np.ndarray | None = None

  @property
  def tensors(self) -> dict[str, TensorInfo]:
    return self._header.tensors

  @property
  def metadata(self) -> dict[str, Any]:
    return dict(self._header.metadata)

  def _buffer(self) -> np.ndarray:
    if self._buf is None:
      if self._header.data_size == 0:
        self._buf = np.zeros(0, np.uint8)
      else:
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r",
                              offset=self._header.data_start,
                              shape=(self._header.data_size,))
      self._buf.flags.writeable = False
    return self._buf

  def view(self, name: str) -> np.ndarray:
    """Zero-copy, read-only view of one tensor (valid until `close`)."""
    t = self._header.tensors.get(name)
    if t is None:
      raise KfuseError(f"{self.path}: no tensor named {name!r}")
    raw = np.asarray(self._buffer()[t.begin:t.end])
    return raw.view(t.dtype).reshape(t.shape)

  def read_into(self, name: str, out: np.ndarray, start: int = 0) -> np.ndarray:
    """Copy bytes of tensor ``name`` into ``out`` with positional reads (no memory map).

    ``start`` is a byte offset into the tensor; ``out.nbytes`` bytes are read.
    Pages are never mapped into this process, so the resident memory stays
    that of ``out`` however much of the file is read.
    """
    t = self._header.tensors.get(name)
    if t is None:
      raise KfuseError(f"{self.path}: no tensor named {name!r}")
    if start < 0 or start + out.nbytes > t.nbytes or not out.flags.c_contiguous:
      raise KfuseError(f"{self.path}: tensor {name!r}: cannot read {out.nbytes} bytes at"
                       f" {start} of {t.nbytes} into a {out.shape} buffer")
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = self._fileno()
    pos, done = self._header.data_start + t.begin + start, 0
    while done < out.nbytes:
      try:
        n = os.preadv(fd, [view[done:]], pos + done)
      except OSError as e:
        raise KfuseError(f"{self.path}: cannot read tensor {name!r}: {e.strerror or e}") from e
      if n <= 0:
        raise KfuseError(f"{self.path}: tensor {name!r} ends early (file truncated?)")
      done += n
    return out

  def _fileno(self) -> int:
    fd = getattr(self, "_fd", None)
    if fd is None:
      try:
        fd = self._fd = os.open(self.path, os.O_RDONLY)
      except OSError as e:
        raise KfuseError(f"{self.path}: cannot open: {e.strerror or e}") from e
    return fd

  def close(self) -> None:
    """Drop the memory map (views handed out earlier keep it alive until freed)."""
    self._buf = None
    fd = getattr(self, "_fd", None)
    if fd is not None:
      self._fd = None
      os.close(fd)


def _to_numpy(name: str, x: Any, dtype: np.dtype | None = None) -> np.ndarray:
  """Host numpy copy-or-view of ``x`` in a safetensors dtype, cast to ``dtype`` if floating."""
  try:
    a = np.asarray(x)
  except Exception as e:  # e.g. non-addressable jax arrays
    raise KfuseError(f"tensor {name!r}: cannot convert {type(x).__name__} to numpy: {e}") from e
  if dtype is not None and a.dtype != dtype and _is_float(a.dtype):
    with np.errstate(over="ignore", invalid="ignore"):
      b = a.astype(dtype)
    if _is_float(np.dtype(dtype)) and np.isinf(b).any():   # vectorised; rare path
      over = int(np.count_nonzero(np.isinf(b) & np.isfinite(a)))
      if over:
        raise KfuseError(f"tensor {name!r}: {over} values out of the range of"
                         f" {np.dtype(dtype).name} would be written as inf; write a wider"
                         f" dtype or clip the values first")
    a = b
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  if a.dtype not in _NP_TO_ST:
    raise KfuseError(f"tensor {name!r}: dtype {a.dtype} (shape {a.shape}) cannot be"
                     " stored in safetensors")
  return a if a.flags.c_contiguous else np.array(a, order="C")  # keeps 0-d shapes


def _is_float(dt: np.dtype) -> bool:
  return dt.kind == "f" or dt.name in _ML_FLOATS


def _check_name(name: Any) -> str:
  if not isinstance(name, str) or not name or name == "__metadata__":
    raise KfuseError(f"invalid tensor name {name!r}: must be a non-empty string"
                     " other than '__metadata__'")
  return name


def _header_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  off = 0
  for k, a in arrays.items():
    header[k] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape),
                 "data_offsets": [off, off + a.nbytes]}
    off += a.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  return raw + b" " * (-len(raw) % 8)


def _layout_order(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Largest itemsize first (stable), so every tensor's data is naturally aligned."""
  keys = sorted(arrays, key=lambda k: -arrays[k].dtype.itemsize)
  return {k: arrays[k] for k in keys}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Write ``tensors`` to one safetensors file at ``path`` (not atomic); return bytes written.

  The header is space-padded to a multiple of 8 bytes and tensors are laid out
  largest-itemsize first so each one is aligned. ``metadata`` defaults to
  ``{"format": "pt"}`` so that transformers accepts the file.
  """
  arrays = _layout_order({_check_name(k): _to_numpy(k, v) for k, v in tensors.items()})
  meta = {"format": "pt"} if metadata is None else {str(k): str(v) for k, v in metadata.items()}
  head = _header_bytes(arrays, meta)
  with open(os.fspath(path), "wb") as f:
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for a in arrays.values():
      if a.nbytes:
        f.write(memoryview(a.reshape(-1).view(np.uint8)))
    f.flush()
    os.fsync(f.fileno())
  return 8 + len(head) + sum(a.nbytes for a in arrays.values())


# ----------------------------------------------------------------- HF directory


def _parse_json(raw: bytes, path: str, what: str) -> Any:
  """Decode UTF-8 JSON; any malformed input is a one-line KfuseError.

  Besides syntax errors this covers what `json` raises on hostile but valid
  text: integers over Python's 4300-digit conversion limit (ValueError) and
  nesting deeper than the recursion limit (RecursionError).
  """
  try:
    return json.loads(raw.decode("utf-8"))
  except (ValueError, RecursionError) as e:   # UnicodeDecodeError, JSONDecodeError are ValueErrors
    msg = " ".join(str(e).split()) or type(e).__name__
    raise KfuseError(f"{path}: invalid JSON {what}: {msg}") from e


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise KfuseError(f"{path}: cannot read {what}: {e.strerror or e}") from e
  return _parse_json(raw, path, f"in {what}")


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

  def _info(self, name: str) -> TensorInfo:
    shard = self._weight_map.get(name)
    if shard is None:
      close = difflib.get_close_matches(str(name), self._weight_map, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise KfuseError(f"{self.path}: no tensor named {name!r}"
                       f" ({len(self._weight_map)} tensors){hint}")
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
    dt = _as_dtype(dtype)
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


def _as_dtype(dtype: Any) -> np.dtype | None:
  if dtype is None:
    return None
  return resolve_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)


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
  index = _read_json(index_path, "safetensors index")
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
  config = _read_json(cfg_path, "model config") if os.path.isfile(cfg_path) else None
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


# ----------------------------------------------------------------- writing


# ----------------------------------------------------------------- config.json

# Keys that hold the number of transformer blocks (Llama/Mistral/Qwen: num_hidden_layers,
# GPT-2/Bloom/GPT-J: n_layer, ChatGLM/T5: num_layers, MPT: n_layers).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Keys that hold one entry per block (Qwen2/3, Gemma 2/3, Mistral 3 ...: attention kind).
PER_LAYER_KEYS = ("layer_types",)
_SUB_CONFIGS = ("text_config",)


def _config_dtype_keys(cfg: dict, dtype: np.dtype) -> None:
  """Record ``dtype`` under both names: transformers 5 reads ``dtype`` and falls back
  to the legacy ``torch_dtype`` (which transformers 4 reads), so a donor's ``dtype``
  left alone would load the merge in the donor's precision."""
  if dtype is not None and dtype.name in _TORCH_DTYPE_NAMES:
    cfg["dtype"] = cfg["torch_dtype"] = _TORCH_DTYPE_NAMES[dtype.name]


def _relayer(cfg: dict, layers: list, where: str) -> None:
  """Set ``cfg``'s layer fields for output blocks ``layers`` = [(source config, index)]."""
  for key in LAYER_COUNT_KEYS:
    if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
      cfg[key] = len(layers)
  for key in PER_LAYER_KEYS:
    if not isinstance(cfg.get(key), list):
      continue
    vals = []
    for src, i in layers:
      lst = src.get(key)
      if not isinstance(lst, list) or not 0 <= i < len(lst):
        raise KfuseError(f"{where}: {key} has no entry for source layer {i}")
      vals.append(lst[i])
    cfg[key] = vals


def hf_config(config: Mapping[str, Any], dtype: Any = None, layers=None,
              where: str = CONFIG_FILE) -> dict:
  """The config.json of an output: a copy of ``config`` with the output's dtype and layers.

  ``dtype`` sets ``dtype`` and ``torch_dtype``. ``layers`` lists, per output
  block, ``(source_config, source_layer)``: every layer-count key
  (`LAYER_COUNT_KEYS`) becomes ``len(layers)`` and every per-layer list
  (`PER_LAYER_KEYS`) takes the source block's entry from its own config
  (``None``: from ``config``), also inside ``text_config``.
  """
  cfg = json.loads(json.dumps(dict(config)))
  _config_dtype_keys(cfg, _as_dtype(dtype))
  if layers is not None:
    srcs = [(dict(config) if c is None else c, int(i)) for c, i in layers]
    _relayer(cfg, srcs, where)
    for sub in _SUB_CONFIGS:
      if isinstance(cfg.get(sub), dict):
        _relayer(cfg[sub], [(c.get(sub) if isinstance(c.get(sub), dict) else {}, i)
                            for c, i in srcs], f"{where}: {sub}")
  return cfg


def config_num_layers(config: Mapping[str, Any] | None) -> int | None:
  """The block count a config declares (first of `LAYER_COUNT_KEYS`), or None."""
  for key in LAYER_COUNT_KEYS:
    v = (config or {}).get(key)
    if isinstance(v, int) and not isinstance(v, bool):
      return v
  return None


def check_config_layers(config: Mapping[str, Any], names, where: str = CONFIG_FILE) -> None:
  """Refuse a config whose layer fields disagree with the tensors it describes.

  Blocks are counted from the tensor names (`kfuse.tree.num_layers`); every
  integer layer-count key and the length of every per-layer list must match,
  else transformers builds a different model (dropping tensors silently) or
  cannot build one. Tensors without block indices are not checked.
  """
  from kfuse.tree import num_layers
  n = num_layers(names)
  if n == 0:
    return
  for key in LAYER_COUNT_KEYS:
    v = config.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and v != n:
      raise KfuseError(f"{where}: {key} = {v} but the tensors hold {n} layers")
  for key in PER_LAYER_KEYS:
    v = config.get(key)
    if isinstance(v, list) and len(v) != n:
      raise KfuseError(f"{where}: {key} has {len(v)} entries but the tensors hold {n} layers")


def _commit_shards(out_dir: str, tmps: list, shard_names: list, order: list, total_size: int,
                   dtype, config: dict | None, extra_files: dict[str, str] | None) -> list[str]:
  """Rename finished temporary shards to their HF names, then write the index (when
  sharded), config.json (``torch_dtype`` from ``dtype``) and extra files; return the paths."""
  n = len(tmps)
  final = [SINGLE_FILE] if n == 1 else [
      f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
  written = []
  for tmp, fname in zip(tmps, final):
    dst = os.path.join(out_dir, fname)
    os.replace(tmp, dst)
    written.append(dst)

  def write_text(fname: str, text: str) -> None:
    dst = os.path.join(out_dir, fname)
    atomic_write_text(dst, text)
    written.append(dst)

  if n > 1:
    owner = {name: fname for names, fname in zip(shard_names, final) for name in names}
    index = {"metadata": {"total_size": total_size},
             "weight_map": {name: owner[name] for name in order}}
    write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
  if config is not None:
    cfg = hf_config(config, dtype)
    check_config_layers(cfg, order, os.path.join(out_dir, CONFIG_FILE))
    write_text(CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
  for fname, text in (extra_files or {}).items():
    if os.path.basename(fname) != fname or fname in ("", ".", ".."):
      raise KfuseError(f"extra file name {fname!r} must be a plain file name")
    write_text(fname, text)
  return written


class HFWriter:
  """Stream tensors into a HF model directory, holding at most one shard in memory.

  Shards are written to temporary files as they fill up and renamed to
  ``model-0000k-of-0000N.safetensors`` by `finish` (or to ``model.safetensors``
  when everything fits in one). Writes into ``out_dir`` directly; use
  `write_hf_dir` or `atomic_output_dir` for an all-or-nothing output.
  """

  def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5_000_000_000,
               dtype: Any = None):
    self.out_dir = os.fspath(out_dir)
    if max_shard_bytes <= 0:
      raise KfuseError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    self.max_shard_bytes = int(max_shard_bytes)
    self.dtype = _as_dtype(dtype)
    os.makedirs(self.out_dir, exist_ok=True)
    clash = [n for n in os.listdir(self.out_dir)
             if n == INDEX_FILE or fnmatch.fnmatch(n, "model*.safetensors")]
    if clash:
      raise KfuseError(f"{self.out_dir}: already holds weights ({clash[0]}); write to an"
                       " empty directory")
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[tuple[str, list[str]]] = []  # (temp path, names)
    self._names: set[str] = set()
    self._order: list[str] = []
    self.total_size = 0
    self._finished = False

  def add(self, name: str, array: Any) -> None:
    """Queue one tensor; flushes the current shard first if this one would overflow it."""
    if self._finished:
      raise KfuseError(f"{self.out_dir}: HFWriter.add({name!r}) after finish()")
    _check_name(name)
    if name in self._names:
      raise KfuseError(f"{self.out_dir}: duplicate tensor name {name!r}")
    a = _to_numpy(name, array, self.dtype)
    if self._pending and self._pending_bytes + a.nbytes > self.max_shard_bytes:
      self._flush()
    self._names.add(name)
    self._order.append(name)
    self._pending[name] = a
    self._pending_bytes += a.nbytes
    self.total_size += a.nbytes

  def _flush(self) -> None:
    k = len(self._shards) + 1
    tmp = os.path.join(self.out_dir, f".shard-{k:05d}.safetensors.tmp-{os.getpid()}")
    names = list(self._pending)
    self._shards.append((tmp, names))
    write_safetensors(tmp, self._pending)
    self._pending, self._pending_bytes = {}, 0

  def abort(self) -> None:
    """Delete the temporary shards written so far."""
    self._finished = True
    self._pending = {}
    for tmp, _ in self._shards:
      if os.path.exists(tmp):
        os.remove(tmp)

  def finish(self, config: dict | None = None,
             extra_files: dict[str, str] | None = None) -> list[str]:
    """Write the remaining shard, rename shards, write index / config / extras; return paths."""
    if self._finished:
      raise KfuseError(f"{self.out_dir}: HFWriter.finish() called twice")
    if self._pending or not self._shards:
      self._flush()
    self._finished = True
    return _commit_shards(self.out_dir, [tmp for tmp, _ in self._shards],
                          [names for _, names in self._shards], self._order, self.total_size,
                          self.dtype, config, extra_files)

  def __enter__(self) -> "HFWriter":
    return self

  def __exit__(self, exc_type, *rest) -> None:
    if exc_type is not None and not self._finished:
      self.abort()


class PlannedHFWriter:
  """Write a HF model directory whose tensor list is known before any data exists.

  ``specs`` lists ``(name, shape, dtype)`` in output order. Shards are planned
  up front exactly as `HFWriter` fills them (next shard when one would
  overflow ``max_shard_bytes``; within a shard, largest itemsize first) and
  their headers written; ``preallocate`` first checks the disk has room for
  all of it, so a full disk fails before any work. `add` then writes each tensor
  straight to its final offset with ``pwrite``: tensors may arrive in any
  order and from several threads, and nothing is held in memory. `finish`
  syncs and renames the shards and writes the index and config; `abort`
  deletes them. Files live in ``out_dir`` under temporary names until
  `finish`: wrap in `atomic_output_dir` for an all-or-nothing output.
  """

  def __init__(self, out_dir: str | os.PathLike, specs, max_shard_bytes: int = 5_000_000_000,
               metadata: Mapping[str, str] | None = None, preallocate: bool = True,
               dtype: Any = None):
    import threading
    self.dtype = _as_dtype(dtype)   # recorded as config.json's torch_dtype, as HFWriter does
    self.out_dir = os.fspath(out_dir)
    if max_shard_bytes <= 0:
      raise KfuseError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    os.makedirs(self.out_dir, exist_ok=True)
    clash = [n for n in os.listdir(self.out_dir)
             if n == INDEX_FILE or fnmatch.fnmatch(n, "model*.safetensors")]
    if clash:
      raise KfuseError(f"{self.out_dir}: already holds weights ({clash[0]}); write to an"
                       " empty directory")
    self._lock = threading.Lock()
    self._spec: dict[str, tuple] = {}
    self._order: list[str] = []
    for name, shape, dtype in specs:
      _check_name(name)
      if name in self._spec:
        raise KfuseError(f"{self.out_dir}: duplicate tensor name {name!r}")
      dt = np.dtype(dtype)
      if dt not in _NP_TO_ST:
        raise KfuseError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
      self._spec[name] = (tuple(int(d) for d in shape), dt)
      self._order.append(name)
    self.total_size = sum(math.prod(sh) * dt.itemsize for sh, dt in self._spec.values())
    if preallocate:
      _check_free_space(self.out_dir, self.total_size)
    meta = {"format": "pt"} if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    self._shards = self._plan(int(max_shard_bytes))
    self._where: dict[str, tuple] = {}       # name -> (fd, absolute offset, nbytes)
    self._fds: list[int] = []
    self._tmp: list[str] = []
    self._written: set[str] = set()
    self._parts: dict[str, int] = {}
    self._finished = False
    try:
      for k, names in enumerate(self._shards, 1):
        self._open_shard(k, names, meta, preallocate)
    except BaseException:
      self.abort()
      raise

  def _plan(self, max_bytes: int) -> list[list[str]]:
    shards, cur, cur_bytes = [], [], 0
    for name in self._order:
      sh, dt = self._spec[name]
      nb = math.prod(sh) * dt.itemsize
      if cur and cur_bytes + nb > max_bytes:
        shards.append(cur)
        cur, cur_bytes = [], 0
      cur.append(name)
      cur_bytes += nb
    shards.append(cur)
    return shards

  def _open_shard(self, k: int, names: list[str], meta: dict, preallocate: bool) -> None:
    ordered = sorted(names, key=lambda n: -self._spec[n][1].itemsize)
    header: dict[str, Any] = {"__metadata__": meta}
    off = 0
    for n in ordered:
      sh, dt = self._spec[n]
      nb = math.prod(sh) * dt.itemsize
      header[n] = {"dtype": _NP_TO_ST[dt], "shape": list(sh), "data_offsets": [off, off + nb]}
      off += nb
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    tmp = os.path.join(self.out_dir, f".shard-{k:05d}.safetensors.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    self._fds.append(fd)
    self._tmp.append(tmp)
    total = len(head) + off
    try:
      _pwrite_all(fd, memoryview(head), 0)
      os.ftruncate(fd, total)     # sparse: filling fallocate-d extents is ~10x slower (ext4)
    except OSError as e:
      raise KfuseError(f"{self.out_dir}: cannot create shard {k} of the output"
                       f" ({total / 1e9:.2f} GB): {e.strerror or e}") from e
    pos = len(head)
    for n in ordered:
      sh, dt = self._spec[n]
      nb = math.prod(sh) * dt.itemsize
      self._where[n] = (fd, pos, nb)
      pos += nb

  @property
  def names(self) -> list[str]:
    return list(self._order)

  def add(self, name: str, array: Any) -> None:
    """Write one planned tensor at its offset (cast to the planned dtype if floating)."""
    with self._lock:
      if self._finished:
        raise KfuseError(f"{self.out_dir}: PlannedHFWriter.add({name!r}) after finish()")
      if name not in self._spec:
        raise KfuseError(f"{self.out_dir}: tensor {name!r} is not in the output plan")
      if name in self._written or name in self._parts:
        raise KfuseError(f"{self.out_dir}: duplicate tensor name {name!r}")
      self._written.add(name)
    sh, dt = self._spec[name]
    a = _to_numpy(name, array, dt)
    if a.shape != sh or a.dtype != dt:
      raise KfuseError(f"{self.out_dir}: tensor {name!r} is {a.dtype}{list(a.shape)}, the"
                       f" plan says {dt}{list(sh)}")
    fd, pos, nb = self._where[name]
    if nb:
      try:
        _pwrite_all(fd, memoryview(a.reshape(-1).view(np.uint8)), pos)
      except OSError as e:
        raise KfuseError(f"{self.out_dir}: cannot write tensor {name!r}"
                         f" ({nb / 1e6:.1f} MB): {e.strerror or e}") from e

  def add_part(self, name: str, start: int, values: Any) -> None:
    """Write flat entries ``[start, start + values.size)`` of planned tensor ``name``.

    Parts must not overlap; the tensor counts as written once all its entries are.
    """
    sh, dt = self._spec.get(name, ((), None))
    if dt is None:
      raise KfuseError(f"{self.out_dir}: tensor {name!r} is not in the output plan")
    a = _to_numpy(name, values, dt).reshape(-1)
    numel = math.prod(sh)
    if a.dtype != dt or start < 0 or start + a.size > numel:
      raise KfuseError(f"{self.out_dir}: tensor {name!r}: part of {a.size} {a.dtype} entries"
                       f" at {start} does not fit {dt}{list(sh)}")
    with self._lock:
      if self._finished:
        raise KfuseError(f"{self.out_dir}: PlannedHFWriter.add_part({name!r}) after finish()")
      got = self._parts.get(name, 0) + a.size
      if name in self._written or got > numel:
        raise KfuseError(f"{self.out_dir}: tensor {name!r} written twice")
      self._parts[name] = got
      if got == numel:
        self._written.add(name)
    fd, pos, _ = self._where[name]
    if a.size:
      try:
        _pwrite_all(fd, memoryview(a.view(np.uint8)), pos + start * dt.itemsize)
      except OSError as e:
        raise KfuseError(f"{self.out_dir}: cannot write tensor {name!r}"
                         f" ({a.nbytes / 1e6:.1f} MB at entry {start}): {e.strerror or e}") from e

  def abort(self) -> None:
    """Close and delete the temporary shards."""
    self._finished = True
    self._close()
    for tmp in self._tmp:
      if os.path.exists(tmp):
        os.remove(tmp)

  def _close(self) -> None:
    fds, self._fds = self._fds, []
    for fd in fds:
      try:
        os.close(fd)
      except OSError:
        pass

  def finish(self, config: dict | None = None,
             extra_files: dict[str, str] | None = None) -> list[str]:
    """Check every tensor arrived, sync and rename the shards, write index / config / extras."""
    if self._finished:
      raise KfuseError(f"{self.out_dir}: PlannedHFWriter.finish() called twice")
    missing = [n for n in self._order if n not in self._written]
    if missing:
      raise KfuseError(f"{self.out_dir}: tensor {missing[0]!r} was never written"
                       f" ({len(missing)} missing)")
    try:
      for fd in self._fds:
        os.fsync(fd)
    except OSError as e:
      raise KfuseError(f"{self.out_dir}: cannot sync the output: {e.strerror or e}") from e
    self._finished = True
    self._close()
    return _commit_shards(self.out_dir, self._tmp, self._shards, self._order, self.total_size,
                          self.dtype, config, extra_files)

  def __enter__(self) -> "PlannedHFWriter":
    return self

  def __exit__(self, exc_type, *rest) -> None:
    if exc_type is not None and not self._finished:
      self.abort()


def _check_free_space(directory: str, need: int) -> None:
  """Fail before any work when the output cannot fit (a full disk mid-write is
  still reported, by `add`, and leaves nothing behind)."""
  try:
    st = os.statvfs(directory)
  except (OSError, AttributeError):
    return
  free = st.f_bavail * st.f_frsize
  if free < need:
    raise KfuseError(f"{directory}: the output needs {need / 1e9:.2f} GB but only"
                     f" {free / 1e9:.2f} GB are free (No space left on device)")


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
  done = 0
  while done < len(data):
    n = os.pwrite(fd, data[done:done + (1 << 30)], pos + done)
    if n <= 0:
      raise OSError(errno.EIO, "short write")
    done += n


def write_hf_dir(out_dir: str | os.PathLike, tensors: Mapping[str, Any],
                 config: dict | None = None, dtype: Any = None,
                 max_shard_bytes: float = 5e9, overwrite: bool = False) -> list[str]:
  """Atomically write a complete HF model directory; return the paths of its files."""
  final = os.fspath(out_dir)
  with atomic_output_dir(final, overwrite=overwrite) as tmp:
    with HFWriter(tmp, max_shard_bytes=int(max_shard_bytes), dtype=dtype) as w:
      for name, arr in tensors.items():
        w.add(name, arr)
      written = w.finish(config=config)
  return [os.path.join(final, os.path.basename(p)) for p in written]


def copy_aux_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                   overwrite: bool = False) -> list[str]:
  """Copy config / tokenizer side files (never weights) from ``src_dir`` to ``dst_dir``.

  Files already present in ``dst_dir`` are kept unless ``overwrite``; returns
  the names copied. A ``.safetensors`` file path as ``src_dir`` means its folder.
  """
  src = os.fspath(src_dir)
  if os.path.isfile(src):
    src = os.path.dirname(os.path.abspath(src))
  if not os.path.isdir(src):
    raise KfuseError(f"source directory {src} does not exist")
  dst = os.fspath(dst_dir)
  if not os.path.isdir(dst):
    raise KfuseError(f"destination directory {dst} does not exist")
  copied = []
  for name in sorted(os.listdir(src)):
    sp = os.path.join(src, name)
    if not os.path.isfile(sp) or not any(fnmatch.fnmatch(name, p) for p in AUX_PATTERNS):
      continue
    dp = os.path.join(dst, name)
    if os.path.exists(dp) and not overwrite:
      continue
    with open(sp, "rb") as f:
      atomic_write_bytes(dp, f.read())
    shutil.copymode(sp, dp)
    copied.append(name)
  return copied
