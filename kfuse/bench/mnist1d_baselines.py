"""MNIST-1D baselines (Greydanus, 2020): logistic regression, MLP and CNN test accuracy.

    python -m kfuse.main --config=configs/mnist1d_baselines.py

Reproduces the paper's headline table (logistic regression 32 %, MLP 68 %,
CNN 94 % test accuracy) with kfuse's data, models and training loop:
MNIST-1D regenerated offline by ``mnist1d.data.make_dataset`` with its
default arguments (5,000 signals, the package's 4,000 / 1,000 train / test
split; no validation split), each model trained from scratch for a fixed
number of steps and scored on the test split *after the last step* (no
early stopping on the test set), over several seeds.

Outputs under the workdir: ``results.json`` (atomic), ``results.md`` (the
table) and one Orbax checkpoint per model and seed
(``checkpoints/<label>_seed<s>``). The table is printed at the end.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from kfuse import models, optim, train
from kfuse.bench.common import check_workdir, get as _get, plain as _plain, to_dict as _to_dict
from kfuse.bench.common import write_json as _write_json_atomic, write_text as _write_text_atomic
from kfuse.data import load
from kfuse.tree import KfuseError

__all__ = ["run", "train_one", "markdown_table", "check_config"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

_RUN_SCHEMA = {"model": {"name": str}, "steps": int, "batch_size": int,
               "optimizer": optim.OPTIMIZER_SCHEMA, "paper": (float, type(None)), "log_every": int}
_SCHEMA = {"seeds": list, "data": {"name": str, "val_fraction": float, "normalize": bool,
                                   "cache_dir": (str, type(None))},
           "models": dict, "eval_batch_size": int, "workdir": str, "overwrite": bool,
           "progress": bool}


def _as_config(config: Any) -> ml_collections.ConfigDict:
  if isinstance(config, Mapping):
    return ml_collections.ConfigDict(dict(config), sort_keys=False)
  return config


def check_config(config: Any) -> list[dict]:
  """Validate the config's fields and types; return ``[{label, **run}]`` in table order."""
  config = _as_config(config)
  optim.check_types(config, _SCHEMA, "config")
  seeds = list(config.seeds)
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise KfuseError(f"config.seeds: expected a non-empty list of ints, got {seeds!r}")
  runs = []
  for label, spec in _to_dict(config.models).items():
    spec = dict(spec)
    unknown = sorted(set(spec) - set(_RUN_SCHEMA))
    if unknown:
      raise KfuseError(f"models.{label}.{unknown[0]}: unknown field (expected {', '.join(_RUN_SCHEMA)})")
    missing = [f for f in ("model", "steps", "batch_size", "optimizer") if f not in spec]
    if missing:
      raise KfuseError(f"models.{label}.{missing[0]}: missing")
    optim.check_types(spec, _RUN_SCHEMA, f"models.{label}")
    if spec["steps"] <= 0 or spec["batch_size"] <= 0:
      raise KfuseError(f"models.{label}.steps: steps and batch_size must be positive")
    model_kw = dict(_to_dict(spec["model"]))
    name = model_kw.pop("name", None)
    if name is None:
      raise KfuseError(f"models.{label}.model.name: missing")
    try:
      models.get_model(name, num_classes=10, **model_kw)  # unknown names / fields / types
      optim.make_optimizer(spec["optimizer"], spec["steps"])
    except KfuseError as e:
      raise KfuseError(f"models.{label}.{e}") from None
    if spec.get("paper", 0) is None:
      spec.pop("paper")
    runs.append({"label": label, **spec, "model": {"name": name, **model_kw}})
  if not runs:
    raise KfuseError("config.models: no model to train")
  return runs


def train_one(run_spec: Mapping, ds, seed: int, *, eval_batch_size: int = 1000,
              progress: bool = True, checkpoint_dir: str | None = None) -> dict:
  """Train ``run_spec``'s model on ``ds`` from seed ``seed``; return test metrics and state."""
  model_kw = dict(run_spec["model"])
  model = models.get_model(model_kw.pop("name"), num_classes=ds.num_classes, **model_kw)
  k_init, k_data, k_drop = jax.random.split(jax.random.key(seed), 3)
  variables = jax.jit(model.init)(k_init, ds.x_train[:1])
  steps = int(run_spec["steps"])
  t = time.time()
  state, history = train.train_classifier(
      model, variables, ds.x_train, ds.y_train, optimizer=run_spec["optimizer"], steps=steps,
      batch_size=int(run_spec["batch_size"]), data_key=k_data, dropout_key=k_drop,
      desc=f"{run_spec['label']}[seed {seed}]", log_every=int(run_spec.get("log_every", 500)),
      progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=0,
      meta={"model": run_spec["model"], "seed": seed, "steps": steps})
  seconds = time.time() - t
  predict = train.make_predict(model)
  test = train.evaluate(predict, state.variables, ds.x_test, ds.y_test, eval_batch_size)
  tr = train.evaluate(predict, state.variables, ds.x_train, ds.y_train, eval_batch_size)
  n_params = int(sum(np.size(a) for a in jax.tree.leaves(state.params)))
  return {"seed": seed, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
          "train_accuracy": tr["accuracy"], "params": n_params, "seconds": seconds,
          "history": history, "variables": state.variables}


