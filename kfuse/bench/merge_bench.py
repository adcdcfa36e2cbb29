"""Multi-task model-merging benchmark (FusionBench's CLIP 8-task protocol, at toy scale).

Pipeline (`run`):

1. build a task suite (`kfuse.data.tasks`): N tasks sharing one input space,
   each a fixed transformation + relabelling of a base dataset;
2. pretrain a classifier (backbone + throw-away head) on the untransformed
   base data;
3. per task, fit a fresh linear head on the frozen pretrained backbone
   (linear probe), then fine-tune backbone (+ head) -> one expert per task;
4. evaluate on every task: the individual experts, the pretrained backbone
   with each task's fine-tuned head (the "zero-shot" row), and every merge
   method of ``config.methods``. Only backbones are merged (`kfuse.merge`);
   each task is scored with the merged backbone and its own head. A method's
   hyper-parameters are chosen on the validation splits (average accuracy)
   from the Cartesian grid ``config.methods.<label>.grid``; test accuracy is
   reported for the chosen point;
5. write ``results.json`` (atomic), ``results.md``, ``merge_bench.png`` and
   Orbax checkpoints (``checkpoints/{pretrained,experts,merged}``) under the
   workdir, and print the Markdown table.

Accuracies are reported per task, averaged, and normalised by the individual
experts' accuracy (merged / expert, per task).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
import zlib
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from kfuse import models, optim, train
from kfuse.data import make_suite, pretrain_task
from kfuse.bench.common import (
    to_dict as _to_dict, get as _get, plain as _plain, check_workdir as _check_workdir,
    write_json as _write_json_atomic, write_text as _write_text_atomic, method_entries)
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["run", "markdown_table", "plot", "grid_points", "method_specs"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "merge_bench.png"


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
  """Validate ``config.methods`` and return ``[{label, method, points}]``.

  Each entry ``config.methods.<label>`` holds ``name`` (a `kfuse.merge`
  method; default: the label), ``params`` and an optional ``grid``. Unknown
  methods / parameter names fail here, before any training.
  """
  from kfuse import merge

  specs = []
  for label, entry in method_entries(methods_cfg, ("name", "params", "grid")):
    name = entry.get("name") or label
    try:
      m = merge.get_method(name)
    except KfuseError as e:
      raise KfuseError(f"methods.{label}.name: {e}") from None
    params = _to_dict(entry.get("params"))
    grid = _to_dict(entry.get("grid"))
    for p in list(params) + list(grid):
      if p not in m.param_map:
        raise KfuseError(f"methods.{label}.params: unknown parameter {p!r} for method {name!r}"
                         f" (known: {', '.join(sorted(m.param_map)) or 'none'})")
    try:
      points = grid_points(params, grid)
    except KfuseError as e:
      raise KfuseError(f"methods.{label}.{e}") from None
    specs.append({"label": label, "method": name, "points": points, "grid": sorted(grid)})
  return specs


# ------------------------------------------------------------------ config checks

_OPT = optim.OPTIMIZER_SCHEMA
SCHEMA = {
    "seed": int, "workdir": str, "overwrite": bool, "progress": bool, "eval_batch_size": int,
    "resume": bool, "checkpoint_every": int, "methods": dict,
    "data": {"name": str, "num_tasks": (int, type(None)), "tasks": list, "val_fraction": float,
             "relabel": bool, "cache_dir": (str, type(None)), "pretrain_samples": int},
    "model": {"name": str},
    "pretrain": {"steps": int, "batch_size": int, "log_every": int, "optimizer": _OPT},
    "finetune": {"probe_steps": int, "probe_learning_rate": float, "steps": int,
                 "trainable": str, "batch_size": int, "log_every": int, "optimizer": _OPT},
}


def check_config(config: Any) -> None:
  """Types of every known field, the model and the optimizers; `KfuseError` names the field.

  Runs before any data is generated or any step is trained.
  """
  optim.check_types(config, SCHEMA, "config")
  model_kw = _to_dict(config.model)
  name = model_kw.pop("name", "mlp")
  models.get_model(name, num_classes=10, **model_kw)  # unknown model / argument / type
  for phase in ("pretrain", "finetune"):
    cfg = _to_dict(_get(config, phase))
    for field in ("steps", "batch_size"):
      if int(cfg.get(field, 1)) <= 0:
        raise KfuseError(f"config.{phase}.{field}: must be positive, got {cfg.get(field)}")
    try:
      optim.make_optimizer(cfg["optimizer"], int(cfg["steps"]))
    except KfuseError as e:
      raise KfuseError(f"config.{phase}.{e}") from None
  _trainable(_to_dict(config.finetune).get("trainable", "all"), "config.finetune.trainable")
  if int(_get(config, "checkpoint_every", 0)) < 0:
    raise KfuseError("config.checkpoint_every: must be >= 0")


# ------------------------------------------------------------------ training phases


class _Phases:
  """Jitted train / predict functions, built once per (model shape, phase) and reused."""

  def __init__(self, config):
    self.config = config
    self.model_cfg = _to_dict(config.model)
    self._models: dict[int, Any] = {}
    self._steps: dict[tuple, Any] = {}
    self._predict: dict[int, Any] = {}

  def model(self, num_classes: int):
    if num_classes not in self._models:
      kw = dict(self.model_cfg)
      name = kw.pop("name", "mlp")
      self._models[num_classes] = models.get_model(name, num_classes=num_classes, **kw)
    return self._models[num_classes]

  def step(self, num_classes: int, phase: str, opt_cfg: Mapping, steps: int,
           trainable: Sequence[str] | None):
    key = (num_classes, phase)
    if key not in self._steps:
      tx = optim.make_optimizer(opt_cfg, steps, trainable)
      self._steps[key] = (tx, train.make_train_step(self.model(num_classes), tx, trainable))
    return self._steps[key]

  def predict(self, num_classes: int):
    if num_classes not in self._predict:
      self._predict[num_classes] = train.make_predict(self.model(num_classes))
    return self._predict[num_classes]


def _train(phases: _Phases, task, variables: PyTree, phase: str, cfg: Mapping, opt_cfg: Mapping,
           steps: int, trainable, key: jax.Array, progress: bool,
           checkpoint_dir: str | None = None, checkpoint_every: int = 0,
           meta: Mapping | None = None):
  """Train ``variables`` on ``task``; returns ``(variables, history)``.

  With ``checkpoint_dir`` the run is resumable (see `kfuse.train.fit`).
  """
  k_data, k_drop = jax.random.split(key)
  state, history = train.train_classifier(
      phases.model(task.num_classes), variables, task.x_train, task.y_train, optimizer=opt_cfg,
      steps=steps, batch_size=int(cfg["batch_size"]), data_key=k_data, dropout_key=k_drop,
      step=phases.step(task.num_classes, phase, opt_cfg, steps, trainable),
      desc=f"{phase}[{task.name}]", log_every=int(cfg.get("log_every", 100)), progress=progress,
      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, meta=meta)
  return state.variables, history


def _trainable(value: str, field: str):
  table = {"all": None, "backbone": ("backbone",), "head": ("head",)}
  if value not in table:
    raise KfuseError(f"{field}: expected one of {', '.join(table)}, got {value!r}")
  return table[value]


def _mean_state(states: Sequence[Mapping]) -> dict:
  """Element-wise mean of the experts' model state (BatchNorm statistics); {} if stateless."""
  if not states or not states[0]:
    return {}
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *states)


