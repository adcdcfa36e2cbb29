"""Pinned model pools: one pretrained backbone + one fine-tuned expert per task, on disk, hash-checked.

FusionBench (Tang et al. 2024) compares merging methods on *model pools*: the
same pretrained checkpoint and the same fine-tuned experts for every method.
`build_pool(config, path)` builds such a pool once for the image-task suite
(`kfuse.data.image_tasks`):

1. pretrain the backbone (``config.model``, e.g. a small ViT) with a
   throw-away head on the broad pretraining mixture (`image_tasks.pretrain_mixture`,
   disjoint from every task's data);
2. per task: a "zero-shot" head on the frozen pretrained backbone
   (``config.head``: ``prototype``, the default, a cosine classifier over class
   prototypes of a few labelled val examples, no training, the analogue of
   CLIP's zero-shot head; or ``probe``, a linear probe trained on the task's
   train split), then fine-tune the backbone from it with that
   head frozen (``finetune.trainable='backbone'``, as task arithmetic fine-tunes
   CLIP under its fixed zero-shot head; ``'all'``: LP-FT, Kumar et al. 2022)
   -> the task's expert;
3. save every model as an Orbax checkpoint and write ``manifest.json``::

     <path>/manifest.json        written last, atomically: its presence = a complete pool
     <path>/progress.json        during a build: finished parts and their hashes (resume)
     <path>/pretrained/          {'params': {'backbone', 'head'}}  (head: pretraining classes)
     <path>/probes/<task>/       {'params': {'head'}}              (zero-shot head, pretrained backbone)
     <path>/experts/<task>/      {'params': {'backbone', 'head'}}

The manifest holds the format, the resolved config (tasks, data seeds and
sizes, model, step counts, optimizers), the backbone (model name + arguments),
per task the data seed, split sizes, class names, accuracies measured at build
time, and the content hash (`tree_hash`: SHA-256 over every array's path,
dtype, shape and bytes) of each checkpoint.

`load_pool(path, expect=...)` restores the checkpoints, recomputes their
hashes and compares them with the manifest, the backbone with ``expect['model']``
and the task list with ``expect['tasks']``; any mismatch, a missing task or a
half-written pool (no manifest) raises `KfuseError` with one line.

Resume: a killed build leaves ``progress.json`` and the checkpoints finished
so far. Running `build_pool` again with the same config keeps every finished
part whose checkpoint still has its recorded hash and trains the rest; every
part is a pure function of the config and its own keys
(``fold_in(PRNGKey(seed), crc32(task))``), so a resumed pool equals an
uninterrupted one. A different config is refused, naming the first differing field.

Run ``python -m kfuse.bench.pool --path=DIR [--preset=sanity] [--tasks=a,b]``
to build a pool and print its accuracy table.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from kfuse import models, optim, train
from kfuse.bench.common import plain, to_dict
from kfuse.data import image_tasks
from kfuse.io.atomic import atomic_write_text
from kfuse.tree import KfuseError, flatten

PyTree = Any

__all__ = ["DEFAULT_CONFIG", "PRESETS", "Pool", "resolve_config", "tree_hash", "build_pool",
           "features", "shot_indices", "prototype_head",
           "load_pool", "pool_status", "markdown_table", "main"]

FORMAT = "kfuse-pool/1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "tasks": list(image_tasks.PROTOCOLS[8]),
    # pretrain_exclude_tasks: leave the pool's own tasks' generators out of the pretraining
    # mixture (held-out sources) instead of only drawing disjoint samples from them
    "data": {"seed": 0, "sizes": [2000, 500, 1000], "pretrain_per_domain": 1000,
             "pretrain_exclude_tasks": False},
    "model": {"name": "vit", "patch_size": 4, "dim": 64, "depth": 4, "num_heads": 4},
    "pretrain": {"steps": 2000, "batch_size": 128,
                 "optimizer": {"name": "adamw", "learning_rate": 1e-3, "schedule": "cosine",
                               "warmup_steps": 100}},
    # head: the task's "zero-shot" head, the pool's pretrained-model baseline, frozen while the
    # experts are fine-tuned. "prototype": a cosine classifier over class means of the
    # pretrained backbone's features on `shots` labelled val examples per class (no training;
    # the analogue of CLIP's text-prototype head); "probe": a linear probe trained on the
    # task's train split (`probe` below), far stronger than a zero-shot head.
    "head": {"kind": "prototype", "shots": 16, "temperature": 20.0},
    "probe": {"steps": 300, "batch_size": 128,
              "optimizer": {"name": "adam", "learning_rate": 1e-2}},
    # trainable "backbone": the probe head stays frozen during fine-tuning, as task arithmetic
    # fine-tunes CLIP with the zero-shot head fixed (Ilharco et al. 2023), so every model of
    # the pool shares each task's head; "all" also fine-tunes the head (LP-FT).
    "finetune": {"steps": 500, "batch_size": 128, "trainable": "backbone",
                 "optimizer": {"name": "adamw", "learning_rate": 5e-4, "schedule": "cosine",
                               "warmup_steps": 50}},
}
TRAINABLE = {"backbone": ("backbone",), "all": None}
HEADS = ("prototype", "probe")

PRESETS: dict[str, dict] = {
    "default": {},
    # the quick sanity measurement recorded in experiments/merge_bench/DESIGN.md
    "sanity": {"tasks": ["sk_digits", "letters_sans", "texture", "cellular_automata"],
               "model": {"name": "vit", "patch_size": 4, "dim": 48, "depth": 2, "num_heads": 4},
               "pretrain": {"steps": 1200}, "probe": {"steps": 200},
               "finetune": {"steps": 400}},
    # the CI-sized pool (tests)
    "tiny": {"tasks": ["grating_orientation", "shapes", "texture"],
             "data": {"sizes": [64, 32, 32], "pretrain_per_domain": 10},
             "model": {"name": "vit", "patch_size": 4, "dim": 16, "depth": 1, "num_heads": 2,
                       "mlp_ratio": 2},
             "pretrain": {"steps": 8, "batch_size": 32,
                          "optimizer": {"name": "adam", "learning_rate": 1e-3}},
             "probe": {"steps": 4, "batch_size": 32},
             "finetune": {"steps": 6, "batch_size": 32,
                          "optimizer": {"name": "adam", "learning_rate": 1e-3}}},
}

_PHASE = {"steps": int, "batch_size": int, "optimizer": optim.OPTIMIZER_SCHEMA}
SCHEMA = {"seed": int, "tasks": list, "model": dict,
          "data": {"seed": int, "sizes": list, "pretrain_per_domain": int,
                   "pretrain_exclude_tasks": bool},
          "head": {"kind": str, "shots": int, "temperature": float},
          "pretrain": _PHASE, "probe": _PHASE, "finetune": {**_PHASE, "trainable": str}}


# ------------------------------------------------------------------ config


_WHOLE = ("model", "optimizer")   # replaced as a unit by an override, never merged


def _merge(base: dict, over: Mapping) -> dict:
  out = copy.deepcopy(base)
  for k, v in over.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k not in _WHOLE:
      out[k] = _merge(out[k], v)
    else:
      out[k] = copy.deepcopy(plain(to_dict(v) if hasattr(v, "to_dict") else v))
  return out


def resolve_config(config: Mapping | None = None) -> dict:
  """``config`` over `DEFAULT_CONFIG` (``model`` is replaced whole), validated; a plain dict.

  Checks field types, unknown top-level fields, task names, the model name
  and its arguments, step counts and batch sizes; `KfuseError` names the field.
  """
  config = plain(to_dict(config)) if config is not None else {}
  unknown = sorted(set(config) - set(DEFAULT_CONFIG))
  if unknown:
    from kfuse.registry import suggest
    raise KfuseError(f"config.{unknown[0]}: unknown field{suggest(unknown[0], DEFAULT_CONFIG)};"
                     f" known: {', '.join(DEFAULT_CONFIG)}")
  cfg = _merge(DEFAULT_CONFIG, config)
  optim.check_types(cfg, SCHEMA, "config")
  if not cfg["tasks"]:
    raise KfuseError("config.tasks: expected at least one task")
  for t in cfg["tasks"]:
    image_tasks._spec(t)
  if len(set(cfg["tasks"])) != len(cfg["tasks"]):
    raise KfuseError(f"config.tasks: a task is listed twice: {cfg['tasks']}")
  image_tasks._check_sizes(cfg["data"]["sizes"])
  for phase in ("pretrain", "probe", "finetune"):
    for f in ("steps", "batch_size"):
      if cfg[phase][f] < 1:
        raise KfuseError(f"config.{phase}.{f}: must be >= 1, got {cfg[phase][f]}")
    try:
      optim.make_optimizer(cfg[phase]["optimizer"], int(cfg[phase]["steps"]))
    except KfuseError as e:
      raise KfuseError(f"config.{phase}.{e}") from None
  if cfg["finetune"]["trainable"] not in TRAINABLE:
    from kfuse.registry import suggest
    v = cfg["finetune"]["trainable"]
    raise KfuseError(f"config.finetune.trainable: unknown value {v!r}{suggest(v, TRAINABLE)};"
                     f" known: {', '.join(TRAINABLE)}")
  head = cfg["head"]
  if head["kind"] not in HEADS:
    from kfuse.registry import suggest
    raise KfuseError(f"config.head.kind: unknown value {head['kind']!r}{suggest(head['kind'], HEADS)};"
                     f" known: {', '.join(HEADS)}")
  if head["shots"] < 1 or not head["temperature"] > 0:
    raise KfuseError(f"config.head: shots must be >= 1 and temperature > 0, got {head['shots']}"
                     f" and {head['temperature']}")
  _backbone(cfg)  # the model name and its arguments
  models.get_model(cfg["model"]["name"], num_classes=2, **_model_kwargs(cfg))
  return cfg


def _model_kwargs(cfg: Mapping) -> dict:
  return {k: v for k, v in cfg["model"].items() if k != "name"}


def _backbone(cfg: Mapping) -> dict:
  """The backbone's identity: model name + every argument (the factory's defaults filled in)."""
  import inspect

  name = cfg["model"].get("name")
  if not isinstance(name, str):
    raise KfuseError(f"config.model.name: expected a model name, got {name!r}")
  try:
    fn = models.MODELS.get(name).fn
  except KfuseError as e:
    raise KfuseError(f"config.model.name: {e}") from None
  kwargs = _model_kwargs(cfg)
  models.check_kwargs(name, kwargs)
  full = {k: p.default for k, p in inspect.signature(fn).parameters.items()
          if k != "num_classes" and p.default is not inspect.Parameter.empty}
  full.update(kwargs)
  return {"name": name, "kwargs": plain(full)}


def _first_difference(a: Any, b: Any, where: str) -> str | None:
  """``'field: a != b'`` for the first differing leaf of two JSON-like values, else None."""
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f"{where}.{k}: {'missing' if k not in a else a[k]!r} != {'missing' if k not in b else b[k]!r}"
      d = _first_difference(a[k], b[k], f"{where}.{k}")
      if d:
        return d
    return None
  return None if a == b else f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------ hashing / io


def tree_hash(tree: PyTree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (sorted by path): a checkpoint's content."""
  h = hashlib.sha256()
  for path, leaf in sorted(flatten(tree).items()):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{path}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise KfuseError(f"pool: cannot read {what} {path}: {str(e).splitlines()[0]}") from None
  if not isinstance(data, dict):
    raise KfuseError(f"pool: {what} {path} is not a JSON object")
  return data


