"""Command-line merge jobs: mergekit YAML and native checkpoint merges.

Both plan their merge and run it through the one pipeline (`kfuse.merge.pipeline`:
validate, stream tensor by tensor through `kfuse.merge.engine`, write atomically).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax

from kfuse import configs
from kfuse import tree as T
from kfuse.merge import pipeline
from kfuse.merge.api import canonical_params, layout_of, resolve_values, validate_params
from kfuse.merge.core import TensorInfo, get_method
from kfuse.merge.engine import OrbaxSource, TensorTask
from kfuse.tree import KfuseError


def _get(config, name, default=None):
  """`kfuse.configs.get`, with an unset (None) field reading as ``default``."""
  v = configs.get(config, name, default)
  return default if v is None else v


def scale_options(config) -> dict:
  """Streaming / sharding options shared by both merge jobs (see WORKSPACE.md, "Scale").

  ``num_devices`` > 1 shards every tensor over a 1-D mesh of that many devices;
  ``prefetch_bytes`` caps the input bytes held at once (0: the largest tensor's
  inputs); ``chunk`` sets the flat chunk length of elementwise recipes (-1:
  automatic, 0: whole tensors). ``compile_cache`` (JAX's persistent compilation cache)
  is process-wide JAX state, so the command line turns it on (`kfuse.main`), not this
  function: a job called from Python leaves the caller's JAX configuration alone.
  """
  from kfuse import shard
  chunk = int(_get(config, "chunk", -1))
  return {"mesh": shard.make_mesh(int(_get(config, "num_devices", 0))),
          "prefetch_bytes": int(_get(config, "prefetch_bytes", 0)) or None,
          "chunk": None if chunk < 0 else chunk}


def numerics_options(config) -> dict:
  """``allow_nonfinite`` (write NaN/Inf results) and ``overflow`` ('error' | 'clamp'
  values a down-cast would turn into inf), shared by both merge jobs."""
  return {"allow_nonfinite": bool(_get(config, "allow_nonfinite", False)),
          "overflow": str(_get(config, "overflow", "error"))}


def run_mergekit(config, workdir=None) -> dict:
  """``configs/mergekit.py:PATH.yml``: run a mergekit YAML into config.output_dir."""
  from kfuse.mergekit_compat import run_yaml
  yml = _get(config, "yaml")
  out = _get(config, "output_dir")
  if not yml:
    raise KfuseError("config.yaml: give the mergekit YAML as --config=configs/mergekit.py:PATH.yml")
  if not out:
    raise KfuseError("config.output_dir: required (--config.output_dir=OUT)")
  t0 = time.perf_counter()
  res = run_yaml(yml, out, overwrite=bool(_get(config, "overwrite", False)),
                 seed=int(_get(config, "seed", 0)),
                 out_shard_bytes=int(_get(config, "out_shard_bytes", 5_000_000_000)),
                 progress=bool(_get(config, "progress", True)),
                 **scale_options(config), **numerics_options(config))
  res["seconds"] = round(time.perf_counter() - t0, 3)
  print(json.dumps(res))
  return res


def _split(v) -> list[str]:
  if v is None:
    return []
  if isinstance(v, str):
    return [x for x in (s.strip() for s in v.split(",")) if x]
  return [str(x) for x in v]


def latest_step(path: str) -> str | None:
  """The newest step directory of an Orbax CheckpointManager root, or None.

  Step directories are named by their integer step (``root/100``); orbax's
  unfinished temporaries (``100.orbax-checkpoint-tmp-…``) are not steps.
  """
  from kfuse import io as kio
  if not os.path.isdir(path):
    return None
  steps = [int(n) for n in os.listdir(path)
           if n.isdigit() and kio.is_orbax_checkpoint(os.path.join(path, n))]
  return os.path.join(path, str(max(steps))) if steps else None


def open_model(path: str):
  """A tensor source for an HF safetensors dir/file, an Orbax checkpoint (a step
  directory or a CheckpointManager root, whose latest step is used)."""
  from kfuse import io as kio
  if kio.is_hf_dir(path):
    return kio.open_hf_dir(path), "safetensors", None
  if not kio.is_orbax_checkpoint(path):
    path = latest_step(path) or path
  if kio.is_orbax_checkpoint(path):
    src = OrbaxSource(path)   # restores one tensor at a time while merging
    return src, "orbax", src.tree
  if not os.path.exists(path):
    raise KfuseError(f"model {path} does not exist")
  raise KfuseError(f"model {path} is neither a safetensors directory nor an Orbax checkpoint"
                   " (nor a CheckpointManager directory of step checkpoints)")


def input_layout(names, layout: str = "auto") -> str:
  """Row-wise rules' layout: 'torch' ([out, in]) or 'flax' ([in, out]).

  ``auto`` infers it from the tensor names, whatever the file format, with the
  rule of `kfuse.merge.merge` (HF names such as ``model.layers.0.mlp.up_proj.weight``
  are PyTorch layout, Flax paths such as ``params/Dense_0/kernel`` are not).
  """
  if layout == "auto":
    return layout_of(names)
  if layout not in ("torch", "flax"):
    raise KfuseError(f"config.layout: unknown layout {layout!r} (auto|torch|flax)")
  return layout


def merge_checkpoints(method: str, models: list[str], base: str | None, output_dir: str, *,
                      params: Mapping[str, Any] | None = None, seed: int = 0,
                      overwrite: bool = False, output_format: str = "auto",
                      dtype: str | None = None, progress: bool = True, mesh=None,
                      prefetch_bytes: int | None = None, chunk: int | None = None,
                      layout: str = "auto", allow_nonfinite: bool = False,
                      overflow: str = "error", statistics: list[str] | None = None) -> dict:
  """Merge checkpoints on disk with a registered method, streaming tensor by tensor.

  ``output_format='auto'`` writes safetensors when every input (base included)
  is a safetensors directory, else Orbax. ``layout`` (auto|torch|flax) is the
  weight layout of row-wise rules (`input_layout`). ``allow_nonfinite`` writes
  NaN/Inf results instead of refusing them; ``overflow`` (error|clamp) decides
  what happens to values a down-cast turns into inf. ``statistics``: one saved
  statistics checkpoint per model for regmean / fisher, read one tensor at a time
  (`hf_statistics.stream_contexts`).
  """
  from kfuse import io as kio
  m = get_method(method)
  params = canonical_params(params)
  if not models:
    raise KfuseError("config.models: empty model list")
  kio.check_output_outside_inputs(output_dir, list(models) + ([base] if base else []))
  opened = [open_model(p) for p in models]
  bsrc = open_model(base) if base else None
  if m.base == "include" and bsrc is not None:
    opened, bsrc = [bsrc] + opened, None
  if m.base == "unused":
    bsrc = None
  n = len(opened)
  validate_params(m, params, n, where="config.params")
  every = ([bsrc] if bsrc else []) + opened
  all_srcs = [o[0] for o in every]
  ref = all_srcs[0]
  for s in all_srcs[1:]:
    extra = [k for k in s.names if k not in ref.names]
    if extra:
      raise KfuseError(f"{s.path}: extra key {extra[0]!r} not in {ref.path}")
    missing = [k for k in ref.names if k not in s.names]
    if missing:
      raise KfuseError(f"{s.path}: missing key {missing[0]!r} present in {ref.path}")
  fmt = output_format
  if fmt == "auto":
    fmt = "safetensors" if {o[1] for o in every} == {"safetensors"} else "orbax"
  if fmt not in pipeline.FORMATS:
    raise KfuseError(f"config.output_format: unknown format {output_format!r} (auto|safetensors|orbax)")
  layout = input_layout(ref.names, layout)
  L = T.num_layers(ref.names)
  off = 1 if bsrc else 0
  tasks = []
  for name in ref.names:
    info = TensorInfo(name, tuple(ref.shape(name)), ref.dtype(name), T.layer_index(name), L, layout)
    vals = resolve_values(m, params, info, n)
    tasks.append(TensorTask(name, m, (0, name) if bsrc else None,
                            [(i + off, name) for i in range(n)], vals, info))
  if statistics:
    from kfuse.merge.hf_statistics import stream_contexts
    if len(statistics) != n:
      raise KfuseError(f"config.statistics: {len(statistics)} statistics for {n} models"
                       f" (one per model, in order)")
    ctx = stream_contexts(m, statistics, {t.out_name: t.info.shape for t in tasks},
                          {t.out_name: t.values for t in tasks}, layout)
    tasks = [dataclasses.replace(t, context=ctx[t.out_name]) for t in tasks]
  dt = T.resolve_dtype(dtype) if dtype else None
  plan = pipeline.Plan(
      m, tasks, all_srcs, format=fmt, dtype=dt, out_dtype=dt,
      donor=ref.path if os.path.isdir(ref.path) else os.path.dirname(ref.path),
      config=getattr(ref, "config", None),
      like=next((o[2] for o in every if o[2] is not None), None),
      where="config.models", base_where="config.base", base_word="base model")
  return pipeline.run(plan, output_dir, key=jax.random.key(seed), overwrite=overwrite,
                      progress=progress, mesh=mesh, prefetch_bytes=prefetch_bytes, chunk=chunk,
                      allow_nonfinite=allow_nonfinite, overflow=overflow)


def cli_params(method: str, params: Mapping[str, Any]) -> dict:
  """Method parameters as given in a config / on the command line, as `merge` takes them.

  Unset (``None``) fields are dropped. A list (``--config.params.weight=1.0,0.5``
  parses as a tuple) holds one value per model for a per-model parameter and
  the anchors of a per-layer gradient (mergekit semantics) for any other; a
  list of ``{filter|regex, value}`` dicts is a rule list. A string given to a
  number or boolean parameter is refused with its name.
  """
  from kfuse.merge import params as P
  spec = get_method(method).param_map
  out = {}
  for name, v in params.items():
    if v is None:
      continue
    if isinstance(v, tuple):
      v = list(v)
    p = spec.get("lambda" if name == "lambda_" else name)
    if p is not None and p.kind in (float, int, bool) and isinstance(v, str):
      raise KfuseError(f"config.params.{name}: expected a {p.kind.__name__}, got {v!r}")
    if p is not None and not p.per_model and isinstance(v, list) and not P.is_rule_list(v):
      v = P.Gradient(v)
    out[name] = v
  return out


def run_native(config, workdir=None) -> dict:
  """``configs/merge.py``: merge checkpoints named on the command line."""
  params = _get(config, "params", {})
  params = params.to_dict() if hasattr(params, "to_dict") else dict(params)
  out = _get(config, "output_dir")
  if not out:
    raise KfuseError("config.output_dir: required (--config.output_dir=OUT)")
  method = _get(config, "method")
  res = merge_checkpoints(method, _split(_get(config, "models")),
                          _get(config, "base") or None, out, params=cli_params(method, params),
                          seed=int(_get(config, "seed", 0)),
                          overwrite=bool(_get(config, "overwrite", False)),
                          output_format=_get(config, "output_format", "auto"),
                          dtype=_get(config, "dtype") or None,
                          progress=bool(_get(config, "progress", True)),
                          layout=_get(config, "layout", "auto"),
                          **scale_options(config), **numerics_options(config))
  print(json.dumps(res))
  return res
