"""Data-informed merges as merging-benchmark rows: Fisher, RegMean, RegMean++, ESM, Expert
Merging, AdaMerging, AdaRank (TA / CART / Iso-CTS); Twin-Merging scored per input.

Importing this module registers the mergers with `kfuse.bench.merge_bench.register_merger`
(``config.methods.<label> = dict(name=<one of them>, params={...}, grid={})``). Every one
uses only the benchmark's data budget (`merge_bench.TaskData`), and all of them the same
part of it: each task's **unlabeled test inputs** (``data.unlabeled_per_task``, default
200), never a label. Each call appends what it used (inputs per task, steps, batches) to
``MergeInputs.log``, which the benchmark writes to the row's ``merger_log`` in results.json.

* ``fisher``: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS
  2022. Expert i's diagonal Fisher on its task's unlabeled inputs, with the model's own
  predictive distribution in place of labels (the label-free score Σ_c √p_c log p_c, as
  FusionBench's ``fisher_merging``; `kfuse.merge.statistics.fisher`), then
  `kfuse.merge.informed` ``fisher`` (normalised coefficients, ε = 1e-6).
* ``regmean``: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
  Models", ICLR 2023. Grams G_i = XᵀX / n of every linear layer's inputs, task i's unlabeled
  inputs through expert i (`statistics.grams`), W* = (Σ G̃_i)⁻¹ Σ G̃_i W_i with the
  off-diagonal scale α = 0.95 (FusionBench ``reduce_non_diagonal_ratio``).
* ``regmean_plusplus``: Nguyen et al., "RegMean++", 2025. The same formula, stage by stage
  in forward order (a stage = a top-level backbone entry holding linear layers: the patch
  embedding, each transformer block); expert i's Grams of stage l are taken with the
  *merged* stages < l in front of it. Entries without linear layers (cls, position
  embedding, final norm) are averaged, as RegMean does.
* ``esm``: Li et al., "Model Merging in the Essential Subspace", CVPR 2026. Grams of the
  first ``samples`` = 32 unlabeled inputs of task i through expert i (the paper's proxy
  budget), then `kfuse.merge.essential` (PCA of the activation shift, polarised scaling,
  p = 2, q = 0.15). λ is the row's grid, chosen on the labelled validation split as every
  grid row (the reference picks it on validation in [0, 2]).
* ``expert_merging``: Zhang et al., "Expert Merging", arXiv 2509.25712. θ₀ + Σ_i σ(w_{i,p}) τ_{i,p}
  (one coefficient per expert and tensor, α₀ = 0.1), w trained to align the merged model's
  logits (soft-target CE, T = 1) and backbone features (MSE, β = 0.1) with expert i's on the
  first ``samples`` = 32 unlabeled inputs of task i (full batch, every task per step), L1 pull
  to α₀ (ρ = 0.1), AdamW; kfuse's choices for this small pool: lr 1e-2, 200 steps (the
  reference's LLM runs use 1e-6..1e-4 over ~100 samples per task, 3 epochs).
* ``adamerging_task`` / ``adamerging_layer``: Yang et al., "AdaMerging", ICLR 2024.
  θ(λ) = θ₀ + Σ_i λ_i τ_i (per expert, or per expert and tensor), λ₀ = 0.3, Adam 1e-3,
  one batch of 16 unlabeled test inputs per task per step, each scored by its own head
  (`kfuse.merge.adamerging`). Steps: 1000 in FusionBench; the parameter ``steps``. The λ
  trajectory (every ``log_every`` steps, from step 0) is logged.

* ``adarank_ta`` / ``adarank_cart``: Lee et al., "AdaRank", ICLR 2026. Straight-through
  binary masks over each task matrix's SVD components and λ per expert and tensor, by the
  same entropy loop as AdaMerging (`kfuse.merge.adarank`; reference defaults: TA λ₀ 0.3 with
  every component kept, CART λ₀ 2.3 with the top 16 % kept, T = 10, Adam 1e-3). Logged: the
  kept fraction of components (every ``log_every`` steps) and per expert at the end.
* ``adarank_iso_cts``: the same loop with the masks over the rank-1 components of the
  **Iso-CTS** merged matrix (Marczak et al., ICML 2025; f = 0.8) and one λ per tensor, λ₀ = 1,
  every component kept at first (= the ``iso_cts`` merge at λ = 1 before the first step).
  kfuse's construction: the AdaRank reference code has the TA and CART bases only. Logged as
  the other AdaRank rows.
* Twin-Merging (Lu et al., NeurIPS 2024) is not a merger row: its model differs per input.
  `twin_row` / `run_twin` score it on a pool: the router is trained on the **labelled val
  budget** (``data.val_per_task``; the label is the task id), no test label is used.

Hyper-parameters are the papers' / FusionBench's; none is chosen on the test split.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from kfuse import models
from kfuse.bench import merge_bench as MB
from kfuse.merge import adamerging as AM
from kfuse.merge import expert_merging as EM
from kfuse.merge import adarank as AR
from kfuse.merge import api
from kfuse.merge import informed
from kfuse.merge import statistics as ST
from kfuse.merge import subspace as SS
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["fisher_merger", "regmean_merger", "regmean_plusplus_merger", "esm_merger",
           "expert_merging_merger", "adamerging_merger", "adarank_merger", "twin_row", "run_twin",
           "forward_order", "DATA"]

DATA = "unlabeled test inputs (data.unlabeled_per_task), no labels"


def _batches(x: np.ndarray, batch_size: int, where: str) -> list[dict]:
  if len(x) == 0:
    raise KfuseError(f"{where}: the data budget holds no unlabeled inputs"
                     f" (data.unlabeled_per_task = 0)")
  return [{"x": x[i:i + batch_size]} for i in range(0, len(x), batch_size)]


def _state(inputs: MB.MergeInputs) -> dict:
  """The model state used with merged backbones (the experts' mean; {} without BatchNorm)."""
  if inputs.pool is None:
    return {}
  return MB._mean_state([models.model_state_of(inputs.pool.experts[t]) for t in inputs.tasks])


def _log(inputs: MB.MergeInputs, params: Mapping, **info) -> None:
  inputs.log.append({"params": MB._plain(dict(params)), "data": DATA,
                     "unlabeled_per_task": {t: int(len(inputs.data[t].unlabeled)) for t in inputs.tasks},
                     "labeled_per_task": 0, **info})


def _grams(inputs: MB.MergeInputs, i: int, backbone: PyTree, batch_size: int,
           state: Mapping, max_examples: int | None = None) -> ST.Statistics:
  """Grams of ``backbone`` (with task i's head) on task i's unlabeled inputs (the first
  ``max_examples`` of them; all when None), backbone paths."""
  t = inputs.tasks[i]
  x = inputs.data[t].unlabeled[:max_examples]
  st = ST.grams(inputs.model(t), models.with_params(backbone, inputs.heads[t], state),
                _batches(x, batch_size, f"{t}"), apply_kwargs={"train": False})
  return st.under("backbone")


# ------------------------------------------------------------------ Fisher


def fisher_merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
  """Fisher merging of the backbones, Fishers from each task's unlabeled inputs (module doc)."""
  state, bs = _state(inputs), int(params["batch_size"])
  stats = []
  for t, e in zip(inputs.tasks, inputs.experts):
    model, head = inputs.model(t), inputs.heads[t]
    apply_fn = lambda p, x, model=model, head=head: model.apply(
        models.with_params(p, head, state), x, train=False)
    stats.append(ST.fisher(apply_fn, e, _batches(inputs.data[t].unlabeled, bs, t),
                           mode=str(params["mode"])))
  _log(inputs, params, fisher_mode=str(params["mode"]), labels="the model's own predictions")
  return api.merge(informed.with_statistics("fisher", stats), inputs.experts,
                   params={"normalize": True, "epsilon": float(params["epsilon"])})


# ------------------------------------------------------------------ RegMean


def regmean_merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
  """RegMean of the backbones, Grams of task i's unlabeled inputs through expert i."""
  state, bs = _state(inputs), int(params["batch_size"])
  stats = [_grams(inputs, i, e, bs, state) for i, e in enumerate(inputs.experts)]
  _log(inputs, params, gram_tokens={t: dict(s.tokens) for t, s in zip(inputs.tasks, stats)})
  return api.merge(informed.with_statistics("regmean", stats), inputs.experts,
                   params={"alpha": float(params["alpha"]), "ridge": float(params["ridge"])})


def forward_order(model: nn.Module, variables: PyTree, x: np.ndarray, prefix: str = "backbone"
                  ) -> list[str]:
  """Top-level entries of ``variables['params'][prefix]`` whose linear layers are called,
  in the order of their first call (Flax method interception; shapes only, no compute)."""
  order: list[str] = []

  def intercept(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and isinstance(ctx.module, ST.LAYERS):
      path = ctx.module.path
      if len(path) > 1 and path[0] == prefix and path[1] not in order:
        order.append(path[1])
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(intercept):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, x)
  return order


def regmean_plusplus_merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
  """RegMean++ of the backbones: stage l's Grams behind the merged stages < l (module doc)."""
  state, bs = _state(inputs), int(params["batch_size"])
  alpha, ridge = float(params["alpha"]), float(params["ridge"])
  t0 = inputs.tasks[0]
  stages = forward_order(inputs.model(t0), models.with_params(inputs.experts[0], inputs.heads[t0],
                                                               state),
                         inputs.data[t0].unlabeled[:1])
  rest = [k for k in inputs.experts[0] if k not in stages]
  merged = dict(api.merge("simple_average", [{k: e[k] for k in rest} for e in inputs.experts])
                ) if rest else {}
  for stage in stages:
    hybrid = [{**e, **merged} for e in inputs.experts]   # merged prefix, expert i's stages >= l
    stats = [_grams(inputs, i, h, bs, state).under(stage) for i, h in enumerate(hybrid)]
    merged[stage] = api.merge(informed.with_statistics("regmean_plusplus", stats),
                              [e[stage] for e in inputs.experts],
                              params={"alpha": alpha, "ridge": ridge})
  _log(inputs, params, stages=stages, averaged=rest)
  return {k: merged[k] for k in inputs.experts[0]}


# ------------------------------------------------------------------ ESM


def esm_merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
  """ESM of the backbones: Grams of the first ``samples`` unlabeled inputs of task i through
  expert i (the paper's 32 per task), then `kfuse.merge.essential` with ``lambda``."""
  state, n = _state(inputs), int(params["samples"])
  if n < 1:
    raise KfuseError(f"esm: samples must be >= 1, got {n}")
  stats = [_grams(inputs, i, e, n, state, max_examples=n) for i, e in enumerate(inputs.experts)]
  esm = {k: params[k] for k in ("lambda", "power", "eig_power")}
  _log(inputs, params, unlabeled_used_per_task={t: int(min(n, len(inputs.data[t].unlabeled)))
                                                for t in inputs.tasks},
       gram_tokens={t: sorted(set(s.tokens.values())) for t, s in zip(inputs.tasks, stats)})
  return api.merge(informed.with_statistics("esm", stats), inputs.experts, inputs.pretrained,
                   params=esm)


# ------------------------------------------------------------------ Expert Merging


def expert_merging_merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
  """Expert Merging: per-tensor coefficients aligning the merged backbone's logits and
  features with each expert's on the first ``samples`` unlabeled inputs of its task."""
  state, n, steps = _state(inputs), int(params["samples"]), int(params["steps"])
  xs = [np.asarray(inputs.data[t].unlabeled[:n]) for t in inputs.tasks]
  for t, x in zip(inputs.tasks, xs):
    if len(x) < n:
      raise KfuseError(f"expert_merging: task {t!r} has {len(x)} unlabeled inputs, fewer than"
                       f" samples = {n} (data.unlabeled_per_task)")
  mods = [inputs.model(t) for t in inputs.tasks]
  is_backbone = lambda mdl, name: mdl.name == "backbone" and name == "__call__"

  def apply_fn(p, x, i):
    t = inputs.tasks[i]
    z, inter = mods[i].apply(models.with_params(p, inputs.heads[t], state), x, train=False,
                             capture_intermediates=is_backbone, mutable=["intermediates"])
    return z, inter["intermediates"]["backbone"]["__call__"][0]

  learner = EM.expert_merging(apply_fn, tasks=len(inputs.tasks), init=float(params["init"]),
                              learning_rate=float(params["learning_rate"]),
                              temperature=float(params["temperature"]),
                              hidden_weight=float(params["hidden_weight"]),
                              reg_weight=float(params["reg_weight"]))
  batch = {"x": np.stack(xs)}
  st = learner.init(inputs.pretrained, inputs.experts, batch)
  losses = []
  for _ in range(steps):
    st, m = learner.step(st, batch)
    losses.append(float(m["loss"]))
  alphas = np.asarray(jax.nn.sigmoid(st.w), np.float64)
  _log(inputs, params, unlabeled_used_per_task={t: n for t in inputs.tasks}, steps=steps,
       loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
       alpha_mean_per_expert=alphas.mean(axis=1).tolist(),
       alpha_range=[float(alphas.min()), float(alphas.max())])
  return EM.merged(st)


# ------------------------------------------------------------------ AdaMerging


def _entropy_merger(what: str, build: Callable, merged_of: Callable, info: Callable,
                    trajectory: str = "trajectory"):
  """A merger that trains an entropy learner (`kfuse.merge.adamerging` protocol: per-task
  batches ``[T, B, ...]`` of unlabeled test inputs, each task scored by its own head).

  ``build(apply_fn, params, tasks) -> Learner``; ``merged_of(state) -> backbone``;
  ``info(state) -> dict`` logged (λ etc.)."""

  def merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
    state, bs = _state(inputs), int(params["batch_size"])
    steps, every = int(params["steps"]), max(1, int(params["log_every"]))
    xs = [np.asarray(inputs.data[t].unlabeled) for t in inputs.tasks]
    for t, x in zip(inputs.tasks, xs):
      if len(x) == 0:
        raise KfuseError(f"{what}: no unlabeled inputs for task {t!r}"
                         f" (data.unlabeled_per_task = 0)")
      if x.shape[1:] != xs[0].shape[1:]:
        raise KfuseError(f"{what}: task {t!r} inputs are {x.shape[1:]},"
                         f" task {inputs.tasks[0]!r}'s {xs[0].shape[1:]} (one batch per task)")
    mods = [inputs.model(t) for t in inputs.tasks]

    def apply_fn(p, x, i):
      t = inputs.tasks[i]
      return mods[i].apply(models.with_params(p, inputs.heads[t], state), x, train=False)

    learner = build(apply_fn, params, len(inputs.tasks))
    rng = np.random.default_rng(int(params["seed"]))
    batch = lambda: np.stack([x[rng.integers(0, len(x), bs)] for x in xs])
    st = learner.init(inputs.pretrained, inputs.experts, {"x": batch()[:, :1]})
    traj, losses = [info(st)], []
    for s in range(steps):
      st, m = learner.step(st, {"x": batch()})
      losses.append(float(m["loss"]))
      if (s + 1) % every == 0 or s + 1 == steps:
        traj.append(info(st))
    _log(inputs, params, steps=steps, batch_per_task=bs, inputs_seen_per_task=steps * bs,
         log_every=every, **{trajectory: traj}, entropy_first=losses[0] if losses else None,
         entropy_last=losses[-1] if losses else None, **info(st, final=True))
    return merged_of(st)

  return merger


def adamerging_merger(granularity: str):
  """AdaMerging (``granularity`` 'task' or 'layer') on the tasks' unlabeled test inputs."""
  build = lambda apply_fn, params, n: AM.adamerging(
      apply_fn, granularity=granularity, init=float(params["init"]),
      optimizer=optax.adam(float(params["learning_rate"])), tasks=n)

  def info(st, final=False):
    if final:
      return {"lambda_shape": list(st.lambdas.shape),
              "lambdas_final": np.asarray(st.lambdas, np.float64).tolist()}
    return _lam(st.lambdas)

  return _entropy_merger(f"{granularity}-wise AdaMerging", build, AM.merged, info,
                         trajectory="lambda_trajectory")


def iso_cts_blocks(logits: Sequence, tasks: int, fraction: float) -> dict:
  """AdaRank on Iso-CTS: kept / total components of each task's block and of the common block,
  summed over the matrices (mask logits ``[1, r]``; columns [task 1 … task T, common],
  `kfuse.merge.subspace.iso_cts_split`; kept = logit > 0)."""
  kept, total = np.zeros(tasks + 1, int), np.zeros(tasks + 1, int)
  for m in logits:
    on = np.asarray(m)[0] > 0
    kc, kt = SS.iso_cts_split(on.size, tasks, fraction)
    bounds = [i * kt for i in range(tasks + 1)] + [tasks * kt + kc]
    for b in range(tasks + 1):
      kept[b] += int(on[bounds[b]:bounds[b + 1]].sum())
      total[b] += bounds[b + 1] - bounds[b]
  return {"kept_per_block": kept.tolist(), "total_per_block": total.tolist(),
          "blocks": "each task's, in order, then the common subspace"}


def adarank_merger(base: str):
  """AdaRank on ``base`` ('ta', 'cart' or 'iso_cts') on the tasks' unlabeled test inputs."""
  seen: dict = {}

  def build(apply_fn, params, n):
    seen.update(tasks=n, fraction=float(params.get("common_space_fraction", 0.8)))
    return AR.adarank(
        apply_fn, base=base, init=params["init"], initial_rank_ratio=params["initial_rank_ratio"],
        temperature=float(params["temperature"]),
        optimizer=optax.adam(float(params["learning_rate"])), tasks=n,
        **({"common_space_fraction": seen["fraction"]} if base == "iso_cts" else {}))

  def info(st, final=False):
    kept = [int(np.sum(np.asarray(m) > 0)) for m in st.logits]
    total = [int(np.size(m)) for m in st.logits]
    if final:
      return {"lambda_shape": list(st.lambdas.shape), "kept_components": kept,
              "total_components": total,
              "kept_per_expert": [int(sum(np.sum(np.asarray(m)[i] > 0) for m in st.logits))
                                  for i in range(st.lambdas.shape[0])],
              **(iso_cts_blocks(st.logits, seen["tasks"], seen["fraction"])
                 if base == "iso_cts" else {})}
    return {"lambda_mean": _lam(st.lambdas), "kept_fraction": sum(kept) / max(1, sum(total))}

  return _entropy_merger(f"AdaRank ({base})", build, AR.merged, info)


# ------------------------------------------------------------------ Twin-Merging


def twin_row(inputs: MB.MergeInputs, test: Mapping[str, tuple], params: Mapping | None = None
             ) -> dict:
  """Twin-Merging on the benchmark (not a `register_merger` row: θ(x) differs per input).

  θ* = task arithmetic (λ 0.29) or TIES of the backbones; exclusive deltas at rank ratio 0.1;
  the router is trained on the shared expert's features of the **labelled val budget**
  (``inputs.data[t].x_val``, label = the task id, not the class); each test input x of task t
  is scored by t's head on θ*(x) + Σ w_i(x) δ̂_i. ``test``: ``{task: (x_test, y_test)}``.
  Returns per-task test accuracy, the router's task-id accuracy on test and what was used."""
  from kfuse.bench import pool as pool_lib
  from kfuse.merge import twin as TW
  p = {"shared": "task_arithmetic", "shared_params": None, "rank_ratio": TW.RANK_RATIO,
       "router_epochs": 50, "router_lr": 5e-4, "router_batch_size": 1024, "batch_size": 100,
       "seed": 0, **dict(params or {})}
  cfg, state = inputs.pool.manifest["config"], _state(inputs)
  shared = TW.shared_expert(inputs.pretrained, inputs.experts, p["shared"], p["shared_params"])
  tw = TW.twin(shared, inputs.experts, float(p["rank_ratio"]))
  xs = [np.asarray(inputs.data[t].x_val) for t in inputs.tasks]
  if any(len(x) == 0 for x in xs):
    raise KfuseError("Twin-Merging: the router needs labelled val inputs of every task"
                     " (data.val_per_task = 0)")
  feats = np.concatenate([pool_lib.features(cfg, shared, x) for x in xs])
  ids = np.concatenate([np.full(len(x), i) for i, x in enumerate(xs)])
  router = TW.train_router(feats, ids, len(inputs.tasks), epochs=int(p["router_epochs"]),
                           learning_rate=float(p["router_lr"]),
                           batch_size=int(p["router_batch_size"]), seed=int(p["seed"]))
  acc, route_acc, bs = {}, {}, int(p["batch_size"])
  for i, t in enumerate(inputs.tasks):
    model, head = inputs.model(t), inputs.heads[t]
    fn = jax.jit(lambda w, x, model=model, head=head: TW.twin_apply(
        lambda th, xb: model.apply(models.with_params(th, head, state), xb, train=False), tw, w, x))
    x, y = test[t]
    w = np.asarray(TW.route(router, pool_lib.features(cfg, shared, np.asarray(x))))
    pred = np.concatenate([np.asarray(fn(w[j:j + bs], x[j:j + bs])).argmax(-1)
                           for j in range(0, len(x), bs)])
    acc[t] = float(np.mean(pred == np.asarray(y)))
    route_acc[t] = float(np.mean(w.argmax(1) == i))
  return {"test": acc, "test_avg": float(np.mean(list(acc.values()))), "router_task_accuracy": route_acc,
          "params": MB._plain(p), "data": "labelled val inputs (data.val_per_task) for the router"
          " (task ids only); no test label", "labeled_per_task": {t: int(len(x)) for t, x in
                                                                  zip(inputs.tasks, xs)}}


def run_twin(pool_path: str, val_per_task: int = 64, params: Mapping | None = None,
             cache: str | None = None) -> dict:
  """`twin_row` on a built pool (the benchmark's data and heads; read-only)."""
  from kfuse.bench import pool as pool_lib
  pool = pool_lib.load_pool(pool_path)
  tasks = pool.tasks
  datasets = MB._datasets(pool, tasks, cache)
  data, _ = MB._budget(datasets, 0, int(val_per_task))
  inputs = MB.MergeInputs(tasks=list(tasks), pretrained=models.backbone_of(pool.pretrained),
                          experts=[models.backbone_of(pool.experts[t]) for t in tasks],
                          heads={t: models.head_of(pool.experts[t]) for t in tasks},
                          model=pool.model, data=data, key=jax.random.key(0), pool=pool)
  return twin_row(inputs, {t: (datasets[t].x_test, datasets[t].y_test) for t in tasks}, params)


def _lam(lambdas) -> list:
  """Per expert: λ (task-wise) or its mean over the tensors (layer-wise)."""
  a = np.asarray(lambdas, np.float64)
  return (a if a.ndim == 1 else a.mean(axis=1)).tolist()


# ------------------------------------------------------------------ registration


def _register(name: str, fn, defaults: Mapping, doc: str) -> None:
  """`merge_bench.register_merger` with the config's params over ``defaults``."""
  MB.register_merger(name, lambda inputs, params: fn(inputs, {**defaults, **dict(params)}),
                     defaults=dict(defaults), doc=doc)


_STATS = {"batch_size": 32}
_ADA = {"init": 0.3, "learning_rate": 1e-3, "batch_size": 16, "steps": 1000, "log_every": 50,
        "seed": 0}
_register("fisher", fisher_merger, {**_STATS, "mode": "per_example", "epsilon": 1e-6},
          "Fisher merging, Fishers from the unlabeled test inputs (own predictions as labels)")
_register("regmean", regmean_merger, {**_STATS, "alpha": 0.95, "ridge": 0.0},
          "RegMean, Grams from the unlabeled test inputs")
_register("regmean_plusplus", regmean_plusplus_merger, {**_STATS, "alpha": 0.95, "ridge": 0.0},
          "RegMean++, Grams behind the merged prefix")
_register("esm", esm_merger, {"samples": 32, "lambda": 1.0, "power": 2.0, "eig_power": 0.15},
          "ESM, Grams of 32 unlabeled test inputs per task; λ chosen on validation (grid)")
_register("expert_merging", expert_merging_merger,
          {"samples": 32, "steps": 200, "init": 0.1, "learning_rate": 1e-2, "temperature": 1.0,
           "hidden_weight": 0.1, "reg_weight": 0.1},
          "Expert Merging, logits + backbone features aligned to each expert on 32 unlabeled inputs")
_ARK = {"init": None, "initial_rank_ratio": None, "temperature": 10.0, "learning_rate": 1e-3,
        "batch_size": 16, "steps": 1000, "log_every": 50, "seed": 0}
_register("adarank_ta", adarank_merger("ta"), _ARK,
          "AdaRank on task arithmetic, entropy on the unlabeled test inputs")
_register("adarank_cart", adarank_merger("cart"), _ARK,
          "AdaRank on CART (the experts' mean as origin), entropy on the unlabeled test inputs")
_register("adarank_iso_cts", adarank_merger("iso_cts"), {**_ARK, "common_space_fraction": 0.8},
          "AdaRank on Iso-CTS (masks over the Iso-CTS merged matrix's components), entropy on the"
          " unlabeled test inputs")
_register("adamerging_task", adamerging_merger("task"), _ADA,
          "task-wise AdaMerging, entropy on the unlabeled test inputs")
_register("adamerging_layer", adamerging_merger("layer"), _ADA,
          "layer-wise AdaMerging, entropy on the unlabeled test inputs")
