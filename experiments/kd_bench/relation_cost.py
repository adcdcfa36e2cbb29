"""Per-step cost of the kd_bench relation-loss rows with and without their sample caps.

    python experiments/kd_bench/relation_cost.py [--steps 50]

Builds the full config's `alone`, `rkd` and `cnn_trg` steps on MNIST-1D (batch 128, an
untrained teacher: the cost does not depend on the weights) and times --steps jitted steps
after one warm-up step, for the config's objectives and for the same objectives with
``max_samples`` / ``token_pool`` removed (RKD angle O(B^3), TRG graph O((B L)^2)). Prints ms per
step (wall clock and process CPU time).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from configs import kd_bench as kd_config  # noqa: E402
from kfuse import distill, models, optim, train  # noqa: E402
from kfuse.data import iterate, load  # noqa: E402
from kfuse.distill import objectives as O  # noqa: E402


def _uncapped(spec):
  if isinstance(spec, (list, tuple)):
    return [_uncapped(s) for s in spec]
  spec = dict(spec)
  spec.pop("max_samples", None)
  spec.pop("token_pool", None)
  return spec


def time_step(cfg, ds, label, spec, steps):
  entry = cfg.methods[label].to_dict()
  mcfg = dict(cfg.datasets.mnist1d[entry["student"]])
  name = mcfg.pop("name")
  student = models.get_model(name, num_classes=10, **{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in mcfg.items()})
  teacher = models.get_model("cnn1d", num_classes=10, widths=(16, 32))
  tv = teacher.init(jax.random.key(0), ds.x_train[:2])
  obj = O.get([dict(s) for s in spec] if isinstance(spec, (list, tuple)) else dict(spec))
  step = distill.make_step(student, obj, optim.make_optimizer(cfg.optimizer.to_dict(), 3000),
                           [distill.Teacher(teacher, tv)])
  state = step.init(student.init(jax.random.key(1), ds.x_train[:2]), ds.x_train[:2])
  batches = iterate(jax.random.key(2), ds.x_train, ds.y_train, cfg.batch_size, epochs=None)
  key = jax.random.key(3)
  xb, yb = next(batches)
  state, m = step(state, {"x": xb, "y": yb}, key)
  jax.block_until_ready(m["loss"])
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    xb, yb = next(batches)
    state, m = step(state, {"x": xb, "y": yb}, key)
  jax.block_until_ready(m["loss"])
  return (1000 * (time.perf_counter() - t0) / steps, 1000 * (time.process_time() - c0) / steps,
          step.jitted._cache_size())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=50)
  args = ap.parse_args()
  cfg = kd_config.get_config()
  ds = load("mnist1d", seed=0, val_fraction=0.1)
  rows = [("alone", "config", cfg.methods.alone.objective.to_dict())]
  for label in ("rkd", "cnn_trg"):
    spec = cfg.methods[label].objective
    spec = [dict(s) for s in spec] if isinstance(spec, (list, tuple)) else spec.to_dict()
    rows += [(label, "config (capped)", spec), (label, "uncapped", _uncapped(spec))]
  print(f"batch {cfg.batch_size}, {args.steps} steps, load average {os.getloadavg()[0]:.1f}")
  for label, variant, spec in rows:
    wall, cpu, compiles = time_step(cfg, ds, label, spec, args.steps)
    print(f"{label:8s} {variant:16s} {wall:7.1f} ms/step wall {cpu:7.1f} ms/step CPU"
          f"  (compiled {compiles}x)", flush=True)


if __name__ == "__main__":
  main()
