"""Shared machinery of the test-time adaptation (TTA) methods.

Every method is an `Adapter`, the library's step protocol (`kfuse.protocol`)
plus a ``reset``, over an explicit state pytree::

    tta = adapt.tent(model.apply, optimizer=optax.adam(1e-3))
    state = tta.init(variables, {"x": x_example}, key)   # holds the source variables
    state, metrics = tta.step(state, {"x": x}, key)       # already jitted; metrics["logits"]
    state = tta.reset(state)                             # back to the source model

This module holds what the methods share:

* **normalization control** (`forward`): Flax ``nn.BatchNorm`` layers are
  intercepted (``flax.linen.intercept_methods``) so a method can normalize
  with the source running statistics (``norm="source"``), with the statistics
  of the current test batch (``norm="batch"``, optionally mixed with a share
  ``prior`` of the source statistics), or with an exponential moving average
  that is updated by the batch (``norm="ema"``, RoTTA's RobustBN). The model
  itself is called in inference mode (``apply_kwargs``, e.g. ``train=False``),
  so dropout and other train-only behaviour stay off;
* **trainable subsets** (`Trainable`, the one piece every method uses):
  ``"norm"`` (the affine ``scale``/``bias`` of BatchNorm / LayerNorm / GroupNorm
  layers), ``"bn"``, ``"all"``, a regex or a predicate over '/'-joined parameter
  paths. The selection is a pure function of the tree structure, so it is
  static under ``jit``; gradients are taken and optimizers act on the flat
  ``{path: leaf}`` dict of the subset only (no dead gradients of frozen weights);
* **losses**: `entropy`, `soft_cross_entropy`, `tree_norm` (gradient-safe at
  zero); tree helpers `ema`, `tree_where`; and `adapter`, which turns a
  method's array-level step into the protocol's jitted ``step(state, batch, key)``.

Streams of batches are run by `kfuse.adapt.stream`.

Bad input: a model without any BatchNorm layer raises `KfuseError` when a
method needs batch statistics; a batch of size 1 raises when pure batch
statistics are requested (use ``bn_adapt(prior=...)`` or RoTTA's RobustBN);
a batch with NaN/Inf inputs leaves the state unchanged inside ``step``
(``metrics['skipped'] = 1``, see `guard`) and `run` refuses it on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse import nnx as knnx
from kfuse import protocol
from kfuse import tree as ktree
from kfuse.tree import KfuseError

PyTree = Any

__all__ = [
    "Adapter", "NORM_MODES", "Trainable", "adapter", "as_apply_fn", "forward", "batch_norm_paths",
    "norm_layer_paths", "trainable_paths", "trainable_mask", "subset", "with_subset", "with_params",
    "entropy", "soft_cross_entropy", "tree_norm", "ema", "tree_where", "guard", "is_finite",
    "copy_tree", "check_inputs", "need_key",
]

NORM_MODES = ("source", "batch", "ema")


class Adapter(NamedTuple):
  """A test-time adaptation method: a `kfuse.protocol.Learner` plus ``reset``.

  Attributes:
    init: ``init(variables, example_batch, key=None, **extra) -> state``. The
      state holds a copy of the source ``variables`` so `reset` needs nothing else.
      ``example_batch`` (``{"x": array or jax.ShapeDtypeStruct}`` shaped like one
      test batch) sizes the state and validates the model once, eagerly. No
      PRNG key is stored in the state.
    step: ``step(state, {"x": x}, key) -> (state, metrics)``, jit-compiled by the
      library. ``metrics["logits"]`` are the method's *online* predictions for
      ``x``. Stochastic methods (CoTTA, RoTTA) draw all their randomness from
      ``key``; the others ignore it (``None`` is accepted).
    reset: ``reset(state) -> state``, the state right after `init` (jitted).
    name: registry name.
  """
  init: Callable[..., Any]
  step: Callable[[Any, jax.Array], tuple]
  reset: Callable[[Any], Any]
  name: str = ""


def as_apply_fn(model: Any) -> Callable:
  """``model.apply`` for a Flax Linen module; for an NNX model (``nnx.Module`` / ``GraphDef``)
  `kfuse.nnx.apply_fn` in eval mode (its BatchNorm layers are intercepted like Linen's; pass
  the ``nnx.State`` to ``init``); else ``model`` itself (a Flax-style apply)."""
  if isinstance(model, nn.Module):
    return model.apply
  if knnx.is_nnx(model):
    return functools.partial(knnx.apply_fn(model), train=False)
  if not callable(model):
    raise KfuseError("apply_fn: expected a flax.linen.Module or its apply function,"
                     f" got {type(model).__name__}")
  return model


# ------------------------------------------------------------------ batch normalization


@dataclasses.dataclass
class _NormPlan:
  mode: str
  prior: float
  momentum: float
  sample_mask: jax.Array | None
  calls: list


def _moments(x: jax.Array, axes: tuple, sample_mask: jax.Array | None):
  """Biased mean and variance of ``x`` over ``axes``; rows weighted by ``sample_mask``.

  One pass, ``σ² = max(E[x²] - E[x]², 0)``, as Flax's BatchNorm (``use_fast_variance``).
  """
  if sample_mask is None:
    mean = x.mean(axes)
    mean_sq = jnp.square(x).mean(axes)
  else:
    w = sample_mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    count = jnp.maximum(jnp.sum(jnp.broadcast_to(w, x.shape), axes), 1.0)
    mean = jnp.sum(w * x, axes) / count
    mean_sq = jnp.sum(w * jnp.square(x), axes) / count
  return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _batch_norm(module: nn.BatchNorm, x: jax.Array, plan: _NormPlan) -> jax.Array:
  """``(x - μ) / sqrt(σ² + eps) * scale + bias`` with μ, σ² chosen by ``plan.mode``.

  * ``source``: μ, σ² = the running statistics (``batch_stats``);
  * ``batch``:  μ = p·μ_src + (1-p)·μ_B, σ² = p·σ²_src + (1-p)·σ²_B, p = ``prior``
    (p = 0 is BN-1 / Tent's "train-mode BN"; p > 0 is BN-alpha / TTAB's adapt prior);
  * ``ema``:    μ ← (1-α)·μ + α·μ_B, σ² ← (1-α)·σ² + α·σ²_B with α = ``momentum``;
    normalize with the *updated* statistics and store them (RoTTA RobustBN).

  μ_B, σ²_B are the biased moments over every axis but the feature axes, so
  gradients flow through them as in PyTorch's train-mode BatchNorm.
  """
  path = "/".join(str(p) for p in module.scope.path)
  plan.calls.append(path)
  axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  feature_axes = tuple(sorted(int(a) % x.ndim for a in axes))
  reduce_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  bshape = [1] * x.ndim
  for a in feature_axes:
    bshape[a] = x.shape[a]
  ra_mean = module.get_variable("batch_stats", "mean")
  ra_var = module.get_variable("batch_stats", "var")
  if ra_mean is None or ra_var is None:
    raise KfuseError(f"variables: BatchNorm {path!r} has no batch_stats/mean and var")
  xf = x.astype(jnp.float32)
  if plan.mode == "source":
    mean, var = ra_mean, ra_var
  else:
    if 0 not in reduce_axes:
      raise KfuseError(f"model: BatchNorm {path!r} normalizes over the batch axis;"
                       " cannot take batch statistics")
    if plan.mode == "batch" and plan.prior == 0.0 and x.shape[0] == 1 and plan.sample_mask is None:
      raise KfuseError("batch: size 1, but batch statistics need at least 2 samples; use"
                       " bn_adapt(prior=...) (mix in the source statistics) or rotta (RobustBN)")
    b_mean, b_var = _moments(xf, reduce_axes, plan.sample_mask)
    b_mean = b_mean.reshape(ra_mean.shape)
    b_var = b_var.reshape(ra_var.shape)
    if plan.mode == "batch":
      p = plan.prior
      mean, var = (b_mean, b_var) if p == 0.0 else (p * ra_mean + (1 - p) * b_mean,
                                                     p * ra_var + (1 - p) * b_var)
    else:  # ema
      a = plan.momentum
      mean = (1 - a) * ra_mean + a * b_mean
      var = (1 - a) * ra_var + a * b_var
      if module.is_mutable_collection("batch_stats"):
        module.put_variable("batch_stats", "mean", jax.lax.stop_gradient(mean))
        module.put_variable("batch_stats", "var", jax.lax.stop_gradient(var))
  mul = jax.lax.rsqrt(var + module.epsilon)                 # per feature: y = x·a + c
  if module.use_scale:
    mul = mul * module.get_variable("params", "scale").reshape(mul.shape)
  add = -mean * mul
  if module.use_bias:
    add = add + module.get_variable("params", "bias").reshape(mul.shape)
  y = xf * mul.reshape(bshape) + add.reshape(bshape)
  out_dtype = module.dtype or jnp.result_type(x.dtype, module.param_dtype)
  return y.astype(out_dtype)


def _interceptor(plan: _NormPlan):
  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      if kwargs.get("mask") is not None:
        raise KfuseError("model: BatchNorm called with mask=; masked BatchNorm is not"
                         " supported by kfuse.adapt")
      return _batch_norm(context.module, args[0], plan)
    return next_fun(*args, **kwargs)
  return intercept


def forward(apply_fn: Callable, variables: PyTree, x: jax.Array, *, norm: str = "batch",
            prior: float = 0.0, momentum: float = 0.05, sample_mask: jax.Array | None = None,
            apply_kwargs: Mapping[str, Any] | None = None,
            require_bn: bool = False) -> tuple[jax.Array, PyTree | None]:
  """Logits of a Flax model whose BatchNorm layers follow ``norm`` (see `_batch_norm`).

  Args:
    apply_fn: a Flax ``Module.apply`` (accepts ``mutable=``).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    x: one batch.
    norm: ``source`` | ``batch`` | ``ema``.
    prior: share of the source statistics for ``norm='batch'`` (0 = pure batch statistics).
    momentum: α of ``norm='ema'``.
    sample_mask: optional ``[B]`` weights (1 = include) for the batch moments, for
      fixed-size buffers that are partly empty (RoTTA's memory bank).
    apply_kwargs: extra keyword arguments of ``apply_fn`` (e.g. ``train=False``).
    require_bn: raise `KfuseError` if no BatchNorm layer was called.

  Returns:
    ``(logits, batch_stats)``: the updated ``batch_stats`` for ``norm='ema'``, else None.
  """
  if norm not in NORM_MODES:
    raise KfuseError(f"norm: unknown mode {norm!r}; known: {', '.join(NORM_MODES)}")
  plan = _NormPlan(norm, float(prior), float(momentum), sample_mask, [])
  kwargs = dict(apply_kwargs or {})
  with nn.intercept_methods(_interceptor(plan)):
    if norm == "ema" and "batch_stats" in variables:
      logits, updates = apply_fn(variables, x, mutable=["batch_stats"], **kwargs)
      new_stats = updates["batch_stats"]
    else:
      logits, new_stats = apply_fn(variables, x, **kwargs), None
  if require_bn and not plan.calls:
    raise KfuseError(f"model: no flax.linen.BatchNorm layer was called, but norm={norm!r}"
                     " needs BatchNorm layers")
  return logits, new_stats


# ------------------------------------------------------------------ trainable subsets


def batch_norm_paths(variables: Mapping[str, Any]) -> list[str]:
  """Module paths (in ``params``) of the BatchNorm layers: those with ``batch_stats``."""
  stats = ktree.flatten(variables.get("batch_stats", {}))
  return sorted({k.rsplit("/", 1)[0] for k in stats if k.endswith(("/mean", "/var"))})


def norm_layer_paths(variables: Mapping[str, Any]) -> list[str]:
  """Module paths of normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm).

  A module is a normalization layer when its parameters are only ``scale`` and/or
  ``bias`` and it has a ``scale`` or running statistics (Flax's naming).
  """
  bn = set(batch_norm_paths(variables))
  modules: dict[str, set] = {}
  for k in ktree.flatten(variables.get("params", {})):
    mod, _, leaf = k.rpartition("/")
    modules.setdefault(mod, set()).add(leaf)
  return sorted(m for m, leaves in modules.items()
                if leaves <= {"scale", "bias"} and ("scale" in leaves or m in bn))


def trainable_paths(variables: Mapping[str, Any], trainable: Any = "norm",
                    exclude: Sequence[str] = ()) -> tuple[str, ...]:
  """Paths (relative to ``params``) of the parameters a method updates.

  Args:
    variables: the model variables.
    trainable: ``"norm"`` (affine of BN/LN/GN layers, as the test-time-adaptation
      benchmark's Tent/EATA/SAR), ``"bn"`` (BatchNorm affine only, as the official
      Tent), ``"all"``, a regex (``re.search`` on the path) or a predicate ``path -> bool``.
    exclude: regexes; matching paths are dropped (e.g. SAR's top blocks).

  Raises:
    KfuseError: if nothing is selected (e.g. a model without normalization layers).
  """
  flat = ktree.flatten(variables.get("params", {}))
  if trainable in ("norm", "bn"):
    mods = set(norm_layer_paths(variables) if trainable == "norm" else batch_norm_paths(variables))
    keep = [k for k in flat if k.rpartition("/")[0] in mods]
  elif trainable == "all":
    keep = list(flat)
  elif isinstance(trainable, str):
    pat = re.compile(trainable)
    keep = [k for k in flat if pat.search(k)]
  elif callable(trainable):
    keep = [k for k in flat if trainable(k)]
  else:
    raise KfuseError(f"trainable: expected 'norm', 'bn', 'all', a regex or a predicate, got {trainable!r}")
  pats = [re.compile(p) for p in exclude]
  keep = [k for k in keep if not any(p.search(k) for p in pats)]
  if not keep:
    what = {"norm": "normalization-layer (BatchNorm/LayerNorm/GroupNorm) scale/bias",
            "bn": "BatchNorm scale/bias"}.get(trainable if isinstance(trainable, str) else "", "")
    raise KfuseError(f"trainable: {trainable!r} (exclude={list(exclude)}) selects no parameter"
                     + (f"; the model has no {what}" if what else ""))
  return tuple(keep)


def trainable_mask(variables: Mapping[str, Any], trainable: Any = "norm",
                   exclude: Sequence[str] = ()) -> PyTree:
  """`trainable_paths` as a boolean pytree shaped like ``variables['params']``.

  Usable with ``optax.masked`` / ``optax.partition``; the methods themselves hand
  their optimizer the flat ``{path: leaf}`` subset instead (`Trainable`: no dead gradients
  or zero updates of frozen weights).
  """
  keep = set(trainable_paths(variables, trainable, exclude))
  params = variables.get("params", {})
  return ktree.unflatten(params, {k: (k in keep) for k in ktree.flatten(params)})


class Trainable(NamedTuple):
  """The trainable subset of a method: `trainable_paths` + its optimizer plumbing.

  The one shared piece of every gradient-based method: gradients are taken with
  respect to the flat subset ``{path: leaf}`` only, and ``tx`` (any optax
  transformation) sees only that subset, so frozen weights cost nothing.

      sel = Trainable("norm", exclude)
      opt_state = sel.init(tx, variables)
      (loss, aux), grads = sel.value_and_grad(loss_fn, variables)   # loss_fn(variables)
      variables, opt_state = sel.update(tx, grads, opt_state, variables)
  """
  trainable: Any = "norm"
  exclude: tuple = ()

  def paths(self, variables: Mapping[str, Any]) -> tuple[str, ...]:
    return trainable_paths(variables, self.trainable, self.exclude)

  def get(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The flat trainable subset ``{path: leaf}`` of ``variables['params']``."""
    return subset(variables["params"], self.paths(variables))

  def put(self, variables: Mapping[str, Any], sub: Mapping[str, jax.Array]) -> dict:
    """``variables`` with the trainable leaves replaced by ``sub``."""
    return with_params(variables, with_subset(variables["params"], sub))

  def init(self, tx: Any, variables: Mapping[str, Any]) -> PyTree:
    return tx.init(self.get(variables))

  def value_and_grad(self, loss_fn: Callable, variables: Mapping[str, Any], *,
                     has_aux: bool = True) -> tuple:
    """``loss_fn(variables)`` and its gradient with respect to the trainable subset."""
    return jax.value_and_grad(lambda sub: loss_fn(self.put(variables, sub)),
                              has_aux=has_aux)(self.get(variables))

  def update(self, tx: Any, grads: Mapping[str, jax.Array], opt_state: PyTree,
             variables: Mapping[str, Any], take: jax.Array | None = None) -> tuple[dict, PyTree]:
    """One ``tx`` step on the subset; ``take`` (scalar bool) False keeps both unchanged."""
    sub = self.get(variables)
    updates, new_opt = tx.update(grads, opt_state, sub)
    new_sub = optax.apply_updates(sub, updates)
    if take is not None:
      new_sub = tree_where(take, new_sub, sub)
      new_opt = tree_where(take, new_opt, opt_state)
    return self.put(variables, new_sub), new_opt


def subset(params: PyTree, paths: Sequence[str]) -> dict[str, jax.Array]:
  """``{path: leaf}`` for ``paths`` (the trainable subset the optimizer sees)."""
  flat = ktree.flatten(params)
  return {k: flat[k] for k in paths}


def with_subset(params: PyTree, sub: Mapping[str, jax.Array]) -> PyTree:
  """``params`` with the leaves of ``sub`` replaced (no copies of the others)."""
  flat = ktree.flatten(params)
  flat.update(sub)
  return ktree.unflatten(params, flat)


def with_params(variables: Mapping[str, Any], params: PyTree) -> dict:
  return {**variables, "params": params}


# ------------------------------------------------------------------ losses and tree helpers


def entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy per row, ``H(p) = -Σ_c p_c log p_c`` with ``p = softmax(logits)``."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def soft_cross_entropy(logits: jax.Array, target_logits: jax.Array) -> jax.Array:
  """``-Σ_c softmax(target)_c · log_softmax(logits)_c`` per row (CoTTA / RoTTA)."""
  p_t = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(p_t * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def tree_norm(tree: PyTree) -> jax.Array:
  """``‖t‖₂`` over every leaf, gradient-safe at zero (gradient 0 there, not NaN).

  ``sqrt`` has an infinite derivative at 0; the double ``where`` keeps both the
  value (exactly ``optax.tree.norm``) and its gradient finite for an all-zero tree.
  """
  sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
  sq = jnp.asarray(sq, jnp.float32)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def ema(old: PyTree, new: PyTree, decay: float | jax.Array) -> PyTree:
  """``decay·old + (1 - decay)·new`` leafwise (mean-teacher update)."""
  return jax.tree.map(lambda o, n: (decay * o + (1.0 - decay) * n).astype(o.dtype), old, new)


def tree_where(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  """``a`` where the scalar ``pred`` holds, else ``b`` (leafwise ``jnp.where``)."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def is_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def guard(finite: jax.Array, new_state: Any, old_state: Any) -> Any:
  """Documented NaN fallback: keep ``old_state`` when the batch was not finite."""
  return tree_where(finite, new_state, old_state)


def copy_tree(t: PyTree) -> PyTree:
  """A fresh copy of every array leaf (so donation never aliases the caller's buffers)."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), t)


def check_variables(variables: Any, name: str) -> None:
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise KfuseError(f"variables: {name} expects Flax variables {{'params': ..., ...}},"
                     f" got {type(variables).__name__}")


def check_example(batch: Any, name: str) -> jax.ShapeDtypeStruct:
  """The shape of ``batch["x"]`` of an ``init`` example batch (raises `KfuseError`)."""
  protocol.check_batch(batch, where=f"batch: {name}.init")
  x = batch["x"]
  if x is None or not hasattr(x, "shape") or len(x.shape) < 1:
    raise KfuseError(f"batch: {name}.init needs an example batch {{'x': array or"
                     " jax.ShapeDtypeStruct}")
  return jax.ShapeDtypeStruct(tuple(x.shape), getattr(x, "dtype", jnp.float32))


def validate(array_step: Callable, state: Any, example: jax.ShapeDtypeStruct) -> None:
  """Trace one step abstractly so configuration errors surface at ``init`` time."""
  jax.eval_shape(lambda s, x: array_step(s, x, jax.random.key(0)), state, example)


def make_init(name: str, build: Callable, array_step: Callable) -> Callable:
  """The protocol's ``init(variables, batch, key=None, **kw) -> state`` of every method.

  Checks the Flax ``variables`` and the example ``batch`` (one-line `KfuseError`s
  naming ``name``), builds the state with ``build(variables, example, **kw)`` from
  a copy of the variables (so donation never aliases the caller's buffers) and the
  example's `jax.ShapeDtypeStruct`, then traces one ``array_step`` (`validate`) so
  configuration errors surface here. Deterministic setup takes no key.
  """
  def init(variables, batch, key=None, **kw):
    del key
    variables = knnx.as_variables(variables)     # an nnx.State: its Linen variables layout
    check_variables(variables, name)
    example = check_example(batch, name)
    state = build(copy_tree(variables), example, **kw)
    validate(array_step, state, example)
    return state

  return init


def need_key(key: Any, name: str) -> jax.Array:
  """``key``, or `KfuseError` for a stochastic method called without one."""
  if key is None:
    raise KfuseError(f"key: {name}.step needs a PRNG key (jax.random.key(seed)) on every call")
  return key


def adapter(name: str, init: Callable, array_step: Callable, reset: Callable) -> Adapter:
  """The protocol's `Adapter` from a method's ``array_step(state, x, key) -> (state, logits, metrics)``.

  ``step(state, batch, key=None)`` checks ``batch`` is a mapping with ``"x"``, runs
  ``array_step`` on ``batch["x"]`` and returns ``(state, {**metrics, "logits": logits})``;
  it and ``reset`` are jit-compiled here, once, for every method.
  """
  def step(state, batch, key=None):
    protocol.check_batch(batch, where=f"batch: {name}.step")
    state, logits, metrics = array_step(state, batch["x"], key)
    return state, {**metrics, "logits": logits}

  return Adapter(init, jax.jit(step), jax.jit(reset), name)


# ------------------------------------------------------------------ stream drivers


def check_inputs(xs: Any, name: str = "stream") -> None:
  """Host-side check: raise `KfuseError` naming the first batch with NaN/Inf inputs."""
  a = np.asarray(xs)
  if a.dtype.kind == "f":
    bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    if bad.any():
      raise KfuseError(f"{name}: batch {int(np.argmax(bad))} contains NaN or Inf inputs")
