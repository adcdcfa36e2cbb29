"""Data-informed merging speed: kfuse (JAX) vs PyTorch references written the FusionBench way.

    python experiments/perf/informed_bench.py                  # single-threaded, one core
    python experiments/perf/informed_bench.py --threads 0      # each library's default threading

1. **AdaMerging step** (layer-wise: merge θ(λ) + forward of T tasks + entropy + backward over
   λ + Adam). PyTorch as FusionBench's ``LayerWiseMergedModel`` does it: a ``[N, P]``
   ``merge_weight`` parameter, the merged state dict ``θ_0 + Σ_i λ_{i,p} τ_i`` built each
   step, ``torch.func.functional_call`` of the body per task, per-task linear heads, summed
   entropy, ``zero_grad / backward / Adam.step``. kfuse: `kfuse.merge.adamerging` (one
   jitted step). Same weights, same batches; before timing the script checks that one step
   from the same λ gives the same loss and the same λ on both sides.
2. **Gram collection** (RegMean statistics): PyTorch forward hooks on every ``nn.Linear``
   keeping FusionBench's running average ``G ← (G·n + XᵀX)/(n + rows)`` under
   ``torch.no_grad``; kfuse: `kfuse.merge.statistics.grams`. Same batches; checks that the
   Grams agree before timing.

Model: an MLP body (``--width``, 3 hidden Dense + tanh-GELU, input ``--d_in``) with one
linear head per task, N = T experts. Rounds alternate (JAX, PyTorch, ...) so that load from
other processes hits both; medians of each side are compared in wall-clock and in
per-process CPU time (``time.process_time``; load-independent on a shared machine).
Writes ``informed_results.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tasks", type=int, default=4)
  ap.add_argument("--batch", type=int, default=16, help="per task (FusionBench: 16)")
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--d_in", type=int, default=256)
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--steps", type=int, default=20, help="AdaMerging steps per timed round")
  ap.add_argument("--gram_batches", type=int, default=16, help="batches per Gram round")
  ap.add_argument("--gram_batch", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--threads", type=int, default=1, choices=(0, 1))
  ap.add_argument("--out", default="")
  return ap.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:     # must precede the jax import
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pinning import pin_one_core  # noqa: E402  (experiments/pinning.py)
  pin_one_core()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from kfuse.merge import adamerging as A  # noqa: E402
from kfuse.merge import statistics as S  # noqa: E402


class Body(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.gelu(nn.Dense(self.width, name=f"fc{i}")(x))
    return x


def torch_body(d_in, width):
  layers = []
  for i in range(3):
    layers += [torch.nn.Linear(d_in if i == 0 else width, width), torch.nn.GELU(approximate="tanh")]
  return torch.nn.Sequential(*layers)


def to_torch(p):
  """Flax body params -> the Sequential's state dict (Linear i at index 2i, weight = kernelᵀ)."""
  return {f"{2 * i}.{n}": torch.tensor(np.asarray(p[f"fc{i}"][k]).T.copy() if k == "kernel"
                                       else np.asarray(p[f"fc{i}"][k]))
          for i in range(3) for n, k in (("weight", "kernel"), ("bias", "bias"))}


def _time(fn, n):
  w, c = time.perf_counter(), time.process_time()
  fn(n)
  return time.perf_counter() - w, time.process_time() - c