def _write_json(path: str, data: Mapping) -> None:
  atomic_write_text(path, json.dumps(plain(data), indent=1, sort_keys=True) + "\n")


def _restore(root: str, rel: str) -> PyTree:
  """Restore checkpoint ``root/rel`` as host NumPy arrays; one line on any failure."""
  path = os.path.join(root, rel)
  if not os.path.isdir(path):
    raise KfuseError(f"pool {root}: checkpoint {rel} is missing")
  try:
    tree = train.restore_checkpoint(path)
  except KfuseError:
    raise
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
    raise KfuseError(f"pool {root}: checkpoint {rel} cannot be read ({type(e).__name__}: {msg})") from None
  return jax.tree.map(np.asarray, tree)


def _verified(root: str, rel: str, sha: str) -> PyTree:
  tree = _restore(root, rel)
  got = tree_hash(tree)
  if got != sha:
    raise KfuseError(f"pool {root}: checkpoint {rel} has content hash {got[:12]}… but the manifest"
                     f" records {str(sha)[:12]}… (modified or corrupt)")
  return tree


def _save(root: str, rel: str, tree: PyTree) -> str:
  """Save ``tree`` at ``root/rel`` (Orbax writes atomically), re-read it, return its hash."""
  train.save_checkpoint(os.path.join(root, rel), tree, force=True)
  want = tree_hash(tree)
  got = tree_hash(_restore(root, rel))
  if got != want:
    raise KfuseError(f"pool {root}: checkpoint {rel} does not read back what was written")
  return want


