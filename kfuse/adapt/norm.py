"""Normalization-statistics methods: the unadapted source model and BN-adapt.

* `source`: inference with the source running statistics; nothing changes.
* `bn_adapt` ("BN-1", "Norm"; Schneider et al., *Improving robustness against
  common corruptions by covariate shift adaptation*, NeurIPS 2020; Nado et al.
  2020; the Tent repository's ``norm.py``): every BatchNorm layer normalizes
  with the statistics of the current test batch,

      μ = p·μ_src + (1-p)·μ_B,   σ² = p·σ²_src + (1-p)·σ²_B,

  with ``p = prior`` (default 0: "the statistics are measured independently for
  each batch; no running average or other cross-batch estimation is used").
  ``prior > 0`` is the benchmark's BN-alpha / TTAB's ``adapt_prior`` (e.g.
  ``prior=0.9`` for batches of size 1). No gradients, no state updates.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kfuse.adapt import core
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["NormState", "source", "bn_adapt"]


class NormState(NamedTuple):
  """State of `source` / `bn_adapt`: the (never changing) variables and a step counter."""
  variables: PyTree
  count: jax.Array


def _norm_method(name: str, apply_fn: Any, norm: str, prior: float,
                 apply_kwargs: Mapping[str, Any] | None) -> core.Adapter:
  apply_fn = core.as_apply_fn(apply_fn)

  def build(variables, example):
    if norm == "batch" and not core.batch_norm_paths(variables):
      raise KfuseError(f"variables: {name} needs BatchNorm layers (a 'batch_stats' collection);"
                       " the model has none")
    return NormState(variables, jnp.zeros((), jnp.int32))

  def step(state: NormState, x, key):
    del key
    logits, _ = core.forward(apply_fn, state.variables, x, norm=norm, prior=prior,
                             apply_kwargs=apply_kwargs, require_bn=(norm == "batch"))
    finite = core.is_finite(x)
    count = state.count + finite.astype(jnp.int32)    # a skipped (NaN) batch is not counted
    return (NormState(state.variables, count), logits,
            {"skipped": 1.0 - finite.astype(jnp.float32)})

  def reset(state: NormState) -> NormState:
    return NormState(state.variables, jnp.zeros((), jnp.int32))

  return core.adapter(name, core.make_init(name, build, step), step, reset)


def source(apply_fn: Any, *, apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """The unadapted source model (BatchNorm uses its running statistics)."""
  return _norm_method("source", apply_fn, "source", 0.0, apply_kwargs)


def bn_adapt(apply_fn: Any, *, prior: float = 0.0,
             apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """BN-adapt: normalize with test-batch statistics, ``μ = p·μ_src + (1-p)·μ_B`` (same for σ²).

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    prior: share ``p`` of the source statistics in [0, 1) (0 = BN-1, pure batch statistics).
    apply_kwargs: extra keyword arguments for ``apply_fn`` (e.g. ``{'train': False}``).
  """
  if not 0.0 <= float(prior) < 1.0:
    raise KfuseError(f"prior: must be in [0, 1), got {prior}")
  return _norm_method("bn_adapt", apply_fn, "batch", float(prior), apply_kwargs)