# ------------------------------------------------------------------ evaluation


def _eval_backbone(phases: _Phases, suite, backbone: PyTree, heads: Sequence[PyTree],
                   split: str, batch_size: int, model_state: Mapping | None = None
                   ) -> dict[str, float]:
  """Accuracy of ``backbone`` + each task's head on each task's ``split``."""
  out = {}
  for task, head in zip(suite, heads):
    x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
    variables = models.with_params(backbone, head, model_state)
    m = train.evaluate(phases.predict(task.num_classes), variables,
                       x, y, batch_size)
    out[task.name] = m["accuracy"]
  return out


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
  row.update(extra)
  return row


def _merge_method(spec: dict, experts: Sequence[PyTree], base: PyTree, key: jax.Array,
                  evaluate_val) -> tuple[dict, PyTree, list[dict]]:
  """Grid search ``spec`` on validation; returns (best point, merged backbone, trace)."""
  from kfuse import merge

  best, best_tree, trace = None, None, []
  for params in spec["points"]:
    try:
      merged = merge.merge(spec["method"], experts, base, params=params, key=key)
    except KfuseError as e:
      raise KfuseError(f"methods.{spec['label']}: {e}") from None
    val = evaluate_val(merged)
    avg = float(np.mean(list(val.values())))
    trace.append({"params": _plain(params), "val_avg": avg})
    if best is None or avg > best["val_avg"]:
      best, best_tree = {"params": params, "val": val, "val_avg": avg}, merged
  return best, best_tree, trace