# ------------------------------------------------------------------ training


_STEPS: dict[str, tuple] = {}   # one compiled step per (model, classes, phase settings)


def _step(cfg: Mapping, phase: str, num_classes: int, trainable):
  key = json.dumps([cfg["model"], num_classes, cfg[phase], trainable], sort_keys=True)
  if key not in _STEPS:
    model = _model(cfg, num_classes)
    tx = optim.make_optimizer(cfg[phase]["optimizer"], int(cfg[phase]["steps"]), trainable)
    _STEPS[key] = (tx, train.make_train_step(model, tx, trainable))
  return _STEPS[key]


def _model(cfg: Mapping, num_classes: int):
  return models.get_model(cfg["model"]["name"], num_classes=int(num_classes), **_model_kwargs(cfg))


def _fit(cfg, phase, variables, x, y, num_classes, key, trainable=None, progress=False):
  k_data, k_drop = jax.random.split(key)
  state, _ = train.train_classifier(
      _model(cfg, num_classes), variables, x, y, optimizer=cfg[phase]["optimizer"],
      steps=int(cfg[phase]["steps"]), batch_size=min(int(cfg[phase]["batch_size"]), len(y)),
      data_key=k_data, dropout_key=k_drop, trainable=trainable,
      step=_step(cfg, phase, num_classes, trainable), desc=phase, progress=progress,
      log_every=max(1, int(cfg[phase]["steps"])))
  return jax.tree.map(np.asarray, state.variables)


