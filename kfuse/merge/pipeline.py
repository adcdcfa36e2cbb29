"""The one pipeline of checkpoint merges: plan -> validate -> execute -> write atomically.

Both front ends build a `Plan` and hand it to `run`: the native checkpoint merge
(`kfuse.merge.runner.merge_checkpoints`, ``configs/merge.py``) and the mergekit
YAML runner (`kfuse.mergekit_compat.run_yaml`, ``configs/mergekit.py``). A front
end parses its inputs, opens the models and resolves every tensor's parameters
with `kfuse.merge.params.resolve` (the one resolver); `run` then

1. validates the plan against the method's contract (`validate`: the one
   contract check, `core.check_models`, for every task; whole-model statistics
   cannot be streamed);
2. executes it tensor by tensor with the streaming engine (`engine.execute`);
3. writes the result atomically: a temporary sibling directory (HF safetensors
   shards planned up front, tokenizer / aux files, config.json, extra files)
   renamed into place when complete, or an Orbax checkpoint.

On a multi-host run every process executes the plan and only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax

from kfuse.merge.core import Method, check_models
from kfuse.merge.engine import Stats, TensorTask, compile_cache, execute, output_specs
from kfuse.tree import KfuseError

FORMATS = ("safetensors", "orbax")


@dataclasses.dataclass
class Plan:
  """A checkpoint merge as a front end planned it.

  Attributes:
    method: the merge method (every task's).
    tasks: one `TensorTask` per output tensor, in output order.
    sources: the `TensorSource`s the tasks' (model index, name) pairs refer to.
    format: 'safetensors' (an HF directory) or 'orbax'.
    dtype: working dtype of float inputs (None: as stored).
    out_dtype: dtype of the saved float tensors (None: the working dtype).
    donor: directory whose tokenizer and other non-weight files are copied
      (safetensors; None: none).
    config: the config.json written with the shards (safetensors; None: none).
    like: a pytree whose structure the Orbax output takes (None: a flat dict).
    files: extra text files written beside the tensors, ``{name: text}``.
    max_shard_bytes: size cap of one output safetensors shard.
    where: what contract errors name (a config file or field).
    base_where: what a missing base's error names (default ``where``).
    base_word: the base model as the front end's user wrote it.
  """
  method: Method
  tasks: list[TensorTask]
  sources: list
  format: str = "safetensors"
  dtype: Any = None
  out_dtype: Any = None
  donor: Optional[str] = None
  config: Optional[dict] = None
  like: Any = None
  files: Mapping[str, str] = dataclasses.field(default_factory=dict)
  max_shard_bytes: int = 5_000_000_000
  where: str = ""
  base_where: Optional[str] = None
  base_word: str = "base model"


def validate(plan: Plan) -> None:
  """The plan's contract: `core.check_models` for every task (a base where the
  method requires one, a number of models it accepts), a streamable method, a
  known output format. One-line `KfuseError`s."""
  m = plan.method
  if plan.format not in FORMATS:
    raise KfuseError(f"{plan.where}: unknown output format {plan.format!r}"
                     f" ({'|'.join(FORMATS)})")
  if m.tree_stats is not None and any(t.context.stats is None for t in plan.tasks):
    raise KfuseError(f"{plan.where}: method {m.name!r} needs whole-model statistics, which a"
                     f" streaming merge cannot compute; use kfuse.merge.merge in Python")
  seen = set()
  for task in plan.tasks:
    contract = (task.method, len(task.experts), task.base is not None)
    if contract in seen:
      continue
    seen.add(contract)
    method, n, has_base = contract
    missing_base = method.base == "required" and not has_base
    where = plan.base_where or plan.where if missing_base else plan.where
    check_models(method, n, has_base, where, base_word=plan.base_word)


def no_matrix_note(plan: Plan) -> Optional[str]:
  """One line when a subspace method (TSV-M, Iso-C/CTS, WUDI, SVC) meets a model with no
  weight matrix (`subspace.matrix_view`; e.g. no 2-D tensor): there is nothing to decompose, and every tensor is merged as the papers
  merge non-matrix tensors (the mean task vector; SVC leaves them as its base method made
  them). None otherwise."""
  from kfuse.merge import subspace
  if not plan.tasks or not subspace.decomposes(plan.method):
    return None
  if any(subspace.matrix_view(t.info) is not None for t in plan.tasks):
    return None
  ranks = sorted({len(t.info.shape) for t in plan.tasks})
  return (f"method {plan.method.name!r} decomposes weight matrices and this model has"
          f" none ({len(plan.tasks)} tensors of rank {'/'.join(map(str, ranks))}): every"
          f" tensor was merged as a non-matrix tensor (the mean task vector), as the paper does")


def process_age() -> Optional[float]:
  """Seconds since this process started (Linux ``/proc``, 10 ms resolution; None elsewhere)."""
  try:
    with open("/proc/self/stat") as f:
      start = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime, in ticks
    with open("/proc/uptime") as f:
      up = float(f.read().split()[0])
    return round(up - start / os.sysconf("SC_CLK_TCK"), 3)
  except (OSError, ValueError, IndexError):
    return None


def report(res: dict, stats: Stats) -> dict:
  """Add the engine's counts to a result dict (``clamped``, ``nonfinite`` per tensor,
  ``copied``) and say on stderr, in one line, that integer / bool tensors were copied.
  Also how long the process took before the engine started (``startup_s``) and
  before the first tensor was merged (``first_tensor_s``), wall time from the
  process's start and CPU time of all its threads (``*_cpu_s``)."""
  age, now = process_age(), time.perf_counter()
  for name, at in (("startup", stats.started), ("first_tensor", stats.first_tensor)):
    if at is not None and age is not None:
      res[f"{name}_s"] = round(age - (now - at[0]), 3)
    if at is not None:
      res[f"{name}_cpu_s"] = round(at[1], 3)
  cache = compile_cache.counts()
  if cache is not None:
    res["compile_cache"] = cache
  if stats.clamped:
    res["clamped"] = dict(stats.clamped)
  if stats.nonfinite:
    res["nonfinite"] = dict(stats.nonfinite)
  if stats.copied:
    res["copied"] = len(stats.copied)
    print(f"kfuse: note: {len(stats.copied)} integer/bool tensor(s) copied unchanged (all"
          f" models agree), e.g. {stats.copied[0]!r}", file=sys.stderr)
  return res


