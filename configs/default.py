"""The default job: the quick merging benchmark (``configs/merge_bench.py:quick``), <= 3 min on 2 cores.

    python -m kfuse.main --config=configs/default.py

Builds a small model pool (4 image tasks, a small ViT, short pretraining and
fine-tuning) into ``workdirs/default/pool`` (resumed if interrupted, reused by
later runs), then merges the experts' backbones with six data-free kfuse
methods (`QUICK_METHODS`; the 8 / 14 / 20 variants run every one),
hyper-parameters chosen on validation, runs task negation on the same 4 tasks
and writes results.json, results.md and merge_bench.png under ``config.workdir``.
The full benchmark is ``configs/merge_bench.py`` (8 / 14 / 20 tasks, negation).

Override anything from the command line, e.g. ``--config.pool.finetune.steps=400``
or ``--config.methods.ties.grid.density='[0.1, 0.3]'``.
"""

import importlib.util
import os


def _merge_bench_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_bench.py")
  spec = importlib.util.spec_from_file_location("kfuse_configs_merge_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  """The quick benchmark; takes no argument (the variants are ``configs/merge_bench.py``)."""
  from kfuse.configs import parse_arg
  parse_arg(arg)
  return _merge_bench_module().get_config("quick")
