"""Design pilots for the image variant of tta_bench (issue 19): one seed, a few methods, overrides.

    python experiments/tta_bench/design.py --name A --set batch_size=100
    python experiments/tta_bench/design.py --name B --set batch_size=25 --set model.widths='(32,64)'
    python experiments/tta_bench/design.py --name final --variant images --seeds 0,1,2 --long

Each run is `kfuse.bench.tta_bench.run` on ``configs/tta_bench.py:<--variant>`` with one seed
(or ``--seeds``), the methods of ``--methods`` and no long stream unless ``--long``; one JSON line
per run (mean error per method and protocol, timings) is appended to ``--log``.
"""

import argparse
import ast
import importlib.util
import json
import os
import time

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_module():
  spec = importlib.util.spec_from_file_location("cfg_tta_bench", os.path.join(ROOT, "configs", "tta_bench.py"))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  return m


def _set(config, path: str, value: str) -> None:
  *head, last = path.split(".")
  node = config
  for k in head:
    node = node[k]
  try:
    v = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    v = value
  with node.ignore_type():
    node[last] = v


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", required=True)
  p.add_argument("--variant", default="images_quick")
  p.add_argument("--methods", default="source,bn_adapt,tent,eata")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seeds", default="", help="comma list: repeat per seed, mean ± std (config.seeds)")
  p.add_argument("--long", action="store_true", help="keep the variant's long stream (its methods"
                 " that are in --methods)")
  p.add_argument("--set", action="append", default=[], help="config.path=value (Python literal)")
  p.add_argument("--log", default="/tmp/tta19/design.jsonl")
  args = p.parse_args()
  from kfuse.bench import tta_bench
  m = _config_module()
  c = m.get_config(args.variant)
  c.workdir, c.overwrite, c.progress = f"/tmp/tta19/design_{args.name}", True, True
  c.seeds, c.seed = tuple(int(v) for v in args.seeds.split(",") if v), args.seed
  keep = args.methods.split(",")
  if args.long:
    c.long.methods = tuple(k for k in c.long.methods if k in keep)
  else:
    c.long = dict(rounds=0, samples_per_domain=0, methods=())
  all_methods = m.methods()
  c.methods = ml_collections.ConfigDict({k: all_methods[k] for k in keep},
                                        sort_keys=False)
  for s in args.set:
    k, v = s.split("=", 1)
    _set(c, k, v)
  t = time.time()
  r = tta_bench.run(c)
  line = {"name": args.name, "set": args.set, "seed": args.seed, "seeds": list(c.seeds),
          "wall_s": round(time.time() - t, 1),
          "clean_acc": r["clean"]["pool_accuracy"],
          "timing_s": {k: round(v, 1) for k, v in r["timing_s"].items()},
          "corruptions": r["corruptions"],
          "mean": {p: {k: round(v["mean"], 2) for k, v in rows.items()} for p, rows in r["protocols"].items()},
          "std": {p: {k: round(v.get("std", 0.0), 2) for k, v in rows.items()}
                  for p, rows in r["protocols"].items()},
          "seed_means": {p: {k: v.get("seed_means") for k, v in rows.items()}
                         for p, rows in r["protocols"].items()},
          "long": ({k: [round(e, 2) for e in v["per_round"]] for k, v in r["long"]["methods"].items()}
                   if r.get("long") else None),
          "errors": {p: {k: [round(e, 1) for e in v["errors"]] for k, v in rows.items()}
                     for p, rows in r["protocols"].items()}}
  with open(args.log, "a") as f:
    f.write(json.dumps(line) + "\n")
  print(json.dumps(line["mean"]), line["wall_s"], "s")


if __name__ == "__main__":
  main()
