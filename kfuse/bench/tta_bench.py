"""Test-time adaptation benchmark: MNIST-1D-C and 16x16 image-C, the CIFAR-10-C protocols at toy scale.

    python -m kfuse.main --config=configs/tta_bench.py          # full (~8 min on 2 idle cores)
    python -m kfuse.main --config=configs/tta_bench.py:quick    # <= 3 min
    python -m kfuse.main --config=configs/tta_bench.py:images   # glyph digits, CIFAR-10-C corruptions, 3 seeds

With ``data.name`` an image task of `kfuse.data.image_tasks` (e.g. ``glyph_digits``), the
pool is the task's test split, corrupted by the 15 CIFAR-10-C corruptions of
`kfuse.data.image_corruptions`, and the source model is a 2-D BatchNorm ResNet (``cnn2d``);
CoTTA / RoTTA then use 2-D augmentations. ``config.seeds`` repeats everything per seed
(corruption draws, source model, stream orders) and reports mean ± std (`aggregate`).

Pipeline (`run`):

1. data (`kfuse.data.corruptions`): the clean MNIST-1D training split, and a
   test pool (by default 10,000 fresh signals from the generator, like
   CIFAR-10-C's 10,000 images) corrupted by each of the 15 corruptions at
   ``severity`` (5);
2. a ResNet-style BatchNorm CNN (``cnn1d``) trained on clean data only (the
   "source" model), or restored from ``config.source_checkpoint``;
3. every method of ``config.methods`` (`kfuse.adapt` names + optimizer +
   parameters) on the stream of all corruptions (`kfuse.adapt.evaluate_stream`),
   under each protocol of
   ``config.protocols``: ``reset_per_shift`` (reset to the source before every
   corruption, Tent's setting) and ``continual`` (reset once, CoTTA's /
   the benchmark repository's setting). Predictions are online: a batch is
   scored with the logits the method returns for it;
4. a long continual stream (``config.long``): the corruption sequence repeated
   ``rounds`` times without reset, error per visit (does a method degrade?);
5. ``results.json`` (atomic), ``results.md`` (tables), ``tta_bench.png``
   (error along the continual and long streams) and an Orbax checkpoint of the
   source model under the workdir; the tables are printed.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from kfuse import adapt, models, train
from kfuse.adapt import augment as aug_lib
from kfuse.adapt import kff as kff_lib
from kfuse.data import corruptions as corr
from kfuse.data import image_corruptions as icorr
from kfuse.bench.common import (
    to_dict as _to_dict, plain as _plain, check_workdir as _check_workdir,
    write_text as _write_atomic, method_entries)
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["run", "markdown_tables", "plot", "method_specs", "train_source", "load_data", "aggregate"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "tta_bench.png"


# ------------------------------------------------------------------ config helpers


def method_specs(methods_cfg: Any) -> list[dict]:
  """Validate ``config.methods``: ``[{label, method, optimizer, params}]``.

  ``config.methods.<label>`` holds ``name`` (a `kfuse.adapt` method; default the
  label), ``optimizer`` (dict; default the method's registered paper default) and ``params``.
  """
  specs = []
  for label, entry in method_entries(methods_cfg, ("name", "optimizer", "params")):
    name = entry.get("name") or label
    if name not in adapt.names():
      raise KfuseError(f"methods.{label}.name: unknown TTA method {name!r};"
                       f" known: {', '.join(adapt.names())}")
    params = _to_dict(entry.get("params"))
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()}
    opt = entry.get("optimizer", "default")
    opt = _to_dict(opt) if opt not in (None, "default") else opt
    specs.append({"label": label, "method": name, "optimizer": opt, "params": params})
  if not specs:
    raise KfuseError("methods: no method to run")
  return specs


# ------------------------------------------------------------------ source model


def train_source(model, ds, cfg: Mapping, key: jax.Array, progress: bool) -> tuple[PyTree, list]:
  """Train ``model`` on the clean training split; returns ``(variables, history)``."""
  k_init, k_data, k_drop = jax.random.split(key, 3)
  state, history = train.train_classifier(
      model, model.init(k_init, ds.x_train[:2]), ds.x_train, ds.y_train,
      optimizer=cfg["optimizer"], steps=int(cfg["steps"]), batch_size=int(cfg["batch_size"]),
      data_key=k_data, dropout_key=k_drop, desc="source", log_every=int(cfg.get("log_every", 500)),
      progress=progress)
  return jax.device_get(state.variables), history


# ------------------------------------------------------------------ methods


def _fisher_batches(ds, cfg: Mapping) -> list[np.ndarray]:
  fisher = cfg.get("fisher") or {}
  n, bs = int(fisher.get("samples", 2000)), int(fisher.get("batch_size", 64))
  x = ds.x_train[:n]
  return [x[i:i + bs] for i in range(0, len(x) - bs + 1, bs)]


_AUGMENTS = {"cotta": aug_lib.COTTA, "rotta": aug_lib.ROTTA}


def _build(spec: dict, model, apply_kwargs: Mapping, spatial_dims: int = 1) -> adapt.Adapter:
  """``spatial_dims`` 2 (images): CoTTA / RoTTA get the 2-D version of their augmentation."""
  params = dict(spec["params"])
  if spatial_dims != 1 and spec["method"] in _AUGMENTS and "augment" not in params:
    params["augment"] = aug_lib.make_augment(_AUGMENTS[spec["method"]], spatial_dims=spatial_dims)
  try:
    return adapt.make(spec["method"], model.apply, optimizer=spec["optimizer"],
                      apply_kwargs=dict(apply_kwargs), **params)
  except KfuseError as e:
    raise KfuseError(f"methods.{spec['label']}: {e}") from None


# ------------------------------------------------------------------ data


def _image_data(data_cfg: Mapping, seed: int, cache: str | None):
  """An image task of `kfuse.data.image_tasks` and its CIFAR-10-C-style corruptions.

  Pixels are clipped to [0, 1], corrupted by `kfuse.data.image_corruptions` (seeded by
  ``seed``), then standardized with one mean and std of the clean training images.
  """
  from kfuse.data import image_tasks, sources
  sizes = tuple(int(v) for v in (data_cfg.get("sizes") or image_tasks.DEFAULT_SIZES))
  task = image_tasks.load_task(data_cfg["name"], seed=int(data_cfg.get("data_seed", 0)),
                               sizes=sizes, cache=cache)
  clip = lambda a: np.clip(a, 0.0, 1.0).astype(np.float32)
  m, sd = float(clip(task.x_train).mean()), float(clip(task.x_train).std())
  norm = lambda a: ((clip(a) - m) / sd).astype(np.float32)
  ds = sources.Dataset(task.name, norm(task.x_train), task.y_train, norm(task.x_val), task.y_val,
                       norm(task.x_test), task.y_test, task.num_classes, task.shape)
  names = list(data_cfg.get("corruptions") or icorr.IMAGE_CORRUPTIONS)
  severity = int(data_cfg.get("severity", 5))
  pool = clip(task.x_test)
  domains = [corr.Domain(n, severity, norm(icorr.corrupt_images(pool, n, severity, seed)),
                         task.y_test) for n in names]
  return ds, domains, norm(pool), task.y_test, names


def load_data(data_cfg: Mapping, seed: int, cache: str | None):
  """``(source dataset, corrupted domains, clean pool x, pool y, corruption names)``.

  ``data.name``: ``mnist1d`` / ``digits`` (`kfuse.data.corruptions`) or an image task of
  `kfuse.data.image_tasks` (16x16 images, the CIFAR-10-C corruptions of
  `kfuse.data.image_corruptions`).
  """
  from kfuse.data import image_tasks
  name = data_cfg.get("name", "mnist1d")
  if name in image_tasks.TASK_NAMES:
    return _image_data(data_cfg, seed, cache)
  names = list(data_cfg.get("corruptions") or corr.CORRUPTIONS)
  data = corr.clean_data(name, pool=data_cfg.get("pool", "fresh"),
                         pool_size=int(data_cfg.get("pool_size", 10_000)),
                         pool_seed=int(data_cfg.get("pool_seed", 1)), seed=seed, cache=cache)
  domains = corr.corrupted_domains(data, names, (int(data_cfg.get("severity", 5)),), seed=seed,
                                   cache=cache)
  return data.source, domains, data.standardize(data.pool_x), data.pool_y, names


# ------------------------------------------------------------------ reports


_SHORT = {"glass_blur": "glass", "zoom_blur": "zoom", "elastic_transform": "elast",
          "jpeg_compression": "jpeg", "gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul",
          "speckle_noise": "speck", "defocus_blur": "defoc", "gaussian_blur": "gblur",
          "motion_blur": "motn", "translate": "trans", "brightness": "brit", "contrast": "contr",
          "elastic": "elast", "pixelate": "pixel", "quantize": "quant", "occlusion": "occl"}


def markdown_tables(results: Mapping) -> str:
  """One error table per protocol (rows: methods; columns: corruptions + mean), plus the long stream."""
  names = results["corruptions"]
  short = {n: _SHORT.get(n, n) for n in names}
  out = []
  for protocol, rows in results["protocols"].items():
    out.append(f"**{protocol}** — severity {results['severity']} error (%), online predictions\n")
    head = ["Method"] + [short[n] for n in names] + ["**mean**"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join([" --- "] + [" ---: "] * (len(names) + 1)) + "|")
    for label, r in rows.items():
      several = "std" in r and len(r.get("seed_means") or ()) > 1      # one seed: no "± 0.0"
      mean = f"{r['mean']:.1f} ± {r['std']:.1f}" if several else f"{r['mean']:.1f}"
      cells = [label] + [f"{e:.1f}" for e in r["errors"]] + [f"**{mean}**"]
      out.append("| " + " | ".join(cells) + " |")
    out.append("")
  long = results.get("long")
  if long:
    rounds = long["rounds"]
    out.append(f"**long continual stream** — {rounds} rounds of the {len(names)} corruptions,"
               f" {long['samples_per_domain']} samples per visit; mean error (%) per round\n")
    head = ["Method"] + [f"r{i + 1}" for i in range(rounds)] + ["last − first"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join([" --- "] + [" ---: "] * (rounds + 1)) + "|")
    for label, r in long["methods"].items():
      pr = r["per_round"]
      out.append("| " + " | ".join([label] + [f"{e:.1f}" for e in pr] + [f"{pr[-1] - pr[0]:+.1f}"]) + " |")
    out.append("")
  return "\n".join(out)


def plot(results: Mapping, path: str) -> str:
  """Error along the continual stream (per corruption) and along the long stream (Agg)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  long = results.get("long")
  fig = Figure(figsize=(13, 8.5 if long else 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  names = results["corruptions"]
  cont = results["protocols"].get("continual") or next(iter(results["protocols"].values()))
  ax = fig.add_subplot(2 if long else 1, 1, 1)
  for label, r in cont.items():
    ax.plot(np.arange(len(names)), r["errors"], marker="o", ms=3, label=f"{label} ({r['mean']:.1f})")
  ax.set_xticks(np.arange(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right",
                fontsize=8)
  ax.set_ylabel("error (%)")
  proto = "continual" if "continual" in results["protocols"] else next(iter(results["protocols"]))
  ax.set_title(f"tta_bench: {proto} stream, severity {results['severity']} (mean in legend)")
  ax.legend(fontsize=7, ncols=4)
  ax.grid(alpha=0.3)
  if long:
    ax2 = fig.add_subplot(2, 1, 2)
    n = len(names)
    for label, r in long["methods"].items():
      e = np.asarray(r["errors"])
      ax2.plot(np.arange(len(e)), e, lw=0.8, alpha=0.35)
      centers = n * np.arange(long["rounds"]) + (n - 1) / 2
      ax2.plot(centers, r["per_round"], marker="s", ms=4, color=ax2.lines[-1].get_color(),
               label=f"{label}")
    for i in range(1, long["rounds"]):
      ax2.axvline(i * n - 0.5, color="gray", lw=0.5, ls=":")
    ax2.set_xlabel("domain visit (faint: per corruption; squares: round mean)")
    ax2.set_ylabel("error (%)")
    ax2.set_title(f"long continual stream: {long['rounds']} rounds, no reset")
    ax2.legend(fontsize=7, ncols=4)
    ax2.grid(alpha=0.3)
  fig.savefig(path, dpi=110)
  return path


# ------------------------------------------------------------------ entry point


def _run_seed(config: Any, seed: int, workdir: str, ckpt_name: str) -> dict:
  """One seed of the benchmark (data draws, source model, every stream); writes the checkpoint."""
  t_start = time.time()
  get = lambda k, d=None: config.get(k, d) if hasattr(config, "get") else getattr(config, k, d)
  progress = bool(get("progress", True))
  data_cfg, model_cfg = _to_dict(config.data), _to_dict(config.model)
  src_cfg, long_cfg = _to_dict(config.source), _to_dict(get("long"))
  specs = method_specs(config.methods)
  protocols = list(get("protocols", corr.PROTOCOLS))
  for p in protocols:
    if p not in corr.PROTOCOLS:
      raise KfuseError(f"protocols: unknown protocol {p!r}; known: {', '.join(corr.PROTOCOLS)}")
  severity = int(data_cfg.get("severity", 5))
  batch_size = int(get("batch_size", 200))
  apply_kwargs = {"train": False}
  key = jax.random.key(seed)
  k_src, k_methods, k_long = jax.random.split(key, 3)
  timing = {}

  # 1. data
  t = time.time()
  cache = data_cfg.get("cache_dir") or None
  source_ds, domains, clean_x, pool_y, corruptions = load_data(data_cfg, seed, cache)
  spatial_dims = len(source_ds.shape)
  timing["data"] = time.time() - t
  logging.info("tta_bench: %d corruptions x %d samples, batch %d", len(domains), len(pool_y),
               batch_size)

  # 2. source model
  t = time.time()
  mk = dict(model_cfg)
  model = models.get_model(mk.pop("name", "cnn1d"), num_classes=source_ds.num_classes, **mk)
  ckpt = get("source_checkpoint", "") or ""
  history = []
  if ckpt:
    like = model.init(jax.random.key(0), source_ds.x_train[:2])
    variables = train.restore_checkpoint(ckpt, like)
  else:
    variables, history = train_source(model, source_ds, src_cfg, k_src, progress)
  predict = train.make_predict(model)
  clean = {
      "val_accuracy": train.evaluate(predict, variables, source_ds.x_val, source_ds.y_val)["accuracy"],
      "test_accuracy": train.evaluate(predict, variables, source_ds.x_test, source_ds.y_test)["accuracy"],
      "pool_accuracy": train.evaluate(predict, variables, clean_x, pool_y)["accuracy"],
  }
  ckpt_path = train.save_checkpoint(os.path.join(workdir, "checkpoints", ckpt_name), variables)
  timing["source"] = time.time() - t
  logging.info("source model: clean pool accuracy %.4f", clean["pool_accuracy"])

  fisher = None
  if any(s["method"] == "eata" for s in specs):
    fisher = adapt.fisher_information(model.apply, variables, _fisher_batches(source_ds, src_cfg),
                                      apply_kwargs=apply_kwargs)

  # 3. protocols
  adapters = {s["label"]: _build(s, model, apply_kwargs, spatial_dims) for s in specs}
  if any(s["method"] == "kff" for s in specs):
    # KFF's source statistics: CLS features of the clean samples EATA's Fisher uses
    stats = kff_lib.source_statistics(model.apply, variables, _fisher_batches(source_ds, src_cfg),
                                      apply_kwargs=apply_kwargs)
    for s in specs:
      if s["method"] == "kff":
        a = adapters[s["label"]]
        adapters[s["label"]] = a._replace(init=functools.partial(a.init, source_stats=stats))
  runners = {label: adapt.make_runner(a) for label, a in adapters.items()}
  tables: dict[str, dict] = {}
  for protocol in protocols:
    t = time.time()
    stream = corr.make_stream(domains, batch_size, protocol=protocol, seed=seed)
    rows = {}
    for j, s in enumerate(specs):
      r = adapt.evaluate_stream(adapters[s["label"]], variables, stream,
                                jax.random.fold_in(k_methods, j), fisher=fisher,
                                runner=runners[s["label"]])
      rows[s["label"]] = r
      logging.info("%s %s: mean error %.2f (%.1f s)", protocol, s["label"], r["mean"], r["seconds"])
      if progress:
        print(f"  seed {seed} {protocol:15s} {s['label']:10s} mean error {r['mean']:5.1f}%"
              f"  ({r['seconds']:.1f} s)", flush=True)
    tables[protocol] = rows
    timing[protocol] = time.time() - t

  # 4. long continual stream
  long = None
  rounds = int(long_cfg.get("rounds", 0) or 0)
  if rounds > 0:
    t = time.time()
    n_long = int(long_cfg.get("samples_per_domain", 2000))
    sub = [corr.Domain(d.name, d.severity, d.x[:n_long], d.y[:n_long]) for d in domains]
    stream = corr.make_stream(sub, batch_size, protocol="continual",
                              repeats=rounds, seed=seed + 1)
    labels = list(long_cfg.get("methods") or [s["label"] for s in specs])
    unknown = [m for m in labels if m not in adapters]
    if unknown:
      raise KfuseError(f"long.methods: {unknown[0]!r} is not a label of config.methods")
    out = {}
    for j, label in enumerate(labels):
      r = adapt.evaluate_stream(adapters[label], variables, stream, jax.random.fold_in(k_long, j),
                                fisher=fisher, runner=runners[label])
      e = np.asarray(r["errors"]).reshape(rounds, len(domains))
      r["per_round"] = [float(v) for v in e.mean(1)]
      out[label] = r
      if progress:
        print(f"  seed {seed} long x{rounds:<3d}  {label:10s} rounds {r['per_round'][0]:5.1f}% ->"
              f" {r['per_round'][-1]:5.1f}%  ({r['seconds']:.1f} s)", flush=True)
    long = {"rounds": rounds, "samples_per_domain": n_long, "methods": out}
    timing["long"] = time.time() - t
  timing["total"] = time.time() - t_start

  return {
      "dataset": source_ds.name,
      "seed": seed,
      "severity": severity,
      "corruptions": corruptions,
      "batch_size": batch_size,
      "samples_per_domain": int(len(pool_y)),
      "clean": clean,
      "source_history": history,
      "source_checkpoint": ckpt_path,
      "protocols": tables,
      "long": long,
      "timing_s": timing,
  }


def _mean_std(values) -> tuple:
  """Mean and sample standard deviation (ddof 1; 0 for one value) over the first axis."""
  a = np.asarray(values, np.float64)
  return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(a[0]))


def aggregate(per_seed: list[dict]) -> dict:
  """Seeds -> one result: per-corruption mean errors, and mean ± std over seeds of each method's
  mean error (``mean``, ``std``; ``seed_means``), the long stream's rounds likewise."""
  first = per_seed[0]
  out = {k: first[k] for k in ("dataset", "severity", "corruptions", "batch_size",
                               "samples_per_domain")}
  out["seeds"] = [r["seed"] for r in per_seed]
  acc = [r["clean"]["pool_accuracy"] for r in per_seed]
  out["clean"] = {"pool_accuracy": float(np.mean(acc)), "pool_accuracy_per_seed": acc}
  tables = {}
  for protocol, rows in first["protocols"].items():
    tables[protocol] = {}
    for label in rows:
      runs = [r["protocols"][protocol][label] for r in per_seed]
      e_mean, e_std = _mean_std([x["errors"] for x in runs])
      means = [x["mean"] for x in runs]
      m, sd = _mean_std(means)
      tables[protocol][label] = {"errors": e_mean.tolist(), "errors_std": e_std.tolist(),
                                 "mean": float(m), "std": float(sd), "seed_means": means,
                                 "seconds": float(sum(x["seconds"] for x in runs))}
  out["protocols"] = tables
  if first.get("long"):
    lg = first["long"]
    methods = {}
    for label in lg["methods"]:
      runs = [r["long"]["methods"][label] for r in per_seed]
      pr_mean, pr_std = _mean_std([x["per_round"] for x in runs])
      methods[label] = {"errors": _mean_std([x["errors"] for x in runs])[0].tolist(),
                        "per_round": pr_mean.tolist(), "per_round_std": pr_std.tolist()}
    out["long"] = {"rounds": lg["rounds"], "samples_per_domain": lg["samples_per_domain"],
                   "methods": methods}
  else:
    out["long"] = None
  out["per_seed"] = per_seed
  out["timing_s"] = {"total": float(sum(r["timing_s"]["total"] for r in per_seed))}
  return out


def run(config: Any, workdir: str | None = None) -> dict:
  """Run the benchmark described by ``config`` (see ``configs/tta_bench.py``); returns the results.

  ``config.seeds`` (non-empty) repeats the whole benchmark once per seed (data draws, source
  model, streams) and reports the mean ± std over seeds; otherwise ``config.seed`` runs once.
  """
  get = lambda k, d=None: config.get(k, d) if hasattr(config, "get") else getattr(config, k, d)
  workdir = _check_workdir(workdir or get("workdir", ""), bool(get("overwrite", False)))
  method_specs(config.methods)
  seeds = [int(s) for s in (get("seeds", ()) or ())]
  if seeds and (get("source_checkpoint", "") or "") and len(seeds) > 1:
    raise KfuseError("source_checkpoint: one checkpoint cannot serve several seeds;"
                     " pass --config.seeds='()' or drop the checkpoint")
  if not seeds:
    results = _run_seed(config, int(get("seed", 0)), workdir, "source")
  else:
    results = aggregate([_run_seed(config, s, workdir, f"source_seed{s}") for s in seeds])
  results["config"] = _plain(_to_dict(config))
  results["devices"] = [str(d) for d in jax.devices()]
  severity, batch_size = results["severity"], results["batch_size"]
  clean = results["clean"]
  tables_md = markdown_tables(results)
  seeds_line = (f" Mean ± std over seeds {', '.join(map(str, results['seeds']))}."
                if "seeds" in results else "")
  _write_atomic(os.path.join(workdir, RESULTS_JSON), json.dumps(_plain(results), indent=2))
  _write_atomic(os.path.join(workdir, RESULTS_MD),
                f"# tta_bench: {results['dataset']}-C, severity {severity}\n\n"
                f"Source model clean accuracy: {100 * clean['pool_accuracy']:.1f}% on the test pool"
                f" ({results['samples_per_domain']} samples per corruption, batch {batch_size}).{seeds_line}\n\n"
                f"{tables_md}\n")
  plot(results, os.path.join(workdir, PLOT_PNG))
  print(tables_md, flush=True)
  logging.info("tta_bench: wrote %s (%.1f s)", workdir, results["timing_s"]["total"])
  return results
