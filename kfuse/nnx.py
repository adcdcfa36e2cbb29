"""Flax NNX at kfuse's edges: one conversion between an NNX model and what every pillar takes.

Every pillar of kfuse works on a Linen-style pair: a pure ``apply(variables, x, ...)`` and a
``variables`` pytree of collections (``{'params': ..., 'batch_stats': ...}``). An NNX model is
``graphdef, state = nnx.split(model)``; this module converts it once, at the edge:

    apply = kfuse.nnx.apply_fn(graphdef)           # apply(variables, x, train=, mutable=, rngs=)
    variables = kfuse.nnx.to_variables(state)      # {'params': {...}, 'batch_stats': {...}}
    state = kfuse.nnx.to_state(variables, like=state)
    model = nnx.merge(graphdef, state)

so merging (`kfuse.merge.merge`), distillation (`kfuse.distill.make_step`), test-time
adaptation (`kfuse.adapt.make`), supervised training (`kfuse.train.learner`) and Orbax I/O
(`kfuse.io.orbax_io`) keep one code path each. RNG streams (``nnx.Rngs``: typed keys and
counters) travel as any variable; `key_data` turns the keys into ``uint32`` data where array code
(merging, Orbax) needs plain arrays, and `to_state` with ``like`` wraps them back.

* **Collections.** A variable's collection is its type's registered NNX name
  (`nnx.variable_name_from_type`, as flax's Linen bridge names them): ``nnx.Param`` ->
  ``'params'``, ``nnx.BatchStat`` -> ``'batch_stats'``, ``nnx.Cache`` -> ``'cache'``; other types
  (``RngKey``, ``RngCount``, your own) are registered under their class name. Paths inside a
  collection are the NNX attribute paths, so an NNX model whose attributes carry the names of a
  Linen model's submodules (``self.dense1`` / ``nn.Dense(name='dense1')``) has exactly the Linen
  variables: the same parameter paths, hence the same merge (per-tensor keys and rules come
  from the paths) and the same trainable subsets.
* **BatchNorm.** Inside `apply_fn`, every ``nnx.BatchNorm`` runs as a ``flax.linen.BatchNorm``
  over the same ``scale``/``bias``/``mean``/``var`` (the same maths: flax's ``_compute_stats`` /
  ``_normalize``; the running statistics are written back after a train-mode call). So Linen's
  method interception (``nn.intercept_methods``) reaches NNX BatchNorm layers too, and
  ``kfuse.adapt``'s normalization control (source / batch / EMA statistics, Tent's train-mode
  BN) applies unchanged. ``batch_stats`` is the NNX ``BatchStat`` collection.
* **Modes.** ``train=True`` / ``False`` calls ``module.train()`` / ``module.eval()`` (BatchNorm
  ``use_running_average``, Dropout ``deterministic``) on the merged copy; ``None`` keeps the
  mode recorded in the graphdef. ``rngs={'dropout': key}`` reseeds the model's RNG streams.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Mapping, Sequence

from kfuse.tree import KfuseError

__all__ = ["is_nnx", "is_state", "split", "collection", "to_variables", "as_variables",
           "to_state", "key_data", "native_tree", "from_native", "apply_fn"]

PyTree = Any


def _nnx():
  """``flax.nnx``, imported on first use: ``import kfuse.merge`` / ``kfuse.io`` stay free of it
  (about 1 s of import time, optax included)."""
  from flax import nnx
  return nnx


def is_nnx(model: Any) -> bool:
  """True for an NNX model: an ``nnx.Module`` or the ``nnx.GraphDef`` of one (False, without
  importing flax.nnx, while nothing has: no such object can exist yet)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(model, (nnx.Module, nnx.GraphDef))


