"""Multi-task model merging on a pinned model pool (FusionBench's protocol at toy scale).

FusionBench (Tang et al. 2024) compares merging methods on *model pools*: one
pretrained checkpoint and one fine-tuned expert per task, the same files for
every method. `run(config)`:

1. loads the pool at ``config.pool.path`` with `kfuse.bench.pool.load_pool`
   (``expect=`` the pool config, so the backbone, the task list, the data
   seed / sizes and every checkpoint's SHA-256 are checked; any mismatch is
   one `KfuseError` line). A pool that is absent or half-built is first built
   (or resumed) with `build_pool` from the same config;
2. loads each task's splits (`kfuse.data.image_tasks.load_task`, the pool's
   data seed and sizes) and cuts the **data budget** that data-informed
   methods may use: per task the first ``data.unlabeled_per_task`` test
   inputs *without labels* (test-time data, as AdaMerging uses) and the first
   ``data.val_per_task`` labelled validation examples;
3. rows (test accuracy per task, average, normalised = merged / expert per
   task):
   * ``Pretrained``: the pretrained backbone with each task's zero-shot head
     (the pool's probe head), FusionBench's "zero-shot" row;
   * ``Individual``: each expert on its own task;
   * one row per ``config.methods.<label> = {name, params, grid}``: only the
     backbones are merged; each task keeps its expert's head (the frozen
     zero-shot head when the pool fine-tuned the backbone only). The grid's
     Cartesian points are scored by average *validation* accuracy over the
     tasks (`select_on_validation`); test accuracy is reported for the chosen
     point, and the whole validation trace is kept;
   * with ``sequential.order`` set: ``seq:<label>`` rows, the same method
     applied one expert at a time in that order (`sequential_merge`);
4. task negation (``negation.enabled``; Ilharco et al., "Editing Models with
   Task Arithmetic", ICLR 2023): per target task t, θ = θ₀ − λ·τ_t; λ is the
   grid value with the lowest target *validation* accuracy among those that
   keep the control tasks' (all other tasks) validation accuracy ≥
   ``negation.control_threshold`` × the pretrained model's; target and control
   test accuracy are reported with the pretrained model's, beside the paper's
   ViT-B/32 row;
5. writes ``results.json`` (atomic), ``results.md``, ``merge_bench.png`` (the
   axis zoomed on the rows' range, ours beside the FusionBench column) and the
   merged backbones (``checkpoints/merged``) under the workdir, and prints the
   table and the literature's ordering claims as measured booleans.

Adding a method is one config entry. ``name`` is looked up first in `MERGERS`
(the data-informed hook, below), then in the `kfuse.merge` registry (data-free:
``merge(name, experts, pretrained, params=...)``).

The data-informed hook: `register_merger(name, fn)` with
``fn(inputs: MergeInputs, params: dict) -> merged backbone params``.
`MergeInputs` holds the pool, the pretrained and expert backbones, the heads,
each task's Flax module and the budgeted data (`TaskData`), and a PRNG key.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from kfuse import models, optim, train
from kfuse.bench.common import (
    to_dict as _to_dict, get as _get, plain as _plain, check_workdir as _check_workdir,
    write_json as _write_json_atomic, write_text as _write_text_atomic, method_entries)
from kfuse.registry import Registry
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["run", "markdown_table", "plot", "grid_points", "method_specs", "MergeInputs",
           "TaskData", "MERGERS", "register_merger", "select_on_validation", "sequential_merge",
           "negation_choice", "ordering", "lambda_factored", "LAMBDA_LINEAR", "LITERATURE",
           "NEGATION_LITERATURE"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "merge_bench.png"

# FusionBench (Tang et al. 2024), CLIP ViT-B/32, 8 tasks, average test accuracy (%), by kfuse
# method name (ties_paper is the paper's TIES). Reported beside our rows; never compared as numbers.
LITERATURE = {
    "Pretrained": 48.2, "Individual": 90.3, "simple_average": 66.5, "task_arithmetic": 68.0,
    "ties": 72.2, "ties_paper": 72.2, "fisher": 70.6, "regmean": 82.4,
    "adamerging_layerwise": 82.6, "adamerging_layer": 82.6, "tsv_m": 83.1, "wudi": 84.5,
    "regmean_plusplus": 84.4,
}
LITERATURE_INDIVIDUAL = 90.3
# Ilharco et al. 2023, Table 1, ViT-B/32: negative task vectors, average over 8 target tasks (%),
# control = ImageNet.
NEGATION_LITERATURE = {"target": 24.0, "control": 60.9}


# ------------------------------------------------------------------ the data-informed hook


@dataclasses.dataclass
class TaskData:
  """One task's data budget for data-informed merging.

  Attributes:
    unlabeled: test-time inputs without labels (the first ``data.unlabeled_per_task``
      test inputs), e.g. AdaMerging's entropy batches.
    x_val, y_val: the first ``data.val_per_task`` labelled validation examples
      (statistics: Grams, Fishers).
  """
  unlabeled: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray


@dataclasses.dataclass
class MergeInputs:
  """What a merger may use: the pool's models and each task's data budget.

  Attributes:
    tasks: task names, in the order of ``experts``.
    pretrained: the pretrained backbone params (θ₀).
    experts: the experts' backbone params, one per task.
    heads: ``{task: head params}`` used with a merged backbone.
    model: ``model(task)`` -> the Flax module (backbone + that task's head);
      ``models.with_params(backbone, heads[task])`` are its variables.
    data: ``{task: TaskData}``.
    key: a PRNG key for the method.
    pool: the loaded `kfuse.bench.pool.Pool` (manifest, checkpoints).
    log: a merger appends what it used (data amounts, steps) per call; the row's ``merger_log``.
  """
  tasks: list
  pretrained: PyTree
  experts: list
  heads: dict
  model: Callable[[str], Any]
  data: dict
  key: jax.Array
  pool: Any = None
  log: list = dataclasses.field(default_factory=list)


MERGERS = Registry("benchmark merger")


def register_merger(name: str, fn: Callable[[MergeInputs, Mapping], PyTree],
                    defaults: Mapping | None = None, doc: str | None = None) -> None:
  """Register a (data-informed) merger: ``fn(inputs, params) -> merged backbone params``.

  ``defaults`` declares its parameters (a config entry may set only these).
  A method of this name in `MERGERS` wins over `kfuse.merge`'s registry.
  """
  MERGERS.register(name, fn, defaults=defaults, doc=doc)


def _data_free(name: str) -> Callable[[MergeInputs, Mapping], PyTree]:
  from kfuse import merge

  def fn(inputs: MergeInputs, params: Mapping) -> PyTree:
    return merge.merge(name, inputs.experts, inputs.pretrained, params=dict(params), key=inputs.key)
  return fn


# kfuse.merge methods whose recipe ends with ``scale("lambda"), add_base()``: the merge is
# θ(λ, p) = θ₀ + λ·Δ(p), with Δ independent of λ (DARE / DELLA masks come from the key, not λ).
# Their λ grid needs one merge per setting of the other parameters (`lambda_factored`);
# tests/test_merge_bench.py checks each against `kfuse.merge.merge` at every λ.
LAMBDA_LINEAR = frozenset({"task_arithmetic", "ties", "ties_paper", "dare_linear", "dare_ties",
                           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                           "tsv_m", "iso_c", "iso_cts", "wudi", "wudi_closed_form", "magmax",
                           "pcb"})


def lambda_factored(merge_fn: Callable[[Mapping], PyTree], base: PyTree
                    ) -> Callable[[Mapping], PyTree]:
  """``merge_fn`` for a method linear in λ, merging once per setting of the other parameters.

  θ(λ, p) = θ₀ + λ·Δ(p) with Δ(p) = θ(1, p) − θ₀ computed in float64 from one
  merge at λ = 1; every λ of the grid is then θ₀ + λ·Δ(p) (rounded to the
  leaf's dtype), equal to the method's own result up to float rounding.
  """
  deltas: dict[str, PyTree] = {}

  def fn(params: Mapping) -> PyTree:
    if "lambda" not in params:
      return merge_fn(params)
    rest = {k: v for k, v in params.items() if k != "lambda"}
    key = repr(sorted(_plain(rest).items()))
    if key not in deltas:
      one = merge_fn({**rest, "lambda": 1.0})
      deltas[key] = jax.tree.map(lambda m, b: np.asarray(m, np.float64) - np.asarray(b, np.float64),
                                 one, base)
    lam = float(params["lambda"])
    return jax.tree.map(lambda b, d: (np.asarray(b, np.float64) + lam * d).astype(np.asarray(b).dtype),
                        base, deltas[key])
  return fn


def _merger(name: str) -> tuple[Callable, set]:
  """``(fn, known parameter names)`` of method ``name``; unknown names are one line."""
  if name in MERGERS:
    return MERGERS.get(name).fn, set(MERGERS.get(name).defaults)
  from kfuse import merge
  m = merge.get_method(name)
  return _data_free(name), set(m.param_map)


# ------------------------------------------------------------------ config helpers


def grid_points(params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[dict]:
  """Every ``{**params, **combination}`` of the Cartesian ``grid`` (in order)."""
  params, grid = _plain(params), _plain(grid)
  names = list(grid)
  for n in names:
    if not isinstance(grid[n], list) or not grid[n]:
      raise KfuseError(f"grid.{n}: expected a non-empty list of candidate values, got {grid[n]!r}")
  return [{**params, **dict(zip(names, combo))}
          for combo in itertools.product(*(grid[n] for n in names))]


def method_specs(methods_cfg: Any) -> list[dict]:
  """Validate ``config.methods`` and return ``[{label, method, points, grid}]``.

  Each entry ``config.methods.<label>`` holds ``name`` (a `MERGERS` or
  `kfuse.merge` method; default: the label), ``params`` and an optional
  ``grid``. Unknown methods / parameter names fail here, before any work.
  """
  specs = []
  for label, entry in method_entries(methods_cfg, ("name", "params", "grid")):
    name = entry.get("name") or label
    try:
      _, known = _merger(name)
    except KfuseError as e:
      raise KfuseError(f"methods.{label}.name: {e}") from None
    params, grid = _to_dict(entry.get("params")), _to_dict(entry.get("grid"))
    for p in list(params) + list(grid):
      if p not in known:
        raise KfuseError(f"methods.{label}.params: unknown parameter {p!r} for method {name!r}"
                         f" (known: {', '.join(sorted(known)) or 'none'})")
    try:
      points = grid_points(params, grid)
    except KfuseError as e:
      raise KfuseError(f"methods.{label}.{e}") from None
    specs.append({"label": label, "method": name, "points": points, "grid": sorted(grid)})
  return specs


SCHEMA = {
    "seed": int, "workdir": str, "overwrite": bool, "progress": bool, "eval_batch_size": int,
    "tasks": list, "methods": dict,
    "pool": {"path": str, "preset": str},
    "data": {"cache_dir": (str, type(None)), "unlabeled_per_task": int, "val_per_task": int},
    "negation": {"enabled": bool, "targets": list, "grid": dict, "control_threshold": float},
    "sequential": {"order": list, "methods": list},
}
_POOL_FIELDS = ("seed", "tasks", "data", "model", "pretrain", "probe", "finetune")


def pool_config(config: Any) -> dict:
  """The pool config of ``config.pool``: preset ``pool.preset`` under its other fields, resolved."""
  from kfuse.bench import pool as pool_lib

  cfg = _to_dict(_get(config, "pool"))
  preset = cfg.pop("preset", "") or "default"
  cfg.pop("path", None)
  if preset not in pool_lib.PRESETS:
    from kfuse.registry import suggest
    raise KfuseError(f"config.pool.preset: unknown preset {preset!r}{suggest(preset, pool_lib.PRESETS)};"
                     f" known: {', '.join(pool_lib.PRESETS)}")
  over = pool_lib._merge(pool_lib.PRESETS[preset], cfg)
  try:
    return pool_lib.resolve_config(over)
  except KfuseError as e:
    raise KfuseError(f"{e}".replace("config.", "config.pool.", 1)) from None


def check_config(config: Any) -> None:
  """Types of the known fields, the methods, the pool config; `KfuseError` names the field."""
  optim.check_types(config, SCHEMA, "config")
  for f in ("unlabeled_per_task", "val_per_task"):
    if int(_get(_get(config, "data"), f, 0)) < 0:
      raise KfuseError(f"config.data.{f}: must be >= 0")
  neg = _to_dict(_get(config, "negation"))
  if neg.get("enabled"):
    thr = float(neg.get("control_threshold", 0.95))
    if not 0.0 <= thr <= 1.0:
      raise KfuseError(f"config.negation.control_threshold: must be in [0, 1], got {thr}")
    try:
      grid_points({}, _to_dict(neg.get("grid")) or {"lambda": []})
    except KfuseError as e:
      raise KfuseError(f"config.negation.{e}") from None


# ------------------------------------------------------------------ evaluation


class _Evaluator:
  """Accuracy of a backbone under each task's head on the tasks' splits.

  One jitted backbone forward pass (the variables are arguments, so a single
  compilation serves every merged model, grid point and task) computes the
  features of every requested task's split in fixed-size chunks of the
  concatenated inputs; each task's linear head is then applied on the host:
  logits = f · W + b, exactly the `Classifier`'s ``head(backbone(x))``.
  """

  def __init__(self, pool, datasets: Mapping, batch_size: int):
    self.pool, self.datasets, self.batch_size = pool, datasets, int(batch_size)
    model = pool.model(pool.tasks[0])   # the backbone does not depend on the head size
    self._features = jax.jit(
        lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x, train=False)))

  def features(self, backbone: PyTree, state: Mapping | None, split: str,
               tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """``{task: [N, D] features}`` of ``backbone`` on each task's ``split``, in one batched pass."""
    xs = [getattr(self.datasets[t], f"x_{split}") for t in tasks]
    x = np.concatenate(xs)
    b = self.batch_size
    pad = (-len(x)) % b
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    variables = {"params": {"backbone": backbone}, **dict(state or {})}
    f = np.concatenate([np.asarray(self._features(variables, x[i:i + b]))
                        for i in range(0, len(x), b)])
    out, start = {}, 0
    for t, xt in zip(tasks, xs):
      out[t] = f[start:start + len(xt)]
      start += len(xt)
    return out

  def backbone(self, backbone: PyTree, heads: Mapping, split: str, state: Mapping | None = None,
               tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``{task: accuracy}`` of ``backbone`` + each task's head on ``split``."""
    tasks = list(tasks if tasks is not None else heads)
    feats = self.features(backbone, state, split, tasks)
    out = {}
    for t in tasks:
      h = heads[t]
      logits = feats[t] @ np.asarray(h["kernel"]) + np.asarray(h["bias"])
      out[t] = float(np.mean(logits.argmax(-1) == getattr(self.datasets[t], f"y_{split}")))
    return out

  def accuracy(self, task: str, variables: PyTree, split: str) -> float:
    """Accuracy of full variables (backbone + ``task``'s head) on ``task``'s ``split``."""
    return self.backbone(models.backbone_of(variables), {task: models.head_of(variables)}, split,
                         models.model_state_of(variables), [task])[task]


def _mean_state(states: Sequence[Mapping]) -> dict:
  """Element-wise mean of the experts' model state (BatchNorm statistics); {} if stateless."""
  if not states or not states[0]:
    return {}
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *states)


def _row(name: str, method: str | None, params: Mapping | None, val: Mapping, test: Mapping,
         reference: Mapping | None, **extra) -> dict:
  row = {"name": name, "method": method, "params": _plain(params or {}),
         "val": dict(val), "test": dict(test),
         "val_avg": float(np.mean(list(val.values()))),
         "test_avg": float(np.mean(list(test.values())))}
  if reference is not None:
    norm = {t: (test[t] / reference[t] if reference[t] > 0 else float("nan")) for t in test}
    row["normalized"] = norm
    row["normalized_avg"] = float(np.mean(list(norm.values())))
  lit = LITERATURE.get(method or name)
  if lit is not None:
    row["literature"] = {"avg": lit, "normalized": lit / LITERATURE_INDIVIDUAL}
  row.update(extra)
  return row


def select_on_validation(points: Sequence[Mapping], merge_fn: Callable[[Mapping], PyTree],
                         score: Callable[[PyTree], Mapping[str, float]]
                         ) -> tuple[dict, PyTree, list[dict]]:
  """Grid search: the point whose merge has the highest average validation accuracy.

  Returns ``(best, merged, trace)``: ``best = {params, val, val_avg}`` (the
  first point wins a tie), its merged backbone, and ``trace = [{params,
  val_avg}]`` over every point in order.
  """
  best, best_tree, trace = None, None, []
  for params in points:
    merged = merge_fn(params)
    val = score(merged)
    avg = float(np.mean(list(val.values())))
    trace.append({"params": _plain(params), "val_avg": avg})
    if best is None or avg > best["val_avg"]:
      best, best_tree = {"params": dict(params), "val": val, "val_avg": avg}, merged
  return best, best_tree, trace


def sequential_merge(merge_fn: Callable[[Sequence[PyTree]], PyTree], experts: Sequence[PyTree]
                     ) -> PyTree:
  """Continual merging: θ¹ = θ_{o₁}, θᵗ = M(θᵗ⁻¹, θ_{oₜ}) for the experts in the given order.

  ``merge_fn(two_models)`` is one method with fixed parameters (the base model
  is bound inside it). With one expert the result is that expert.
  """
  merged = experts[0]
  for e in experts[1:]:
    merged = merge_fn([merged, e])
  return merged


def negation_choice(trace: Sequence[Mapping], pretrained_control: float, threshold: float
                    ) -> tuple[int, bool]:
  """Index of the chosen λ in ``trace`` (``[{target_val, control_val}]``) and whether it is feasible.

  Feasible: ``control_val >= threshold * pretrained_control``; among those the
  lowest ``target_val`` wins (first on a tie). With none feasible, the point with
  the highest ``control_val`` is returned with ``False``.
  """
  ok = [i for i, p in enumerate(trace) if p["control_val"] >= threshold * pretrained_control]
  if ok:
    return min(ok, key=lambda i: (trace[i]["target_val"], i)), True
  return max(range(len(trace)), key=lambda i: (trace[i]["control_val"], -i)), False


# ------------------------------------------------------------------ reports


def _fmt_params(params: Mapping) -> str:
  def f(v):
    return f"{v:g}" if isinstance(v, float) else str(v)
  return ", ".join(f"{k}={f(v)}" for k, v in params.items())


def markdown_table(results: Mapping) -> str:
  """Test accuracy (%) per task, average, normalised average and the literature, one row per method."""
  tasks = results["tasks"]
  head = ["Method"] + tasks + ["Avg.", "Norm. avg.", "FusionBench avg. (norm.)", "Chosen params"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join([" --- "] + [" ---: "] * (len(tasks) + 3) + [" --- "]) + "|"]
  for r in results["rows"]:
    cells = [r["name"]] + [f"{100 * r['test'][t]:.1f}" for t in tasks]
    cells.append(f"**{100 * r['test_avg']:.1f}**")
    cells.append(f"{100 * r['normalized_avg']:.1f}" if "normalized_avg" in r else "-")
    lit = r.get("literature")
    cells.append(f"{lit['avg']:.1f} ({100 * lit['normalized']:.1f})" if lit else "")
    cells.append(_fmt_params(r["params"]) if r.get("method") else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def negation_table(neg: Mapping) -> str:
  """Target / control test accuracy (%) per target task, pretrained vs negated, and the paper's row."""
  lines = ["| Target task | λ | constraint met | Pretrained target | Pretrained control |"
           " Negated target | Negated control |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
  for t, r in neg["per_target"].items():
    lines.append(f"| {t} | {r['lambda']:g} | {'yes' if r['feasible'] else 'NO'} |"
                 f" {100 * r['pretrained']['target_test']:.1f} | {100 * r['pretrained']['control_test']:.1f} |"
                 f" {100 * r['negated']['target_test']:.1f} | {100 * r['negated']['control_test']:.1f} |")
  a = neg["average"]
  lines.append(f"| **average** | | | {100 * a['pretrained_target']:.1f} | {100 * a['pretrained_control']:.1f} |"
               f" **{100 * a['negated_target']:.1f}** | **{100 * a['negated_control']:.1f}** |")
  lit = neg["literature"]
  lines.append(f"| Ilharco et al. 2023, ViT-B/32 (control: ImageNet) | | | | |"
               f" {lit['target']:.1f} | {lit['control']:.1f} |")
  return "\n".join(lines)


def _zoom(values: Sequence[float]) -> tuple[float, float]:
  """An axis range around ``values`` (10 % of their span, at least 2 points, each side) in [0, 100]."""
  lo, hi = float(np.min(values)), float(np.max(values))
  pad = max(2.0, 0.1 * (hi - lo))
  return max(0.0, lo - pad), min(100.0, hi + pad)


def plot(results: Mapping, path: str) -> str:
  """Average test accuracy per row (left) and normalised beside FusionBench's (right); zoomed axes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = results["rows"]
  names = [r["name"] for r in rows]
  avg = np.array([100 * r["test_avg"] for r in rows])
  norm = np.array([100 * r.get("normalized_avg", np.nan) for r in rows])
  lit = np.array([100 * r["literature"]["normalized"] if r.get("literature") else np.nan for r in rows])
  fig = Figure(figsize=(max(9.0, 1.1 * len(rows) + 3.0), 4.8), layout="constrained")
  FigureCanvasAgg(fig)
  x = np.arange(len(rows))
  colors = ["tab:gray" if r["method"] is None else "tab:blue" for r in rows]
  ax = fig.add_subplot(1, 2, 1)
  lo, hi = _zoom(avg)
  ax.bar(x, avg - lo, bottom=lo, color=colors, alpha=0.85)
  for i, v in enumerate(avg):
    ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
  ax.set_ylim(lo, hi)
  ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
  ax.set_ylabel("average test accuracy (%) [axis zoomed]")
  ax.set_title(f"{len(results['tasks'])} tasks, absolute")
  ax2 = fig.add_subplot(1, 2, 2)
  both = np.concatenate([norm[np.isfinite(norm)], lit[np.isfinite(lit)]])
  lo2, hi2 = _zoom(both if both.size else [0.0, 100.0])
  w = 0.4
  ax2.bar(x - w / 2, np.nan_to_num(norm, nan=lo2) - lo2, w, bottom=lo2, color="tab:blue",
          label="ours")
  ax2.bar(x + w / 2, np.nan_to_num(lit, nan=lo2) - lo2, w, bottom=lo2, color="tab:orange",
          label="FusionBench CLIP ViT-B/32, 8 tasks")
  ax2.set_ylim(lo2, hi2)
  ax2.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
  ax2.set_ylabel("normalised accuracy (% of experts) [axis zoomed]")
  ax2.set_title("normalised, beside the literature")
  ax2.legend(fontsize=7, loc="upper right")
  fig.savefig(path, dpi=110)
  return path


def ordering(rows: Sequence[Mapping]) -> dict:
  """The literature's claims (issue 12), computed on the measured test averages (never asserted).

  simple average < task arithmetic < TIES (by >= 2 points) < individual experts,
  experts >= 30 points above the pretrained model, simple average losing >= 15
  points normalised. A claim is present only when its rows are.
  """
  by = {r["name"]: 100 * r["test_avg"] for r in rows}
  norm = {r["name"]: 100 * r["normalized_avg"] for r in rows if "normalized_avg" in r}
  out = {}
  if "Individual" in by and "Pretrained" in by:
    out["Individual >= Pretrained + 30"] = bool(by["Individual"] >= by["Pretrained"] + 30)
  if "simple_average" in norm:
    out["simple_average normalised <= 85"] = bool(norm["simple_average"] <= 85.0)
  if "simple_average" in by and "task_arithmetic" in by:
    out["simple_average < task_arithmetic"] = bool(by["simple_average"] < by["task_arithmetic"])
  for ties in ("ties", "ties_paper"):
    if ties in by and "task_arithmetic" in by:
      out[f"task_arithmetic + 2 <= {ties}"] = bool(by["task_arithmetic"] + 2 <= by[ties])
    if ties in by and "Individual" in by:
      out[f"{ties} < Individual"] = bool(by[ties] < by["Individual"])
  return out


# ------------------------------------------------------------------ pool + data


def _open_pool(config: Any, tasks: Sequence[str] | None, cache: str | None, progress: bool,
               workdir: str):
  """Build (or resume) the pool when it is not complete, then load it with every check."""
  from kfuse.bench import pool as pool_lib

  pcfg = pool_config(config)
  path = _get(_get(config, "pool"), "path", "") or os.path.join(workdir, "pool")
  path = os.path.abspath(path)
  built = False
  if pool_lib.pool_status(path) != "complete":
    t = time.time()
    logging.info("merge_bench: building pool %s (%s)", path, pool_lib.pool_status(path))
    pool_lib.build_pool(pcfg, path, cache=cache, progress=progress)
    built = time.time() - t
  tasks = list(tasks or pcfg["tasks"])
  expect = {"model": pcfg["model"], "data": {"seed": pcfg["data"]["seed"],
                                             "sizes": pcfg["data"]["sizes"]}, "tasks": tasks}
  return pool_lib.load_pool(path, expect=expect, tasks=tasks), built


def _zero_shot_head(pool, task: str) -> PyTree:
  return pool.probes[task]["params"]["head"]


def _datasets(pool, tasks: Sequence[str], cache: str | None) -> dict:
  from kfuse.data import image_tasks

  data = pool.manifest["config"]["data"]
  return {t: image_tasks.load_task(t, seed=int(data["seed"]), sizes=tuple(data["sizes"]), cache=cache)
          for t in tasks}


def _budget(datasets: Mapping, unlabeled: int, val: int) -> tuple[dict, dict]:
  """Per task the first ``unlabeled`` test inputs (no labels) and ``val`` labelled val examples."""
  data, amounts = {}, {}
  for t, ds in datasets.items():
    data[t] = TaskData(unlabeled=np.asarray(ds.x_test[:unlabeled]), x_val=np.asarray(ds.x_val[:val]),
                       y_val=np.asarray(ds.y_val[:val]))
    amounts[t] = {"unlabeled_test": int(len(data[t].unlabeled)), "labeled_val": int(len(data[t].y_val)),
                  "val_split": int(len(ds.y_val)), "test_split": int(len(ds.y_test))}
  return data, amounts


# ------------------------------------------------------------------ protocols


def _negation(config: Any, ev: _Evaluator, pool, tasks: Sequence[str], pre_bb: PyTree,
              pre_state: Mapping, experts_bb: Mapping, key: jax.Array) -> dict:
  """Task negation per target task (see the module docstring)."""
  from kfuse import merge

  neg = _to_dict(_get(config, "negation"))
  targets = list(neg.get("targets") or tasks)   # checked against the tasks by `run`
  if len(tasks) < 2:
    raise KfuseError("config.negation: needs at least two tasks (a target and a control)")
  thr = float(neg.get("control_threshold", 0.95))
  points = grid_points({}, _to_dict(neg.get("grid")))
  heads = {t: _zero_shot_head(pool, t) for t in tasks}
  pre = {s: ev.backbone(pre_bb, heads, s, pre_state) for s in ("val", "test")}
  per = {}
  for target in targets:
    control = [t for t in tasks if t != target]
    ctl = lambda acc: float(np.mean([acc[t] for t in control]))
    trace, trees = [], []
    for p in points:
      bb = merge.merge("task_negation", [experts_bb[target]], pre_bb, params=p, key=key)
      # λ = 0 is θ₀ itself (θ₀ − 0·τ): its val accuracies are the pretrained model's
      val = pre["val"] if set(p) == {"lambda"} and p["lambda"] == 0 else ev.backbone(
          bb, heads, "val", pre_state)
      trace.append({"params": _plain(p), "target_val": val[target], "control_val": ctl(val)})
      trees.append(bb)
    i, feasible = negation_choice(trace, ctl(pre["val"]), thr)
    test = ev.backbone(trees[i], heads, "test", pre_state)
    per[target] = {
        "lambda": float(points[i].get("lambda", 1.0)), "params": _plain(points[i]),
        "feasible": feasible, "control_tasks": control, "trace": trace,
        "pretrained": {"target_val": pre["val"][target], "control_val": ctl(pre["val"]),
                       "target_test": pre["test"][target], "control_test": ctl(pre["test"])},
        "negated": {"target_val": trace[i]["target_val"], "control_val": trace[i]["control_val"],
                    "target_test": test[target], "control_test": ctl(test)}}
  mean = lambda who, what: float(np.mean([r[who][what] for r in per.values()]))
  return {"targets": targets, "control_threshold": thr, "per_target": per,
          "average": {"pretrained_target": mean("pretrained", "target_test"),
                      "pretrained_control": mean("pretrained", "control_test"),
                      "negated_target": mean("negated", "target_test"),
                      "negated_control": mean("negated", "control_test")},
          "literature": dict(NEGATION_LITERATURE)}


# ------------------------------------------------------------------ entry point


def run(config: Any, workdir: str | None = None) -> dict:
  """Run the benchmark described by ``config`` on its pool; returns the results dict.

  See ``configs/merge_bench.py`` for the fields.
  """
  t_start = time.time()
  if isinstance(config, Mapping):  # a plain dict works too
    config = ml_collections.ConfigDict(dict(config), sort_keys=False)
  check_config(config)
  specs = method_specs(_get(config, "methods"))  # fail fast on typos, before any work
  bench_tasks = list(_get(config, "tasks", ()) or ()) or pool_config(config)["tasks"]
  for field in ("sequential.order", "negation.targets"):
    sec, name = field.split(".")
    for t in list(_to_dict(_get(config, sec)).get(name) or ()):
      if t not in bench_tasks:
        from kfuse.registry import suggest
        raise KfuseError(f"config.{field}: {t!r} is not one of the benchmark's tasks"
                         f"{suggest(t, bench_tasks)} ({', '.join(bench_tasks)})")
  seq = _to_dict(_get(config, "sequential"))
  seq_order = list(seq.get("order") or ())
  seq_labels = (list(seq.get("methods") or [s["label"] for s in specs]) if seq_order
                else [])   # sequential.methods matter only with an order
  for label in seq_labels:
    spec = next((s for s in specs if s["label"] == label), None)
    if spec is None:
      raise KfuseError(f"config.sequential.methods: {label!r} is not a label of config.methods")
    if spec["method"] in MERGERS:
      raise KfuseError(f"config.sequential.methods: {label!r} is a data-informed merger;"
                       " sequential merging takes kfuse.merge methods only")
  workdir = _check_workdir(workdir or _get(config, "workdir", ""), bool(_get(config, "overwrite", False)))
  progress = bool(_get(config, "progress", True))
  eval_bs = int(_get(config, "eval_batch_size", 500))
  data_cfg = _to_dict(_get(config, "data"))
  cache = data_cfg.get("cache_dir") or None
  timing = {}

  # 1. the pool (built or resumed when absent; always loaded with its checks)
  t = time.time()
  pool, built = _open_pool(config, list(_get(config, "tasks", ()) or ()), cache, progress, workdir)
  tasks = pool.tasks
  if built:
    timing["pool_build"] = built
  timing["pool_load"] = time.time() - t - (built or 0)

  # 2. data + budget
  t = time.time()
  datasets = _datasets(pool, tasks, cache)
  budget_data, amounts = _budget(datasets, int(data_cfg.get("unlabeled_per_task", 0)),
                                 int(data_cfg.get("val_per_task", 0)))
  timing["data"] = time.time() - t
  ev = _Evaluator(pool, datasets, eval_bs)

  pre_bb = models.backbone_of(pool.pretrained)
  pre_state = models.model_state_of(pool.pretrained)
  experts_bb = {t_: models.backbone_of(pool.experts[t_]) for t_ in tasks}
  heads = {t_: models.head_of(pool.experts[t_]) for t_ in tasks}
  zs_heads = {t_: _zero_shot_head(pool, t_) for t_ in tasks}
  merged_state = _mean_state([models.model_state_of(pool.experts[t_]) for t_ in tasks])
  key = jax.random.key(int(_get(config, "seed", 0)))

  # 3. rows
  t = time.time()
  ind = {s: {t_: ev.accuracy(t_, pool.experts[t_], s) for t_ in tasks} for s in ("val", "test")}
  pre = {s: ev.backbone(pre_bb, zs_heads, s, pre_state) for s in ("val", "test")}
  rows = [_row("Pretrained", None, None, pre["val"], pre["test"], ind["test"]),
          _row("Individual", None, None, ind["val"], ind["test"], ind["test"])]
  timing["reference_rows"] = time.time() - t
  score = lambda bb: ev.backbone(bb, heads, "val", merged_state)
  merged_trees = {}

  def add_row(label, method, merge_point, points, **extra):
    tm = time.time()
    try:
      best, tree, trace = select_on_validation(points, merge_point, score)
    except KfuseError as e:
      raise KfuseError(f"methods.{label}: {e}") from None
    test = ev.backbone(tree, heads, "test", merged_state)
    rows.append(_row(label, method, best["params"], best["val"], test, ind["test"], grid=trace,
                     seconds=time.time() - tm, **extra))
    merged_trees[label] = tree
    logging.info("merge %s: val %.3f test %.3f (%s)", label, best["val_avg"], rows[-1]["test_avg"],
                 _fmt_params(best["params"]))

  for spec in specs:
    fn, _ = _merger(spec["method"])
    k = jax.random.fold_in(key, zlib.crc32(spec["label"].encode()) & 0x7FFFFFFF)
    inputs = MergeInputs(tasks=list(tasks), pretrained=pre_bb, experts=[experts_bb[t_] for t_ in tasks],
                         heads=heads, model=pool.model, data=budget_data, key=k, pool=pool)
    merge_point = lambda p, fn=fn, inputs=inputs: fn(inputs, p)
    if spec["method"] in LAMBDA_LINEAR and spec["method"] not in MERGERS:
      merge_point = lambda_factored(merge_point, pre_bb)
    add_row(spec["label"], spec["method"], merge_point, spec["points"])
    if inputs.log:
      rows[-1]["merger_log"] = _plain(inputs.log)
  for label in seq_labels:
    spec = next(s for s in specs if s["label"] == label)
    fn = _data_free(spec["method"])
    k = jax.random.fold_in(key, zlib.crc32(f"seq:{label}".encode()) & 0x7FFFFFFF)

    def merge_point(p, fn=fn, k=k):
      two = lambda ms: fn(MergeInputs(tasks=[], pretrained=pre_bb, experts=list(ms), heads={},
                                      model=pool.model, data={}, key=k), p)
      return sequential_merge(two, [experts_bb[o] for o in seq_order])
    add_row(f"seq:{label}", spec["method"], merge_point, spec["points"], order=seq_order)
  timing["merges"] = time.time() - t

  # 4. negation
  negation = None
  if bool(_to_dict(_get(config, "negation")).get("enabled", False)):
    t = time.time()
    negation = _negation(config, ev, pool, tasks, pre_bb, pre_state, experts_bb,
                         jax.random.fold_in(key, 7))
    timing["negation"] = time.time() - t

  # 5. outputs
  t = time.time()
  if merged_trees:
    train.save_checkpoint(os.path.join(workdir, "checkpoints", "merged"),
                          jax.tree.map(np.asarray, merged_trees))
  timing["checkpoints"] = time.time() - t
  timing["total"] = time.time() - t_start
  man = pool.manifest
  results = {
      "tasks": list(tasks),
      "pool": {"path": pool.path, "backbone": man["backbone"], "config": man["config"],
               "pretrained_sha256": man["pretrained"]["sha256"],
               "experts_sha256": {t_: man["experts"][t_]["expert"]["sha256"] for t_ in tasks},
               "build_seconds": man.get("seconds")},
      "task_sources": {t_: man["experts"][t_].get("source") for t_ in tasks},
      "data_budget": {"unlabeled_per_task": int(data_cfg.get("unlabeled_per_task", 0)),
                      "val_per_task": int(data_cfg.get("val_per_task", 0)), "per_task": amounts,
                      "selection": "hyper-parameters chosen on the whole val split"},
      "rows": rows,
      "ordering": ordering(rows),
      "literature": {"source": "FusionBench (Tang et al. 2024), CLIP ViT-B/32, 8 tasks",
                     "avg": dict(LITERATURE), "individual": LITERATURE_INDIVIDUAL},
      "sequential": {"order": seq_order, "methods": seq_labels} if seq_order else None,
      "negation": negation,
      "timing_s": timing,
      "config": _plain(_to_dict(config)),
      "devices": [str(d) for d in jax.devices()],
  }
  table = markdown_table(results) if rows else ""
  md = [f"# merge_bench: {len(tasks)} tasks on pool {pool.path}\n",
        "Test accuracy (%); normalised = merged / individual expert, per task. FusionBench column:"
        " CLIP ViT-B/32, 8 tasks (its normalised value = avg / 90.3).\n", table, ""]
  if negation:
    md += ["## Task negation\n", negation_table(negation), ""]
  md += ["ordering (measured): " + ", ".join(f"{k}: {v}" for k, v in results["ordering"].items())]
  _write_json_atomic(os.path.join(workdir, RESULTS_JSON), results)
  _write_text_atomic(os.path.join(workdir, RESULTS_MD), "\n".join(md) + "\n")
  plot(results, os.path.join(workdir, PLOT_PNG))
  print(table, flush=True)
  if negation:
    print(negation_table(negation), flush=True)
  print("ordering (measured): " + ", ".join(f"{k}: {v}" for k, v in results["ordering"].items()),
        flush=True)
  logging.info("merge_bench: wrote %s (%.1f s)", workdir, time.time() - t_start)
  return results


from kfuse.bench import informed_rows  # noqa: E402,F401  (registers the data-informed mergers)
