"""kfuse command-line entry point.

    python -m kfuse.main --config=configs/default.py
    python -m kfuse.main --config=configs/mergekit.py:merge.yml --config.output_dir=OUT
    python -m kfuse.main --config=configs/merge.py:ties --config.models=a,b --config.base=c \
        --config.output_dir=OUT

This file only parses flags and dispatches on ``config.task``; the work lives
in importable libraries (see `kfuse.tasks`).
"""

from __future__ import annotations

import gc
import sys

gc.disable()   # importing JAX makes ~10^6 objects; collecting during imports costs ~0.15 s

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Job configuration (a configs/*.py file).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Overrides config.workdir where the job has one.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep runs readable
    logging.set_verbosity(logging.WARNING)
  from kfuse import tasks
  from kfuse.tree import KfuseError
  import jax
  logging.info("JAX devices: %s", jax.devices())
  try:
    tasks.entry(FLAGS.config)           # imports the task's module (with GC still off)
    gc.freeze()                         # long-lived import-time objects: never rescanned
    gc.enable()
    tasks.run(FLAGS.config, FLAGS.workdir)
  except KfuseError as e:
    print(f"kfuse: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