def is_state(tree: Any) -> bool:
  """True for an ``nnx.State`` (what ``nnx.split`` / ``nnx.state`` return); never imports flax.nnx."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(tree, nnx.State)


def split(model: Any) -> tuple[Any, Any]:
  """``(graphdef, state)`` of an ``nnx.Module``; a ``GraphDef`` comes back with ``None``."""
  nnx = _nnx()
  if isinstance(model, nnx.GraphDef):
    return model, None
  if isinstance(model, nnx.Module):
    return nnx.split(model)
  raise KfuseError(f"model: expected an nnx.Module or its nnx.GraphDef, got {type(model).__name__}")


def collection(var_type: type) -> str:
  """The collection name of an NNX variable type (``nnx.Param`` -> ``'params'``)."""
  return _nnx().variable_name_from_type(var_type, allow_register=True)


def _flat(state: Any):
  return [(tuple(path), var) for path, var in _nnx().to_flat_state(state)]


def _nest(items: Sequence[tuple[tuple, Any]]) -> dict:
  out: dict = {}
  for path, value in items:
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def _walk(tree: Mapping, prefix: tuple = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _walk(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def to_variables(state: nnx.State) -> dict:
  """``nnx.State`` -> ``{collection: nested dict of arrays}`` (Linen's variables layout).

  Works on abstract (``jax.ShapeDtypeStruct``) and stacked states too: only the values move.
  """
  if not is_state(state):
    raise KfuseError(f"state: expected an nnx.State, got {type(state).__name__}")
  groups: dict[str, list] = {}
  for path, var in _flat(state):
    groups.setdefault(collection(type(var)), []).append((path, var.get_value()))
  return {c: _nest(items) for c, items in groups.items()}


def as_variables(tree: Any) -> Any:
  """`to_variables` for an ``nnx.State`` or ``nnx.Module``; anything else unchanged."""
  if is_nnx(tree) and not isinstance(tree, _nnx().GraphDef):
    tree = _nnx().state(tree)
  return to_variables(tree) if is_state(tree) else tree


def to_state(variables: Mapping[str, Any], like: nnx.State | None = None) -> nnx.State:
  """``{collection: nested arrays}`` -> ``nnx.State``; the inverse of `to_variables`.

  With ``like`` (the state the variables came from, or an abstract one), its variable types
  and metadata are kept and every one of its paths must be present (one-line `KfuseError`
  naming the first missing or extra path); without it, each collection's registered type
  (``'params'`` -> ``nnx.Param``) wraps the values.
  """
  nnx = _nnx()
  if not isinstance(variables, Mapping):
    raise KfuseError(f"variables: expected a mapping of collections, got {type(variables).__name__}")
  given = {(c,) + p: v for c, tree in variables.items() for p, v in
           (_walk(tree) if isinstance(tree, Mapping) else [((), tree)])}
  if like is None:
    items = [(p[1:], nnx.variable_type_from_name(p[0], allow_register=True)(v))
             for p, v in given.items()]
    return nnx.State(_nest(items))
  items = []
  for path, var in _flat(like):
    key = (collection(type(var)),) + path
    if key not in given:
      raise KfuseError(f"variables: no {_name(key)!r} (the NNX state has {_name(path)!r} in"
                       f" collection {key[0]!r})")
    items.append((path, var.replace(_like_key(given.pop(key), var.get_value()))))
  if given:
    extra = _name(next(iter(given)))
    raise KfuseError(f"variables: {extra!r} is not a variable of the NNX state"
                     f" ({len(items)} variables)")
  return nnx.State(_nest(items))


def _is_key(x: Any) -> bool:
  import jax
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data(variables: PyTree) -> PyTree:
  """``variables`` with each typed PRNG key (an ``nnx.Rngs`` stream's ``RngKey``) as its raw
  ``uint32`` key data, so pytree code over arrays (merging: integer leaves are copied when the
  models agree) can take it; `to_state` with ``like`` wraps it back into a key."""
  import jax
  def data(x):
    if not _is_key(x):
      return x
    return (jax.eval_shape(jax.random.key_data, x) if isinstance(x, jax.ShapeDtypeStruct)
            else jax.random.key_data(x))
  return jax.tree.map(data, variables)


def _like_key(value: Any, ref: Any) -> Any:
  import jax
  if _is_key(ref) and not _is_key(value):     # an abstract ref: its dtype names the impl
    impl = (getattr(ref.dtype, "_impl", None) if isinstance(ref, jax.ShapeDtypeStruct)
            else jax.random.key_impl(ref))          # None: the default impl
    return jax.random.wrap_key_data(value, impl=impl)
  return value


def native_tree(state: nnx.State) -> dict:
  """The tree Orbax writes for an ``nnx.State`` saved as is: ``{path...: {'value': leaf}}``."""
  return _nest([(path + ("value",), var.get_value()) for path, var in _flat(state)])


def from_native(tree: Mapping, like: nnx.State) -> nnx.State:
  """`native_tree`'s layout back into an ``nnx.State`` with ``like``'s types and metadata."""
  def leaf(path):
    node = tree
    for k in path + ("value",):
      node = node[k]
    return node
  return _nnx().State(_nest([(path, var.replace(leaf(path))) for path, var in _flat(like)]))


# ------------------------------------------------------------------ apply


@functools.cache
def _routed_batch_norm() -> type:
  """The ``nnx.BatchNorm`` subclass `apply_fn` gives the merged copy's BatchNorm layers."""
  import flax.linen as nn
  nnx = _nnx()

  class _LinenBatchNorm(nnx.BatchNorm):
    """An ``nnx.BatchNorm`` whose call runs ``flax.linen.BatchNorm`` on its variables, so Linen
    method interceptors (``kfuse.adapt``'s normalization control) see it. Set on merged copies
    only (`apply_fn`), never on the caller's modules."""

    _kfuse_path: str = ""

    def __call__(self, x, use_running_average=None, *, mask=None):
      ura = use_running_average if use_running_average is not None else self.use_running_average
      if ura is None:
        raise KfuseError(f"model: BatchNorm {self._kfuse_path!r} has no use_running_average;"
                         " pass train=True/False")
      name = self._kfuse_path or "BatchNorm"
      config = dict(use_running_average=bool(ura), axis=self.axis, momentum=self.momentum,
                    epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    use_bias=self.use_bias, use_scale=self.use_scale, axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups,
                    use_fast_variance=self.use_fast_variance)
      params = {k: getattr(self, k).get_value() for k in ("scale", "bias")
                if getattr(self, k, None) is not None}
      stats = {"mean": self.mean.get_value(), "var": self.var.get_value()}
      y, upd = _At(name, tuple(config.items())).apply(
          {"params": {name: params}, "batch_stats": {name: stats}}, x, mask=mask,
          mutable=["batch_stats"])
      new = upd["batch_stats"][name]
      self.mean.set_value(new["mean"])
      self.var.set_value(new["var"])
      return y

  class _At(nn.Module):
    """Runs ``nn.BatchNorm(**config)`` as the child ``name_``, so its scope path is the NNX path."""
    name_: str
    config: tuple

    @nn.compact
    def __call__(self, x, **kw):
      return nn.BatchNorm(name=self.name_, **dict(self.config))(x, **kw)

  return _LinenBatchNorm


def _route_batch_norm(module: Any) -> None:
  nnx = _nnx()
  for path, node in nnx.iter_graph(module):
    if type(node) is nnx.BatchNorm:          # subclasses keep their own call
      node.__class__ = _routed_batch_norm()
      node._kfuse_path = _name(path)


def apply_fn(model: Any) -> Callable:
  """A Linen-style pure ``apply`` for an NNX model (an ``nnx.Module`` or its ``GraphDef``).

  ``apply(variables, *args, train=None, mutable=False, rngs=None, **kwargs)``: merges the
  graphdef with ``variables`` (`to_variables` layout, or an ``nnx.State``), sets the mode
  (``train``), calls the model and returns its output, or ``(output, {collection: ...})`` for
  the collections in ``mutable`` (a list, or True for every non-``params`` one) as they are
  after the call (BatchNorm's updated ``batch_stats``). Pure: the caller's model is untouched.
  """
  nnx = _nnx()
  graphdef, _ = split(model)

  def apply(variables, *args, train: bool | None = None, mutable: Any = False,
            rngs: Mapping[str, Any] | None = None, **kwargs):
    state = variables if is_state(variables) else to_state(variables)
    try:
      module = nnx.merge(graphdef, state, copy=True)   # never the caller's Variables
    except (ValueError, KeyError, TypeError) as e:
      raise KfuseError(f"variables: do not fit the NNX graphdef: {str(e).splitlines()[0]}") from None
    _route_batch_norm(module)
    if train is not None:
      module.train() if train else module.eval()
    if rngs:
      nnx.reseed(module, **dict(rngs))
    out = module(*args, **kwargs)
    if not mutable:
      return out
    after = to_variables(nnx.state(module))
    cols = [c for c in after if c != "params"] if mutable is True else list(mutable)
    return out, {c: after[c] for c in cols if c in after}

  return apply

