"""DLF's per-step solve, before / after a change to kfuse/decode/processors.py, alternated A/B.

    python experiments/decode_bench/dlf_ab.py --before <git rev> [--vocab 8192] [--rounds 9]

Loads ``processors.py`` as it was at ``--before`` (``git show``) beside the working tree's,
then alternates, round by round: (1) the jitted `dlf_weights` solve alone on one row of random
logits (T = 1 and 2 experts); (2) fused greedy decoding of three random Llama-shaped models
(`w2s_bench.make_model`, 64 new tokens, batch 1) with DLF (T = 1), against the sum of the
three models' own decoding. Medians over rounds; one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import decode
from kfuse.decode import processors as P
from kfuse.decode.w2s_bench import make_model


def _old_module(rev: str):
  src = subprocess.run(["git", "show", f"{rev}:kfuse/decode/processors.py"], check=True,
                       capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "processors_before.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("processors_before", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["processors_before"] = mod
  spec.loader.exec_module(mod)
  return mod


def _time(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--before", required=True)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=9)
  args = ap.parse_args()
  old = _old_module(args.before)
  rng = np.random.default_rng(0)
  runs = {}
  for t in (1, 2):
    zl = jnp.asarray(rng.normal(0, 2, (1, args.vocab)), jnp.float32)
    zs = zl + jnp.asarray(rng.normal(0, 1, (1, args.vocab)), jnp.float32)
    ze = zs[:, None] + jnp.asarray(rng.normal(0, 1, (1, t, args.vocab)), jnp.float32)
    for name, mod in (("before", old), ("after", P)):
      f = jax.jit(mod.dlf_weights)
      runs[f"solve_T{t}_{name}"] = lambda f=f, a=(zl, zs, ze): f(*a)
  models = [make_model(args.vocab, 128, args.dim, 4, args.dim // 32, args.dim * 3, i)
            for i in range(3)]
  prompts = rng.integers(3, args.vocab, (1, 16)).tolist()
  o = old.dlf(1)
  procs = {"before": P.Processor(o.init, o.apply, o.models, o.name), "after": P.dlf(1)}
  for i, m in enumerate(models):
    runs[f"alone{i}"] = lambda m=m: decode.generate(m, prompts, 64).tokens
  for name, proc in procs.items():
    runs[f"fused_{name}"] = lambda p=proc: decode.generate(models, prompts, 64, processor=p).tokens
  same = np.array_equal(runs["fused_before"](), runs["fused_after"]())
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for k, fn in runs.items():
      times[k].append(_time(fn))
  med = {k: statistics.median(v) for k, v in times.items()}
  alone = [sum(times[f"alone{i}"][r] for i in range(3)) for r in range(args.rounds)]
  out = dict(vars(args), same_tokens=bool(same),
             solve_ms={k[6:]: 1e3 * v for k, v in med.items() if k.startswith("solve")},
             fused_over_alone={n: statistics.median(
                 [times[f"fused_{n}"][r] / alone[r] for r in range(args.rounds)]) for n in procs},
             seconds_median=med)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
