"""Why AdaMerging sits below task arithmetic on a pool: accuracy along a logged task-wise λ
trajectory, entropy as a proxy for correctness at λ = 0.3 and for the experts, and one task's
λ scanned with the others at 0.3. Test labels are used for the diagnosis only.

    PYTHONPATH=$PWD KFUSE_CACHE=/tmp/kfuse_pool_cache python experiments/merge_bench/adamerging_diagnosis.py \
        --pool /tmp/pd_d8 --results WORKDIR/results.json --out diag.json

``--results``: a merge_bench results.json holding an ``adamerging_task`` row (its merger_log).
"""
import argparse, json, numpy as np, jax
ap = argparse.ArgumentParser()
ap.add_argument("--pool", required=True)
ap.add_argument("--results", required=True)
ap.add_argument("--out", default="adamerging_diagnosis.json")
ap.add_argument("--cache", default=None)
A = ap.parse_args()
from kfuse.bench import merge_bench as MB, pool as P
from kfuse import models, train
pool = P.load_pool(A.pool); tasks = pool.tasks
ds = MB._datasets(pool, tasks, A.cache)
pre = models.backbone_of(pool.pretrained)
ex = [models.backbone_of(pool.experts[t]) for t in tasks]
heads = {t: models.head_of(pool.experts[t]) for t in tasks}
log = {r['name']: r['merger_log'][0] for r in json.load(open(A.results))['rows'] if 'merger_log' in r}
taus = [jax.tree.map(lambda e, b: np.asarray(e, np.float32) - np.asarray(b, np.float32), e, pre) for e in ex]
pred = {t: jax.jit(lambda v, x, mod=pool.model(t): mod.apply(v, x, train=False)) for t in tasks}
def logits(bb, t, split="test"):
  x = getattr(ds[t], f"x_{split}")
  return np.concatenate([np.asarray(pred[t](models.with_params(bb, heads[t], {}), x[i:i+500])) for i in range(0, len(x), 500)])
def merged(lam):
  return jax.tree.map(lambda b, *tv: np.asarray(b, np.float32) + sum(l * v for l, v in zip(lam, tv)), pre, *taus)
def ent(z):
  z = z - z.max(-1, keepdims=True); p = np.exp(z); p /= p.sum(-1, keepdims=True)
  return -(p * np.log(p + 1e-8)).sum(-1)
def auroc(score, pos):
  # P(score of a correct example > score of a wrong one)
  a, b = score[pos], score[~pos]
  if len(a) == 0 or len(b) == 0: return None
  r = np.argsort(np.argsort(np.concatenate([a, b]))) + 1
  return float((r[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))
out = {"trajectory_task": []}
traj = log['adamerging_task']['lambda_trajectory']
for k, lam in enumerate(traj):
  bb = merged(lam); row = {"step": k * 50, "lambda": lam, "acc": {}, "entropy": {}}
  for t in tasks:
    z = logits(bb, t, "test"); row["acc"][t] = float(np.mean(z.argmax(-1) == ds[t].y_test)); row["entropy"][t] = float(ent(z).mean())
  row["avg"] = float(np.mean(list(row["acc"].values()))); row["entropy_sum"] = float(sum(row["entropy"].values()))
  out["trajectory_task"].append(row); print(k, row["avg"], row["entropy_sum"], flush=True)
# entropy vs correctness at λ = 0.3 and for the experts
for name, bbf in (("ta_0.3", lambda i: merged([0.3] * len(tasks))), ("expert", lambda i: ex[i])):
  d = {}
  for i, t in enumerate(tasks):
    z = logits(bbf(i), t, "test"); h = ent(z); ok = z.argmax(-1) == ds[t].y_test
    d[t] = {"acc": float(ok.mean()), "H_correct": float(h[ok].mean()) if ok.any() else None,
            "H_wrong": float(h[~ok].mean()) if (~ok).any() else None, "auroc_neg_entropy": auroc(-h, ok),
            "num_classes": int(z.shape[-1]), "max_entropy": float(np.log(z.shape[-1]))}
  out[name] = d; print(name, json.dumps(d), flush=True)
# one task's λ alone: accuracy and entropy of task t as λ_t varies (others at 0.3)
scan = {}
for i, t in enumerate(tasks):
  scan[t] = []
  for v in (0.0, 0.15, 0.3, 0.45, 0.6, 0.9):
    lam = [0.3] * len(tasks); lam[i] = v
    bb = merged(lam); z = logits(bb, t, "test")
    others = [float(np.mean(logits(bb, u, "test").argmax(-1) == ds[u].y_test)) for u in tasks if u != t]
    scan[t].append({"lambda_t": v, "acc_t": float(np.mean(z.argmax(-1) == ds[t].y_test)), "H_t": float(ent(z).mean()), "acc_others": float(np.mean(others))})
  print(t, scan[t], flush=True)
out["scan"] = scan
json.dump(out, open(A.out, 'w'), indent=1)