_PREDICT: dict[str, Any] = {}


def _accuracy(cfg, variables, num_classes, x, y) -> float:
  key = json.dumps([cfg["model"], num_classes], sort_keys=True)
  if key not in _PREDICT:
    _PREDICT[key] = train.make_predict(_model(cfg, num_classes))
  predict = _PREDICT[key]
  return round(train.evaluate(predict, variables, x, y)["accuracy"], 4)


def _task_key(cfg: Mapping, task: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(int(cfg["seed"])), zlib.crc32(task.encode()))


def _pretrain(cfg: Mapping, cache: str | None, progress: bool) -> tuple[dict, dict]:
  exclude = cfg["tasks"] if cfg["data"]["pretrain_exclude_tasks"] else ()
  data = image_tasks.pretrain_mixture(seed=int(cfg["data"]["seed"]),
                                      per_domain=int(cfg["data"]["pretrain_per_domain"]),
                                      cache=cache, exclude=exclude)
  key = jax.random.fold_in(jax.random.PRNGKey(int(cfg["seed"])), 0)
  k_init, k_fit = jax.random.split(key)
  model = _model(cfg, data.num_classes)
  variables = jax.tree.map(np.asarray, model.init(k_init, data.x_train[:1]))
  variables = _fit(cfg, "pretrain", variables, data.x_train, data.y_train, data.num_classes, k_fit,
                   progress=progress)
  info = {"num_classes": data.num_classes, "classes": list(image_tasks.pretrain_domains(exclude)),
          "train_size": len(data.y_train), "val_size": len(data.y_val),
          "val_accuracy": _accuracy(cfg, variables, data.num_classes, data.x_val, data.y_val)}
  return variables, info


_FEATURES: dict[str, Any] = {}


def features(cfg: Mapping, backbone: PyTree, x: np.ndarray, batch: int = 1000) -> np.ndarray:
  """The backbone's output features of ``x`` (eval mode), ``[N, D]`` float64."""
  key = json.dumps(cfg["model"], sort_keys=True)
  if key not in _FEATURES:
    model = _model(cfg, 2)
    _FEATURES[key] = jax.jit(lambda v, xb: model.apply(v, xb, method=lambda m, xb: m.backbone(xb)))
  fn = _FEATURES[key]
  variables = {"params": {"backbone": backbone}}
  return np.concatenate([np.asarray(fn(variables, x[i:i + batch]), np.float64)
                         for i in range(0, len(x), batch)])


def shot_indices(y: np.ndarray, num_classes: int, shots: int, where: str = "val") -> np.ndarray:
  """The first ``shots`` indices of each class in ``y`` (class by class); error if a class lacks one."""
  idx = []
  for c in range(num_classes):
    have = np.flatnonzero(np.asarray(y) == c)[:shots]
    if not len(have):
      raise KfuseError(f"head.shots: the {where} split has no example of class {c}")
    idx.append(have)
  return np.concatenate(idx)


def prototype_head(features: np.ndarray, y: np.ndarray, num_classes: int,
                   temperature: float) -> dict:
  """A cosine prototype classifier written as a linear head ``{'kernel': [D, K], 'bias': [K]}``.

  With μ the mean of the labelled features f_i and ĝ_i = (f_i − μ)/‖f_i − μ‖
  (centring + L2 normalisation, "CL2N" of SimpleShot, Wang et al. 2019), the
  prototypes are p̂_c = normalise(mean_{y_i = c} ĝ_i) and the head is

    logit_c(f) = T · p̂_c · (f − μ) / s,     s = mean_i ‖f_i − μ‖,

  i.e. kernel = T·P̂ᵀ/s, bias = −T·P̂μ/s. Its argmax is the nearest prototype in
  cosine similarity (the per-sample factor ‖f − μ‖/s leaves it unchanged), and
  T is a fixed temperature, as CLIP's zero-shot head (Radford et al. 2021) scores
  normalised image features against class prototypes from another modality:
  no parameter is trained on the task's data.
  """
  f = np.asarray(features, np.float64)
  mu = f.mean(0)
  g = f - mu
  s = float(np.linalg.norm(g, axis=1).mean())
  g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  protos = np.stack([g[np.asarray(y) == c].mean(0) for c in range(num_classes)])
  protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
  kernel = temperature * protos.T / s
  return {"kernel": kernel.astype(np.float32), "bias": (-(mu @ kernel)).astype(np.float32)}


