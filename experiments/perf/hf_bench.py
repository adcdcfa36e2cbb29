"""Forward pass of a Llama-shaped causal LM: kfuse (JAX, Flax NNX) vs transformers (PyTorch), CPU.

    python experiments/perf/hf_bench.py                       # ~134M params, batch 8 x 512, 3 pairs
    python experiments/perf/hf_bench.py --hidden=256 --layers=2 --vocab=4096 --seq=128 --reps=2

Builds a random Llama with transformers (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000,
untied: 134M parameters), ``save_pretrained`` under --root, loads that directory in both
frameworks (float32), then times one forward pass (logits for every position) per framework,
alternating kfuse and transformers ``--reps`` times after one warm-up each (kfuse's warm-up
compiles). Reports every wall time, the medians, the ratio and the logits' max |Δ| / max |ref|.
Appends one JSON row to experiments/perf/hf_bench.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--kv_heads", type=int, default=12)
  ap.add_argument("--mlp", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--root", default="/tmp/kfuse_hf_bench")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "hf_bench.jsonl"))
  a = ap.parse_args()

  import jax
  import torch
  import transformers
  from kfuse.models import hf

  cfg = transformers.LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers,
                                 num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                                 intermediate_size=a.mlp, vocab_size=a.vocab,
                                 max_position_embeddings=max(2048, a.seq),
                                 tie_word_embeddings=False)
  path = os.path.join(a.root, f"llama_h{a.hidden}_l{a.layers}_v{a.vocab}")
  if not os.path.isdir(path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
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
      date=time.strftime("%Y-%m-%d"), params=n_params, batch=a.batch, seq=a.seq,
      hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab,
      kfuse_s=kw, transformers_s=tw, kfuse_median_s=float(np.median(kw)),
      transformers_median_s=float(np.median(tw)),
      ratio_transformers_over_kfuse=float(np.median(tw) / np.median(kw)),
      kfuse_first_call_s=t_compile, max_rel_err=err, torch_threads=torch.get_num_threads(),
      cpus=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
      transformers=transformers.__version__, attn=tm.config._attn_implementation,
      machine=platform.machine())
  print(json.dumps(row))
  with open(a.out, "a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
