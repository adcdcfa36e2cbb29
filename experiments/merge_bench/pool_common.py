"""The prelude shared by pool_merge_check.py and diagnose_pool.py: a built pool and its tasks' data.

`parse_args` reads ``--path DIR [--tasks N] [--cache DIR] [--json OUT]``; `load` verifies the
pool (`kfuse.bench.pool.load_pool`), keeps its first N tasks and loads their datasets with the
pool's data seed and sizes; `LAMBDAS` is the λ grid 0.1 … 1.0 (Ilharco et al. 2023 /
FusionBench).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from kfuse.bench import pool as pool_lib
from kfuse.data import image_tasks

LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser()
  ap.add_argument("--path", required=True)
  ap.add_argument("--tasks", type=int, default=None, help="first N tasks of the pool")
  ap.add_argument("--cache", default=None)
  ap.add_argument("--json", default=None)
  return ap.parse_args()


def load(args: argparse.Namespace) -> tuple[pool_lib.Pool, list[str], dict]:
  """``(pool, tasks, {task: Dataset})``: the pool at ``args.path`` holding only its first
  ``args.tasks`` tasks (all when unset), and their datasets."""
  pool = pool_lib.load_pool(args.path)
  tasks = pool.tasks[:args.tasks] if args.tasks else pool.tasks
  pool = dataclasses.replace(pool, probes={t: pool.probes[t] for t in tasks},
                             experts={t: pool.experts[t] for t in tasks})
  cfg = pool.manifest["config"]
  data = {t: image_tasks.load_task(t, seed=cfg["data"]["seed"], sizes=tuple(cfg["data"]["sizes"]),
                                   cache=args.cache) for t in tasks}
  return pool, tasks, data


def write_json(path: str | None, obj) -> None:
  """``obj`` as indented JSON at ``path`` (nothing when ``path`` is None)."""
  if path:
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)
