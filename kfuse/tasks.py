"""The jobs ``python -m kfuse.main`` runs: ``config.task`` -> ``run(config, workdir)``.

`TASKS` is a `kfuse.registry.Registry` like every other pillar's; each entry's
module is imported only when the task runs (``--help`` stays JAX-free).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from kfuse.errors import KfuseError
from kfuse.registry import Registry

__all__ = ["TASKS", "register_task", "entry", "run"]

TASKS = Registry("task")


def register_task(name: str, target: str, about: str) -> None:
  """Register ``name`` -> ``"module:function"`` (imported on first use); ``about`` is its
  one-line ``--help`` text."""
  module, fn = target.split(":")

  def load() -> Callable[[Any, Any], Any]:
    return getattr(importlib.import_module(module), fn)

  load.target = target
  TASKS.register(name, load, defaults={}, doc=about)


register_task("mergekit", "kfuse.merge.runner:run_mergekit",
              "run a mergekit YAML into config.output_dir (streaming, atomic)")
register_task("merge", "kfuse.merge.runner:run_native",
              "merge safetensors / Orbax checkpoints with any kfuse method")
register_task("merge_bench", "kfuse.bench.merge_bench:run",
              "multi-task merge benchmark (methods x tasks, measured table)")
register_task("mnist1d_baselines", "kfuse.bench.mnist1d_baselines:run",
              "MNIST-1D paper baselines (logreg, MLP, CNN)")
register_task("tta_bench", "kfuse.bench.tta_bench:run",
              "test-time adaptation benchmark on MNIST-1D-C")
register_task("lm_eval", "kfuse.bench.lm_eval:run",
              "perplexity of an HF causal LM (Llama, Mistral, Qwen2, GPT-2) on a text file")
register_task("fusion_bench", "kfuse.fusion.bench:run",
              "FuseLLM / FuseChat knowledge fusion across tokenizers, bits per character")
register_task("merge_informed_hf", "kfuse.merge.hf_statistics:run",
              "RegMean / Fisher of HF LMs: statistics on calibration text, streaming merge")
register_task("kd_bench", "kfuse.bench.kd_bench:run",
              "knowledge-distillation benchmark (KD losses, Forget-Me-Not, Fantastic Gains)")
register_task("w2s_bench", "kfuse.decode.w2s_bench:run",
              "weak-to-strong decoding: proxy-tuning / DLF vs fine-tuning, bits per character")


def entry(config: Any) -> Callable[[Any, Any], Any]:
  """The function that runs ``config.task`` (its module imported)."""
  task = config.get("task") if hasattr(config, "get") else None
  if not isinstance(task, str):
    raise KfuseError(f"config.task: missing or not a name ({task!r}); known: "
                     f"{', '.join(TASKS.names())}")
  try:
    loader = TASKS.get(task)
  except KfuseError as e:
    raise KfuseError(f"config.task: {e}") from None
  return loader()


def run(config: Any, workdir: str | None = None) -> Any:
  fn = entry(config)
  if workdir is None:
    workdir = config.get("workdir")
  return fn(config, workdir)
