"""The safetensors file format: one file's header, memory-mapped reads, one-file writes.

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
import json
import math
import os
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from kfuse.errors import KfuseError

__all__ = [
    "TensorEntry",
    "SafetensorsHeader",
    "SafetensorsFile",
    "read_safetensors_header",
    "write_safetensors",
    "header_bytes",
    "layout_order",
    "to_safetensors_array",
    "check_tensor_name",
    "is_float_dtype",
    "as_dtype",
    "NP_TO_ST",
]

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
NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in _ST_TO_NP.items()}
_ML_FLOATS = frozenset(("bfloat16", "float8_e4m3fn", "float8_e5m2"))
_TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16",
                      "bfloat16": "bfloat16", "float64": "float64"}



@dataclasses.dataclass(frozen=True)
class TensorEntry:
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
class SafetensorsHeader:
  tensors: dict[str, TensorEntry]  # ordered by data offset
  metadata: dict[str, Any]
  data_start: int
  data_size: int


def _parse_entry(path: str, name: str, entry: Any, data_size: int) -> TensorEntry:
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
  return TensorEntry(name, dt, tuple(shape), begin, end)


def _check_overlaps(path: str, infos: list[TensorEntry]) -> None:
  prev = None
  for t in infos:
    if t.nbytes == 0:
      continue
    if prev is not None and t.begin < prev.end:
      raise KfuseError(f"{path}: tensors {prev.name!r} and {t.name!r} have overlapping"
                       f" data_offsets {[prev.begin, prev.end]} and {[t.begin, t.end]}")
    prev = t


def parse_json(raw: bytes, path: Any, what: str) -> Any:
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


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
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
  header = parse_json(raw, path, "header")
  if not isinstance(header, dict):
    raise KfuseError(f"{path}: header must be a JSON object, got {type(header).__name__}")
  meta = header.pop("__metadata__", None) or {}
  if not isinstance(meta, dict):
    raise KfuseError(f"{path}: __metadata__ must be a JSON object")
  data_size = size - 8 - n
  infos = sorted((_parse_entry(path, k, v, data_size) for k, v in header.items()),
                 key=lambda t: (t.begin, t.end))
  _check_overlaps(path, infos)
  return SafetensorsHeader({t.name: t for t in infos}, meta, 8 + n, data_size)


class SafetensorsFile:
  """One safetensors file, memory-mapped read-only on first tensor access."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._header = read_safetensors_header(self.path)
    self._buf: np.ndarray | None = None

  @property
  def tensors(self) -> dict[str, TensorEntry]:
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


def to_safetensors_array(name: str, x: Any, dtype: np.dtype | None = None) -> np.ndarray:
  """Host numpy copy-or-view of ``x`` in a safetensors dtype, cast to ``dtype`` if floating."""
  try:
    a = np.asarray(x)
  except Exception as e:  # e.g. non-addressable jax arrays
    raise KfuseError(f"tensor {name!r}: cannot convert {type(x).__name__} to numpy: {e}") from e
  if dtype is not None and a.dtype != dtype and is_float_dtype(a.dtype):
    with np.errstate(over="ignore", invalid="ignore"):
      b = a.astype(dtype)
    if is_float_dtype(np.dtype(dtype)) and np.isinf(b).any():   # vectorised; rare path
      over = int(np.count_nonzero(np.isinf(b) & np.isfinite(a)))
      if over:
        raise KfuseError(f"tensor {name!r}: {over} values out of the range of"
                         f" {np.dtype(dtype).name} would be written as inf; write a wider"
                         f" dtype or clip the values first")
    a = b
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  if a.dtype not in NP_TO_ST:
    raise KfuseError(f"tensor {name!r}: dtype {a.dtype} (shape {a.shape}) cannot be"
                     " stored in safetensors")
  return a if a.flags.c_contiguous else np.array(a, order="C")  # keeps 0-d shapes


def is_float_dtype(dt: np.dtype) -> bool:
  return dt.kind == "f" or dt.name in _ML_FLOATS


def check_tensor_name(name: Any) -> str:
  if not isinstance(name, str) or not name or name == "__metadata__":
    raise KfuseError(f"invalid tensor name {name!r}: must be a non-empty string"
                     " other than '__metadata__'")
  return name


def layout_order(dtypes: Mapping[str, np.dtype]) -> list[str]:
  """The names largest itemsize first (stable), so every tensor's data is naturally aligned."""
  return sorted(dtypes, key=lambda k: -np.dtype(dtypes[k]).itemsize)


def header_bytes(entries: Iterable[tuple[str, np.dtype, tuple]],
                 metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[int]]:
  """The file's first bytes for tensors ``(name, dtype, shape)`` stored back to back in
  that order: the uint64 header length and the JSON header, space-padded to a multiple
  of 8. Also returns each tensor's data offset. ``metadata`` defaults to
  ``{"format": "pt"}`` so that transformers accepts the file.
  """
  meta = {"format": "pt"} if metadata is None else {str(k): str(v) for k, v in metadata.items()}
  header: dict[str, Any] = {"__metadata__": meta}
  off, offsets = 0, []
  for name, dt, shape in entries:
    nbytes = math.prod(shape) * np.dtype(dt).itemsize
    header[name] = {"dtype": NP_TO_ST[np.dtype(dt)], "shape": list(shape),
                    "data_offsets": [off, off + nbytes]}
    offsets.append(off)
    off += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw, offsets


def as_dtype(dtype: Any) -> np.dtype | None:
  """``None``, a dtype, or a name (``"bfloat16"``, ``"bf16"``; `kfuse.tree.resolve_dtype`)."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    from kfuse.tree import resolve_dtype   # imports JAX; only for names
    return resolve_dtype(dtype)
  return np.dtype(dtype)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Write ``tensors`` to one safetensors file at ``path`` (not atomic); return bytes written.

  The header is space-padded to a multiple of 8 bytes and tensors are laid out
  largest-itemsize first so each one is aligned. ``metadata`` defaults to
  ``{"format": "pt"}`` so that transformers accepts the file.
  """
  arrays = {check_tensor_name(k): to_safetensors_array(k, v) for k, v in tensors.items()}
  order = layout_order({k: a.dtype for k, a in arrays.items()})
  head, _ = header_bytes(((k, arrays[k].dtype, arrays[k].shape) for k in order), metadata)
  with open(os.fspath(path), "wb") as f:
    f.write(head)
    for k in order:
      if arrays[k].nbytes:
        f.write(memoryview(arrays[k].reshape(-1).view(np.uint8)))
    f.flush()
    os.fsync(f.fileno())
  return len(head) + sum(a.nbytes for a in arrays.values())

