"""Is fused decoding's excess kfuse's or the machine's? Plain JAX matrix-vector chains.

    python experiments/decode_bench/bandwidth.py [--mb 29] [--steps 64] [--rounds 7]

No kfuse code: one jitted `lax.fori_loop` of ``--steps`` steps, each multiplying a vector
through a chain of separate float32 matrices (1024 x 256, 1 MiB each) totalling ``--mb`` MiB
("one model"), against the same loop over three distinct such chains (3 x the bytes, "three
models") and over one chain three times (3 x the arithmetic, 1 x the bytes). Alternated
rounds, medians; prints the per-step milliseconds and the ratios to 3 x one chain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def chain(key, mb: float) -> tuple:
  """Separate [1024, 256] float32 matrices (1 MiB each) totalling ``mb`` MiB."""
  n = max(1, int(mb * 2**20 / (256 * 1024 * 4)))
  return tuple(jax.random.normal(k, (1024, 256), jnp.float32) * 0.03
               for k in jax.random.split(key, n))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mb", type=float, default=29.0)
  ap.add_argument("--steps", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=7)
  args = ap.parse_args()
  ks = jax.random.split(jax.random.key(0), 3)
  one = chain(ks[0], args.mb)
  three = [one, chain(ks[1], args.mb), chain(ks[2], args.mb)]
  x0 = jnp.ones((256,), jnp.float32)

  @jax.jit
  def loop(ws, x):
    def step(_, x):
      for w in ws:                      # unrolled: one matrix-vector product per matrix
        x = jnp.tanh(w @ x)[:256]
      return x
    return jax.lax.fori_loop(0, args.steps, step, x)

  runs = {"one": lambda: loop(one, x0).block_until_ready(),
          "three_distinct": lambda: loop(sum(three, ()), x0).block_until_ready(),
          "one_thrice": lambda: loop(one * 3, x0).block_until_ready()}
  for f in runs.values():
    f()
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for k, f in runs.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(json.dumps(dict(vars(args), ms_per_step={k: 1e3 * v / args.steps for k, v in med.items()},
                        three_distinct_over_3x_one=med["three_distinct"] / (3 * med["one"]),
                        one_thrice_over_3x_one=med["one_thrice"] / (3 * med["one"]))))


if __name__ == "__main__":
  main()
