"""Dispatch table from ``config.task`` to library entry points ``run(config, workdir)``."""

from __future__ import annotations

import importlib
from typing import Any

from kfuse.tree import KfuseError

# task name -> "module:function"; each function takes (config, workdir).
TASKS = {
    "mergekit": "kfuse.merge.runner:run_mergekit",
    "merge": "kfuse.merge.runner:run_native",
    "merge_bench": "kfuse.bench.merge_bench:run",
    "mnist1d_baselines": "kfuse.bench.mnist1d_baselines:run",
    "tta_bench": "kfuse.bench.tta_bench:run",
    "kd_bench": "kfuse.bench.kd_bench:run",
}

# task name -> one line for `python -m kfuse.main --help`
ABOUT = {
    "mergekit": "run a mergekit YAML into config.output_dir (streaming, atomic)",
    "merge": "merge safetensors / Orbax checkpoints with any kfuse method",
    "merge_bench": "multi-task merge benchmark (methods x tasks, measured table)",
    "mnist1d_baselines": "MNIST-1D paper baselines (logreg, MLP, CNN)",
    "tta_bench": "test-time adaptation benchmark on MNIST-1D-C",
    "kd_bench": "knowledge-distillation benchmark (KD losses, Forget-Me-Not, Fantastic Gains)",
}


def entry(config: Any):
  """The function that runs ``config.task`` (its module imported)."""
  task = config.get("task") if hasattr(config, "get") else None
  if task not in TASKS:
    raise KfuseError(f"config.task: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
  mod, fn = TASKS[task].split(":")
  return getattr(importlib.import_module(mod), fn)


def run(config: Any, workdir: str | None = None) -> Any:
  fn = entry(config)
  if workdir is None:
    workdir = config.get("workdir")
  return fn(config, workdir)