# ------------------------------------------------------------------ reports


def _fmt_params(params: Mapping) -> str:
  def f(v):
    return f"{v:g}" if isinstance(v, float) else str(v)
  return ", ".join(f"{k}={f(v)}" for k, v in params.items())


def markdown_table(results: Mapping) -> str:
  """Test accuracy (%) per task, average and normalised average, one row per method."""
  tasks = results["tasks"]
  head = ["Method"] + tasks + ["Avg.", "Norm. avg.", "Chosen params"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join([" --- "] + [" ---: "] * (len(tasks) + 2) + [" --- "]) + "|"]
  for r in results["rows"]:
    cells = [r["name"]] + [f"{100 * r['test'][t]:.1f}" for t in tasks]
    cells.append(f"**{100 * r['test_avg']:.1f}**")
    cells.append(f"{100 * r['normalized_avg']:.1f}" if "normalized_avg" in r else "-")
    cells.append(_fmt_params(r["params"]) if r.get("method") else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: Mapping, path: str) -> str:
  """Bar chart of average test accuracy per method, per-task accuracies as dots (Agg)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows, tasks = results["rows"], results["tasks"]
  names = [r["name"] for r in rows]
  avg = np.array([100 * r["test_avg"] for r in rows])
  fig = Figure(figsize=(max(6.0, 0.75 * len(rows) + 2.0), 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  colors = ["tab:gray" if r["method"] is None else "tab:blue" for r in rows]
  ax.bar(np.arange(len(rows)), avg, color=colors, alpha=0.8, label="average")
  markers = "ovs^Dp*hP<>X"
  for j, t in enumerate(tasks):
    ax.scatter(np.arange(len(rows)) + (j - (len(tasks) - 1) / 2) * 0.5 / max(1, len(tasks)),
               [100 * r["test"][t] for r in rows], s=14, marker=markers[j % len(markers)],
               color="black", alpha=0.6, zorder=3, label=t if j < 12 else None)
  for i, v in enumerate(avg):
    ax.text(i, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(np.arange(len(rows)), names, rotation=30, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"merge_bench: {results['suite']}, {len(tasks)} tasks")
  ax.legend(fontsize=7, ncols=min(4, len(tasks) + 1), loc="upper right")
  fig.savefig(path, dpi=120)
  return path


# ------------------------------------------------------------------ entry point


def _ordering(rows: Sequence[Mapping]) -> dict:
  """The literature's qualitative claims, checked on the measured test averages."""
  by = {r["name"]: r["test_avg"] for r in rows}
  merges = {r["name"]: r["test_avg"] for r in rows if r.get("method")}
  out = {}
  if merges:
    out["individual >= every merge"] = bool(by["Individual"] >= max(merges.values()))
    out["every merge >= pretrained"] = bool(min(merges.values()) >= by["Pretrained"])
  for a, b in (("task_arithmetic", "simple_average"), ("ties", "simple_average"),
               ("ties_paper", "simple_average"), ("ties", "task_arithmetic"),
               ("ties_paper", "task_arithmetic")):
    if a in by and b in by:
      out[f"{a} > {b}"] = bool(by[a] > by[b])
  return out


def _phase_meta(config: Any, phase: str, task: str | None = None) -> dict:
  """What a resumed phase must share with the interrupted one (else `KfuseError`)."""
  data = _to_dict(config.data)
  meta = {"phase": phase, "model": _plain(_to_dict(config.model)), "seed": int(config.seed),
          "data.name": data.get("name", "mnist1d"),
          "data.pretrain_samples": int(data.get("pretrain_samples", 0) or 0),
          "pretrain": _plain(_to_dict(config.pretrain))}
  if phase != "pretrain":
    meta.update({"task": task, "finetune": _plain(_to_dict(config.finetune)),
                 "data.relabel": bool(data.get("relabel", True)),
                 "data.val_fraction": float(data.get("val_fraction", 0.1))})
  return meta


