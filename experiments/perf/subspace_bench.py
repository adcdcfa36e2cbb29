"""Per-matrix time of the subspace merges, kfuse vs FusionBench 0.2.33, same matrices.

    python experiments/perf/subspace_bench.py --shapes=768x768,768x3072 --tasks=8 --reps=3 \
        --wudi-shape=256x256 --wudi-steps=300

For each shape: T random task matrices (PyTorch [out, in], float32, N(0, 1e-2)), then
alternately FusionBench's function (TSV-M: `compute_and_sum_svd_mem_reduction`, Iso-CTS:
`iso_cts`, WUDI: `wudi_merging`) and kfuse's compiled per-tensor kernel (the one
`merge` and the streaming engine run) on them, ``--reps`` times each. kfuse is warmed up
once first (its compile time is reported apart). Reports min / median seconds per matrix,
the ratio FusionBench / kfuse of the medians, and the relative difference of the outputs.
One JSON row per (method, shape) is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

import numpy as np


def _quiet(fn, *a, **kw):
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    return fn(*a, **kw)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="768x768,768x3072")
  ap.add_argument("--tasks", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--methods", default="tsv_m,iso_cts,wudi")
  ap.add_argument("--wudi-shape", default="256x256")
  ap.add_argument("--wudi-steps", type=int, default=300)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "subspace_results.jsonl"))
  a = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  from fusion_bench.method.isotropic_merging.iso_utils import iso_cts
  from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
      compute_and_sum_svd_mem_reduction)
  from fusion_bench.method.wudi.wudi import wudi_merging

  from kfuse.merge import get_method

  def fb_run(method, tvs):
    sd = [{"w": torch.from_numpy(x)} for x in tvs]
    if method == "tsv_m":
      return _quiet(compute_and_sum_svd_mem_reduction, sd, accelerator="cpu")["w"]
    if method == "iso_cts":
      return _quiet(iso_cts, sd, 0.8, accelerator="cpu")["w"]
    return _quiet(wudi_merging, sd, accelerator="cpu", iter_num=a.wudi_steps)["w"].detach()

  def kf_kernel(method):
    m = get_method(method)
    static = {"transpose": False}
    hp = {"lambda": jnp.float32(1.0)}
    if method == "iso_cts":
      static["common_space_fraction"] = 0.8
    if method == "wudi":
      static.update(steps=a.wudi_steps, solver="adam")
      hp["lr"] = jnp.float32(1e-5)
    k = m.kernel(static)
    return lambda base, ex: k(base, ex, jnp.ones(ex.shape[0], jnp.float32), hp,
                              jax.random.key(0)).block_until_ready()

  rows = []
  for method in a.methods.split(","):
    shapes = [a.wudi_shape] if method == "wudi" else a.shapes.split(",")
    for shp in shapes:
      m_, n_ = (int(x) for x in shp.split("x"))
      r = np.random.default_rng(0)
      base = np.zeros((m_, n_), np.float32)
      tvs = [(r.standard_normal((m_, n_)) * 1e-2).astype(np.float32) for _ in range(a.tasks)]
      ex = jnp.stack([jnp.asarray(base + x) for x in tvs])
      jb = jnp.asarray(base)
      run = kf_kernel(method)
      t0 = time.perf_counter()
      out_kf = np.asarray(run(jb, ex))
      first = time.perf_counter() - t0
      fb_t, kf_t = [], []
      for _ in range(a.reps):
        t0 = time.perf_counter()
        out_fb = fb_run(method, tvs).numpy()
        fb_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_kf = np.asarray(run(jb, ex))
        kf_t.append(time.perf_counter() - t0)
      rel = float(np.linalg.norm(out_kf - out_fb) / np.linalg.norm(out_fb))
      row = {"method": method, "shape": shp, "tasks": a.tasks,
             "steps": a.wudi_steps if method == "wudi" else None,
             "fb_min": min(fb_t), "fb_median": statistics.median(fb_t),
             "kfuse_min": min(kf_t), "kfuse_median": statistics.median(kf_t),
             "kfuse_first_call": first,
             "ratio_median": statistics.median(fb_t) / statistics.median(kf_t),
             "rel_diff": rel, "fb_all": fb_t, "kfuse_all": kf_t,
             "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "loadavg": os.getloadavg()[0]}
      rows.append(row)
      print(json.dumps(row), flush=True)
      with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  print("\n| method | shape | T | FusionBench min / median s | kfuse min / median s | "
        "ratio (median) | kfuse 1st call s | rel. diff |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for r_ in rows:
    name = r_["method"] + (f" ({r_['steps']} Adam steps)" if r_["steps"] else "")
    print(f"| {name} | {r_['shape']} | {r_['tasks']} | {r_['fb_min']:.2f} / {r_['fb_median']:.2f} "
          f"| {r_['kfuse_min']:.2f} / {r_['kfuse_median']:.2f} | {r_['ratio_median']:.1f}× "
          f"| {r_['kfuse_first_call']:.2f} | {r_['rel_diff']:.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