def markdown_table(results: Mapping) -> str:
  """Paper vs measured test accuracy (%), mean ± std over seeds, one row per model."""
  seeds = results["seeds"]
  lines = [f"| Model | Paper | kfuse (mean ± std, {len(seeds)} seeds) | Δ | Train acc. | Params |"
           " Steps | Setup |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in results["rows"]:
    paper = r.get("paper")
    mean, std = 100 * r["test_mean"], 100 * r["test_std"]
    delta = f"{mean - paper:+.1f}" if paper is not None else "-"
    lines.append(f"| {r['label']} | {paper if paper is not None else '-'} | **{mean:.1f}** ± {std:.1f}"
                 f" | {delta} | {100 * r['train_mean']:.1f} | {r['params']:,} | {r['steps']}"
                 f" | {r['setup']} |")
  return "\n".join(lines)


def _setup(spec: Mapping) -> str:
  m = dict(spec["model"])
  name = m.pop("name")
  opt = dict(spec["optimizer"])
  arch = ", ".join(f"{k}={v}" for k, v in m.items())
  return (f"`{name}`{'(' + arch + ')' if arch else ''}; {opt.get('name', 'adam')}"
          f" lr {opt.get('learning_rate', 1e-3):g}, batch {spec['batch_size']}")


def run(config: Any, workdir: str | None = None) -> dict:
  """Train every model of ``config.models`` for every seed; write and print the table."""
  t0 = time.time()
  config = _as_config(config)
  runs = check_config(config)
  workdir = check_workdir(workdir or _get(config, "workdir", "") or "workdirs/mnist1d_baselines",
                          bool(_get(config, "overwrite", False)), RESULTS_JSON)
  data_cfg = _to_dict(config.data)
  ds = load(data_cfg.get("name", "mnist1d"), seed=0,
            val_fraction=data_cfg.get("val_fraction", 0.0),
            normalize=bool(data_cfg.get("normalize", True)),
            cache=data_cfg.get("cache_dir") or None)
  seeds = [int(s) for s in config.seeds]
  progress = bool(_get(config, "progress", True))
  rows = []
  for spec in runs:
    per_seed = []
    for seed in seeds:
      ckpt = os.path.join(workdir, "checkpoints", f"{spec['label']}_seed{seed}")
      out = train_one(spec, ds, seed, eval_batch_size=int(config.eval_batch_size),
                      progress=progress, checkpoint_dir=ckpt)
      out.pop("variables")
      per_seed.append(out)
      logging.warning("mnist1d_baselines: %s seed %d test %.3f (%.0f s)", spec["label"], seed,
                      out["test_accuracy"], out["seconds"])
    acc = np.array([r["test_accuracy"] for r in per_seed])
    rows.append({"label": spec["label"], "paper": spec.get("paper"),
                 "test_mean": float(acc.mean()), "test_std": float(acc.std()),
                 "train_mean": float(np.mean([r["train_accuracy"] for r in per_seed])),
                 "params": per_seed[0]["params"], "steps": int(spec["steps"]),
                 "setup": _setup(spec), "spec": _plain(spec), "seeds": per_seed})
  results = {"dataset": ds.name, "sizes": ds.sizes(), "seeds": seeds, "rows": rows,
             "seconds": time.time() - t0, "config": _plain(_to_dict(config)),
             "devices": [str(d) for d in jax.devices()]}
  table = markdown_table(results)
  _write_json_atomic(os.path.join(workdir, RESULTS_JSON), results)
  _write_text_atomic(os.path.join(workdir, RESULTS_MD),
                     f"# MNIST-1D baselines\n\nTest accuracy (%), {ds.sizes()['train']} train /"
                     f" {ds.sizes()['test']} test.\n\n{table}\n")
  print(table, flush=True)
  return results
