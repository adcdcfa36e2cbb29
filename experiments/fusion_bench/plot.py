"""Bar chart of bits per character per domain from the fusion jobs' results files.

    PYTHONPATH=. python experiments/fusion_bench/plot.py WORKDIR [WORKDIR ...] --out fusion_bpc.png

Several workdirs (seeds) are averaged; error bars are the min / max over them.
"""

import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("workdirs", nargs="+")
  ap.add_argument("--out", default="fusion_bpc.png")
  args = ap.parse_args()
  runs = []
  for wd in args.workdirs:
    bpc = {}
    for job in ("fusellm", "fusechat"):
      p = os.path.join(wd, f"results_{job}.json")
      if os.path.exists(p):
        with open(p) as f:
          bpc.update(json.load(f)["bpc"])
    runs.append(bpc)
  labels = [k for k in runs[0] if not k.startswith("source:") and all(k in r for r in runs)]
  domains = list(runs[0][labels[0]])
  fig, ax = plt.subplots(figsize=(11, 4))
  width = 0.8 / len(labels)
  for i, lab in enumerate(labels):
    vals = np.array([[r[lab][d] for d in domains] for r in runs])
    x = np.arange(len(domains)) + i * width
    ax.bar(x, vals.mean(0), width, label=lab, color=plt.cm.tab20(i % 20),
           yerr=[vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)])
  ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
  lo = min(min(r[lab][d] for lab in labels for d in domains) for r in runs)
  ax.set_ylim(lo - 0.1, None)
  ax.set_ylabel("bits per character (lower is better)")
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(args.out)


if __name__ == "__main__":
  main()
