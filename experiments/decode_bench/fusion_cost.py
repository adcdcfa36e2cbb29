"""Where fused decoding's time goes: three distinct models vs one model's weights three times.

    python experiments/decode_bench/fusion_cost.py

Greedy decoding of 64 tokens (batch 1, 16-token prompt) with random Llama-shaped models
(dim 256, 4 layers, vocab 8192; `w2s_bench.make_model`): each model alone, proxy-tuning
over three distinct models, and proxy-tuning over one model passed three times (the same
arithmetic, one set of weights to read per step). Min of 5 runs after a warm-up.
"""

import time

import numpy as np

from kfuse import decode
from kfuse.decode.w2s_bench import make_model


def best(fn, n=5):
  fn()
  out = float("inf")
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out = min(out, time.perf_counter() - t)
  return out


def main():
  models = [make_model(8192, 128, 256, 4, 8, 768, i) for i in range(3)]
  prompts = np.random.default_rng(0).integers(3, 8192, (1, 16)).tolist()
  proc = decode.proxy_tune(1.0)
  alone = sum(best(lambda m=m: decode.generate(m, prompts, 64)) for m in models)
  same = best(lambda: decode.generate([models[0]] * 3, prompts, 64, processor=proc))
  fused = best(lambda: decode.generate(models, prompts, 64, processor=proc))
  print(f"sum of alone {alone:.3f} s; fused, 3 distinct models {fused:.3f} s"
        f" ({fused / alone:.2f}x); fused, one model 3 times {same:.3f} s ({same / alone:.2f}x)")


if __name__ == "__main__":
  main()
