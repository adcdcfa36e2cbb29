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

``--threads N`` (default 1) gives both tools the same N threads: OpenBLAS / OpenMP / MKL
(``*_NUM_THREADS``, read when the libraries load, so set before any import), XLA's Eigen
pool and ``torch.set_num_threads``. Besides wall seconds, each call's process CPU seconds
(user + sys, all threads: ``time.process_time``) are recorded; on a shared machine the CPU
seconds are the comparable number. Why one thread: on a 2-core machine with other jobs
running, multi-threaded LAPACK spins at its barriers while its partner thread waits for a
core; one 2048² SVD took 7.5 s wall / 2.7 s CPU with one OpenBLAS thread and 67.5 s wall /
19.7 s CPU with two (jax, same process state; numpy and torch alike).
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


def set_threads(n: int) -> None:
  """Same thread count for every numeric library; call before numpy / torch / jax load."""
  for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = str(n)
  if n == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def timed(fn):
  """(result, wall s, process CPU s) of one call."""
  c0, t0 = time.process_time(), time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="768x768,768x3072")
  ap.add_argument("--tasks", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--methods", default="tsv_m,iso_cts,wudi")
  ap.add_argument("--wudi-shape", default="256x256")
  ap.add_argument("--wudi-steps", type=int, default=300)
  ap.add_argument("--threads", type=int, default=1, help="threads for both tools (see above)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "subspace_results.jsonl"))
  a = ap.parse_args(argv)
  set_threads(a.threads)

  import jax
  import jax.numpy as jnp
  import torch
  from fusion_bench.method.isotropic_merging.iso_utils import iso_cts
  from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
      compute_and_sum_svd_mem_reduction)
  from fusion_bench.method.wudi.wudi import wudi_merging

  from kfuse.merge import get_method
  torch.set_num_threads(a.threads)

  def fb_run(method, tvs):
    sd = [{"w": torch.from_numpy(x)} for x in tvs]
    if method == "tsv_m":
      return _quiet(compute_and_sum_svd_mem_reduction, sd, accelerator="cpu")["w"]
    if method == "iso_cts":
      return _quiet(iso_cts, sd, 0.8, accelerator="cpu")["w"]
    return _quiet(wudi_merging, sd, accelerator="cpu", iter_num=a.wudi_steps)["w"].detach()

  def kf_kernel(method):
    m = get_method(method)
    static = {"view": (1, False)}   # PyTorch [out, in], as FusionBench sees it
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
      out_kf, first, _ = timed(lambda: np.asarray(run(jb, ex)))
      fb_t, kf_t, fb_c, kf_c = [], [], [], []
      for _ in range(a.reps):
        out_fb, w, c = timed(lambda: fb_run(method, tvs).numpy())
        fb_t.append(w)
        fb_c.append(c)
        out_kf, w, c = timed(lambda: np.asarray(run(jb, ex)))
        kf_t.append(w)
        kf_c.append(c)
      rel = float(np.linalg.norm(out_kf - out_fb) / np.linalg.norm(out_fb))
      row = {"method": method, "shape": shp, "tasks": a.tasks,
             "steps": a.wudi_steps if method == "wudi" else None,
             "fb_min": min(fb_t), "fb_median": statistics.median(fb_t),
             "kfuse_min": min(kf_t), "kfuse_median": statistics.median(kf_t),
             "kfuse_first_call": first,
             "ratio_median": statistics.median(fb_t) / statistics.median(kf_t),
             "fb_cpu_median": statistics.median(fb_c), "kfuse_cpu_median": statistics.median(kf_c),
             "cpu_ratio_per_pair": [f / k for f, k in zip(fb_c, kf_c)],
             "fb_cpu_all": fb_c, "kfuse_cpu_all": kf_c, "threads": a.threads,
             "rel_diff": rel, "fb_all": fb_t, "kfuse_all": kf_t,
             "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "loadavg": os.getloadavg()[0]}
      rows.append(row)
      print(json.dumps(row), flush=True)
      with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  print("\n| method | shape | T | FusionBench CPU s (median) | kfuse CPU s (median) | "
        "FusionBench / kfuse CPU, median of pairs (min–max) | wall s FB / kfuse (median) "
        "| kfuse 1st call wall s | rel. diff |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for r_ in rows:
    name = r_["method"] + (f" ({r_['steps']} Adam steps)" if r_["steps"] else "")
    pr = r_["cpu_ratio_per_pair"]
    print(f"| {name} | {r_['shape']} | {r_['tasks']} | {r_['fb_cpu_median']:.2f} "
          f"| {r_['kfuse_cpu_median']:.2f} | **{statistics.median(pr):.2f}×** "
          f"({min(pr):.2f}–{max(pr):.2f}) | {r_['fb_median']:.2f} / {r_['kfuse_median']:.2f} "
          f"| {r_['kfuse_first_call']:.2f} | {r_['rel_diff']:.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
