"""Run mergekit YAML configurations with kfuse.

    python -m kfuse.main --config=configs/mergekit.py:PATH/TO/merge.yml --config.output_dir=OUT

reads a mergekit YAML unchanged (``models:`` or ``slices:``, ``merge_method``,
``base_model``, ``parameters`` with filters and gradients, ``dtype``,
``out_dtype``) and writes an HF safetensors directory whose tensors equal
mergekit 0.1.5's for every deterministic method (float32 relative error
≤ 1e-5; tests/peers). Semantics replicated (experiments/notes/mergekit_semantics.md):

* ``models:`` is one slice over all layers; a ``base_model`` not listed is
  appended as the last input. Methods that ignore the base (linear, karcher,
  passthrough) treat it as one more input.
* Per-model parameters: source → slice → top level → default; shared
  parameters: slice → top level → default. A filter list that matches
  nothing falls through to the next level. Per-model filters see the model's
  *input* tensor name, shared ones the *output* name.
* Gradients use t = j/(L−1) within each output slice (t = 1 for one layer);
  embeddings and the final norm / head use t = 0, with the first / last
  slice's sources.
* ``dtype`` casts inputs at load time (arithmetic in that dtype);
  ``out_dtype`` casts the saved tensors (default: the merge dtype).

Where kfuse is stricter than mergekit (on purpose, each a one-line error):
parameter names that no mergekit method defines (typos; mergekit ignores
them silently), unknown top-level keys, tensors missing from or shaped
differently in some model (also a tensor every expert has but the base
lacks), NaN/Inf inputs, an existing output directory.

Accepted as mergekit accepts them, with one ``kfuse: warning: ...`` line on
stderr each: a parameter some mergekit method defines but this method does
not use (mergekit's own test YAMLs put ``weight`` on slerp, sce, ram, …), a
shared parameter given per model (ignored there), and a ``density`` outside
(0, 1] (≤ 0 drops that model's task vector, > 1 keeps all of it).

Not supported yet: ``modules:``, tokenizer merging (``tokenizer`` /
``tokenizer_source`` other than ``base``), LoRA model references.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import yaml

from kfuse import tree as T
from kfuse.merge import params as P
from kfuse.merge import pipeline
from kfuse.merge.core import MERGEKIT, Method, TensorInfo, get_method
from kfuse.merge.engine import TensorTask
from kfuse.registry import suggest
from kfuse.tree import KfuseError

log = logging.getLogger("kfuse.mergekit")

TOP_KEYS = {"models", "slices", "modules", "merge_method", "base_model", "dtype",
            "out_dtype", "parameters", "tokenizer", "tokenizer_source", "chat_template",
            "name"}
# Every parameter name a mergekit 0.1.5 merge method defines (the union of the
# shared and per-input parameters of its registered methods; the peer test
# tests/peers/test_yaml_fixtures.py checks it against the installed mergekit).
MERGEKIT_PARAMS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask",
    "t", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "scale",
    "filter_wise", "select_topk", "r", "alpha", "max_iter", "tol"})
_LAYER = re.compile(r"^(.*?\.)(\d+)(\..*)$")
_POST = re.compile(r"(^|\.)(norm|final_layernorm|ln_f|final_layer_norm)\.(weight|bias)$|^lm_head\.")


@dataclasses.dataclass
class Source:
  model: str
  layer_range: Optional[tuple]
  parameters: dict


@dataclasses.dataclass
class Slice:
  sources: list
  parameters: dict
  base_model: Optional[str]


def _fail(path, msg):
  raise KfuseError(f"{path}: {msg}")


def warn(msg: str) -> None:
  """One ``kfuse: warning: ...`` line on stderr (the CLI's ``kfuse: error:`` style)."""
  print(f"kfuse: warning: {msg}", file=sys.stderr, flush=True)


def load_yaml(path: str | os.PathLike) -> dict:
  path = str(path)
  if not os.path.isfile(path):
    raise KfuseError(f"mergekit config {path} does not exist")
  try:
    with open(path) as f:
      cfg = yaml.safe_load(f)
  except yaml.YAMLError as e:
    msg = str(e).replace("\n", " ")
    raise KfuseError(f"{path}: invalid YAML: {msg}") from None
  if not isinstance(cfg, dict):
    _fail(path, "top level must be a mapping")
  return cfg


def _model_ref(v, where, cfg_path) -> str:
  if isinstance(v, dict) and "model" in v:  # {model: {path: ...}} / {model: path}
    v = v["model"]
  if isinstance(v, dict) and "path" in v:
    v = v["path"]
  if not isinstance(v, str) or not v:
    _fail(cfg_path, f"{where}: a model reference must be a path string, got {v!r}")
  if "+" in v:
    _fail(cfg_path, f"{where}: LoRA references ({v!r}) are not supported")
  if v.count("@") > 1:
    _fail(cfg_path, f"{where}: invalid model reference {v!r}")
  return v.split("@")[0]


def _mapping(v, where: str, cfg_path) -> dict:
  """A ``parameters:`` node as a dict (absent / empty: {}); any other type fails in one line."""
  if not v:
    return {}
  if not isinstance(v, dict):
    _fail(cfg_path, f"{where} must be a mapping, got {type(v).__name__}")
  return dict(v)


def parse_config(cfg: Mapping[str, Any], cfg_path: str = "<config>") -> tuple[list[Slice], dict]:
  """Validate a mergekit config dict and normalise it to slices."""
  extra = set(cfg) - TOP_KEYS
  if extra:
    _fail(cfg_path, f"unknown top-level key {sorted(extra, key=str)[0]!r}")
  if "merge_method" not in cfg:
    _fail(cfg_path, "missing required key 'merge_method'")
  if not isinstance(cfg["merge_method"], str):
    got = type(cfg["merge_method"]).__name__
    _fail(cfg_path, f"'merge_method' must be a method name, got {got}")
  for k in ("dtype", "out_dtype"):
    if cfg.get(k) is not None and not isinstance(cfg[k], str):
      _fail(cfg_path, f"{k!r} must be a dtype name such as 'bfloat16', got {cfg[k]!r}")
  n_set = sum(1 for k in ("models", "slices", "modules") if cfg.get(k))
  if n_set != 1:
    _fail(cfg_path, "exactly one of 'models', 'slices', or 'modules' must be present")
  if cfg.get("modules"):
    _fail(cfg_path, "'modules:' configs are not supported by kfuse yet")
  if cfg.get("tokenizer") and cfg.get("tokenizer_source"):
    _fail(cfg_path, "cannot specify both 'tokenizer' and 'tokenizer_source'")
  if cfg.get("tokenizer") or cfg.get("tokenizer_source") not in (None, "base"):
    _fail(cfg_path, "tokenizer merging ('tokenizer' / 'tokenizer_source') is not supported")
  top_params = _mapping(cfg.get("parameters"), "'parameters'", cfg_path)
  base = _model_ref(cfg["base_model"], "base_model", cfg_path) if cfg.get("base_model") else None
  slices = []
  if cfg.get("models"):
    models = cfg["models"]
    if not isinstance(models, list):
      _fail(cfg_path, "'models' must be a list")
    srcs = []
    for i, m in enumerate(models):
      if isinstance(m, str):
        m = {"model": m}
      if not isinstance(m, dict) or "model" not in m:
        _fail(cfg_path, f"models[{i}] needs a 'model' key")
      bad = set(m) - {"model", "parameters"}
      if bad:
        _fail(cfg_path, f"models[{i}]: unknown key {sorted(bad, key=str)[0]!r}")
      srcs.append(Source(_model_ref(m["model"], f"models[{i}]", cfg_path), None,
                         _mapping(m.get("parameters"), f"models[{i}].parameters", cfg_path)))
    if base is not None and base not in [s.model for s in srcs]:
      srcs.append(Source(base, None, {}))
    slices.append(Slice(srcs, {}, base))
  else:
    if not isinstance(cfg["slices"], list):
      _fail(cfg_path, "'slices' must be a list")
    for si, s in enumerate(cfg["slices"]):
      if not isinstance(s, dict) or "sources" not in s:
        _fail(cfg_path, f"slices[{si}] needs 'sources'")
      bad = set(s) - {"sources", "parameters", "base_model", "residual_weight"}
      if bad:
        _fail(cfg_path, f"slices[{si}]: unknown key {sorted(bad, key=str)[0]!r}")
      if not isinstance(s["sources"], list):
        _fail(cfg_path, f"slices[{si}].sources must be a list")
      srcs = []
      for j, src in enumerate(s["sources"]):
        where = f"slices[{si}].sources[{j}]"
        if not isinstance(src, dict) or "model" not in src:
          _fail(cfg_path, f"{where} needs a 'model' key")
        bad = set(src) - {"model", "layer_range", "parameters"}
        if bad:
          _fail(cfg_path, f"{where}: unknown key {sorted(bad, key=str)[0]!r}")
        lr = src.get("layer_range")
        if lr is not None:
          if (not isinstance(lr, (list, tuple)) or len(lr) != 2
              or not all(isinstance(x, int) for x in lr) or lr[0] < 0 or lr[1] <= lr[0]):
            _fail(cfg_path, f"{where}: layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
          lr = (lr[0], lr[1])
        srcs.append(Source(_model_ref(src["model"], where, cfg_path), lr,
                           _mapping(src.get("parameters"), f"{where}.parameters", cfg_path)))
      lens = {(x.layer_range[1] - x.layer_range[0]) if x.layer_range else None for x in srcs}
      if len(lens) > 1:
        _fail(cfg_path, f"slices[{si}]: all inputs to a slice must contain the same number of layers")
      sbase = _model_ref(s["base_model"], f"slices[{si}].base_model", cfg_path) if s.get("base_model") else base
      if sbase is not None and sbase not in [x.model for x in srcs]:
        _fail(cfg_path, f"slices[{si}]: base_model {sbase!r} is not among the slice's sources")
      slices.append(Slice(srcs, _mapping(s.get("parameters"), f"slices[{si}].parameters", cfg_path),
                          sbase))
  return slices, dict(top_params)


# ---------------------------------------------------------------- coercion


def _to_setting(v):
  """mergekit ParameterSetting -> kfuse setting (lists of scalars are gradients)."""
  if isinstance(v, dict) and "value" in v:
    v = [v]
  if isinstance(v, list):
    if not v:
      return None
    if all(isinstance(r, dict) for r in v):
      return [{"filter": r.get("filter"), "value": _to_setting(r.get("value"))} for r in v]
    return P.Gradient(v)
  return v


def _check_names(method: Method, params: Mapping, where: str, per_model: bool,
                 warnings: dict) -> None:
  """Refuse typos; note (in ``warnings``, once per name) parameters mergekit ignores.

  mergekit ignores every parameter its method does not read. A name that some
  mergekit method defines is accepted here with a warning; a shared parameter
  given per model is ignored there (mergekit's resolver skips that level); a
  name no mergekit method (nor this kfuse method) knows is an error that
  suggests the closest valid name.
  """
  spec = method.param_map
  for k in params:
    if k in spec:
      if per_model and not spec[k].per_model:
        warnings.setdefault(("shared", k), f"{where}: parameter {k!r} of merge_method "
                            f"{method.name!r} is shared, so a per-model value is ignored "
                            f"(as mergekit does); set it in the top-level or slice 'parameters'")
      continue
    if k in MERGEKIT_PARAMS:
      warnings.setdefault(("unused", k), f"{where}: parameter {k!r} is not used by merge_method "
                          f"{method.name!r}; ignored (as mergekit does)")
      continue
    hint = suggest(k, spec) or suggest(k, MERGEKIT_PARAMS)
    known = ", ".join(sorted(spec)) or "none"
    raise KfuseError(f"{where}: unknown parameter {k!r} for merge_method {method.name!r}"
                     f"{hint} (known: {known})")


def _fmt_values(vals) -> str:
  vals = sorted(vals)
  return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}..{vals[-1]:g} ({len(vals)} values)"


def _check_coverage(tasks: list, slices: list, models: Mapping, ref_model: str,
                    layout: "Layout") -> None:
  """Refuse a tensor some input holds but the plan never reads (the layout's model lacks it).

  The layout comes from the base (or first) model, so a tensor every expert
  holds but the base lacks would otherwise be dropped from the output
  silently; the native merge (`kfuse.merge.runner.merge_checkpoints`) refuses
  the same inputs. Layers outside a source's ``layer_range`` are not expected.
  """
  paths = list(models)
  read = {p: set() for p in paths}
  for task in tasks:
    for mi, name in ([task.base] if task.base is not None else []) + list(task.experts):
      read[paths[mi]].add(name)
  ranges: dict = {}
  for slc in slices:
    for src in slc.sources:
      ranges.setdefault(src.model, []).append(src.layer_range or (0, layout.num_layers))
  ref = models[ref_model]
  for p in paths:
    m = models[p]
    for name in m.names:
      if name in read[p]:
        continue
      hit = _LAYER.match(name)
      if hit and not any(a <= int(hit.group(2)) < b for a, b in ranges.get(p, [])):
        continue
      if name in ref:   # read from the ref elsewhere (e.g. layers beyond its config's count)
        continue
      shard_of = getattr(m, "shard_of", None)
      where = os.path.join(m.path, shard_of(name)) if shard_of and os.path.isdir(m.path) else m.path
      raise KfuseError(f"{ref.path}: missing tensor {name!r} that {where} has (every input "
                       f"must hold the same tensors; the native merge refuses this too)")


# ------------------------------------------------------------- architecture


@dataclasses.dataclass
class Layout:
  pre: list         # non-layer tensors taken from the first slice
  post: list        # non-layer tensors taken from the last slice
  templates: list   # (prefix, suffix) of layer tensors, in file order
  num_layers: int


def infer_layout(names: Sequence[str], config: Optional[dict]) -> Layout:
  pre, post, templates, seen = [], [], [], set()
  max_idx = -1
  for n in names:
    m = _LAYER.match(n)
    if m:
      tpl = (m.group(1), m.group(3))
      max_idx = max(max_idx, int(m.group(2)))
      if tpl not in seen:
        seen.add(tpl)
        templates.append(tpl)
    elif _POST.search(n):
      post.append(n)
    else:
      pre.append(n)
  from kfuse.io.hf_config import config_num_layers
  nl = config_num_layers(config)
  return Layout(pre, post, templates, max_idx + 1 if nl is None else nl)


# --------------------------------------------------------------- planning


def _contract(method: Method, slc: Slice) -> tuple[Optional[int], list[int]]:
  """(base source index | None, expert source indices) as mergekit forms them (the
  pipeline checks them against the method's contract, `pipeline.validate`)."""
  idx = list(range(len(slc.sources)))
  names = [s.model for s in slc.sources]
  if method.base in ("unused", "include") or slc.base_model is None:
    base_i, experts = None, idx
  else:
    base_i = names.index(slc.base_model)
    experts = [i for i in idx if i != base_i]
  return base_i, experts


def build_plan(slices: list[Slice], top_params: dict, method: Method, models: dict,
               cfg_path: str) -> tuple[list[TensorTask], list[str], int]:
  """Plan every output tensor. ``models`` maps model path -> TensorSource."""
  paths = list(models)
  mindex = {p: i for i, p in enumerate(paths)}
  ref_model = slices[0].base_model or slices[0].sources[0].model
  layout = infer_layout(models[ref_model].names, getattr(models[ref_model], "config", None))
  top = {k: _to_setting(v) for k, v in top_params.items()}
  warnings: dict = {}   # (kind, name) -> one line, printed once the plan is complete
  odd_density: dict = {}  # model -> densities outside (0, 1] it gets somewhere
  _check_names(method, top, f"{cfg_path}: top-level parameters", False, warnings)
  for si, slc in enumerate(slices):
    _check_names(method, slc.parameters, f"{cfg_path}: slices[{si}].parameters", False, warnings)
    for src in slc.sources:
      _check_names(method, src.parameters, f"{cfg_path}: model {src.model!r}", True,
                   warnings)
  tasks: list[TensorTask] = []
  out_names: list[str] = []
  total_layers = sum(
      (s.sources[0].layer_range[1] - s.sources[0].layer_range[0]) if s.sources[0].layer_range
      else layout.num_layers for s in slices)

  def add(out_name, slc, si, in_names, t, layer, where):
    base_i, experts = _contract(method, slc)
    shared_levels = [{k: _to_setting(v) for k, v in slc.parameters.items()}, top]
    model_levels = [[{k: _to_setting(v) for k, v in slc.sources[i].parameters.items()}]
                    for i in experts]
    vals = P.resolve(method, shared_levels, model_levels, out_name, t, len(experts),
                     in_names=[in_names[i] for i in experts], where=f"{cfg_path}: {where}",
                     required=("weight",), lax=True)   # mergekit requires `weight` wherever it exists
    if method.sparsifies:   # declared on the method (`Method.sparsifies`)
      for i, d in zip(experts, vals.get("density", ())):
        if not 0 < d <= 1:
          odd_density.setdefault(slc.sources[i].model, set()).add(d)
    ref = (mindex[slc.sources[base_i].model], in_names[base_i]) if base_i is not None else None
    exps = [(mindex[slc.sources[i].model], in_names[i]) for i in experts]
    src0 = models[slc.sources[experts[0]].model] if base_i is None else models[slc.sources[base_i].model]
    nm0 = in_names[experts[0]] if base_i is None else in_names[base_i]
    if nm0 not in src0:
      raise KfuseError(f"{src0.path}: missing tensor {nm0!r}")
    info = TensorInfo(path=out_name, shape=tuple(src0.shape(nm0)), dtype=src0.dtype(nm0),
                      layer=layer, num_layers=total_layers, layout="torch")
    tasks.append(TensorTask(out_name, method, ref, exps, vals, info, MERGEKIT))
    out_names.append(out_name)

  # pre-weights: first slice, t = 0
  for nm in layout.pre:
    add(nm, slices[0], 0, [nm] * len(slices[0].sources), 0.0, None, "slices[0]")
  offset = 0
  for si, slc in enumerate(slices):
    lr = [s.layer_range or (0, layout.num_layers) for s in slc.sources]
    length = lr[0][1] - lr[0][0]
    for j in range(length):
      t = 1.0 if length == 1 else j / (length - 1)
      for pre_, suf in layout.templates:
        in_names = [f"{pre_}{r[0] + j}{suf}" for r in lr]
        add(f"{pre_}{offset + j}{suf}", slc, si, in_names, t, offset + j, f"slices[{si}]")
    offset += length
  for nm in layout.post:
    last = slices[-1]
    add(nm, last, len(slices) - 1, [nm] * len(last.sources), 0.0, None, f"slices[{len(slices) - 1}]")
  _check_coverage(tasks, slices, models, ref_model, layout)
  for line in warnings.values():
    warn(line)
  for model, ds in odd_density.items():
    warn(f"{cfg_path}: density {_fmt_values(ds)} for model {model!r} is outside (0, 1]; "
         f"accepted as mergekit does (<= 0 drops that model's task vector, > 1 keeps all of it)")
  return tasks, out_names, offset


def _layer_sources(slices: list[Slice], models: dict, donor) -> list:
  """(source config, source layer) of every output block, as `build_plan` lays them out:
  slice by slice, each block from its slice's first input (the base when it has one)."""
  out = []
  for slc in slices:
    first = slc.base_model or slc.sources[0].model
    src = next((s for s in slc.sources if s.model == first), slc.sources[0])
    m = models[src.model]
    lo, hi = src.layer_range or (0, infer_layout(m.names, m.config).num_layers)
    out += [(m.config or donor.config, i) for i in range(lo, hi)]
  return out


def run_yaml(config_path: str | os.PathLike, output_dir: str | os.PathLike, *,
             overwrite: bool = False, seed: int = 0, out_shard_bytes: int = 5_000_000_000,
             progress: bool = True, copy_tokenizer: bool = True, mesh=None,
             prefetch_bytes: Optional[int] = None, chunk: Optional[int] = None,
             stats=None, allow_nonfinite: bool = False, overflow: str = "error") -> dict:
  """Run a mergekit YAML and write an HF safetensors directory (atomically).

  Plans every output tensor (`build_plan`) and runs the plan through the merge
  pipeline (`kfuse.merge.pipeline.run`: contract check, streaming execution into
  preallocated output shards; ``mesh``, ``prefetch_bytes``, ``chunk``, ``stats``,
  ``allow_nonfinite`` and ``overflow`` are passed on to `engine.execute`). Returns
  a summary dict (output path, tensors written, method, format, seconds and the
  engine's counts).
  """
  from kfuse import io as kio  # lazy: keeps `import kfuse.mergekit_compat` light

  config_path = str(config_path)
  cfg = load_yaml(config_path)
  slices, top_params = parse_config(cfg, config_path)
  method = get_method(cfg["merge_method"]) if cfg["merge_method"] in _known() else None
  if method is None:
    raise KfuseError(f"{config_path}: unknown merge_method {cfg['merge_method']!r}")
  dtype = T.resolve_dtype(cfg.get("dtype")) if cfg.get("dtype") else None
  out_dtype = T.resolve_dtype(cfg.get("out_dtype")) if cfg.get("out_dtype") else dtype
  base_dir = Path(config_path).resolve().parent
  models = {}
  for s in slices:
    for src in s.sources:
      if src.model not in models:
        p = src.model if os.path.isabs(src.model) or os.path.exists(src.model) else str(base_dir / src.model)
        models[src.model] = kio.open_hf_dir(p)
  kio.check_output_outside_inputs(output_dir, [config_path] + [m.path for m in models.values()])
  tasks, out_names, total_layers = build_plan(slices, top_params, method, models, config_path)
  dup = {n for n in out_names if out_names.count(n) > 1}
  if dup:
    raise KfuseError(f"{config_path}: output tensor {sorted(dup)[0]!r} would be written twice")
  donor = models[slices[0].base_model or slices[0].sources[0].model]
  config = None
  if donor.config:   # dtype keys and every layer field (checked against the tensors on write)
    config = kio.hf_config(donor.config, out_dtype, _layer_sources(slices, models, donor),
                           where=f"{config_path}: config.json")
  plan = pipeline.Plan(
      method, tasks, [models[m] for m in models], format="safetensors", dtype=dtype,
      out_dtype=out_dtype, config=config, max_shard_bytes=out_shard_bytes,
      donor=(donor.path if os.path.isdir(donor.path) else os.path.dirname(donor.path))
      if copy_tokenizer else None,
      files={"mergekit_config.yml": yaml.safe_dump(cfg, sort_keys=False)},
      where=config_path, base_word="base_model")
  return pipeline.run(plan, output_dir, key=jax.random.key(seed), overwrite=overwrite,
                      progress=progress, stats=stats, mesh=mesh, prefetch_bytes=prefetch_bytes,
                      chunk=chunk, allow_nonfinite=allow_nonfinite, overflow=overflow)


def _known():
  from kfuse.merge.core import names
  return set(names())
