"""Fused-decoding overhead, measured with alternated A/B rounds.

    python experiments/decode_bench/overhead.py [--rounds 7] [--dim 256] [--vocab 8192]

Three random Llama-shaped models (`w2s_bench.make_model`, greedy, batch 1, 16-token prompt,
64 new tokens). Every round times, back to back and in this order: each model alone, the
three fused by ``--rule``, one model passed three times through the same fused loop
(identical arithmetic, one set of weights: "same3"), and that model with two copies of
its weights (identical values and arithmetic, three sets of weights to read: "copies3").
Rounds alternate so that the machine's load drifts over all of them alike; the ratio
fused / (sum of alone) is taken per round and the median over rounds reported (and the
min-of-rounds ratio beside it). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kfuse import decode
from kfuse.decode.w2s_bench import make_model
from kfuse.models import hf


def _time(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--rule", default="proxy_tune", choices=("proxy_tune", "ensemble", "dlf"))
  args = ap.parse_args()
  models = [make_model(args.vocab, 128, args.dim, args.layers, args.dim // 32, args.dim * 3, i)
            for i in range(3)]
  prompts = np.random.default_rng(0).integers(3, args.vocab, (args.batch, 16)).tolist()
  proc = {"proxy_tune": decode.proxy_tune(1.0), "ensemble": decode.ensemble("mean"),
          "dlf": decode.dlf(1)}[args.rule]
  runs = {f"alone{i}": (lambda m=m: decode.generate(m, prompts, args.new))
          for i, m in enumerate(models)}
  runs["fused"] = lambda: decode.generate(models, prompts, args.new, processor=proc)
  runs["same3"] = lambda: decode.generate([models[0]] * 3, prompts, args.new, processor=proc)
  copies = [models[0]] + [hf.with_hf_dict(models[0], {k: np.array(v) for k, v in
                                                       hf.to_hf_dict(models[0]).items()})
                          for _ in range(2)]
  runs["copies3"] = lambda: decode.generate(copies, prompts, args.new, processor=proc)
  for fn in runs.values():
    fn()                                          # compile
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for k, fn in runs.items():
      times[k].append(_time(fn))
  alone = [sum(times[f"alone{i}"][r] for i in range(3)) for r in range(args.rounds)]
  ratio = lambda k: [times[k][r] / alone[r] for r in range(args.rounds)]
  best = {k: min(v) for k, v in times.items()}
  out = dict(vars(args),
             fused_over_alone_median=statistics.median(ratio("fused")),
             same3_over_alone_median=statistics.median(ratio("same3")),
             copies3_over_alone_median=statistics.median(ratio("copies3")),
             fused_over_alone_min=best["fused"] / sum(best[f"alone{i}"] for i in range(3)),
             seconds_min=best, seconds_median={k: statistics.median(v) for k, v in times.items()})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
