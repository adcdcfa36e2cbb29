"""Gram collection throughput: kfuse.merge.hf_statistics.grams vs a PyTorch forward-hook
collector (the way FusionBench's RegMean collects), the same random Llama and windows, CPU.

    PYTHONPATH=. python experiments/perf/hf_gram_bench.py

Both accumulate XᵀX of every Linear input in float32 over the same batches; the first
two batches (compilation / warm-up) are excluded; tokens per second of the remaining batches.
"""

import tempfile
import time

import numpy as np
import torch
import transformers

from kfuse.merge import hf_statistics as H
from kfuse.models import hf

BATCHES, B, T = 5, 8, 128


def main():
  cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=688,
                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                                 tie_word_embeddings=False)
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(cfg).eval()
  d = tempfile.mkdtemp()
  m.save_pretrained(d)
  ids = np.random.default_rng(0).integers(0, 1000, (BATCHES + 2) * B * T)
  batches = H.token_batches(ids, T, B)
  model = hf.load(d)
  H.grams(model, batches[:2])                      # compile (first and accumulating step)
  t0 = time.perf_counter()
  H.grams(model, batches[2:])
  jx = time.perf_counter() - t0
  sums = {}

  def hook(mod, args, out, name=None):
    x = args[0].reshape(-1, args[0].shape[-1])
    sums[name] = sums.get(name, 0) + x.T @ x

  for name, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear):
      mod.register_forward_hook(lambda mod, a, o, name=name: hook(mod, a, o, name))
  with torch.no_grad():
    for b in batches[:2]:
      m(torch.tensor(b["x"], dtype=torch.long))
    t0 = time.perf_counter()
    for b in batches[2:]:
      m(torch.tensor(b["x"], dtype=torch.long))
    pt = time.perf_counter() - t0
  tokens = BATCHES * B * T
  print(f"kfuse {tokens / jx:.0f} tok/s ({jx:.2f} s), torch hooks {tokens / pt:.0f} tok/s"
        f" ({pt:.2f} s), ratio {pt / jx:.2f}x  [{torch.get_num_threads()} torch threads]")


if __name__ == "__main__":
  main()
