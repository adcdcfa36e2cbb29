"""Diagnostic runs behind the README's discussion: a subset of kd_bench students on MNIST-1D.

    python experiments/kd_bench/diagnose.py METHODS STEPS SEEDS [EXTRA_METHODS_JSON]
    # e.g. the DKD beta check (3 seeds):
    python experiments/kd_bench/diagnose.py alone,dkd,dkd_beta2 3000 0,1,2 \
        '{"dkd_beta2": {"student": "student", "objective": {"name": "dkd", "alpha": 1.0,
          "beta": 2.0, "temperature": 4.0, "ce_weight": 1.0, "warmup_epochs": 20.0}}}'
    # a wider small CNN (SMALL_CNN_WIDTHS=8,16):
    SMALL_CNN_WIDTHS=8,16 python experiments/kd_bench/diagnose.py cnn_alone,cnn_hinton 3000 0

Runs `kfuse.bench.kd_bench` with the full config's teacher, optimizer and data, only the
MNIST-1D students listed in METHODS (config.methods labels, plus any defined in
EXTRA_METHODS_JSON), STEPS student steps, the given seeds, Forget-Me-Not and Fantastic Gains
off. Prints each method's test accuracy (absl INFO) and the last training batch's metrics
("LAST ..." lines: train-batch accuracy, CE, KD / feature terms), then the usual tables.
Outputs go to /tmp/kd_diagnose.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import logging  # noqa: E402

from configs import kd_bench as kd_config  # noqa: E402
from kfuse.bench import kd_bench  # noqa: E402


def main(argv):
  if len(argv) < 4:
    raise SystemExit(__doc__)
  logging.set_verbosity(logging.INFO)
  fit = kd_bench._Runner.fit

  def fit_and_report(self, step, state, x, y, steps, key, desc, on_step=None):
    state, last = fit(self, step, state, x, y, steps, key, desc, on_step)
    print("LAST", desc, {k: round(v, 4) for k, v in last.items()}, flush=True)
    return state, last

  kd_bench._Runner.fit = fit_and_report
  cfg = kd_config.get_config()
  cfg.seeds = tuple(int(s) for s in argv[3].split(","))
  for label, entry in (json.loads(argv[4]) if len(argv) > 4 else {}).items():
    cfg.methods[label] = entry
  d = dict(cfg.datasets.mnist1d.to_dict(), methods=tuple(argv[1].split(",")),
           student_steps=int(argv[2]))
  if os.environ.get("SMALL_CNN_WIDTHS"):
    d["small_cnn"] = dict(name="cnn1d", widths=tuple(
        int(w) for w in os.environ["SMALL_CNN_WIDTHS"].split(",")))
  cfg.datasets = {"mnist1d": d}
  cfg.forget_me_not.enabled = False
  cfg.fantastic_gains.enabled = False
  cfg.workdir = "/tmp/kd_diagnose"
  kd_bench.run(cfg)


if __name__ == "__main__":
  main(sys.argv)
