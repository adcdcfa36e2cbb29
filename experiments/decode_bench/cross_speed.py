"""Cross-vocabulary decoding speed: UniTE and DeePEn (`generate_cross`) vs each model alone.

    python experiments/decode_bench/cross_speed.py [--vocab 2048] [--new 64] [--rounds 5]

Two random Llama-shaped models (`w2s_bench.make_model`, dim 256, 4 layers) whose
vocabularies are two byte-level BPE tokenizers trained offline on different text
(`kfuse.data.text.train_tokenizer`: pysource / shakespeare, ``--vocab`` tokens each).
Greedy, one text prompt, ``--new`` new strings. Each model alone runs `generate` (its own
tokens, the jitted while loop); the ensembles run `generate_cross` (host loop, one jitted
step per model per fed token, one jitted fusion + pick per string). Alternated rounds,
medians; prints one JSON line with strings/s and the ratio to the sum of alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


from kfuse import decode
from kfuse.data import text
from kfuse.decode.w2s_bench import make_model


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  toks = [text.train_tokenizer("bpe", args.vocab, domains=(d,))
          for d in ("pysource", "shakespeare")]
  models = [make_model(args.vocab, 256, args.dim, 4, args.dim // 32, args.dim * 3, i)
            for i in range(2)]
  vocab = decode.CrossVocab(toks, [args.vocab] * 2)
  prompt = "def main(argv):\n    "
  ids = [t.encode(prompt).ids.tolist() for t in toks]
  procs = {"unite": decode.unite(vocab, k=10), "deepen": decode.deepen(vocab, models)}
  runs = {f"alone{i}": (lambda i=i: decode.generate(models[i], [ids[i]], args.new))
          for i in range(2)}
  for name, proc in procs.items():
    runs[name] = lambda p=proc: decode.generate_cross(models, vocab, [prompt], args.new,
                                                      processor=p)
  for fn in runs.values():
    fn()
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for k, fn in runs.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  alone = [times["alone0"][r] + times["alone1"][r] for r in range(args.rounds)]
  out = dict(vars(args), union_strings=len(vocab), anchors=int(len(vocab.common())),
             strings_per_s={k: args.new / v for k, v in med.items()},
             over_sum_of_alone={n: statistics.median([times[n][r] / alone[r]
                                                       for r in range(args.rounds)])
                                for n in procs},
             seconds_median=med)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
