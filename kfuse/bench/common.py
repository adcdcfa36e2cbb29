"""Small helpers shared by the benchmark jobs: config access, JSON-friendly values,
the workdir check and atomic result files."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from kfuse.configs import get, to_dict   # re-exported: the benchmarks read configs with them
from kfuse.io.atomic import atomic_write_text
from kfuse.tree import KfuseError

__all__ = ["to_dict", "get", "plain", "method_entries", "check_workdir", "write_json",
           "write_text"]


def plain(v: Any) -> Any:
  """Tuples -> lists, numpy scalars -> Python, recursively (JSON-friendly)."""
  if isinstance(v, Mapping):
    return {str(k): plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [plain(x) for x in v]
  if isinstance(v, np.generic):
    return v.item()
  return v


def method_entries(methods_cfg: Any, fields: tuple) -> list[tuple[str, dict]]:
  """``[(label, entry)]`` for each ``config.methods.<label>`` as a plain dict, refusing
  fields outside ``fields`` (fails before any training)."""
  out = []
  for label, entry in to_dict(methods_cfg).items():
    entry = dict(to_dict(entry))
    unknown = set(entry) - set(fields)
    if unknown:
      raise KfuseError(f"methods.{label}: unknown field {sorted(unknown)[0]!r}"
                       f" (expected {', '.join(fields)})")
    out.append((label, entry))
  return out


def check_workdir(workdir: str, overwrite: bool, results: str = "results.json") -> str:
  """The absolute workdir, created; refuses one that already holds ``results``
  unless ``overwrite``."""
  if not workdir:
    raise KfuseError("workdir: empty; set config.workdir or --workdir")
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, results)) and not overwrite:
    raise KfuseError(f"workdir: {workdir} already holds {results}; pass --config.overwrite=True"
                     " to replace it, or another --config.workdir")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON, written atomically (temp sibling, fsync, rename)."""
  atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True))


def write_text(path: str, text: str) -> None:
  atomic_write_text(path, text)