def _zero_shot_head(cfg: Mapping, ds, backbone: PyTree, key: jax.Array,
                    progress: bool) -> tuple[dict, dict]:
  """The task's head on the pretrained backbone (see ``config.head``) -> ``(head, record)``."""
  k = ds.num_classes
  k_init, k_probe = jax.random.split(key)
  head_cfg = cfg["head"]
  if head_cfg["kind"] == "probe":
    head = _model(cfg, k).init(k_init, ds.x_train[:1])["params"]["head"]
    variables = models.with_params(backbone, jax.tree.map(np.asarray, head))
    probed = _fit(cfg, "probe", variables, ds.x_train, ds.y_train, k, k_probe, ("head",), progress)
    return probed["params"]["head"], {"kind": "probe", "trained_on": "train"}
  idx = shot_indices(ds.y_val, k, int(head_cfg["shots"]))
  head = prototype_head(features(cfg, backbone, ds.x_val[idx]), ds.y_val[idx], k,
                        float(head_cfg["temperature"]))
  return head, {"kind": "prototype", "shots_from": "val", "shot_indices": idx.tolist(),
                "temperature": float(head_cfg["temperature"])}


def _build_task(cfg: Mapping, task: str, backbone: PyTree, cache: str | None,
                progress: bool) -> tuple[dict, dict, dict]:
  """Zero-shot head on the frozen backbone, then fine-tune -> ``(head, expert, info)``."""
  ds = image_tasks.load_task(task, seed=int(cfg["data"]["seed"]),
                             sizes=tuple(cfg["data"]["sizes"]), cache=cache)
  k = ds.num_classes
  k_head, k_ft = jax.random.split(_task_key(cfg, task))
  head, head_info = _zero_shot_head(cfg, ds, backbone, k_head, progress)
  zero_shot = models.with_params(backbone, head)
  expert = _fit(cfg, "finetune", zero_shot, ds.x_train, ds.y_train, k, k_ft,
                TRAINABLE[cfg["finetune"]["trainable"]], progress)
  acc = {f"{who}_{split}": _accuracy(cfg, v, k, getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}"))
         for who, v in (("pretrained", zero_shot), ("expert", expert)) for split in ("val", "test")}
  info = {"num_classes": k, "class_names": list(ds.class_names), "source": ds.source,
          "why": ds.why, "data_seed": ds.seed, "sizes": ds.sizes(), "accuracy": acc,
          "head": head_info}
  return {"params": {"head": head}}, expert, info


# ------------------------------------------------------------------ build


def _check_target(path: str, cfg: dict, overwrite: bool) -> dict | None:
  """The resumable progress record at ``path`` (None: fresh build); refuses foreign content."""
  if os.path.exists(os.path.join(path, MANIFEST)):
    if overwrite:
      shutil.rmtree(path)
      return None
    built = _read_json(os.path.join(path, MANIFEST), "manifest").get("config")
    diff = _first_difference(built, cfg, "config")
    if diff:
      raise KfuseError(f"pool {path}: already built with another config ({diff}); use another path"
                       " or overwrite=True")
    return {"complete": True}
  prog_path = os.path.join(path, PROGRESS)
  if os.path.exists(prog_path):
    prog = _read_json(prog_path, "progress record")
    diff = _first_difference(prog.get("config"), cfg, "config")
    if diff and not overwrite:
      raise KfuseError(f"pool {path}: an interrupted build with another config is there ({diff});"
                       " resume it with its config, or overwrite=True")
    if diff:
      shutil.rmtree(path)
      return None
    return prog
  if os.path.isdir(path) and os.listdir(path):
    raise KfuseError(f"pool {path}: the directory exists and is not a kfuse model pool"
                     " (no manifest.json or progress.json); choose an empty or new path")
  if os.path.exists(path) and not os.path.isdir(path):
    raise KfuseError(f"pool {path}: exists and is not a directory")
  return None


def _still_valid(path: str, rel: str, sha: str) -> bool:
  try:
    _verified(path, rel, sha)
    return True
  except KfuseError as e:
    print(f"kfuse: note: rebuilding {rel}: {e}", file=sys.stderr)
    return False


