"""Merge checkpoints (HF safetensors dirs or Orbax checkpoints) with a kfuse method.

    python -m kfuse.main --config=configs/merge.py:ties \
        --config.models=ckpt/a,ckpt/b,ckpt/c --config.base=ckpt/base \
        --config.output_dir=out/ties --config.params.density=0.2 --config.params.lambda_=0.5

The argument after ':' picks the method (default: task_arithmetic); its
parameters appear under config.params with their defaults (required ones
unset), so any of them can be set with --config.params.NAME=VALUE
(`lambda` is `lambda_`). Values are Python literals:
  --config.params.t=0.5                     a number, the same for every tensor
  --config.params.weight=1.0,0.5            a per-model parameter: one value per model
  --config.params.t=0,0.5,1                 any other parameter: a per-layer gradient
  --config.params.density="[{'filter': 'mlp', 'value': 0.3}, {'value': 0.5}]"   rules
`--config=configs/merge.py:METHOD --help` lists the method's parameters.
"""

import ml_collections

from kfuse.configs import merge_method_params, merge_param_docs, parse_arg


def get_config(arg=None):
  """``arg``: the method (default task_arithmetic), e.g. ``ties`` or ``method=ties``."""
  method = parse_arg(arg, method="task_arithmetic").method
  config = ml_collections.ConfigDict()
  config.task = "merge"
  config.method = method
  config.models = ""          # comma-separated paths
  config.base = ""              # base model path (methods with a base)
  config.output_dir = ""        # where the merged model is written; never inside an input
  config.output_format = "auto"   # auto | safetensors | orbax (auto: safetensors iff all inputs are)
  config.layout = "auto"          # row-wise rules: auto (from the names) | torch [out,in] | flax [in,out]
  config.dtype = ""               # cast inputs (e.g. bfloat16); empty: keep
  config.overwrite = False      # replace an existing output_dir (never an input)
  config.seed = 0               # key for random methods (DARE, DELLA)
  config.progress = True        # progress bar on stderr
  # scale (WORKSPACE.md, "Scale: streaming, sharding, multi-host")
  config.num_devices = 0          # >1: shard every tensor over this many devices
  config.prefetch_bytes = 0       # input bytes held at once; 0: largest tensor's inputs
  config.chunk = -1               # flat chunk length for elementwise methods; -1 auto, 0 off
  config.compile_cache = "auto"   # JAX's persistent compilation cache: auto (~/.cache/kfuse/xla), a dir, or '' off
  # numerics (WORKSPACE.md, "Method-author conventions")
  config.allow_nonfinite = False  # write results holding NaN/Inf instead of refusing them
  config.overflow = "error"       # values a down-cast turns into inf: error | clamp (to ±max)
  # the method's parameters with their defaults (required: None); any literal type
  config.params = merge_method_params(method)
  return config


def field_docs(arg=None):
  """One line per method parameter for `--help` (from the method's registry entry)."""
  return merge_param_docs(parse_arg(arg, method="task_arithmetic").method)
