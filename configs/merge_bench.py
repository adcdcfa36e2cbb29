"""The multi-task model-merging benchmark (FusionBench-style, MNIST-1D, 8 tasks).

    python -m kfuse.main --config=configs/merge_bench.py          # full: 8 tasks
    python -m kfuse.main --config=configs/merge_bench.py:quick    # == configs/default.py
    python -m kfuse.main --config=configs/merge_bench.py:digits   # 8 tasks on sklearn digits

Same pipeline as the quick run (`kfuse.bench.merge_bench`); the full variant
uses 8 tasks, longer fine-tuning (1,500 steps) and wider validation grids
(lambda x density) for the task-vector methods. Grid points are scored by average validation
accuracy over all tasks; test accuracy is reported for the best point.
"""

import importlib.util
import os

import ml_collections

from kfuse.configs import one_of, parse_arg


def _default_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
  spec = importlib.util.spec_from_file_location("kfuse_configs_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _full_methods(default):
  """The quick run's methods with wider grids (trim densities, DARE drop rates)."""
  return default.methods(densities=(0.1, 0.2, 0.3, 0.5), drop_densities=(0.3, 0.5, 0.7))


def get_config(arg=None):
  """``arg``: None / 'full' (8 MNIST-1D tasks), 'quick' (the default run), 'digits'."""
  variant = parse_arg(arg, variant=("full", one_of("full", "quick", "digits"))).variant
  default = _default_module()
  config = default.get_config()
  if variant == "quick":
    return config
  config.workdir = f"workdirs/merge_bench_{variant}"
  config.data.num_tasks = 8
  config.finetune.steps = 1500
  config.methods = ml_collections.ConfigDict(_full_methods(default), sort_keys=False)
  if variant == "digits":
    config.data.name = "digits"
    config.data.pretrain_samples = 0  # no generator for digits: pretrain on its base split
    config.pretrain.steps = 1500
    config.finetune.steps = 600
    config.finetune.batch_size = 64
    config.pretrain.batch_size = 64
  return config
