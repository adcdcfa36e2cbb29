"""Writers of Hugging Face safetensors model directories (sharded, atomic, preplanned).

`HFWriter` streams tensors into shards as they come; `PlannedHFWriter` plans the
shards from the tensor list and ``pwrite``s each tensor at its final offset (any
order, any thread); `write_hf_dir` writes a whole model atomically. Shard names,
the index and config.json follow transformers' ``save_pretrained``.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import shutil
from typing import Any, Mapping

import numpy as np

from kfuse.errors import KfuseError
from kfuse.io.atomic import atomic_output_dir, atomic_write_bytes, atomic_write_text
from kfuse.io.hf_config import CONFIG_FILE, check_config_layers, hf_config
from kfuse.io.hf_dir import INDEX_FILE, SINGLE_FILE
from kfuse.io.safetensors_format import (NP_TO_ST, as_dtype, check_tensor_name, header_bytes,
                                         layout_order, to_safetensors_array, write_safetensors)

__all__ = ["HFWriter", "PlannedHFWriter", "write_hf_dir", "copy_aux_files", "AUX_PATTERNS",
           "check_free_space", "pwrite_all"]

# Files `copy_aux_files` carries over (weights never match these).
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "*.txt",
    "chat_template.jinja", "preprocessor_config.json",
)


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


def _weightless_dir(out_dir: str | os.PathLike, max_shard_bytes: int) -> str:
  """``out_dir``, created, after checking it holds no weights and the shard size is valid."""
  out_dir = os.fspath(out_dir)
  if max_shard_bytes <= 0:
    raise KfuseError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  os.makedirs(out_dir, exist_ok=True)
  clash = [n for n in os.listdir(out_dir)
           if n == INDEX_FILE or fnmatch.fnmatch(n, "model*.safetensors")]
  if clash:
    raise KfuseError(f"{out_dir}: already holds weights ({clash[0]}); write to an empty directory")
  return out_dir


class _Writer:
  """A context manager that aborts (deletes its temporaries) when the block raises."""
  _finished: bool

  def abort(self) -> None:
    raise NotImplementedError

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *rest) -> None:
    if exc_type is not None and not self._finished:
      self.abort()


class HFWriter(_Writer):
  """Stream tensors into a HF model directory, holding at most one shard in memory.

  Shards are written to temporary files as they fill up and renamed to
  ``model-0000k-of-0000N.safetensors`` by `finish` (or to ``model.safetensors``
  when everything fits in one). Writes into ``out_dir`` directly; use
  `write_hf_dir` or `atomic_output_dir` for an all-or-nothing output.
  """

  def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5_000_000_000,
               dtype: Any = None):
    self.out_dir = _weightless_dir(out_dir, max_shard_bytes)
    self.max_shard_bytes = int(max_shard_bytes)
    self.dtype = as_dtype(dtype)
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
    check_tensor_name(name)
    if name in self._names:
      raise KfuseError(f"{self.out_dir}: duplicate tensor name {name!r}")
    a = to_safetensors_array(name, array, self.dtype)
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


class PlannedHFWriter(_Writer):
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
    self.dtype = as_dtype(dtype)   # recorded as config.json's torch_dtype, as HFWriter does
    self.out_dir = _weightless_dir(out_dir, max_shard_bytes)
    self._lock = threading.Lock()
    self._spec: dict[str, tuple] = {}
    self._order: list[str] = []
    for name, shape, dtype in specs:
      check_tensor_name(name)
      if name in self._spec:
        raise KfuseError(f"{self.out_dir}: duplicate tensor name {name!r}")
      dt = np.dtype(dtype)
      if dt not in NP_TO_ST:
        raise KfuseError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
      self._spec[name] = (tuple(int(d) for d in shape), dt)
      self._order.append(name)
    self.total_size = sum(math.prod(sh) * dt.itemsize for sh, dt in self._spec.values())
    if preallocate:
      check_free_space(self.out_dir, self.total_size)
    self._shards = self._plan(int(max_shard_bytes))
    self._where: dict[str, tuple] = {}       # name -> (fd, absolute offset, nbytes)
    self._fds: list[int] = []
    self._tmp: list[str] = []
    self._written: set[str] = set()
    self._parts: dict[str, int] = {}
    self._finished = False
    try:
      for k, names in enumerate(self._shards, 1):
        self._open_shard(k, names, metadata, preallocate)
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

  def _open_shard(self, k: int, names: list[str], meta: Mapping[str, str] | None,
                  preallocate: bool) -> None:
    ordered = layout_order({n: self._spec[n][1] for n in names})
    head, offsets = header_bytes(((n, self._spec[n][1], self._spec[n][0]) for n in ordered), meta)
    off = sum(math.prod(self._spec[n][0]) * self._spec[n][1].itemsize for n in ordered)
    tmp = os.path.join(self.out_dir, f".shard-{k:05d}.safetensors.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    self._fds.append(fd)
    self._tmp.append(tmp)
    total = len(head) + off
    try:
      pwrite_all(fd, memoryview(head), 0)
      os.ftruncate(fd, total)     # sparse: filling fallocate-d extents is ~10x slower (ext4)
    except OSError as e:
      raise KfuseError(f"{self.out_dir}: cannot create shard {k} of the output"
                       f" ({total / 1e9:.2f} GB): {e.strerror or e}") from e
    for n, o in zip(ordered, offsets):
      sh, dt = self._spec[n]
      self._where[n] = (fd, len(head) + o, math.prod(sh) * dt.itemsize)

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
    a = to_safetensors_array(name, array, dt)
    if a.shape != sh or a.dtype != dt:
      raise KfuseError(f"{self.out_dir}: tensor {name!r} is {a.dtype}{list(a.shape)}, the"
                       f" plan says {dt}{list(sh)}")
    fd, pos, nb = self._where[name]
    if nb:
      try:
        pwrite_all(fd, memoryview(a.reshape(-1).view(np.uint8)), pos)
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
    a = to_safetensors_array(name, values, dt).reshape(-1)
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
        pwrite_all(fd, memoryview(a.view(np.uint8)), pos + start * dt.itemsize)
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


def check_free_space(directory: str, need: int) -> None:
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


def pwrite_all(fd: int, data: memoryview, pos: int) -> None:
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
