"""Knowledge-distillation benchmark: does KD reproduce its known gains at toy scale?

Three experiments, every number a mean ± std over ``config.seeds`` (each
seed re-draws the validation split, initialisations, batch order and label
noise):

1. **students** (per dataset, MNIST-1D and sklearn digits): a strong CNN
   teacher is trained once per seed; small students (an MLP, and a small CNN
   for the feature-map losses) are trained alone and with each distillation
   objective of ``config.methods`` for the same number of steps, same
   optimizer and same batches. Claim checked: Hinton KD and DKD students
   beat the same student trained alone.
2. **forget_me_not** (label noise): a model is trained on labels with
   ``noise`` symmetric noise long enough to memorise them; checkpoints are
   kept every ``checkpoint_every`` steps, members are picked greedily on the
   (equally noisy) validation split, and the checkpoint ensemble is
   distilled into a fresh model of the original size (`kfuse.distill` with a
   stacked teacher). Claim checked (Stern, Corn & Weinshall 2025): the
   distilled model beats the original (final) model. Also reported: the
   early-stopped best checkpoint, the ensemble itself, and self-distillation
   from the final model alone (to separate "ensemble" from "distillation").
3. **fantastic_gains**: the trained CNN of experiment 1 is the *student*
   and the weaker MLP trained alone is the *teacher*. Continued training with
   plain KL distillation vs KL+DP (per-sample choice between the teacher and
   the frozen initial student, Roth et al. 2024). Claim checked: plain KD
   from a weaker teacher hurts, KL+DP does not.

Outputs under the workdir: ``results.json`` (atomic), ``results.md``,
``kd_bench.png`` and Orbax checkpoints of the seed-0 teachers and students.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from kfuse import distill, models, optim, train
from kfuse.data import load
from kfuse.train import add_label_noise
from kfuse.distill import objectives as O
from kfuse.bench.common import (
    to_dict as _to_dict, get as _get, plain as _plain, check_workdir as _check_workdir,
    write_text as _write_atomic, method_entries)
from kfuse.tree import KfuseError

__all__ = ["run", "markdown_tables", "plot", "summarize"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "kd_bench.png"

PyTree = Any


# ------------------------------------------------------------------ small helpers


def summarize(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"values": [float(a) for a in v], "mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _pm(s: Mapping, scale: float = 100.0, digits: int = 1) -> str:
  return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


_MODELS: dict[str, Any] = {}


def _model(cfg: Mapping, num_classes: int):
  """The registry model for ``cfg`` (cached, so jitted steps and predictors are reused)."""
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _to_dict(cfg).items()}
  key = json.dumps([num_classes, _plain(kw)], sort_keys=True)
  if key not in _MODELS:
    kw = dict(kw)
    name = kw.pop("name")
    _MODELS[key] = models.get_model(name, num_classes=num_classes, **kw)
  return _MODELS[key]


def _stable(text: str) -> int:
  return zlib.crc32(text.encode()) % (2 ** 31)


def _variables(state: distill.DistillState | train.TrainState) -> dict:
  return {"params": state.params, **state.model_state}


def _host(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, jax.device_get(tree))


class _Runner:
  """Builds and caches jitted steps / predictors; runs training loops."""

  def __init__(self, config):
    self.config = config
    self.batch_size = int(_get(config, "batch_size", 128))
    self.eval_bs = int(_get(config, "eval_batch_size", 500))
    self.progress = bool(_get(config, "progress", False))
    self._predict: dict[int, Callable] = {}
    self._steps: dict[str, distill.DistillStep] = {}
    self._train_steps: dict[str, tuple] = {}

  def step(self, key: str, build: Callable[[], distill.DistillStep], teacher_vars=()):
    """A cached step for ``key`` (built once), bound to ``teacher_vars``: one compilation per key."""
    if key not in self._steps:
      self._steps[key] = build()
    return self._steps[key].with_teachers(teacher_vars)

  def optimizer(self, steps: int, opt_cfg: Mapping | None = None):
    return optim.make_optimizer(_to_dict(opt_cfg or self.config.optimizer), steps)

  def train_step(self, module, steps: int, opt_cfg: Mapping | None = None) -> tuple:
    """A cached ``(tx, jitted step)`` of `kfuse.train` for ``module``: one compilation per
    module, run length and optimizer config."""
    key = f"{id(module)}/{steps}/{json.dumps(_plain(_to_dict(opt_cfg or {})), sort_keys=True)}"
    if key not in self._train_steps:
      tx = self.optimizer(steps, opt_cfg)
      self._train_steps[key] = (tx, train.make_train_step(module, tx))
    return self._train_steps[key]

  def predict(self, module) -> Callable:
    if id(module) not in self._predict:
      self._predict[id(module)] = (module, distill.make_predict(module))
    return self._predict[id(module)][1]

  def fit(self, step: distill.DistillStep, state, x, y, steps: int, key, desc: str,
          on_step: Callable | None = None):
    k_data, k_step = jax.random.split(key)
    batches = train.batches(k_data, x, y, self.batch_size)
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)
    last = None
    for i in range(steps):
      state, last = step(state, next(batches), k_step)
      if on_step is not None:
        on_step(i + 1, state)
      bar.update(1)
    bar.close()
    return state, ({k: float(v) for k, v in jax.device_get(last).items()} if last else {})

  def accuracy(self, module, variables, x, y) -> float:
    return train.evaluate(self.predict(module), variables, x, y, self.eval_bs)["accuracy"]

  def probs(self, module, variables, x) -> np.ndarray:
    predict = self.predict(module)
    out = [np.asarray(predict(variables, x[i:i + self.eval_bs])) for i in range(0, len(x), self.eval_bs)]
    z = np.concatenate(out).astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _method_specs(methods_cfg: Any) -> dict[str, dict]:
  """Validate ``config.methods`` (fail before any training) -> {label: spec}."""
  out = {}
  for label, entry in method_entries(methods_cfg, ("student", "objective", "mixup_alpha",
                                                    "combine")):
    if "objective" not in entry:
      raise KfuseError(f"methods.{label}.objective: missing")
    spec = entry["objective"]
    spec = [_to_dict(s) for s in spec] if isinstance(spec, (list, tuple)) else _to_dict(spec)
    try:
      O.get(spec)  # validates names, arguments and values
    except KfuseError as e:
      raise KfuseError(f"methods.{label}.{e}") from None
    out[label] = {"student": entry.get("student", "student"), "objective": spec,
                  "mixup_alpha": float(entry.get("mixup_alpha", 0.0)),
                  "combine": entry.get("combine", "mean")}
  return out


# ------------------------------------------------------------------ experiment 1: students


def _is_supervised(spec: Mapping) -> bool:
  obj = spec["objective"]
  return isinstance(obj, Mapping) and obj.get("name") == "supervised"


def _steps_per_epoch(n: int, batch_size: int) -> int:
  return max(1, n // batch_size)


def _objective(spec, steps_per_epoch: int):
  """Objective from a config spec; DKD's warm-up gets the run's steps per epoch."""
  parts = spec if isinstance(spec, list) else [spec]
  parts = [dict(p, steps_per_epoch=steps_per_epoch) if p.get("name") == "dkd"
           and "steps_per_epoch" not in p else p for p in parts]
  return O.get(parts if isinstance(spec, list) else parts[0])


def _train_supervised(runner: _Runner, module, ds, steps: int, key, desc: str, opt_cfg=None,
                      y_train=None, on_step=None) -> tuple[train.TrainState, list]:
  """`kfuse.train.train_classifier` from a fresh init on ``ds.x_train`` (labels ``y_train``,
  default the clean ones); ``on_step(i, state)`` sees every step. Returns ``(state, history)``."""
  k_init, k_fit = jax.random.split(key)
  k_data, k_drop = jax.random.split(k_fit)
  y = ds.y_train if y_train is None else y_train
  return train.train_classifier(
      module, module.init(k_init, ds.x_train[:2]), ds.x_train, y,
      optimizer=_to_dict(opt_cfg or runner.config.optimizer), steps=steps,
      batch_size=runner.batch_size, data_key=k_data, dropout_key=k_drop,
      step=runner.train_step(module, steps, opt_cfg), desc=desc, progress=runner.progress,
      on_step=on_step)


def _students(runner: _Runner, name: str, dcfg: Mapping, specs: dict, seeds: Sequence[int],
              root_key) -> tuple[dict, dict]:
  """Experiment 1 on dataset ``name``. Returns (results, per-seed artefacts for experiment 3)."""
  labels = list(dcfg["methods"])
  per = {m: [] for m in labels}
  teacher_acc, artefacts = [], {}
  t_steps, s_steps = int(dcfg["teacher_steps"]), int(dcfg["student_steps"])
  for seed in seeds:
    ds = load(name, seed=seed, val_fraction=float(runner.config.data.val_fraction),
              cache=runner.config.data.cache_dir or None)
    key = jax.random.fold_in(root_key, seed)
    teacher = _model(dcfg["teacher"], ds.num_classes)
    t_state, _ = _train_supervised(runner, teacher, ds, t_steps, jax.random.fold_in(key, 0),
                                   f"{name}/teacher[{seed}]")
    t_vars = _variables(t_state)
    teacher_acc.append(runner.accuracy(teacher, t_vars, ds.x_test, ds.y_test))
    logging.info("kd_bench %s seed %d: teacher test accuracy %.4f", name, seed, teacher_acc[-1])
    spe = _steps_per_epoch(len(ds.y_train), runner.batch_size)
    students = {}
    for j, m in enumerate(labels):
      spec = specs[m]
      module = _model(dcfg[spec["student"]], ds.num_classes)
      obj = _objective(spec["objective"], spe)
      uses_teacher = obj.needs_teachers or obj.name == "topk"

      def build(module=module, obj=obj, spec=spec, uses_teacher=uses_teacher):
        teachers = [distill.Teacher(teacher, t_vars)] if uses_teacher else []
        return distill.make_step(module, obj, runner.optimizer(s_steps), teachers,
                                 mixup_alpha=spec["mixup_alpha"], combine=spec["combine"])

      step = runner.step(f"students/{name}/{m}", build, [t_vars] if uses_teacher else [])
      # the same initialisation and batch order for every method using this student
      k_init, k_fit = jax.random.split(jax.random.fold_in(key, _stable(spec["student"])))
      state = step.init(module.init(k_init, ds.x_train[:2]), ds.x_train[:2],
                        jax.random.fold_in(key, j))
      t0 = time.time()
      state, last = runner.fit(step, state, ds.x_train, ds.y_train, s_steps, k_fit,
                               f"{name}/{m}[{seed}]")
      acc = runner.accuracy(module, _variables(state), ds.x_test, ds.y_test)
      per[m].append({"test": acc, "seconds": time.time() - t0, "last": last})
      students[m] = (module, _variables(state))
      logging.info("kd_bench %s seed %d: %-14s test %.4f (%.1fs)", name, seed, m, acc,
                   time.time() - t0)
    artefacts[seed] = {"ds": ds, "teacher": (teacher, t_vars), "students": students}
  rows = []
  for m in labels:
    accs = [r["test"] for r in per[m]]
    row = {"name": m, "student": specs[m]["student"], "objective": _plain(specs[m]["objective"]),
           "mixup_alpha": specs[m]["mixup_alpha"], "test": summarize(accs),
           "seconds": float(np.mean([r["seconds"] for r in per[m]]))}
    ref = [r for r in labels if specs[r]["student"] == specs[m]["student"]
           and _is_supervised(specs[r]) and not specs[r]["mixup_alpha"]]
    if ref and m != ref[0]:
      row["reference"] = ref[0]
      row["delta_vs_alone"] = summarize([a - r["test"] for a, r in zip(accs, per[ref[0]])])
      row["wins"] = int(sum(a > r["test"] for a, r in zip(accs, per[ref[0]])))
    rows.append(row)
  return {"teacher": {"model": _plain(_to_dict(dcfg["teacher"])), "test": summarize(teacher_acc)},
          "students": {k: _plain(_to_dict(dcfg[k])) for k in ("student", "small_cnn") if k in dcfg},
          "rows": rows, "seeds": list(seeds)}, artefacts


# ------------------------------------------------------------------ experiment 2: Forget-Me-Not


def _forget_me_not(runner: _Runner, cfg: Mapping, seeds: Sequence[int], root_key) -> dict:
  name = cfg["dataset"]
  steps, every = int(cfg["steps"]), int(cfg["checkpoint_every"])
  rows: dict[str, list] = {k: [] for k in ("original", "best_checkpoint", "ensemble", "distilled",
                                           "self_distilled")}
  extra = {"members": [], "train_noisy_fit": [], "forgetting_final": [], "original_peak_test": []}
  for seed in seeds:
    ds = load(name, seed=seed, val_fraction=float(runner.config.data.val_fraction),
              cache=runner.config.data.cache_dir or None)
    c = ds.num_classes
    y_noisy = add_label_noise(ds.y_train, c, float(cfg["noise"]), seed, "forget_me_not.noise")
    y_val_noisy = add_label_noise(ds.y_val, c, float(cfg["noise"]), seed + 1000,
                                  "forget_me_not.noise")
    module = _model(cfg["model"], c)
    key = jax.random.fold_in(root_key, seed)
    ckpts = []

    def keep(i, state):
      if i % every == 0:
        ckpts.append(_host(_variables(state)))

    state, _ = _train_supervised(runner, module, ds, steps, jax.random.fold_in(key, 0),
                                 f"fmn/train[{seed}]", cfg.get("optimizer"), y_noisy, keep)
    final = _variables(state)
    if not ckpts or steps % every:
      ckpts.append(_host(final))
    val_probs = np.stack([runner.probs(module, v, ds.x_val) for v in ckpts])
    test_probs = np.stack([runner.probs(module, v, ds.x_test) for v in ckpts])
    val_acc_noisy = (val_probs.argmax(-1) == y_val_noisy[None]).mean(-1)
    test_acc = (test_probs.argmax(-1) == ds.y_test[None]).mean(-1)
    members = distill.greedy_selection(val_probs, y_val_noisy, int(cfg["max_members"]))
    ens_test = float((test_probs[members].mean(0).argmax(-1) == ds.y_test).mean())
    fit = float(np.mean(runner.probs(module, final, ds.x_train).argmax(-1) == y_noisy))
    forgetting = distill.forgetting_scores(val_probs.argmax(-1) == y_val_noisy[None])
    rows["original"].append(float(test_acc[-1]))
    rows["best_checkpoint"].append(float(test_acc[int(np.argmax(val_acc_noisy))]))
    rows["ensemble"].append(ens_test)
    extra["members"].append([int(m) for m in members])
    extra["train_noisy_fit"].append(fit)
    extra["forgetting_final"].append(float(forgetting[-1]))
    extra["original_peak_test"].append(float(test_acc.max()))
    # distil (a) the checkpoint ensemble, (b) the final model alone, into a fresh model
    d_steps = int(cfg["distill_steps"])
    for label, teacher in (
        ("distilled", distill.Teacher(module, distill.stack_checkpoints(
            [ckpts[m] for m in members]), stacked=True)),
        ("self_distilled", distill.Teacher(module, final))):
      obj = O.get(_to_dict(cfg["distill_objective"]))
      ck = f"fmn/{label}/{len(members) if label == 'distilled' else 1}"
      step = runner.step(ck, lambda teacher=teacher, obj=obj: distill.make_step(
          module, obj, runner.optimizer(d_steps, cfg.get("optimizer")), [teacher],
          mixup_alpha=float(cfg.get("mixup_alpha", 0.0))), [teacher.variables])
      k_init, k_fit = jax.random.split(jax.random.fold_in(key, 7))
      st = step.init(module.init(k_init, ds.x_train[:2]), ds.x_train[:2])
      st, _ = runner.fit(step, st, ds.x_train, y_noisy, d_steps, k_fit, f"fmn/{label}[{seed}]")
      rows[label].append(runner.accuracy(module, _variables(st), ds.x_test, ds.y_test))
    logging.info("kd_bench fmn seed %d: original %.4f best %.4f ensemble(%d) %.4f distilled %.4f"
                 " self %.4f", seed, rows["original"][-1], rows["best_checkpoint"][-1],
                 len(members), ens_test, rows["distilled"][-1], rows["self_distilled"][-1])
  out_rows = [{"name": k, "test": summarize(v)} for k, v in rows.items()]
  for r in out_rows:
    if r["name"] != "original":
      r["delta_vs_original"] = summarize([a - b for a, b in zip(rows[r["name"]], rows["original"])])
      r["wins"] = int(sum(a > b for a, b in zip(rows[r["name"]], rows["original"])))
  return {"dataset": name, "noise": float(cfg["noise"]), "model": _plain(_to_dict(cfg["model"])),
          "rows": out_rows, "members": extra["members"],
          "train_fit_to_noisy_labels": summarize(extra["train_noisy_fit"]),
          "original_peak_test": summarize(extra["original_peak_test"]),
          "forgetting_of_final_checkpoint": summarize(extra["forgetting_final"]),
          "seeds": list(seeds)}


# ------------------------------------------------------------------ experiment 3: Fantastic Gains


def _fantastic_gains(runner: _Runner, cfg: Mapping, artefacts: Mapping, root_key) -> dict:
  rows: dict[str, list] = {"initial_student": [], "teacher": []}
  flips: dict[str, list] = {}
  methods = {k: _to_dict(v) for k, v in _to_dict(cfg["methods"]).items()}
  for k in methods:
    rows[k] = []
    flips[k] = []
  steps = int(cfg["steps"])
  for seed, art in artefacts.items():
    ds = art["ds"]
    s_mod, s_vars = art["teacher"]                 # the strong CNN becomes the student
    t_mod, t_vars = art["students"][cfg["teacher_method"]]  # the weaker MLP becomes the teacher
    init_pred = runner.probs(s_mod, s_vars, ds.x_test).argmax(-1)
    rows["initial_student"].append(float((init_pred == ds.y_test).mean()))
    rows["teacher"].append(runner.accuracy(t_mod, t_vars, ds.x_test, ds.y_test))
    key = jax.random.fold_in(root_key, seed)
    for j, (label, spec) in enumerate(methods.items()):
      obj = O.get(spec)
      teachers = [distill.Teacher(t_mod, t_vars)]
      if obj.min_teachers >= 2:
        teachers.append(distill.Teacher(s_mod, s_vars))    # the frozen initial student
      step = runner.step(f"fg/{label}", lambda obj=obj, teachers=teachers: distill.make_step(
          s_mod, obj, runner.optimizer(steps, cfg["optimizer"]), teachers),
          [t.variables for t in teachers])
      st = step.init(s_vars, ds.x_train[:2])
      st, last = runner.fit(step, st, ds.x_train, ds.y_train, steps, jax.random.fold_in(key, j),
                            f"fg/{label}[{seed}]")
      pred = runner.probs(s_mod, _variables(st), ds.x_test).argmax(-1)
      rows[label].append(float((pred == ds.y_test).mean()))
      pos = float(np.mean((pred == ds.y_test) & (init_pred != ds.y_test)))
      neg = float(np.mean((pred != ds.y_test) & (init_pred == ds.y_test)))
      flips[label].append({"positive": pos, "negative": neg,
                           "teacher_fraction": last.get("teacher_fraction")})
      logging.info("kd_bench fg seed %d: %-8s %.4f (initial %.4f)", seed, label, rows[label][-1],
                   rows["initial_student"][-1])
  out = []
  for k, v in rows.items():
    r = {"name": k, "test": summarize(v)}
    if k in methods:
      r["delta_vs_initial"] = summarize([a - b for a, b in zip(v, rows["initial_student"])])
      r["positive_flips"] = summarize([f["positive"] for f in flips[k]])
      r["negative_flips"] = summarize([f["negative"] for f in flips[k]])
      tf = [f["teacher_fraction"] for f in flips[k] if f["teacher_fraction"] is not None]
      if tf:
        r["teacher_fraction"] = summarize(tf)
    out.append(r)
  return {"rows": out, "student": "the experiment-1 teacher (CNN)",
          "teacher": f"the experiment-1 '{cfg['teacher_method']}' student (MLP)",
          "seeds": list(artefacts)}


# ------------------------------------------------------------------ reports


def markdown_tables(results: Mapping) -> str:
  """All experiments as Markdown tables (test accuracy %, mean ± std over seeds)."""
  out = []
  for name, res in results.get("students", {}).items():
    n = len(res["seeds"])
    out.append(f"### Students on {name} (test accuracy %, mean ± std over {n} seeds)\n")
    out.append(f"Teacher {res['teacher']['model'].get('name')}: **{_pm(res['teacher']['test'])}**\n")
    out.append("| Method | Student | Test acc. | Δ vs same student alone | wins |")
    out.append("|---|---|---:|---:|---:|")
    for r in res["rows"]:
      d = _pm(r["delta_vs_alone"]) if "delta_vs_alone" in r else "-"
      w = f"{r['wins']}/{n}" if "wins" in r else "-"
      label = r["name"] + (f" (mixup {r['mixup_alpha']:g})" if r.get("mixup_alpha") else "")
      out.append(f"| {label} | {r['student']} | {_pm(r['test'])} | {d} | {w} |")
    out.append("")
  if "forget_me_not" in results:
    res = results["forget_me_not"]
    n = len(res["seeds"])
    out.append(f"### Forget-Me-Not on {res['dataset']} with {100 * res['noise']:.0f}% symmetric"
               f" label noise (test accuracy %, {n} seeds)\n")
    out.append("| Model | Test acc. | Δ vs original | wins |")
    out.append("|---|---:|---:|---:|")
    for r in res["rows"]:
      d = _pm(r["delta_vs_original"]) if "delta_vs_original" in r else "-"
      w = f"{r['wins']}/{n}" if "wins" in r else "-"
      out.append(f"| {r['name']} | {_pm(r['test'])} | {d} | {w} |")
    out.append(f"\nFinal model's fit to the noisy training labels: "
               f"{_pm(res['train_fit_to_noisy_labels'])}%; peak test accuracy during training:"
               f" {_pm(res['original_peak_test'])}%; ensemble members per seed: {res['members']}\n")
  if "fantastic_gains" in results:
    res = results["fantastic_gains"]
    n = len(res["seeds"])
    out.append(f"### Fantastic Gains: transfer from a weaker teacher ({n} seeds)\n")
    out.append(f"Student: {res['student']}; teacher: {res['teacher']}.\n")
    out.append("| Model | Test acc. | Δ vs initial student | positive flips | negative flips |")
    out.append("|---|---:|---:|---:|---:|")
    for r in res["rows"]:
      d = _pm(r["delta_vs_initial"], digits=2) if "delta_vs_initial" in r else "-"
      pf = _pm(r["positive_flips"], digits=2) if "positive_flips" in r else "-"
      nf = _pm(r["negative_flips"], digits=2) if "negative_flips" in r else "-"
      out.append(f"| {r['name']} | {_pm(r['test'], digits=2)} | {d} | {pf} | {nf} |")
    out.append("")
  return "\n".join(out)


def plot(results: Mapping, path: str) -> str:
  """One panel per experiment: mean test accuracy with ±std error bars and per-seed dots (Agg)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = [(f"students: {k}", v["rows"], "name") for k, v in results.get("students", {}).items()]
  if "forget_me_not" in results:
    panels.append(("forget-me-not (label noise)", results["forget_me_not"]["rows"], "name"))
  if "fantastic_gains" in results:
    panels.append(("fantastic gains (weak teacher)", results["fantastic_gains"]["rows"], "name"))
  fig = Figure(figsize=(4.2 * len(panels) + 1, 4.6), layout="constrained")
  FigureCanvasAgg(fig)
  for i, (title, rows, _) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    means = np.array([100 * r["test"]["mean"] for r in rows])
    stds = np.array([100 * r["test"]["std"] for r in rows])
    xs = np.arange(len(rows))
    colors = ["tab:gray" if r["name"].endswith("alone") or r["name"] in ("original", "initial_student")
              else "tab:blue" for r in rows]
    ax.bar(xs, means, yerr=stds, color=colors, alpha=0.8, capsize=3)
    for x, r in zip(xs, rows):
      ax.scatter([x] * len(r["test"]["values"]), [100 * v for v in r["test"]["values"]], s=8,
                 color="black", zorder=3)
    lo = max(0.0, float(np.min(means - stds)) - 8.0)
    ax.set_ylim(lo, min(100.0, float(np.max(means + stds)) + 3.0))
    ax.set_xticks(xs, [r["name"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("test accuracy (%)")
  fig.savefig(path, dpi=110)
  return path


# ------------------------------------------------------------------ entry point


def run(config: Any, workdir: str | None = None) -> dict:
  """Run the benchmark described by ``config`` (see ``configs/kd_bench.py``); returns the results."""
  t_start = time.time()
  workdir = _check_workdir(workdir or _get(config, "workdir", ""), bool(_get(config, "overwrite", False)))
  seeds = [int(s) for s in config.seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise KfuseError(f"seeds: need distinct seeds, got {seeds}")
  specs = _method_specs(config.methods)       # fail fast on typos, before training
  datasets = _to_dict(config.datasets)
  for name, dcfg in datasets.items():
    for field in ("teacher", "student", "teacher_steps", "student_steps", "methods"):
      if field not in dcfg:
        raise KfuseError(f"datasets.{name}.{field}: missing")
    for m in dcfg["methods"]:
      if m not in specs:
        raise KfuseError(f"datasets.{name}.methods: {m!r} is not in config.methods")
      if specs[m]["student"] not in dcfg:
        raise KfuseError(f"methods.{m}.student: dataset {name!r} has no model {specs[m]['student']!r}")
  runner = _Runner(config)
  root = jax.random.key(int(_get(config, "seed", 0)))
  results: dict[str, Any] = {"students": {}}
  timing = {}
  artefacts = {}
  for i, (name, dcfg) in enumerate(datasets.items()):
    t = time.time()
    results["students"][name], art = _students(runner, name, dcfg, specs, seeds,
                                               jax.random.fold_in(root, i))
    artefacts[name] = art
    timing[f"students/{name}"] = time.time() - t
  fmn = _to_dict(_get(config, "forget_me_not", None))
  if fmn and fmn.get("enabled", True):
    t = time.time()
    results["forget_me_not"] = _forget_me_not(runner, fmn, seeds, jax.random.fold_in(root, 100))
    timing["forget_me_not"] = time.time() - t
  fg = _to_dict(_get(config, "fantastic_gains", None))
  if fg and fg.get("enabled", True):
    if fg["dataset"] not in artefacts:
      raise KfuseError(f"fantastic_gains.dataset: {fg['dataset']!r} is not in config.datasets")
    t = time.time()
    results["fantastic_gains"] = _fantastic_gains(runner, fg, artefacts[fg["dataset"]],
                                                  jax.random.fold_in(root, 200))
    timing["fantastic_gains"] = time.time() - t

  # checkpoints of seed 0 (teachers, students): small models, Orbax
  t = time.time()
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for name, art in artefacts.items():
    s0 = art[seeds[0]]
    train.save_checkpoint(os.path.join(ckpt_dir, f"{name}_teacher"), s0["teacher"][1])
    train.save_checkpoint(os.path.join(ckpt_dir, f"{name}_students"),
                          {m: v for m, (_, v) in s0["students"].items()})
  timing["checkpoints"] = time.time() - t
  timing["total"] = time.time() - t_start
  results.update({"timing_s": timing, "config": _plain(_to_dict(config)),
                  "devices": [str(d) for d in jax.devices()]})
  tables = markdown_tables(results)
  _write_atomic(os.path.join(workdir, RESULTS_JSON), json.dumps(results, indent=2))
  _write_atomic(os.path.join(workdir, RESULTS_MD), f"# kd_bench\n\n{tables}\n")
  plot(results, os.path.join(workdir, PLOT_PNG))
  print(tables, flush=True)
  logging.info("kd_bench: wrote %s (%.1f s)", workdir, timing["total"])
  return results