def run(config: Any, workdir: str | None = None) -> dict:
  """Run the benchmark described by ``config``; returns the results dict.

  See ``configs/default.py`` for the fields. Training phases are checkpointed
  under ``<workdir>/train_state`` every ``config.checkpoint_every`` steps; a
  rerun after an interruption resumes from there (``config.resume``), and
  the directory is removed once the run has written its results.
  """
  t_start = time.time()
  if isinstance(config, Mapping):  # a plain dict works too
    config = ml_collections.ConfigDict(dict(config), sort_keys=False)
  check_config(config)
  specs = method_specs(config.methods)  # fail fast on typos, before training
  workdir = _check_workdir(workdir or _get(config, "workdir", ""), bool(_get(config, "overwrite", False)))
  progress = bool(_get(config, "progress", True))
  eval_bs = int(_get(config, "eval_batch_size", 512))
  data_cfg, pre_cfg, ft_cfg = _to_dict(config.data), _to_dict(config.pretrain), _to_dict(config.finetune)
  ft_trainable = _trainable(ft_cfg.get("trainable", "all"), "config.finetune.trainable")
  state_dir = os.path.join(workdir, "train_state")
  if not bool(_get(config, "resume", True)) and os.path.isdir(state_dir):
    shutil.rmtree(state_dir)
  every = int(_get(config, "checkpoint_every", 0))
  ckpt = lambda name: os.path.join(state_dir, name)
  timing = {}

  # 1. data
  t = time.time()
  suite_name = data_cfg.get("name", "mnist1d")
  suite_kw = dict(seed=int(config.seed), val_fraction=float(data_cfg.get("val_fraction", 0.1)),
                  cache=data_cfg.get("cache_dir") or None)
  suite = make_suite(suite_name, data_cfg.get("num_tasks") or None,
                     tasks=list(data_cfg.get("tasks") or ()) or None,
                     relabel=bool(data_cfg.get("relabel", True)), **suite_kw)
  pre = pretrain_task(suite_name, num_samples=int(data_cfg.get("pretrain_samples", 0) or 0),
                      **suite_kw)
  names = [task.name for task in suite]
  timing["data"] = time.time() - t
  logging.info("merge_bench: suite %s, tasks %s", suite_name, names)

  key = jax.random.key(int(config.seed))
  k_init, k_pre, k_heads, k_ft, k_merge = jax.random.split(key, 5)
  phases = _Phases(config)

  # 2. pretraining
  t = time.time()
  pre_model = phases.model(pre.num_classes)
  variables = jax.jit(pre_model.init)(k_init, pre.x_train[:1])
  pre_vars, pre_hist = _train(phases, pre, variables, "pretrain", pre_cfg, pre_cfg["optimizer"],
                              int(pre_cfg["steps"]), None, k_pre, progress, ckpt("pretrain"), every,
                              _phase_meta(config, "pretrain"))
  pre_backbone = models.backbone_of(pre_vars)
  pre_state = models.model_state_of(pre_vars)
  pre_eval = train.evaluate(phases.predict(pre.num_classes), pre_vars, pre.x_test, pre.y_test, eval_bs)
  timing["pretrain"] = time.time() - t
  logging.info("pretrain: test accuracy %.3f on the base data", pre_eval["accuracy"])

  # 3. experts: linear probe (the "zero-shot" head), then fine-tune
  t = time.time()
  probe_steps = int(ft_cfg.get("probe_steps", 0))
  probe_opt = dict(_to_dict(ft_cfg["optimizer"]), schedule="constant", warmup_steps=0,
                   learning_rate=float(ft_cfg.get("probe_learning_rate", 1e-2)))
  experts, probe_heads, histories = [], [], {}
  for i, task in enumerate(suite):
    k_head, k_p, k_f = jax.random.split(jax.random.fold_in(k_ft, i), 3)
    head = jax.jit(phases.model(task.num_classes).init)(k_head, task.x_train[:1])["params"]["head"]
    v = models.with_params(pre_backbone, head, pre_state)
    if probe_steps > 0:
      v, _ = _train(phases, task, v, "probe", ft_cfg, probe_opt, probe_steps, ("head",), k_p,
                    progress, ckpt(f"probe_{task.name}"), 0, _phase_meta(config, "probe", task.name))
      v = models.with_params(pre_backbone, models.head_of(v), pre_state)  # keep the pretrained stats
    probe_heads.append(models.head_of(v))
    v, hist = _train(phases, task, v, "finetune", ft_cfg, ft_cfg["optimizer"], int(ft_cfg["steps"]),
                     ft_trainable, k_f, progress, ckpt(f"finetune_{task.name}"), every,
                     _phase_meta(config, "finetune", task.name))
    experts.append(v)
    histories[task.name] = hist
  timing["finetune"] = time.time() - t

  # 4. evaluation
  t = time.time()
  heads = [models.head_of(v) for v in experts]
  backbones = [models.backbone_of(v) for v in experts]
  merged_state = _mean_state([models.model_state_of(v) for v in experts])
  ev = lambda bb, split, hs=heads, st=merged_state: _eval_backbone(phases, suite, bb, hs, split,
                                                                   eval_bs, st)
  ind_val, ind_test = {}, {}
  for task, v in zip(suite, experts):
    predict = phases.predict(task.num_classes)
    ind_val[task.name] = train.evaluate(predict, v, task.x_val, task.y_val, eval_bs)["accuracy"]
    ind_test[task.name] = train.evaluate(predict, v, task.x_test, task.y_test, eval_bs)["accuracy"]
  pre_ev = lambda split: ev(pre_backbone, split, probe_heads, pre_state)
  rows = [_row("Pretrained", None, None, pre_ev("val"), pre_ev("test"), ind_test),
          _row("Individual", None, None, ind_val, ind_test, ind_test)]
  merged_trees = {}
  for spec in specs:
    tm = time.time()
    k_method = jax.random.fold_in(k_merge, zlib.crc32(spec["label"].encode()) & 0x7FFFFFFF)
    best, tree, trace = _merge_method(spec, backbones, pre_backbone, k_method,
                                      lambda bb: ev(bb, "val"))
    rows.append(_row(spec["label"], spec["method"], best["params"], best["val"], ev(tree, "test"),
                     ind_test, grid=trace, seconds=time.time() - tm))
    merged_trees[spec["label"]] = tree
    logging.info("merge %s: val %.3f test %.3f (%s)", spec["label"], best["val_avg"],
                 rows[-1]["test_avg"], _fmt_params(best["params"]))
  timing["merge_eval"] = time.time() - t

  # 5. outputs
  t = time.time()
  ckpt_dir = os.path.join(workdir, "checkpoints")
  train.save_checkpoint(os.path.join(ckpt_dir, "pretrained"), pre_vars)
  train.save_checkpoint(os.path.join(ckpt_dir, "experts"), dict(zip(names, experts)))
  if merged_trees:
    train.save_checkpoint(os.path.join(ckpt_dir, "merged"), merged_trees)
  timing["checkpoints"] = time.time() - t
  timing["total"] = time.time() - t_start

  results = {
      "suite": suite_name,
      "tasks": names,
      "task_descriptions": {task.name: task.description for task in suite},
      "sizes": suite[0].sizes(),
      "pretrain": {"base_test_accuracy": pre_eval["accuracy"], "history": pre_hist,
                   "train_examples": len(pre.y_train)},
      "finetune_history": histories,
      "rows": rows,
      "ordering": _ordering(rows),
      "timing_s": timing,
      "config": _plain(_to_dict(config)),
      "devices": [str(d) for d in jax.devices()],
  }
  table = markdown_table(results)
  _write_json_atomic(os.path.join(workdir, RESULTS_JSON), results)
  _write_text_atomic(os.path.join(workdir, RESULTS_MD),
                     f"# merge_bench: {results['suite']} ({len(names)} tasks)\n\n"
                     f"Test accuracy (%); normalised = merged / individual expert.\n\n{table}\n")
  plot(results, os.path.join(workdir, PLOT_PNG))
  shutil.rmtree(state_dir, ignore_errors=True)  # finished: nothing left to resume
  print(table, flush=True)
  print("ordering: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results["ordering"].items()),
        flush=True)
  logging.info("merge_bench: wrote %s (%.1f s)", workdir, time.time() - t_start)
  return results
