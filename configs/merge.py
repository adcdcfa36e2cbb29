"""Merge checkpoints (HF safetensors dirs or Orbax checkpoints) with a kfuse method.

    python -m kfuse.main --config=configs/merge.py:ties \
        --config.models=ckpt/a,ckpt/b,ckpt/c --config.base=ckpt/base \
        --config.output_dir=out/ties --config.params.density=0.2 --config.params.lambda_=0.5

The argument after ':' picks the method (default: task_arithmetic); its
parameters appear under config.params with their defaults, so any of them can
be overridden with --config.params.NAME=VALUE. Per-model values: give a
list in a config file of your own (`config.params.weight = [1.0, 0.5]`).
"""

import ml_collections

from kfuse.merge import get_method, REQUIRED


def get_config(arg=None):
  method = arg or "task_arithmetic"
  m = get_method(method)
  config = ml_collections.ConfigDict()
  config.task = "merge"
  config.method = method
  config.models = ""          # comma-separated paths
  config.base = ""
  config.output_dir = ""
  config.output_format = "auto"   # auto | safetensors | orbax
  config.dtype = ""               # cast inputs (e.g. bfloat16); empty: keep
  config.overwrite = False
  config.seed = 0
  config.progress = True
  # scale (WORKSPACE.md, "Scale: streaming, sharding, multi-host")
  config.num_devices = 0          # >1: shard every tensor over this many devices
  config.prefetch_bytes = 0       # input bytes held at once; 0: largest tensor's inputs
  config.chunk = -1               # flat chunk length for elementwise methods; -1 auto, 0 off
  config.compile_cache = ""       # dir for JAX's persistent compilation cache; '' off
  # numerics (WORKSPACE.md, "Method-author conventions")
  config.allow_nonfinite = False  # write results holding NaN/Inf instead of refusing them
  config.overflow = "error"       # values a down-cast turns into inf: error | clamp (to ±max)
  params = {}
  for p in m.params:
    # required parameters start as None: the run fails until they are given
    name = "lambda_" if p.name == "lambda" else p.name  # `lambda` cannot be a flag path
    params[name] = None if p.default is REQUIRED else p.default
  config.params = params
  return config
