"""Forward pass of a Llama-shaped causal LM: kfuse (JAX, Flax NNX) vs transformers (PyTorch), CPU.

    python experiments/perf/hf_bench.py                       # ~134M params, batch 8 x 512, 3 pairs
    python experiments/perf/hf_bench.py --hidden=256 --layers=2 --heads=4 --kv_heads=4 --vocab=4096 --seq=128 --reps=2

Builds a random Llama with transformers (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000,
untied: 134M parameters), ``save_pretrained`` under --root, loads that directory in both
frameworks (float32), then times one forward pass (logits for every position) per framework,
alternating kfuse and transformers ``--reps`` times after one warm-up each (kfuse's warm-up
compiles). Reports every wall time, the medians, the ratio and the logits' max |Δ| / max |ref|.
Appends one JSON row to experiments/perf/hf_bench.jsonl.
"""

from __future__ import annotations

import time

import numpy as np

import llama_common   # experiments/perf/llama_common.py: arguments, the random Llama, the row


def main() -> None:
  a = llama_common.parse_args(batch=8, seq=512, root="/tmp/kfuse_hf_bench", out="hf_bench.jsonl")

  import torch
  import transformers
  from kfuse.models import hf

  path = llama_common.llama_dir(a)
  tm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  n_params = sum(p.numel() for p in tm.parameters())
  km = hf.load(path)
  ids = np.random.RandomState(0).randint(0, a.vocab, (a.batch, a.seq)).astype(np.int32)
  tids = torch.tensor(ids, dtype=torch.long)

  def run_torch():
    with torch.no_grad():
      return tm(tids).logits

  def run_kfuse():
    return hf.forward(km, ids).block_until_ready()

  def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out

  t_compile, k_out = timed(run_kfuse)          # warm-up: trace + compile + run
  _, t_out = timed(run_torch)
  ref = t_out.numpy()
  err = float(np.max(np.abs(np.asarray(k_out) - ref)) / np.max(np.abs(ref)))
  del k_out, t_out, ref
  kw, tw = [], []
  for _ in range(a.reps):
    kw.append(timed(run_kfuse)[0])
    tw.append(timed(run_torch)[0])
  row = dict(
      date=time.strftime("%Y-%m-%d"), params=n_params, **llama_common.shape(a), kfuse_s=kw, transformers_s=tw, kfuse_median_s=float(np.median(kw)),
      transformers_median_s=float(np.median(tw)),
      ratio_transformers_over_kfuse=float(np.median(tw) / np.median(kw)),
      kfuse_first_call_s=t_compile, max_rel_err=err, **llama_common.environment(tm))
  llama_common.append_row(row, a.out)


if __name__ == "__main__":
  main()
