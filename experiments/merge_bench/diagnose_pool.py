"""Structure of a pool's task vectors, and TA vs TIES at matched λ (issue 12, DESIGN.md).

For the pool at ``--path`` (its first ``--tasks`` tasks), with θ₀ the pretrained backbone and
τ_t = θ_t − θ₀ each expert's task vector, flattened over the whole backbone:

* ``rel_norm``: ‖τ_t‖ / ‖θ₀‖ per task;
* ``top20_energy``: the fraction of ‖τ_t‖² held by τ_t's 20 % largest-magnitude entries
  (1.0 = all energy in few entries; 0.2 = every entry the same size);
* ``cos_base``: cos(τ_t, θ₀) (a shared shrink / growth of the weights), and the mean pairwise
  cos(τ_s, τ_t);
* sign conflicts of the TIES-trimmed vectors (each τ_t keeps its top 20 % by magnitude, as in
  Yadav et al. 2023): among entries kept by ≥ 2 tasks, the fraction whose signs disagree
  (``conflict_rate``), and the fraction of the kept mass whose sign opposes the elected sign
  sign(Σ_t trimmed τ_t) (``opposed_mass``: what TIES's disjoint merge removes);
* ``others_only``: each task's val accuracy at θ₀ + λ Σ_{s≠t} τ_s (λ = 0.3), minus its zero-shot
  val accuracy: the interference the other tasks add (weight disentanglement, Ortiz-Jimenez et
  al. 2023);
* val average accuracy of task arithmetic and ``ties_paper`` (k = 0.2, disjoint sum, the paper's
  TIES) at the same λ ∈ {0.1, …, 1.0}.

  python experiments/merge_bench/diagnose_pool.py --path DIR [--tasks N] [--json OUT]
"""

from __future__ import annotations

import time

import jax
import numpy as np

from kfuse import merge, models
from kfuse.bench import merge_bench
from kfuse.tree import flatten

from pool_common import LAMBDAS, load, parse_args, write_json   # this folder's pool_common.py


def flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(v, np.float64).ravel() for _, v in sorted(flatten(tree).items())])


def trim(v: np.ndarray, keep: float) -> np.ndarray:
  k = max(1, int(round(keep * v.size)))
  thr = np.partition(np.abs(v), v.size - k)[v.size - k]
  return np.where(np.abs(v) >= thr, v, 0.0)


def structure(base: np.ndarray, taus: np.ndarray, keep: float = 0.2) -> dict:
  """Norms, energy concentration, cosines and sign conflicts of ``taus`` [T, P] around ``base``."""
  norms = np.linalg.norm(taus, axis=1)
  energy = []
  for v in taus:
    sq = np.sort(v ** 2)[::-1]
    energy.append(float(sq[:int(round(keep * v.size))].sum() / sq.sum()))
  unit = taus / norms[:, None]
  cos = unit @ unit.T
  off = cos[~np.eye(len(taus), dtype=bool)]
  trimmed = np.stack([trim(v, keep) for v in taus])
  nz = trimmed != 0
  multi = nz.sum(0) >= 2
  pos = (trimmed > 0).sum(0)
  neg = (trimmed < 0).sum(0)
  conflict = float(np.mean((pos[multi] > 0) & (neg[multi] > 0)))
  elected = np.sign(trimmed.sum(0))
  opposed = float(np.abs(trimmed)[(np.sign(trimmed) != elected[None]) & nz].sum() / np.abs(trimmed).sum())
  return {"base_norm": float(np.linalg.norm(base)), "tau_norm": norms.tolist(),
          "rel_norm": (norms / np.linalg.norm(base)).tolist(), "top20_energy": energy,
          "cos_base": (taus @ base / norms / np.linalg.norm(base)).tolist(),
          "mean_pairwise_cos": float(off.mean()), "max_pairwise_cos": float(off.max()),
          "kept_by_2plus": float(multi.mean()), "conflict_rate": conflict, "opposed_mass": opposed}


def main():
  args = parse_args()
  t0 = time.process_time()
  pool, tasks, data = load(args)
  ev = merge_bench._Evaluator(pool, data, 500)
  base = models.backbone_of(pool.pretrained)
  experts = [models.backbone_of(pool.experts[t]) for t in tasks]
  heads = {t: models.head_of(pool.experts[t]) for t in tasks}
  out = structure(flat(base), np.stack([flat(e) - flat(base) for e in experts]))
  out["tasks"] = tasks

  zero = ev.backbone(base, heads, "val")
  others = {}
  for i, t in enumerate(tasks):
    rest = [e for j, e in enumerate(experts) if j != i]
    bb = merge.merge("task_arithmetic", rest, base, params={"lambda": 0.3})
    others[t] = ev.backbone(bb, {t: heads[t]}, "val", tasks=[t])[t] - zero[t]
  out["zero_shot_val"] = zero
  out["others_only_0.3"] = others
  key = jax.random.key(0)
  curves = {}
  for label, name, params in (("task_arithmetic", "task_arithmetic", {}),
                              ("ties_paper_k0.2", "ties_paper", {"k": 0.2, "disjoint": "sum"})):
    fn = merge_bench.lambda_factored(
        lambda p, name=name: merge.merge(name, experts, base, params=p, key=key), base)
    curves[label] = {lam: float(np.mean(list(ev.backbone(fn({**params, "lambda": lam}), heads,
                                                          "val").values())))
                     for lam in LAMBDAS}
  out["val_avg_by_lambda"] = curves
  out["cpu_s"] = time.process_time() - t0
  print(f"pool {args.path}: {len(tasks)} tasks")
  print("| task | ‖τ‖/‖θ₀‖ | top-20 % energy | cos(τ, θ₀) | others-only λ=0.3 (val, pts) |")
  print("|---|---:|---:|---:|---:|")
  for i, t in enumerate(tasks):
    print(f"| {t} | {out['rel_norm'][i]:.4f} | {out['top20_energy'][i]:.3f} |"
          f" {out['cos_base'][i]:+.3f} | {100 * others[t]:+.1f} |")
  print(f"‖θ₀‖ = {out['base_norm']:.1f}; pairwise cos mean {out['mean_pairwise_cos']:.4f}"
        f" (max {out['max_pairwise_cos']:.4f}); top-20 % trimmed: {100 * out['kept_by_2plus']:.1f} %"
        f" of entries kept by >= 2 tasks, {100 * out['conflict_rate']:.1f} % of those with mixed"
        f" signs, {100 * out['opposed_mass']:.1f} % of the kept mass opposes the elected sign")
  print("| λ | " + " | ".join(str(l) for l in LAMBDAS) + " |")
  print("|---|" + "---:|" * len(LAMBDAS))
  for label, c in curves.items():
    print(f"| {label} | " + " | ".join(f"{100 * c[l]:.1f}" for l in LAMBDAS) + " |")
  print(f"cpu {out['cpu_s']:.0f} s")
  write_json(args.json, out)


if __name__ == "__main__":
  main()
