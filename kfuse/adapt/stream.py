"""Running an adapter over a stream of test batches, and scoring its online predictions.

    runner = adapt.make_runner(tta)
    state, logits, metrics = runner(state, xs, resets, key)      # xs [T, B, ...]
    report = adapt.evaluate_stream(tta, variables, stream, key)  # error (%) per domain visit

The protocols of the test-time adaptation literature: ``resets[t]`` resets the
state to the source before batch ``t`` (Tent's reset per distribution shift);
all-False is the continual protocol (CoTTA). Batch ``t`` gets its own key
``split(key, T)[t]``, so a run is a pure function of ``(state, xs, resets, key)``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.adapt.core import Adapter, check_inputs
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["make_runner", "run", "evaluate_stream"]


def make_runner(adapter: Adapter) -> Callable:
  """``run(state, xs [T, B, ...], resets [T] bool, key) -> (state, logits [T, B, C], metrics)``.

  A host loop over the adapter's jitted ``step`` (compiled once per batch shape;
  dispatch is asynchronous, so the loop costs little). ``metrics`` are stacked over
  the stream (``[T]`` each), without the logits. A ``lax.scan`` over the stream
  would be one compilation, but XLA:CPU runs convolution gradients inside loops
  several times slower.
  """
  step, reset = adapter.step, adapter.reset

  def run_stream(state, xs, resets, key=None):
    resets = np.asarray(resets, bool)
    keys = jax.random.split(key, len(xs)) if key is not None and len(xs) else None
    logits, metrics = [], []
    for t in range(len(xs)):
      if resets[t]:
        state = reset(state)
      state, m = step(state, {"x": xs[t]}, None if keys is None else keys[t])
      m = dict(m)
      logits.append(m.pop("logits"))
      metrics.append(m)
    stacked = {k: jnp.stack([m[k] for m in metrics]) for k in (metrics[0] if metrics else {})}
    return state, jnp.stack(logits), stacked

  return run_stream


def run(adapter: Adapter, state: Any, xs: Any, resets: Any = None, key: Any = None) -> tuple:
  """Check ``xs`` on the host, then run `make_runner` (no resets by default)."""
  check_inputs(xs)
  resets = np.zeros((len(xs),), bool) if resets is None else np.asarray(resets, bool)
  if resets.shape != (len(xs),):
    raise KfuseError(f"resets: expected shape ({len(xs)},), got {tuple(resets.shape)}")
  return make_runner(adapter)(state, xs, resets, key)


def evaluate_stream(adapter: Adapter, variables: PyTree, stream: Any, key: jax.Array, *,
                    fisher: PyTree | None = None, runner: Callable | None = None) -> dict:
  """Adapt ``adapter`` from ``variables`` over ``stream``; online error (%) per domain visit.

  ``stream`` carries ``x [T, B, ...]``, ``y [T, B]``, ``reset [T]``, ``domain [T]``
  (visit index of each batch), ``names`` (one per visit) and ``num_batches``
  (`kfuse.data.corruptions.Stream`). A batch is scored with the logits the method
  returns for it (``metrics["logits"]``). ``fisher``: EATA's Fisher information;
  ``runner``: a `make_runner` of ``adapter`` to reuse across calls. Returns the
  errors per visit and their mean, each metric's mean and per-visit means, and
  the wall time of the stream (compilation excluded).
  """
  extra = {"fisher": fisher} if adapter.name == "eata" else {}
  k_init, k_run = jax.random.split(key)
  state = adapter.init(variables, {"x": stream.x[0]}, k_init, **extra)
  runner = runner or make_runner(adapter)
  jax.block_until_ready(runner(state, stream.x[:1], stream.reset[:1], k_run)[1])  # compile
  t = time.time()
  _, logits, metrics = runner(state, stream.x, stream.reset, k_run)
  logits = np.asarray(logits)
  seconds = time.time() - t
  wrong = logits.argmax(-1) != stream.y                             # [T, B]
  visits = range(len(stream.names))
  per_visit = [float(100 * wrong[stream.domain == i].mean()) for i in visits]
  metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
  summary = {k: float(v.mean()) for k, v in metrics.items()}
  by_visit = {k: [float(v[stream.domain == i].mean()) for i in visits] for k, v in metrics.items()}
  return {"errors": per_visit, "mean": float(np.mean(per_visit)), "metrics": summary,
          "metrics_per_visit": by_visit,
          "seconds": seconds, "steps": int(stream.num_batches),
          "ms_per_batch": 1e3 * seconds / max(1, stream.num_batches)}