def _seed_from(src: str, path: str, cfg: dict) -> dict:
  """A progress record at ``path`` holding ``src``'s pretrained model and its experts of ``cfg``'s tasks.

  Sound because every part is a pure function of the config and its own key: a pool whose
  config differs from ``cfg`` only in ``tasks`` (and whose pretraining mixture does not depend
  on the task list, ``data.pretrain_exclude_tasks`` false) holds exactly the pretrained model
  and the shared tasks' experts that a fresh build of ``cfg`` would train. Copies are
  hash-checked against ``src``'s manifest.
  """
  src = os.path.abspath(os.fspath(src))
  if pool_status(src) != "complete":
    raise KfuseError(f"pool {src}: cannot reuse it, it is {pool_status(src)}")
  man = _read_json(os.path.join(src, MANIFEST), "manifest")
  diff = _first_difference({**man.get("config", {}), "tasks": None}, {**cfg, "tasks": None}, "config")
  if diff:
    raise KfuseError(f"pool {src}: cannot reuse it, built with another recipe ({diff})")
  if cfg["data"]["pretrain_exclude_tasks"] and man["config"]["tasks"] != cfg["tasks"]:
    raise KfuseError(f"pool {src}: cannot reuse it: data.pretrain_exclude_tasks makes pretraining"
                     " depend on the task list, which differs")
  os.makedirs(path, exist_ok=True)
  shared = [t for t in cfg["tasks"] if t in man["experts"]]
  parts = ["pretrained"] + [man["experts"][t][k]["path"] for t in shared for k in ("probe", "expert")]
  for rel in parts:
    shutil.copytree(os.path.join(src, rel), os.path.join(path, rel), dirs_exist_ok=True)
  _verified(path, "pretrained", man["pretrained"]["sha256"])
  for t in shared:
    for k in ("probe", "expert"):
      _verified(path, man["experts"][t][k]["path"], man["experts"][t][k]["sha256"])
  seconds = man.get("seconds", {})
  return {"format": FORMAT, "config": cfg, "pretrained": man["pretrained"],
          "tasks": {t: man["experts"][t] for t in shared},
          "seconds": {k: seconds[k] for k in ["pretrain", *shared] if k in seconds},
          "reused_from": {"path": src, "parts": ["pretrain", *shared]}}


def build_pool(config: Mapping | None, path: str, *, cache: str | None = None,
               overwrite: bool = False, progress: bool = False, reuse: str | None = None) -> dict:
  """Build (or resume, or confirm) the pool of ``config`` at ``path``; returns the manifest.

  Args:
    config: overrides of `DEFAULT_CONFIG` (see `resolve_config`).
    path: the pool directory (created; a complete pool with the same config is
      returned as is, a different one refused unless ``overwrite``).
    cache: the data cache (`kfuse.data.sources.cache_dir`).
    overwrite: replace a pool or an interrupted build made with another config.
    progress: show progress bars.
    reuse: a complete pool of the same recipe with other tasks (e.g. the 8-task pool when
      building the 20-task one): its pretrained model and the shared tasks' experts are copied
      (hash-checked) instead of trained again, see `_seed_from`; only a fresh build reuses.
  """
  cfg = resolve_config(config)
  path = os.path.abspath(os.fspath(path))
  prog = _check_target(path, cfg, overwrite)
  if prog and prog.get("complete"):
    return load_pool(path).manifest
  if prog is None and reuse:
    prog = _seed_from(reuse, path, cfg)
  os.makedirs(path, exist_ok=True)
  prog = prog or {"format": FORMAT, "config": cfg, "pretrained": None, "tasks": {}}
  prog_path = os.path.join(path, PROGRESS)
  _write_json(prog_path, prog)
  timing = prog.setdefault("seconds", {})

  pre = prog.get("pretrained")
  if not pre or not _still_valid(path, "pretrained", pre["sha256"]):
    t = time.time()
    variables, info = _pretrain(cfg, cache, progress)
    prog["pretrained"] = {**info, "path": "pretrained", "sha256": _save(path, "pretrained", variables)}
    prog["tasks"] = {}  # experts fine-tuned from another backbone are void
    timing["pretrain"] = round(time.time() - t, 1)
    _write_json(prog_path, prog)
  pre = prog["pretrained"]
  backbone = models.backbone_of(_restore(path, "pretrained"))

  for task in cfg["tasks"]:
    done = prog["tasks"].get(task)
    if done and done.get("pretrained_sha256") == pre["sha256"] and all(
        _still_valid(path, done[kind]["path"], done[kind]["sha256"]) for kind in ("probe", "expert")):
      continue
    t = time.time()
    probe, expert, info = _build_task(cfg, task, backbone, cache, progress)
    info["probe"] = {"path": f"probes/{task}", "sha256": _save(path, f"probes/{task}", probe)}
    info["expert"] = {"path": f"experts/{task}", "sha256": _save(path, f"experts/{task}", expert)}
    info["pretrained_sha256"] = pre["sha256"]
    prog["tasks"][task] = info
    timing[task] = round(time.time() - t, 1)
    _write_json(prog_path, prog)

  manifest = {
      "format": FORMAT, "config": cfg, "backbone": _backbone(cfg), "tasks": list(cfg["tasks"]),
      "pretrained": pre, "experts": {t: prog["tasks"][t] for t in cfg["tasks"]},
      "seconds": timing, **({"reused_from": prog["reused_from"]} if "reused_from" in prog else {}),
      "versions": {"jax": jax.__version__, "numpy": np.__version__},
  }
  _write_json(os.path.join(path, MANIFEST), manifest)
  os.remove(prog_path)
  return manifest


