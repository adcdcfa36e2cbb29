"""Crash-safe output: whole directories and single files appear atomically.

A reader never observes a half-written output: everything is written into a
temporary sibling (same parent, hence same filesystem) which is fsync-ed and
then renamed into place. On error the temporary is removed and any previous
output is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from typing import BinaryIO, Callable, Iterator

from kfuse.tree import KfuseError

__all__ = [
    "atomic_output_dir",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_file",
    "check_output_free",
    "check_output_outside_inputs",
    "check_output_writable",
    "commit_dir",
    "remove_stale_outputs",
    "temp_sibling",
    "fsync_tree",
]


def _norm(path: str | os.PathLike) -> str:
  """Absolute path without a trailing separator."""
  p = os.path.abspath(os.fspath(path))
  return p.rstrip(os.sep) or os.sep


def _host() -> str:
  """This host's name as it appears in temporary names (no separators)."""
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> str:
  """A fresh, non-existing name ``.{name}.{tag}-{host}-{pid}-{random}`` next to ``path``.

  The host makes the pid meaningful on a shared filesystem: only the host that
  wrote a temporary can tell whether its process is still alive
  (`remove_stale_outputs`).
  """
  p = _norm(path)
  parent, name = os.path.split(p)
  return os.path.join(parent, f".{name}.{tag}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def check_output_free(path: str | os.PathLike, overwrite: bool) -> None:
  """Raise the standard one-line error when ``path`` exists and ``overwrite`` is off."""
  if os.path.lexists(os.fspath(path)) and not overwrite:
    raise KfuseError(f"output directory {os.fspath(path)} exists; pass overwrite=True"
                     " (--config.overwrite=True) to replace it")


def _inside(path: str, root: str) -> bool:
  """Whether real path ``path`` lies strictly below real path ``root``."""
  return path != root and os.path.commonpath([path, root]) == root


def check_output_outside_inputs(output: str | os.PathLike,
                                inputs: "list[str | os.PathLike]") -> None:
  """Refuse an output that is, contains or sits inside one of ``inputs``.

  Writing such an output would replace (``overwrite=True``) or mix with the
  inputs, so every front end calls this before anything is created or removed.
  Paths are compared after resolving symlinks (`os.path.realpath`).
  """
  out = os.path.realpath(os.fspath(output))
  for inp in inputs:
    src = os.path.realpath(os.fspath(inp))
    how = ("is" if out == src else "contains" if _inside(src, out)
           else "is inside" if _inside(out, src) else None)
    if how:
      raise KfuseError(f"output directory {os.fspath(output)} {how} the input {os.fspath(inp)};"
                       " choose an output outside every input")


def remove_stale_outputs(path: str | os.PathLike) -> list[str]:
  """Delete this host's temporary siblings of output ``path`` left by killed runs.

  `atomic_output_dir` writes into ``.{name}.tmp-{host}-{pid}-{random}`` next
  to the output; a run killed with SIGKILL cannot remove it. Only temporaries
  written by this host whose process no longer exists are deleted: on a shared
  filesystem another host's pid means nothing here, and its run may still be
  writing. Returns the removed paths.
  """
  parent, name = os.path.split(_norm(path))
  prefix, host = f".{name}.tmp-", _host()
  removed = []
  if not os.path.isdir(parent):
    return removed
  for entry in os.listdir(parent):
    if not entry.startswith(prefix):
      continue
    parts = entry[len(prefix):].rsplit("-", 2)   # host, pid, random
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _pid_alive(int(parts[1])):
      continue
    full = os.path.join(parent, entry)
    _remove(full)
    removed.append(full)
  return removed


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True
  return True


def _fsync_path(path: str, directory: bool) -> None:
  flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
  try:
    fd = os.open(path, flags)
  except OSError:
    return  # e.g. platforms that cannot open directories
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """fsync every regular file and directory below (and including) ``root``."""
  for dirpath, _, files in os.walk(root):
    for f in files:
      fp = os.path.join(dirpath, f)
      if os.path.isfile(fp) and not os.path.islink(fp):
        _fsync_path(fp, directory=False)
    _fsync_path(dirpath, directory=True)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    try:
      os.remove(path)
    except OSError:
      pass


def commit_dir(tmp: str, path: str | os.PathLike, overwrite: bool) -> None:
  """Rename the finished ``tmp`` onto ``path``; an old ``path`` is moved aside, then deleted.

  If the rename fails the old output is restored and ``tmp`` is removed.
  """
  dst = _norm(path)
  if os.path.lexists(dst):
    if not overwrite:
      _remove(tmp)
      check_output_free(path, overwrite)
    old = temp_sibling(dst, "old")
    os.rename(dst, old)
    try:
      os.rename(tmp, dst)
    except BaseException:
      os.rename(old, dst)
      _remove(tmp)
      raise
    _remove(old)
  else:
    try:
      os.rename(tmp, dst)
    except BaseException:
      _remove(tmp)
      raise
  _fsync_path(os.path.dirname(dst), directory=True)


def _make_sibling(dst: str, tmp: str) -> None:
  """Create ``dst``'s parent directories and the directory ``tmp``; one line on failure."""
  try:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.mkdir(tmp)
  except OSError as e:
    anc = os.path.dirname(dst)
    while anc != os.path.dirname(anc) and not os.path.lexists(anc):
      anc = os.path.dirname(anc)
    why = (f"{anc} is not a directory" if not os.path.isdir(anc)
           else f"{e.strerror or e}" + (f" ({e.filename})" if e.filename not in (None, tmp) else ""))
    raise KfuseError(f"cannot create the output directory {dst}: {why}") from e


def check_output_writable(path: str | os.PathLike) -> None:
  """Fail with one line, before any work, when no directory can be created next to ``path``.

  Creates the missing parents and a probe sibling (removed at once), as
  `atomic_output_dir` and `kfuse.io.save_orbax` will.
  """
  dst = _norm(path)
  probe = temp_sibling(dst, "probe")
  _make_sibling(dst, probe)
  os.rmdir(probe)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yield a temporary directory that becomes ``path`` when the block exits cleanly.

  Raises `KfuseError` up front if ``path`` exists and ``overwrite`` is False.
  On an exception inside the block the temporary directory is deleted and the
  previous ``path`` (if any) is left exactly as it was.
  """
  check_output_free(path, overwrite)
  dst = _norm(path)
  tmp = temp_sibling(dst)
  _make_sibling(dst, tmp)
  try:
    yield tmp
    fsync_tree(tmp)
  except BaseException:
    _remove(tmp)
    raise
  commit_dir(tmp, path, overwrite)


def atomic_write_file(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
  """Call ``write(f)`` on a temporary file in ``path``'s directory, then os.replace it onto ``path``.

  The file is fsync-ed before the rename; if ``write`` raises, the temporary is
  removed and any previous ``path`` is left untouched. A new file gets mode 0644,
  a replaced one keeps its mode.
  """
  dst = _norm(path)
  parent, name = os.path.split(dst)
  if not os.path.isdir(parent):
    raise KfuseError(f"cannot write {dst}: directory {parent} does not exist")
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
  try:
    mode = os.stat(dst).st_mode & 0o777 if os.path.exists(dst) else 0o644
    os.chmod(tmp, mode)
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, dst)
  except BaseException:
    _remove(tmp)
    raise
  _fsync_path(parent, directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Write ``data`` to ``path`` atomically (`atomic_write_file`)."""
  atomic_write_file(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """UTF-8 text version of `atomic_write_bytes`."""
  atomic_write_bytes(path, text.encode("utf-8"))
