"""Peak memory and CPU time of the subspace merges through the streaming engine, HF checkpoints.

    python experiments/perf/subspace_rss.py --size=llama-w1024 --methods=task_arithmetic,tsv_m,iso_cts,wudi

Builds a base and ``--experts`` random HF-Llama-shaped models with ``bench.build_model``
(NumPy only, under ``--root``), then runs ``python -m kfuse.main --config=configs/merge.py:METHOD``
on them, one method after another, each under ``/usr/bin/time -v`` (peak RSS, user + sys CPU).
``task_arithmetic`` (elementwise, chunked) is the engine's baseline: what the process holds
without any whole-matrix work. The subspace methods need each matrix whole: their bound is
that baseline plus (experts + a few) × the largest matrix (float32). One JSON row per method
is appended to ``--results``; the models are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the model builder and the timer of the perf bench)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="llama-w1024", choices=sorted(bench.SIZES))
  ap.add_argument("--methods", default="task_arithmetic,tsv_m,iso_cts,wudi")
  ap.add_argument("--experts", type=int, default=3)
  ap.add_argument("--root", default="/tmp/kfuse_subspace_rss")
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__),
                                                    "subspace_rss.jsonl"))
  a = ap.parse_args(argv)
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=bench.REPO)
  mdir = os.path.join(a.root, a.size)
  base = bench.build_model(os.path.join(mdir, "base"), a.size, "float32", seed=1)
  exps = [bench.build_model(os.path.join(mdir, f"expert{i}"), a.size, "float32", seed=1,
                            expert=100 + i) for i in range(1, a.experts + 1)]
  shapes = bench.model_shapes(a.size)
  largest = max(int(np.prod(s)) for s in shapes.values()) * 4
  out = os.path.join(a.root, "out")
  try:
    for method in a.methods.split(","):
      shutil.rmtree(out, ignore_errors=True)
      cmd = [sys.executable, "-m", "kfuse.main", f"--config={bench.REPO}/configs/merge.py:{method}",
             f"--config.base={base}", f"--config.models={','.join(exps)}",
             f"--config.output_dir={out}", "--config.progress=False"]
      wall, rss, log, cpu = bench.timed(cmd, env)
      res = bench._result_line(log)
      row = {"size": a.size, "params_M": round(bench.num_params(a.size) / 1e6, 2),
             "method": method, "experts": a.experts, "largest_matrix_MB": round(largest / 1e6, 1),
             "peak_rss_GB": round(rss, 3), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
             "merge_s": res.get("seconds"), "loadavg": round(os.getloadavg()[0], 1),
             "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
      print(json.dumps(row), flush=True)
      with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")
  finally:
    shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
      shutil.rmtree(a.root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