# ------------------------------------------------------------------ load


@dataclasses.dataclass
class Pool:
  """A verified pool: the manifest and every checkpoint as NumPy trees.

  Attributes:
    path: the pool directory.
    manifest: the parsed ``manifest.json``.
    pretrained: the pretrained variables (backbone + pretraining head).
    probes: ``{task: {'params': {'head'}}}`` each task's zero-shot head (prototype or linear
      probe, ``manifest['experts'][task]['head']``) on the pretrained backbone.
    experts: ``{task: variables}`` fine-tuned experts.
  """
  path: str
  manifest: dict
  pretrained: dict
  probes: dict
  experts: dict

  @property
  def tasks(self) -> list[str]:
    return list(self.experts)

  def model(self, task: str):
    """The Flax module of ``task``'s expert (its head size)."""
    return _model(self.manifest["config"], self.manifest["experts"][task]["num_classes"])


def pool_status(path: str) -> str:
  """One line: complete, interrupted (how far), or not a pool."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(os.path.join(path, MANIFEST)):
    return "complete"
  prog_path = os.path.join(path, PROGRESS)
  if os.path.exists(prog_path):
    try:
      prog = _read_json(prog_path, "progress record")
      n = len((prog.get("config") or {}).get("tasks", []))
      pre = "pretrained done" if prog.get("pretrained") else "pretraining not finished"
      return f"interrupted ({pre}, {len(prog.get('tasks') or {})} of {n} experts finished)"
    except KfuseError:
      return "interrupted (unreadable progress record)"
  return "missing" if not os.path.exists(path) else "not a pool"


def _expected_backbone(expect: Mapping) -> dict | None:
  model = expect.get("model")
  if model is None:
    return None
  model = plain(to_dict(model))
  if "kwargs" in model and set(model) <= {"name", "kwargs"}:
    model = {"name": model["name"], **model["kwargs"]}
  return _backbone({"model": model})


def load_pool(path: str, expect: Mapping | None = None, *, tasks: Sequence[str] | None = None) -> Pool:
  """Load and verify the pool at ``path``; `KfuseError` (one line) on any mismatch.

  Args:
    path: a directory written by `build_pool`.
    expect: what the caller's config requires, any of ``model`` (``{'name': ..., **kwargs}``:
      the pool's backbone must be built with exactly these arguments, defaults filled in),
      ``tasks`` (each must have an expert in the pool), ``data`` (``seed`` / ``sizes``
      must equal the pool's). A whole pool config works as ``expect``.
    tasks: load only these experts (default: ``expect['tasks']`` if given, else all).

  Checks: a manifest (else: the build is unfinished or this is not a pool),
  its format, the expectations above, and every loaded checkpoint's content
  hash against the manifest.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise KfuseError(f"pool {path}: no such directory")
  if not os.path.exists(os.path.join(path, MANIFEST)):
    status = pool_status(path)
    if status.startswith("interrupted"):
      raise KfuseError(f"pool {path}: half-written, its build was {status}; re-run build_pool with"
                       " the same config to resume it")
    raise KfuseError(f"pool {path}: not a kfuse model pool (no {MANIFEST})")
  man = _read_json(os.path.join(path, MANIFEST), "manifest")
  if man.get("format") != FORMAT:
    raise KfuseError(f"pool {path}: manifest format {man.get('format')!r}, expected {FORMAT!r}")
  for field in ("config", "backbone", "tasks", "pretrained", "experts"):
    if field not in man:
      raise KfuseError(f"pool {path}: manifest has no {field!r} field")
  expect = plain(to_dict(expect)) if expect is not None else {}
  want = _expected_backbone(expect)
  if want is not None:
    diff = (_first_difference(man["backbone"]["name"], want["name"], "model.name")
            or _first_difference(man["backbone"], want, "model"))
    if diff:
      raise KfuseError(f"pool {path}: built with backbone {man['backbone']['name']} but the config"
                       f" names another ({diff.replace('.kwargs', '')}, pool != config)")
  for field in ("seed", "sizes"):
    if field in (expect.get("data") or {}):
      have, need = man["config"]["data"].get(field), expect["data"][field]
      if have != need:
        raise KfuseError(f"pool {path}: built with data.{field}={have!r} but the config asks for {need!r}")
  wanted = list(tasks if tasks is not None else expect.get("tasks") or man["tasks"])
  for t in wanted:
    if t not in man["experts"]:
      from kfuse.registry import suggest
      raise KfuseError(f"pool {path}: no expert for task {t!r}{suggest(t, man['experts'])};"
                       f" the pool holds {', '.join(man['tasks'])}")
  pretrained = _verified(path, "pretrained", man["pretrained"]["sha256"])
  probes, experts = {}, {}
  for t in wanted:
    e = man["experts"][t]
    if e.get("pretrained_sha256") != man["pretrained"]["sha256"]:
      raise KfuseError(f"pool {path}: expert {t!r} was fine-tuned from another pretrained checkpoint")
    probes[t] = _verified(path, e["probe"]["path"], e["probe"]["sha256"])
    experts[t] = _verified(path, e["expert"]["path"], e["expert"]["sha256"])
  return Pool(path=path, manifest=man, pretrained=pretrained, probes=probes, experts=experts)


# ------------------------------------------------------------------ report / CLI


def markdown_table(manifest: Mapping) -> str:
  """Per task: pretrained backbone + zero-shot head vs expert, test (val) accuracy %, and the gap."""
  head = manifest["config"].get("head", {}).get("kind", "probe")
  rows = [f"| task | source | classes | pretrained+{head} | expert | gap |", "|---|---|---|---|---|---|"]
  gaps, pres, exps = [], [], []
  for t in manifest["tasks"]:
    e = manifest["experts"][t]
    a = e["accuracy"]
    p, x = 100 * a["pretrained_test"], 100 * a["expert_test"]
    pres.append(p)
    exps.append(x)
    gaps.append(x - p)
    rows.append(f"| {t} | {e['source']} | {e['num_classes']} | {p:.1f} ({100 * a['pretrained_val']:.1f})"
                f" | {x:.1f} ({100 * a['expert_val']:.1f}) | {x - p:+.1f} |")
  rows.append(f"| **average** | | | {np.mean(pres):.1f} | {np.mean(exps):.1f} | {np.mean(gaps):+.1f} |")
  rows.append(f"| **normalised** | | | {100 * np.mean(pres) / np.mean(exps):.1f} % | 100 % | |")
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  ap = argparse.ArgumentParser(prog="python -m kfuse.bench.pool", description=__doc__.splitlines()[0])
  ap.add_argument("--path", required=True, help="pool directory")
  ap.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)}")
  ap.add_argument("--tasks", default=None,
                  help="8, 14 or 20 (the protocol: first N of TASK_NAMES) or comma-separated task"
                       " names (overrides the preset)")
  ap.add_argument("--config_json", default=None, help="JSON overrides applied after the preset")
  ap.add_argument("--cache", default=None, help="data cache directory")
  ap.add_argument("--reuse", default=None,
                  help="a complete pool of the same recipe with other tasks: copy its pretrained"
                       " model and shared experts (hash-checked) instead of training them")
  ap.add_argument("--overwrite", action="store_true")
  ap.add_argument("--progress", action="store_true")
  args = ap.parse_args(argv)
  try:
    if args.preset not in PRESETS:
      from kfuse.registry import suggest
      raise KfuseError(f"--preset: unknown preset {args.preset!r}{suggest(args.preset, PRESETS)}")
    over = copy.deepcopy(PRESETS[args.preset])
    if args.tasks and args.tasks.strip().isdigit():
      over["tasks"] = list(image_tasks.protocol(int(args.tasks)))
    elif args.tasks:
      over["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.config_json:
      try:
        over = _merge(over, json.loads(args.config_json))
      except ValueError as e:
        raise KfuseError(f"--config_json: not JSON ({e})") from None
    t = time.time()
    manifest = build_pool(over, args.path, cache=args.cache, overwrite=args.overwrite,
                          progress=args.progress, reuse=args.reuse)
    print(markdown_table(manifest))
    print(f"pool {os.path.abspath(args.path)}: {len(manifest['tasks'])} experts,"
          f" {time.time() - t:.0f} s this run; build seconds: {json.dumps(manifest['seconds'])}")
  except KfuseError as e:
    print(f"kfuse: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