def run(plan: Plan, output_dir: str | os.PathLike, *, key: jax.Array | None = None,
        overwrite: bool = False, progress: bool = True, stats: Optional[Stats] = None,
        **engine_options) -> dict:
  """Validate, execute and write ``plan`` into ``output_dir``, atomically.

  ``engine_options`` go to `engine.execute` (``mesh``, ``prefetch_bytes``,
  ``chunk``, ``allow_nonfinite``, ``overflow``). An existing ``output_dir`` is
  replaced only with ``overwrite``; stale temporaries of this host's dead runs
  are removed first. Returns ``{output_dir, tensors, method, format, seconds}``
  and the engine's counts (`report`).
  """
  from kfuse import io as kio
  from kfuse import shard
  from kfuse.io.atomic import check_output_writable
  validate(plan)
  note = no_matrix_note(plan)
  if note:
    print(f"kfuse: note: {note}", file=sys.stderr)
  stats = stats if stats is not None else Stats()
  opts = dict(key=key, dtype=plan.dtype, out_dtype=plan.out_dtype, progress=progress,
              stats=stats, **engine_options)
  tasks, sources = plan.tasks, plan.sources
  t0 = time.perf_counter()

  def result(count: int) -> dict:
    return {"output_dir": str(output_dir), "tensors": count, "method": plan.method.name,
            "format": plan.format, "seconds": round(time.perf_counter() - t0, 3),
            **({"note": note} if note else {})}

  if not shard.is_writer():   # multi-host: every process computes, process 0 writes
    return result(execute(tasks, sources, lambda name, a: None, **opts))
  kio.remove_stale_outputs(output_dir)
  check_output_writable(output_dir)   # one line now, not a traceback after the work
  if plan.format == "orbax":
    out = {}
    count = execute(tasks, sources, out.__setitem__, **opts)
    from kfuse import tree as T
    kio.save_orbax(output_dir, T.unflatten(plan.like, out) if plan.like is not None else out,
                   overwrite=overwrite)
    return report(result(count), stats)
  with kio.atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
    if plan.donor:   # tokenizer & co. first: finish() then writes the edited config.json
      kio.copy_aux_files(plan.donor, tmp)
    specs = output_specs(tasks, sources, plan.dtype, plan.out_dtype)
    with kio.PlannedHFWriter(tmp, specs, max_shard_bytes=plan.max_shard_bytes,
                             dtype=plan.out_dtype) as writer:
      count = execute(tasks, sources, writer.add, write_part=writer.add_part, **opts)
      writer.finish(config=plan.config)
    for name, text in plan.files.items():
      with open(os.path.join(tmp, name), "w") as f:
        f.write(text)
  return report(result(count), stats)
