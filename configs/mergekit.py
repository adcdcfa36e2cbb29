"""Run a mergekit YAML with kfuse.

    python -m kfuse.main --config=configs/mergekit.py:path/to/merge.yml --config.output_dir=OUT

Optional: --config.overwrite=True (replace an existing OUT), --config.seed=0
(DARE/DELLA randomness), --config.out_shard_bytes=5000000000.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "mergekit"
  config.yaml = arg or ""
  config.output_dir = ""
  config.overwrite = False
  config.seed = 0
  config.out_shard_bytes = 5_000_000_000
  config.progress = True
  return config
