"""Decoding speed: kfuse.decode.generate vs transformers' generate, and the cost of fusion.

    python experiments/decode_bench/speed.py [--new 64] [--batch 1] [--repeats 3]

1. One random Llama-shaped model (the same weights in both libraries, float32, greedy,
   KV cache, ``--new`` tokens after a ``--prompt``-token prompt): tokens/s of kfuse's
   jitted loop (compiled once, then timed) against transformers' ``generate`` on the
   same CPU threads. Min over ``--repeats`` runs (the machine is shared).
2. Fusion overhead: three models decoded together with proxy-tuning (and DLF) against
   the sum of the three models' own decoding times; target ≤ 1.15 x.
Writes speed.json (``--out``) beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import transformers

from kfuse import decode
from kfuse.models import hf


def _torch_llama(path, dim, layers, vocab, seed):
  cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=dim * 3, num_hidden_layers=layers,
                                 num_attention_heads=dim // 32, num_key_value_heads=dim // 32,
                                 vocab_size=vocab, max_position_embeddings=1024,
                                 tie_word_embeddings=False)
  torch.manual_seed(seed)
  m = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0.0, 0.05)
  m.save_pretrained(path)
  return m.eval()


def _best(fn, repeats):
  fn()                                   # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="speed.json", help="file name beside this script")
  args = ap.parse_args()
  threads = torch.get_num_threads()
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, args.vocab, (args.batch, args.prompt)).tolist()
  res = dict(vars(args), torch_threads=threads, cpus=os.cpu_count(),
             weights_mb_per_model=None)
  with tempfile.TemporaryDirectory() as root:
    paths = [os.path.join(root, f"m{i}") for i in range(3)]
    tms = [_torch_llama(p, args.dim, args.layers, args.vocab, i) for i, p in enumerate(paths)]
    models = [hf.load(p) for p in paths]
  res["weights_mb_per_model"] = sum(v.size * 4 for v in hf.to_hf_dict(models[0]).values()) / 2**20
  ids = torch.tensor(prompts)

  def hf_gen():
    with torch.no_grad():
      return tms[0].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)

  ref = hf_gen()[:, args.prompt:].numpy()
  got = decode.generate(models[0], prompts, args.new).tokens
  res["same_tokens_as_transformers"] = bool((ref == got).all())
  t_hf = _best(hf_gen, args.repeats)
  alone = [_best(lambda m=m: decode.generate(m, prompts, args.new), args.repeats) for m in models]
  n_tok = args.batch * args.new
  res.update(kfuse_tokens_per_s=n_tok / alone[0], transformers_tokens_per_s=n_tok / t_hf,
             speed_ratio_kfuse_over_transformers=t_hf / alone[0],
             alone_seconds=alone, transformers_seconds=t_hf)
  for name, proc in (("proxy_tune", decode.proxy_tune(1.0)), ("dlf", decode.dlf(1)),
                     ("ensemble_mean", decode.ensemble("mean"))):
    t = _best(lambda: decode.generate(models, prompts, args.new, processor=proc), args.repeats)
    res[f"fused_{name}_seconds"] = t
    res[f"fused_{name}_over_sum_of_alone"] = t / sum(alone)
  print(json.dumps(res, indent=2))
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), args.out)
  with open(out, "w") as f:
    json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
