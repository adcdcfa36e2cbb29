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

from kfuse.registry import Registry
from kfuse.tree import KfuseError

Array = jax.Array

REQUIRED = object()  # sentinel for a parameter without default


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["base", "values", "weights", "hp", "key", "mask", "result", "cuts"],
                   meta_fields=["is_delta"])
@dataclasses.dataclass(frozen=True)
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
    cuts: the exact top-k cuts of the method's declared ``selection``, found on
      the host by the streaming engine (`CUTS` names the entries), or None:
      the selecting stage then selects in the kernel. Both give the same mask.
    is_delta: static; whether ``values`` hold task vectors.
  """
  base: Optional[Array]
  values: Array
  weights: Array
  hp: dict
  key: Optional[Array] = None
  mask: Optional[Array] = None
  result: Optional[Array] = None
  cuts: Optional[dict] = None
  is_delta: bool = False

  def replace(self, **changes) -> "MergeState":
    """A copy with ``changes`` (a frozen pytree dataclass, as `flax.struct`'s, without
    importing Flax on every merge job's start-up)."""
    return dataclasses.replace(self, **changes)


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


# What a method may declare it selects (`Method.selection`). For each kind: the
# cuts the engine finds on the host, as (cut name, hp entry holding the per-model
# count). A cut ``c`` arrives in ``state.cuts`` as ``c_v`` (uint32 [N], the key at
# the cut) and ``c_p`` (int32 [N], the tie-hash bound), with ``tie_seed`` ([N])
# and, for a flat chunk of a longer tensor, ``tie_offset`` (its flat start); see
# `kfuse.merge.select.keep_from_cut`.
CUTS = {
    "magnitude": (("cut", "k"),),                  # keep the k largest |δ| (TIES trim)
    "band": (("cut_hi", "hi"), ("cut_lo", "lo")),  # keep ascending |δ| ranks [lo, hi)
}


@dataclasses.dataclass(frozen=True)
class PrepareContext:
  """What `Method.prepare` may know beyond one tensor's resolved values.

  Attributes:
    stats: the result of the method's ``tree_stats`` whole-model pre-pass
      (None for methods without one, or where no pre-pass ran).
    dialect: 'kfuse' (native API / CLI) or 'mergekit' (a mergekit YAML, whose
      ranges are more lenient: e.g. any density, <= 0 dropping a task vector).
  """
  stats: Optional[Mapping[str, Any]] = None
  dialect: str = "kfuse"


NATIVE = PrepareContext()
MERGEKIT = PrepareContext(dialect="mergekit")


def unless_rescaled(static: Mapping[str, Any]) -> bool:
  """`Method.elementwise` for GTA recipes: elementwise unless ``rescale`` (a
  whole-tensor norm) is on."""
  return not static.get("rescale", False)


@dataclasses.dataclass(frozen=True)
class Method:
  """A merge method: its recipe and the contract the API and the engine rely on.

  Attributes:
    name: registry name (mergekit's where one exists).
    recipe: ``(MergeState) -> MergeState`` given the static options as kwargs,
      i.e. ``recipe(**static)(state)``.
    params: parameter specs (`Param`): names, defaults, per-model / static.
    base: 'required' | 'optional' | 'unused' | 'include' ('include': a given
      base is treated as one more input, as mergekit's karcher does).
    min_models / max_models: number of non-base models accepted.
    prepare: host-side ``(method, values, info, n, ctx=NATIVE) -> (static, hp)``
      mapping resolved Python values of one tensor to static options and traced
      arrays (e.g. density -> exact integer k); None: `default_prepare`.
      ``ctx`` is a `PrepareContext` (whole-model stats, front-end dialect).
    random: whether the method consumes a PRNG key.
    tree_stats: optional whole-model pre-pass (global top-k thresholds …):
      ``(base_flat, experts_flat, values) -> dict``, handed to ``prepare`` as
      ``ctx.stats``. The streaming engine cannot run it (one tensor at a time).
    elementwise: whether each output entry depends only on the same entry of
      the inputs, given ``hp`` and the host-found cuts; a bool or a function of
      the static options (e.g. `unless_rescaled`). The engine then runs the
      recipe on fixed-size flat chunks (one compiled program for every shape).
    selection: what the recipe selects by a whole-tensor rank, as a key of
      `CUTS` ('magnitude': the ``hp['k']`` largest |δ|; 'band': ascending |δ|
      ranks in ``[hp['lo'], hp['hi'])``), or None. The engine finds those cuts
      exactly on the host and passes them as ``state.cuts``; the stage that
      selects (`stages.trim_magnitude` / `stages.trim_outliers`) uses them.
    sparsifies: whether the per-model ``density`` is the fraction of each task
      vector kept (TIES, DARE, breadcrumbs, DELLA). The native API then insists
      on a density in (0, 1]; a mergekit YAML accepts any (as mergekit does:
      <= 0 drops the task vector, > 1 keeps all of it) with one warning line.
    doc: formula and reference.
    data: the data the method needs ('' = none), e.g. "input Grams: 256 unlabeled
      examples per task"; such methods run on statistics (`kfuse.merge.informed`).
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
  elementwise: Any = False
  selection: Optional[str] = None
  sparsifies: bool = False
  doc: str = ""
  data: str = ""

  def __post_init__(self):
    if self.base not in ("required", "optional", "unused", "include"):
      raise ValueError(f"method {self.name!r}: base must be required|optional|unused|include")
    if self.selection is not None and self.selection not in CUTS:
      raise ValueError(f"method {self.name!r}: selection must be one of {sorted(CUTS)} or None")

  @property
  def param_map(self) -> dict[str, Param]:
    return {p.name: p for p in self.params}

  def is_elementwise(self, static: Mapping[str, Any]) -> bool:
    """Whether the recipe is elementwise for these static options (`elementwise`)."""
    e = self.elementwise
    return bool(e(static) if callable(e) else e)

  def like(self, name: str, recipe: Stage, **changes) -> "Method":
    """A method with this one's parameters, preparation and contract running ``recipe``
    (e.g. a `chain` of stages) instead; ``changes`` override fields (``elementwise``,
    ``selection``, ``doc``, …). The recipe ignores the static options."""
    return dataclasses.replace(self, name=name, recipe=_fixed_recipe(recipe), **changes)

  @functools.cached_property
  def _compiled(self):
    return {}

  def kernel(self, static: Mapping[str, Any]):
    """The jit-compiled per-tensor function for these static options:
    ``run(base, values, weights, hp, rng, cuts=None)``."""
    key = tuple(sorted(static.items()))
    cache = self._compiled
    if key not in cache:
      recipe = self.recipe(**dict(static))

      def run(base, values, weights, hp, rng, cuts=None):
        st = MergeState(base=base, values=values, weights=weights, hp=hp, key=rng, cuts=cuts)
        out = recipe(st)
        if out.result is None:
          raise RuntimeError(f"recipe for {self.name!r} produced no result")
        return out.result

      cache[key] = jax.jit(run)
    return cache[key]


def check_models(method: Method, n: int, has_base: bool, where: str = "",
                 base_word: str = "base model") -> None:
  """The one input-contract check of every front end (`merge`, `merge_checkpoints`,
  mergekit YAML): a base where the method requires one, and ``n`` models within
  ``[min_models, max_models]``. ``n`` counts the non-base models, or every input
  for methods that do not use a base ('unused') or count it as one more input
  ('include'). ``base_word`` names the base as the front end's user wrote it."""
  at = f"{where}: " if where else ""
  if method.base == "required" and not has_base:
    raise KfuseError(f"{at}merge method {method.name!r} requires a {base_word}")
  lo, hi = method.min_models, method.max_models
  if n < lo or (hi is not None and n > hi):
    what = "inputs" if method.base in ("unused", "include") else "non-base models"
    span = f"{lo}" if hi == lo else f"{lo}..{hi if hi is not None else 'any'}"
    raise KfuseError(f"{at}merge method {method.name!r} takes {span} {what}, got {n}")


def _fixed_recipe(stage: Stage) -> Callable[..., Stage]:
  def recipe(**static):
    return stage
  return recipe


METHODS = Registry("merge method")


def register(method: Method) -> Method:
  """Add ``method`` to the registry (its defaults are its `Param` defaults)."""
  METHODS.register(method.name, method,
                   defaults={p.name: p.default for p in method.params}, doc=method.doc)
  return method


def get_method(name) -> Method:
  """The registered method ``name`` (a `Method` is returned as is)."""
  if isinstance(name, Method):
    return name
  if callable(name):
    raise KfuseError("a recipe is not a method: give it parameters and a contract, e.g."
                     " merge.get_method('ties').like('my_ties', recipe)")
  return METHODS.get(name).fn


def names() -> list[str]:
  return METHODS.names()


def registry() -> Mapping[str, Method]:
  return {n: METHODS.get(n).fn for n in METHODS.names()}
