"""Quick merge check on a built pool: zero-shot, experts, simple average, task arithmetic, TIES.

A stop-gap until the benchmark runner runs every method on a pool: merges the
experts' backbones with `kfuse.merge.merge`, keeps each task's pool head, picks
λ on the average val accuracy (grid 0.1 … 1.0, as Ilharco et al. 2023 / FusionBench)
and reports test accuracy %, absolute and normalised to the experts.

  python experiments/merge_bench/pool_merge_check.py --path DIR [--tasks N]
"""

from __future__ import annotations

import numpy as np

from kfuse import models
from kfuse.bench import pool as pool_lib
from kfuse.merge import merge

from pool_common import LAMBDAS, load, parse_args, write_json   # this folder's pool_common.py

METHODS = {"simple_average": ({}, None), "task_arithmetic": ({}, LAMBDAS),
           "ties_paper": ({"k": 0.2}, LAMBDAS)}


def accuracies(cfg, backbone, heads, data, split):
  out = {}
  for t, ds in data.items():
    f = pool_lib.features(cfg, backbone, getattr(ds, f"x_{split}"))
    h = heads[t]["params"]["head"]
    logits = f @ np.asarray(h["kernel"], np.float64) + np.asarray(h["bias"], np.float64)
    out[t] = 100 * float(np.mean(logits.argmax(1) == getattr(ds, f"y_{split}")))
  return out


def main():
  args = parse_args()
  pool, tasks, data = load(args)
  cfg = pool.manifest["config"]
  base = models.backbone_of(pool.pretrained)
  experts = [models.backbone_of(pool.experts[t]) for t in tasks]
  rows = {"zero_shot": accuracies(cfg, base, pool.probes, data, "test")}
  rows["experts"] = {t: accuracies(cfg, models.backbone_of(pool.experts[t]), pool.probes,
                                   {t: data[t]}, "test")[t] for t in tasks}
  chosen = {}
  for name, (params, grid) in METHODS.items():
    if grid is None:
      rows[name] = accuracies(cfg, merge(name, experts, base, params=params), pool.probes, data, "test")
      continue
    best = None
    for lam in grid:
      merged = merge(name, experts, base, params={**params, "lambda": lam})
      val = np.mean(list(accuracies(cfg, merged, pool.probes, data, "val").values()))
      if best is None or val > best[0]:
        best = (val, lam, merged)
    chosen[name] = best[1]
    rows[name] = accuracies(cfg, best[2], pool.probes, data, "test")
  exp = np.mean(list(rows["experts"].values()))
  print(f"pool {args.path}: {len(tasks)} tasks, head={cfg.get('head', {}).get('kind', 'probe')}")
  print("| method | " + " | ".join(tasks) + " | avg | normalised |")
  print("|---|" + "---|" * (len(tasks) + 2))
  for name, acc in rows.items():
    avg = np.mean([acc[t] for t in tasks])
    lam = f" (λ={chosen[name]})" if name in chosen else ""
    print(f"| {name}{lam} | " + " | ".join(f"{acc[t]:.1f}" for t in tasks)
          + f" | {avg:.1f} | {100 * avg / exp:.1f} |")
  write_json(args.json, {"rows": rows, "lambda": chosen, "tasks": tasks})


if __name__ == "__main__":
  main()
