"""JAX's persistent compilation cache for merge jobs: on by default, in the user's cache.

A merge compiles one program per (method, options, dtype, chunk size or tensor
shape). On a small model compiling is most of the work, and merging the same
architecture again compiles the same programs. With the persistent cache the
second run loads them from disk instead (`jax.config` ``jax_compilation_cache_dir``).

``compile_cache`` (``--config.compile_cache``) is ``'auto'`` (the default:
``$KFUSE_CACHE/xla``, else ``~/.cache/kfuse/xla``), a directory, or ``''`` /
``'off'`` (no persistent cache). Every program is cached, however fast it
compiled (JAX's default skips those under 1 s: most of ours), and the
directory is kept under `MAX_BYTES` by JAX's least-recently-used eviction.
`counts` says how many programs a run loaded and wrote.
"""

from __future__ import annotations

import collections
import os
from typing import Optional

AUTO = "auto"
OFF = ("", "off")
MAX_BYTES = 1 << 30   # JAX evicts the least recently used entries above this size

_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "writes"}
_counts: collections.Counter = collections.Counter()
_listening = False
_dir: Optional[str] = None   # where `enable` turned the cache on


def directory(setting: Optional[str]) -> Optional[str]:
  """The cache directory ``setting`` names (None: off)."""
  setting = "" if setting is None else str(setting).strip()
  if setting.lower() in OFF:
    return None
  if setting.lower() == AUTO:
    from kfuse.data.sources import cache_dir   # $KFUSE_CACHE, else ~/.cache/kfuse
    return os.path.join(cache_dir(), "xla")
  return os.path.abspath(os.path.expanduser(setting))


def _count(event: str, **_) -> None:
  name = _EVENTS.get(event)
  if name:
    _counts[name] += 1


def enable(setting: Optional[str] = AUTO) -> Optional[str]:
  """Turn the persistent compilation cache on in ``directory(setting)`` (or leave it off);
  returns the directory. Call before the first compile."""
  global _listening, _dir
  path = directory(setting)
  if path is None:
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  if not _listening:
    jax.monitoring.register_event_listener(_count)
    _listening = True
  _dir = path
  return path


def counts() -> Optional[dict]:
  """XLA programs loaded from (``hits``) and written to (``writes``) the cache so far, and
  its ``dir`` (None when `enable` did not turn it on)."""
  if _dir is None:
    return None
  return {"dir": _dir, **{k: _counts[k] for k in ("hits", "writes")}}
