"""The merge core: per-tensor state, composable stages, recipes and the method registry.

A *stage* is a pure function ``MergeState -> MergeState`` (optax's
GradientTransformation, specialised to one tensor). `chain` composes stages
into a *recipe*; the last stage writes ``state.result``. A *method* bundles a
recipe with its parameter specification (names, defaults, which are
per-model), the host-side preparation that turns user parameters into traced
arrays (e.g. ``density`` -> exact integer ``k`` per model, computed in Python
float64 exactly as mergekit does), and its base-model contract.

Everything inside a recipe is `jnp` on arrays with static shapes: recipes are
jit-compiled once per (method, static options, shape, dtype) and reused for
every same-shaped tensor; hyper-parameters that vary between tensors (weights,
k, t, λ) are traced array arguments, so they never trigger recompilation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from kfuse.tree import KfuseError

Array = jax.Array

REQUIRED = object()  # sentinel for a parameter without default


@struct.dataclass
class MergeState:
  """Per-tensor merge state threaded through stages.

  Attributes:
    base: θ_b, shape ``S`` (None when the method uses no base).
    values: ``[N, *S]``: the experts' tensors, or their task vectors once
      `task_vectors` has run (see ``is_delta``).
    weights: ``[N]`` per-model weights in the working dtype.
    mask: ``[N, *S]`` bool participation mask from sign election (None = all).
    hp: dict of traced per-tensor hyper-parameters (arrays).
    key: PRNG key for random stages (None for deterministic recipes).
    result: the merged tensor, shape ``S``, once a combining stage ran.
    is_delta: static; whether ``values`` hold task vectors.
  """
  base: Optional[Array]
  values: Array
  weights: Array
  hp: dict
  key: Optional[Array] = None
  mask: Optional[Array] = None
  result: Optional[Array] = None
  is_delta: bool = struct.field(pytree_node=False, default=False)


Stage = Callable[[MergeState], MergeState]


def chain(*stages: Stage) -> Stage:
  """Compose stages left to right, like ``optax.chain``."""

  def apply(state: MergeState) -> MergeState:
    for s in stages:
      state = s(state)
    return state

  apply.stages = stages  # for introspection
  return apply


@dataclasses.dataclass(frozen=True)
class Param:
  """Specification of one method parameter.

  ``per_model`` parameters take one value per non-base model (mergekit's
  NON_BASE / INPUT scope); others are shared by the whole tensor. ``static``
  parameters (booleans, enum strings, iteration counts) select the compiled
  kernel; the rest are traced.
  """
  name: str
  default: Any = REQUIRED
  per_model: bool = False
  static: bool = False
  kind: type = float
  mergekit: bool = True  # accepted in mergekit YAML (False: kfuse extension)
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """What host-side preparation may know about a tensor (all static)."""
  path: str
  shape: tuple
  dtype: Any
  layer: Optional[int] = None
  num_layers: int = 0
  layout: str = "torch"   # 'torch' ([out, in]) or 'flax' ([in, out])


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered merge method.

  Attributes:
    name: registry name (mergekit's where one exists).
    recipe: ``(MergeState) -> MergeState`` given the static options as kwargs,
      i.e. ``recipe(**static)(state)``.
    params: parameter specs.
    base: 'required' | 'optional' | 'unused' | 'include' ('include': a given
      base is treated as one more input, as mergekit's karcher does).
    min_models / max_models: number of non-base models accepted.
    prepare: host-side ``(values, info, n) -> dict`` mapping resolved python
      parameter values to traced arrays / extra statics; default converts.
    random: whether the method consumes a PRNG key.
    tree_stats: optional whole-model pre-pass (global top-k thresholds …):
      ``(base_flat, experts_flat, params) -> dict`` whose entries are passed
      to ``prepare`` as ``values['_stats']``.
    doc: formula and reference.
  """
  name: str
  recipe: Callable[..., Stage]
  params: tuple
  base: str = "required"
  min_models: int = 1
  max_models: Optional[int] = None
  prepare: Optional[Callable] = None
  random: bool = False
  tree_stats: Optional[Callable] = None
  doc: str = ""

  @property
  def param_map(self) -> dict[str, Param]:
    return {p.name: p for p in self.params}

  @functools.cached_property
  def _compiled(self):
    return {}

  def kernel(self, static: Mapping[str, Any]):
    """The jit-compiled per-tensor function for these static options."""
    key = tuple(sorted(static.items()))
    cache = self._compiled
    if key not in cache:
      recipe = self.recipe(**dict(static))

      def run(base, values, weights, hp, rng):
        st = MergeState(base=base, values=values, weights=weights, hp=hp, key=rng)
        out = recipe(st)
        if out.result is None:
          raise RuntimeError(f"recipe for {self.name!r} produced no result")
        return out.result

      cache[key] = jax.jit(run)
    return cache[key]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in _REGISTRY:
    raise ValueError(f"merge method {method.name!r} registered twice")
  _REGISTRY[method.name] = method
  return method


def get_method(name: str) -> Method:
  if isinstance(name, Method):
    return name
  if name not in _REGISTRY:
    raise KfuseError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def registry() -> Mapping[str, Method]:
  return dict(_REGISTRY)