def main(a):
  load0 = os.getloadavg()
  if a.threads == 1:
    torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  body = Body(a.width)
  T, N = a.tasks, a.tasks
  base = body.init(jax.random.key(0), jnp.ones((1, a.d_in)))["params"]
  experts = [jax.tree.map(lambda w: w + jnp.asarray(rng.normal(size=w.shape) * 0.01, w.dtype), base)
             for _ in range(N)]
  heads = [(rng.normal(size=(a.width, a.classes)).astype(np.float32) * 0.05,
            np.zeros(a.classes, np.float32)) for _ in range(T)]
  xs = [rng.normal(size=(T, a.batch, a.d_in)).astype(np.float32) for _ in range(8)]

  # ---------------------------------------------------------------- AdaMerging
  jheads = [(jnp.asarray(w), jnp.asarray(b)) for w, b in heads]

  def apply_fn(p, x, t):
    return body.apply({"params": p}, x) @ jheads[t][0] + jheads[t][1]

  hw, hb = jnp.stack([w for w, _ in jheads]), jnp.stack([b for _, b in jheads])

  def apply_traced(p, x, t):   # t traced under vmap: the heads indexed as arrays
    return body.apply({"params": p}, x) @ hw[t] + hb[t]

  learner = A.adamerging(apply_fn, granularity="layer", tasks=T)
  state0 = learner.init(base, experts, {"x": xs[0]})
  learner_v = A.adamerging(apply_traced, granularity="layer", tasks=T, vmap_tasks=True)

  tb = torch_body(a.d_in, a.width)
  names = [n for n, _ in tb.named_parameters()]
  tbase = to_torch(base)
  ttv = {n: torch.stack([to_torch(e)[n] - tbase[n] for e in experts]) for n in names}
  # the JAX λ columns follow kfuse.tree.flatten order: fc0/bias, fc0/kernel, fc1/bias, ...
  jorder = [f"{2 * i}.{k}" for i in range(3) for k in ("bias", "weight")]
  col = {n: jorder.index(n) for n in names}
  theads = [(torch.tensor(w), torch.tensor(b)) for w, b in heads]
  merge_weight = torch.nn.Parameter(torch.full((N, len(names)), 0.3))
  opt = torch.optim.Adam([merge_weight], lr=1e-3)

  def entropy(logits, eps=1e-8):
    p = torch.softmax(logits, dim=-1)
    return -torch.sum(p * torch.log(p + eps), dim=-1).mean()

  def torch_step(x):
    merged = {n: tbase[n] + (merge_weight[:, col[n]].view(-1, *([1] * tbase[n].dim())) * ttv[n]).sum(0)
              for n in names}
    loss = 0
    for t in range(T):
      feats = functional_call(tb, merged, (torch.from_numpy(x[t]),))
      loss = loss + entropy(feats @ theads[t][0] + theads[t][1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  # agreement: one step from λ = 0.3 on the same batch
  s1, m1 = learner.step(state0, {"x": xs[0]}, None)
  s1v, m1v = learner_v.step(state0, {"x": xs[0]}, None)
  l_t = float(torch_step(xs[0]))
  lam_t = merge_weight.detach().numpy()
  agree = {"loss_rel": abs(float(m1["loss"]) - l_t) / abs(l_t),
           "lambda_max_abs": float(np.max(np.abs(np.asarray(s1.lambdas) - lam_t))),
           "vmap_loss_rel": abs(float(m1v["loss"]) - l_t) / abs(l_t),
           "vmap_lambda_max_abs": float(np.max(np.abs(np.asarray(s1v.lambdas) - lam_t)))}
  print("AdaMerging agreement after one step:", agree, flush=True)
  assert agree["loss_rel"] < 1e-4 and agree["lambda_max_abs"] < 1e-6, agree
  assert agree["vmap_loss_rel"] < 1e-4 and agree["vmap_lambda_max_abs"] < 1e-6, agree

  st = {"s": state0, "v": state0}

  def runner(lrn, k):
    def run(n):
      s = st[k]
      for i in range(n):
        s, m = lrn.step(s, {"x": xs[i % len(xs)]}, None)
      jax.block_until_ready(s.lambdas)
      st[k] = s
    return run

  run_jax, run_jax_vmap = runner(learner, "s"), runner(learner_v, "v")

  def run_torch(n):
    for i in range(n):
      torch_step(xs[i % len(xs)])

  run_jax(2), run_jax_vmap(2), run_torch(2)
  ada = {"jax": [], "jax_vmap": [], "torch": []}
  for _ in range(a.rounds):
    ada["jax"].append(_time(run_jax, a.steps))
    ada["torch"].append(_time(run_torch, a.steps))
    ada["jax_vmap"].append(_time(run_jax_vmap, a.steps))
    ada["torch"].append(_time(run_torch, a.steps))

  # ---------------------------------------------------------------- Grams
  gx = [rng.normal(size=(a.gram_batch, a.d_in)).astype(np.float32) for _ in range(a.gram_batches)]
  variables = {"params": experts[0]}
  tb.load_state_dict(to_torch(experts[0]))
  modules = {n: m for n, m in tb.named_modules() if isinstance(m, torch.nn.Linear)}

  def torch_grams(batches):
    g, cnt, handles = {}, {}, []

    def hook_for(name):
      def hook(module, inp, out):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1])
        xtx = x.T @ x
        if name not in g:
          g[name], cnt[name] = xtx / x.shape[0], x.shape[0]
        else:
          g[name] = (g[name] * cnt[name] + xtx) / (cnt[name] + x.shape[0])
          cnt[name] += x.shape[0]
      return hook

    for n, m in modules.items():
      handles.append(m.register_forward_hook(hook_for(n)))
    with torch.no_grad():
      for x in batches:
        tb(torch.from_numpy(x))
    for h in handles:
      h.remove()
    return g

  def jax_grams(batches):
    out = S.grams(body, variables, ({"x": x} for x in batches))
    jax.block_until_ready(list(out.gram.values()))
    return out

  jg, tg = jax_grams(gx), torch_grams(gx)
  gram_rel = max(float(np.max(np.abs(np.asarray(jg.gram[f"fc{i}/kernel"]) - tg[str(2 * i)].numpy()))
                       / np.max(np.abs(tg[str(2 * i)].numpy()))) for i in range(3))
  print("Gram agreement (max rel):", gram_rel, flush=True)
  assert gram_rel < 1e-4
  gram = {"jax": [], "torch": []}
  for _ in range(a.rounds):
    gram["jax"].append(_time(lambda n: jax_grams(gx), 1))
    gram["torch"].append(_time(lambda n: torch_grams(gx), 1))

  def summary(d, per):
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in d.items()}
    out = {"jax_wall_ms": 1e3 * med["jax"][0] / per, "torch_wall_ms": 1e3 * med["torch"][0] / per,
           "jax_cpu_ms": 1e3 * med["jax"][1] / per, "torch_cpu_ms": 1e3 * med["torch"][1] / per,
           "ratio_wall": med["torch"][0] / med["jax"][0], "ratio_cpu": med["torch"][1] / med["jax"][1]}
    if "jax_vmap" in med:
      out.update({"jax_vmap_wall_ms": 1e3 * med["jax_vmap"][0] / per,
                  "jax_vmap_cpu_ms": 1e3 * med["jax_vmap"][1] / per,
                  "ratio_vmap_wall": med["torch"][0] / med["jax_vmap"][0],
                  "ratio_vmap_cpu": med["torch"][1] / med["jax_vmap"][1]})
    return out

  res = {"config": vars(a), "adamerging_step": summary(ada, a.steps), "agreement": agree,
         "gram_collection": summary(gram, 1), "gram_rel": gram_rel,
         "gram_examples_per_round": a.gram_batches * a.gram_batch,
         "versions": {"jax": jax.__version__, "torch": torch.__version__,
                      "python": platform.python_version()},
         "loadavg_1min_start_end": [load0[0], os.getloadavg()[0]], "cpus": os.cpu_count(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  print(json.dumps(res, indent=1))
  out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              f"informed_results_threads{a.threads}.json")
  with open(out, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main(ARGS)
