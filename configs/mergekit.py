"""Run a mergekit YAML with kfuse.

    python -m kfuse.main --config=configs/mergekit.py:path/to/merge.yml --config.output_dir=OUT

Optional: --config.overwrite=True (replace an existing OUT), --config.seed=0
(DARE/DELLA randomness), --config.out_shard_bytes=5000000000,
--config.num_devices=8 (shard over 8 devices), --config.compile_cache=off (compiled
kernels are reused across runs from ~/.cache/kfuse/xla by default). Multi-host: run `python -m kfuse.shard` with the
same flags on every host (WORKSPACE.md, "Scale").
"""

import ml_collections

from kfuse.configs import parse_arg


def get_config(arg=None):
  """``arg``: the YAML path (or ``yaml=PATH``)."""
  config = ml_collections.ConfigDict()
  config.task = "mergekit"
  config.yaml = parse_arg(arg, yaml="").yaml   # the mergekit YAML
  config.output_dir = ""          # where the merged model is written; never inside an input
  config.overwrite = False        # replace an existing output_dir (never an input)
  config.seed = 0                 # key for random methods (DARE, DELLA)
  config.out_shard_bytes = 5_000_000_000   # largest output shard
  config.progress = True          # progress bar on stderr
  # scale (WORKSPACE.md, "Scale: streaming, sharding, multi-host")
  config.num_devices = 0          # >1: shard every tensor over this many devices
  config.prefetch_bytes = 0       # input bytes held at once; 0: largest tensor's inputs
  config.chunk = -1               # flat chunk length for elementwise methods; -1 auto, 0 off
  config.compile_cache = "auto"   # JAX's persistent compilation cache: auto (~/.cache/kfuse/xla), a dir, or '' off
  # numerics (WORKSPACE.md, "Method-author conventions")
  config.allow_nonfinite = False  # write results holding NaN/Inf instead of refusing them
  config.overflow = "error"       # values a down-cast turns into inf: error | clamp (to ±max)
  return config
