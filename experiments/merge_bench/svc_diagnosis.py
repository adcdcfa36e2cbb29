"""Why Singular Value Calibration (SVC) after task arithmetic over-shoots on kfuse's pools (issue 13).

SVC (arXiv 2602.05536) rescales each singular value σ_r of a merged task matrix ΔW = U Σ Vᵀ by
γ_r = T / Σ_i max(α, s_r^i), with s_r^i = ⟨u_rᵀΔW, u_rᵀτ_i⟩ / ‖u_rᵀτ_i‖² the share of task i's
response along u_r that the merge already carries (`kfuse.merge.subspace.svc_calibrate`).

Closed form for the idealised case: if the task responses along u_r are mutually orthogonal
(⟨u_rᵀτ_i, u_rᵀτ_j⟩ = 0 for i ≠ j), task arithmetic ΔW = λ Σ_i τ_i gives s_r^i = λ for every i,
so γ_r = 1 / max(α, λ) and SVC(ΔW) = λ / max(α, λ) · Σ_i τ_i: task arithmetic at λ = 1 for
any λ ≥ α (SVC undoes the scale), at λ / α below it.
Real task vectors are not orthogonal along
u_r: the top directions are shared by several tasks (cross terms > 0, s_r^i > λ, γ_r < 1/λ) and
in the rest one task dominates, so the other tasks' s_r^i are noisy ratios of tiny responses.

Measured per matrix of the backbone (`matrix_view`: Dense kernels, attention projections): the
median over singular directions of γ_r, the σ-weighted mean of λγ_r (the scale SVC applies where
ΔW's energy is), the fraction of the s_r^i at or below α (clipped), ‖SVC(ΔW)‖_F / ‖ΔW‖_F; then the
average val and test accuracy of TA and TA + SVC at each λ of a grid that starts below FusionBench's
(0.02 … 0.3), to see whether the benchmark's val-chosen TA + SVC (λ at the 0.1 grid floor) lost
its points to the grid or to the calibration itself.

  python experiments/merge_bench/svc_diagnosis.py --path POOL [--tasks N] [--json OUT]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import merge, models
from kfuse.bench import merge_bench
from kfuse.merge.core import TensorInfo
from kfuse.merge.subspace import matrix_view, to_matrices
from kfuse.tree import flatten

from pool_common import load, parse_args, write_json   # this folder's pool_common.py

ALPHA = 0.1     # SVC's α for task arithmetic (kfuse's registered default, FusionBench's)
LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.3)


def gammas(delta: np.ndarray, tv: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(σ_r, γ_r, clipped s_r^i [T, r]) of ``delta`` [m, n] against ``tv`` [T, m, n]
  in float64: the same formula as `svc_calibrate`, recomputed here with its intermediates."""
  u, s, _ = np.linalg.svd(delta, full_matrices=False)
  merged = u.T @ delta
  coefs = []
  for t in tv:
    a = u.T @ t
    coefs.append(np.sum(merged * a, axis=1) / np.maximum(np.sum(a * a, axis=1), 1e-12))
  coefs = np.stack(coefs)                                     # [T, r]
  gamma = tv.shape[0] / np.maximum(coefs, alpha).sum(0)
  return s, gamma, coefs <= alpha


def main():
  args = parse_args()
  t0 = time.process_time()
  pool, tasks, data = load(args)
  ev = merge_bench._Evaluator(pool, data, 500)
  base = models.backbone_of(pool.pretrained)
  experts = [models.backbone_of(pool.experts[t]) for t in tasks]
  heads = {t: models.head_of(pool.experts[t]) for t in tasks}
  fb, fe = flatten(base), [flatten(e) for e in experts]
  T = len(tasks)

  per_lambda = {}
  for lam in LAMBDAS:
    med, wmean, clipped, ratio, sizes = [], [], [], [], []
    for path, b in sorted(fb.items()):
      b = np.asarray(b, np.float64)
      view = matrix_view(TensorInfo(path=path, shape=b.shape, dtype=b.dtype, layout="flax"))
      if view is None:
        continue
      taus = np.stack([np.asarray(e[path], np.float64) - b for e in fe])
      tv = np.asarray(to_matrices(jnp.asarray(taus), view))
      delta = lam * tv.sum(0)
      s, g, clip = gammas(delta, tv, ALPHA)
      med.append(float(np.median(g)))
      wmean.append(float(np.sum(s * lam * g) / np.sum(s)))
      clipped.append(float(np.mean(clip)))
      ratio.append(float(np.linalg.norm(s * g) / np.linalg.norm(s)))
      sizes.append(s.size)
    w = np.asarray(sizes, np.float64) / np.sum(sizes)
    per_lambda[lam] = {"matrices": len(med), "median_gamma": float(np.median(med)),
                       "sigma_weighted_lambda_gamma": float(np.dot(w, wmean)),
                       "clipped_fraction": float(np.dot(w, clipped)),
                       "norm_ratio": float(np.median(ratio)),
                       "orthogonal_case_gamma": 1.0 / max(ALPHA, lam)}

  key = jax.random.key(0)
  ta = merge_bench.lambda_factored(
      lambda p: merge.merge("task_arithmetic", experts, base, params=p, key=key), base)
  acc = lambda bb, split: float(np.mean(list(ev.backbone(bb, heads, split).values())))
  res = {}
  for lam in LAMBDAS:
    svc = merge.merge("task_arithmetic_svc", experts, base, params={"lambda": lam}, key=key)
    plain = ta({"lambda": lam})
    res[lam] = {f"{name}_{split}": acc(bb, split) for name, bb in (("ta", plain), ("ta_svc", svc))
                for split in ("val", "test")}
  out = {"tasks": tasks, "alpha": ALPHA, "per_lambda": per_lambda, "accuracy": res,
         "cpu_s": time.process_time() - t0}
  print(f"pool {args.path}: {T} tasks, SVC α = {ALPHA}")
  print("| λ | median γ (orthogonal case 1/max(α, λ)) | σ-weighted λγ | s_r^i clipped to α |"
        " ‖SVC(ΔW)‖/‖ΔW‖ (median) | TA val / test | TA + SVC val / test |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for lam in LAMBDAS:
    p, a = per_lambda[lam], res[lam]
    print(f"| {lam} | {p['median_gamma']:.2f} ({p['orthogonal_case_gamma']:.2f}) |"
          f" {p['sigma_weighted_lambda_gamma']:.2f} | {100 * p['clipped_fraction']:.0f} % |"
          f" {p['norm_ratio']:.2f} | {100 * a['ta_val']:.1f} / {100 * a['ta_test']:.1f} |"
          f" {100 * a['ta_svc_val']:.1f} / {100 * a['ta_svc_test']:.1f} |")
  print(f"cpu {out['cpu_s']:.0f} s")
  write_json(args.json, out)


if __name__ == "__main__":
  main()
