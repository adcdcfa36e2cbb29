"""Data-informed merges as merging-benchmark rows: Fisher, RegMean, RegMean++, ESM, Expert
Merging, AdaMerging.

Importing this module registers seven mergers with `kfuse.bench.merge_bench.register_merger`
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

Hyper-parameters are the papers' / FusionBench's; none is chosen on the test split.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from kfuse import models
from kfuse.bench import merge_bench as MB
from kfuse.merge import adamerging as AM
from kfuse.merge import expert_merging as EM
from kfuse.merge import api
from kfuse.merge import informed
from kfuse.merge import statistics as ST
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["fisher_merger", "regmean_merger", "regmean_plusplus_merger", "esm_merger",
           "expert_merging_merger", "adamerging_merger",
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


def adamerging_merger(granularity: str):
  """AdaMerging (``granularity`` 'task' or 'layer') on the tasks' unlabeled test inputs."""

  def merger(inputs: MB.MergeInputs, params: Mapping) -> PyTree:
    state, bs = _state(inputs), int(params["batch_size"])
    steps, every = int(params["steps"]), max(1, int(params["log_every"]))
    xs = [np.asarray(inputs.data[t].unlabeled) for t in inputs.tasks]
    for t, x in zip(inputs.tasks, xs):
      if len(x) == 0:
        raise KfuseError(f"{granularity}-wise AdaMerging: no unlabeled inputs for task {t!r}"
                         f" (data.unlabeled_per_task = 0)")
      if x.shape[1:] != xs[0].shape[1:]:
        raise KfuseError(f"{granularity}-wise AdaMerging: task {t!r} inputs are {x.shape[1:]},"
                         f" task {inputs.tasks[0]!r}'s {xs[0].shape[1:]} (one batch per task)")
    mods = [inputs.model(t) for t in inputs.tasks]

    def apply_fn(p, x, i):
      t = inputs.tasks[i]
      return mods[i].apply(models.with_params(p, inputs.heads[t], state), x, train=False)

    learner = AM.adamerging(apply_fn, granularity=granularity, init=float(params["init"]),
                            optimizer=optax.adam(float(params["learning_rate"])),
                            tasks=len(inputs.tasks))
    rng = np.random.default_rng(int(params["seed"]))
    batch = lambda: np.stack([x[rng.integers(0, len(x), bs)] for x in xs])
    st = learner.init(inputs.pretrained, inputs.experts, {"x": batch()[:, :1]})
    traj, losses = [_lam(st.lambdas)], []
    for s in range(steps):
      st, m = learner.step(st, {"x": batch()})
      losses.append(float(m["loss"]))
      if (s + 1) % every == 0 or s + 1 == steps:
        traj.append(_lam(st.lambdas))
    _log(inputs, params, steps=steps, batch_per_task=bs, inputs_seen_per_task=steps * bs,
         lambda_shape=list(st.lambdas.shape), log_every=every,
         lambda_trajectory=traj, entropy_first=losses[0] if losses else None,
         entropy_last=losses[-1] if losses else None,
         lambdas_final=np.asarray(st.lambdas, np.float64).tolist())
    return AM.merged(st)

  return merger


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
_register("adamerging_task", adamerging_merger("task"), _ADA,
          "task-wise AdaMerging, entropy on the unlabeled test inputs")
_register("adamerging_layer", adamerging_merger("layer"), _ADA,
          "layer-wise AdaMerging, entropy on the unlabeled test inputs")
