"""Data statistics for data-informed merging: input Grams and diagonal Fishers.

Collected once per expert on its own calibration data, saved as an Orbax
checkpoint keyed by parameter path, and handed to `kfuse.merge.informed`:

    st = statistics.grams(model, variables, batches, max_examples=256)   # RegMean
    st = statistics.fisher(apply_fn, params, batches, max_examples=256)  # Fisher merging
    statistics.save("stats/task0", st); st = statistics.load("stats/task0")

**Gram** (RegMean, Jin et al., ICLR 2023; FusionBench ``regmean``): for every
``nn.Dense`` / ``nn.DenseGeneral`` (attention projections) / ``nn.Conv`` the
layer's inputs are flattened to tokens ``X ∈ R^{n×d_in}`` (every leading axis is
a token axis; DenseGeneral's contracted axes and a Conv's receptive field
``(*kernel_size, C_in)`` form ``d_in``), and ``G = XᵀX / n`` with ``n`` the number
of tokens seen (FusionBench's running average over tokens; kept here as a sum and
divided once, the same number). Keyed by the layer's kernel path
(``backbone/layers_0/kernel``), so ``G`` is ``[d_in, d_in]`` with
``d_in = prod(kernel.shape[:k])`` for the kernel's contracted axes. Layers are
found by Flax method interception (`flax.linen.intercept_methods`); a layer
called several times accumulates every call (as a PyTorch forward hook does).

**Fisher** (Matena & Raffel, NeurIPS 2022; FusionBench ``fisher_merging``): the
label-free score ``s(x) = Σ_c sg(√p_c(x)) · log p_c(x)`` of the model's softmax
``p`` (``sg``: stop-gradient), and

- ``mode="per_example"`` (default): ``F = (1/N) Σ_n (∇_θ s(x_n))²``, per-example
  gradients by ``vmap``;
- ``mode="batch"`` (FusionBench's cheaper variant): ``F = (1/N) Σ_B (∇_θ Σ_{n∈B}
  s(x_n))²``, one gradient per batch (keeps the cross terms between examples).

Memory is bounded by one batch plus the accumulators (``d_in²`` per layer for
Grams; one parameter copy, plus a batch of per-example gradients, for Fishers).
Grams are sums over rows, so partial Grams of disjoint data add up: with ``mesh=`` (a 1-D
`kfuse.shard.make_mesh`) each batch is split over the devices along its example axis, the
variables are replicated, and the compiler reduces the per-device partial Grams / Fishers
(the same numbers up to float32 summation order; tests/merge/test_statistics_sharded.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import tree as T
from kfuse.protocol import check_batch
from kfuse.tree import KfuseError

PyTree = Any
Array = jax.Array

__all__ = ["Statistics", "LAYERS", "grams", "fisher", "collect", "save", "load",
           "layer_inputs", "FISHER_MODES"]

FISHER_MODES = ("per_example", "batch")


def _nn():
  """flax.linen, imported on first use: ``import kfuse.merge`` (every merge job's
  start-up) does not pay for it."""
  import flax.linen as nn
  return nn


def __getattr__(name: str):
  if name == "LAYERS":   # the layers whose inputs `grams` collects (Flax classes, lazily)
    nn = _nn()
    return (nn.Dense, nn.DenseGeneral, nn.Conv)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class Statistics:
  """One expert's statistics, keyed by parameter path ('/'-joined, below ``params``).

  Attributes:
    gram: kernel path -> ``G = XᵀX / n`` ``[d_in, d_in]`` (float32).
    tokens: kernel path -> ``n``, the number of input rows (tokens) behind ``G``.
    fisher: parameter path -> diagonal Fisher, the parameter's shape.
    examples: calibration examples seen (Fisher's ``N``; the Grams' examples).
  """
  gram: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
  fisher: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  examples: int = 0

  def under(self, prefix: str) -> "Statistics":
    """The statistics of the subtree ``prefix`` (e.g. ``"backbone"``), paths relative to it."""
    p = prefix.rstrip("/") + "/"
    cut = lambda d: {k[len(p):]: v for k, v in d.items() if k.startswith(p)}
    return Statistics(cut(self.gram), cut(self.tokens), cut(self.fisher), self.examples)

  def combine(self, other: "Statistics") -> "Statistics":
    """Grams of one and Fishers of the other (the same expert's two passes)."""
    return Statistics({**self.gram, **other.gram}, {**self.tokens, **other.tokens},
                      {**self.fisher, **other.fisher}, max(self.examples, other.examples))


# ------------------------------------------------------------- layer inputs


def _conv_rows(m: nn.Conv, x: Array) -> Array:
  """A Conv's input patches as rows ``[tokens, prod(kernel_size) · C_in]`` ordered like
  its kernel ``[*kernel_size, C_in, C_out]`` flattened, so ``conv(x) = rows @ K + b``."""
  ks = tuple(m.kernel_size) if isinstance(m.kernel_size, Sequence) else (m.kernel_size,)
  nd = len(ks)
  where = "/".join(m.path)
  if m.feature_group_count != 1 or isinstance(m.padding, str) and m.padding in ("CIRCULAR", "CAUSAL"):
    raise KfuseError(f"{where}: Conv with feature_group_count={m.feature_group_count},"
                     f" padding={m.padding!r} has no Gram statistics here; leave it out"
                     f" via layers=")
  x = x.reshape((-1,) + x.shape[-(nd + 1):])
  as_tuple = lambda v: (1,) * nd if v is None else (tuple(v) if isinstance(v, Sequence) else (v,) * nd)
  pad = m.padding
  if not isinstance(pad, str):
    pad = [(p, p) if isinstance(p, int) else tuple(p) for p in
           (pad if isinstance(pad, Sequence) else [pad] * nd)]
  spatial = "HWDXYZ"[:nd] if nd <= 3 else None
  dn = ("N" + spatial + "C", "OI" + spatial, "N" + spatial + "C")
  patches = jax.lax.conv_general_dilated_patches(
      x, ks, as_tuple(m.strides), pad, lhs_dilation=as_tuple(m.input_dilation),
      rhs_dilation=as_tuple(m.kernel_dilation), dimension_numbers=dn)
  cin = x.shape[-1]
  out = patches.shape[:-1]
  # patches' features are (C_in, *kernel_size), channel-major; the kernel's rows are (*kernel_size, C_in)
  patches = patches.reshape(out + (cin,) + ks)
  patches = jnp.moveaxis(patches, len(out), -1)
  return patches.reshape(-1, math.prod(ks) * cin)


def layer_inputs(module: nn.Module, x: Array) -> Array:
  """The rows ``X`` ``[tokens, d_in]`` a linear layer multiplies by its kernel
  ``[d_in, ...]``: Dense (last axis), DenseGeneral (its contracted ``axis``), Conv (patches)."""
  nn = _nn()
  x = jnp.asarray(x)
  if isinstance(module, nn.Conv):
    return _conv_rows(module, x)
  if isinstance(module, nn.DenseGeneral):
    axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    axes = sorted(a % x.ndim for a in axes)
    if module.batch_dims or axes != list(range(x.ndim - len(axes), x.ndim)):
      raise KfuseError(f"{'/'.join(module.path)}: DenseGeneral over axes {module.axis} with"
                       f" batch_dims={module.batch_dims} is not a trailing contraction;"
                       f" leave it out via layers=")
    return x.reshape(-1, math.prod(x.shape[axes[0]:]))
  return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------ batches


def _inputs(batches: Iterable[Any], max_examples: int | None, where: str):
  """Yield ``batch['x']`` until ``max_examples`` examples were taken (FusionBench's rule:
  whole batches, stop once the count reached it); `KfuseError` when nothing came."""
  if max_examples is not None and max_examples <= 0:
    raise KfuseError(f"{where}: max_examples must be positive, got {max_examples}")
  seen = 0
  for batch in batches:
    if max_examples is not None and seen >= max_examples:
      break
    check_batch(batch, ("x",), where=f"{where} batch")
    x = batch["x"]
    if np.ndim(x) == 0 or np.shape(x)[0] == 0:
      continue
    seen += int(np.shape(x)[0])
    yield x
  if seen == 0:
    raise KfuseError(f"{where}: the data iterator yielded no examples; statistics need"
                     f" calibration data (e.g. 256 unlabeled examples per task)")


def _finite_or_raise(flat: Mapping[str, Any], what: str, where: str) -> None:
  bad = {k: jnp.sum(~jnp.isfinite(v)) for k, v in flat.items()}
  for k, n in jax.device_get(bad).items():
    if n:
      raise KfuseError(f"{where}: {what} of {k!r} holds {int(n)} NaN/Inf values (NaN/Inf"
                       f" activations or gradients on the calibration data)")


def _place(x: Any, mesh) -> Array:
  """``x`` on ``mesh`` (a 1-D `kfuse.shard` mesh): examples (axis 0) split over the devices
  when they divide evenly, else replicated (the same numbers, one device's work); no mesh:
  ``jnp.asarray(x)``."""
  if mesh is None:
    return jnp.asarray(x)
  from jax.sharding import NamedSharding, PartitionSpec as P
  from kfuse import shard
  x = np.asarray(x)
  split = x.ndim >= 1 and x.shape[0] > 0 and x.shape[0] % mesh.size == 0
  sharding = NamedSharding(mesh, P(shard.AXIS) if split else P())
  return shard.read_global(x.shape, x.dtype, sharding, lambda idx: x[idx])


def _replicate(tree: PyTree, mesh) -> PyTree:
  if mesh is None:
    return tree
  from kfuse import shard
  return shard.put_replicated(tree, mesh)


# ------------------------------------------------------------------- Grams


def _model_apply(model: nn.Module | Callable, apply_kwargs: Mapping[str, Any] | None):
  kw = dict(apply_kwargs or {})
  if isinstance(model, _nn().Module):
    return lambda variables, x: model.apply(variables, x, **kw)
  return lambda variables, x: model(variables, x, **kw)


def gram_sums(apply: Callable, layers: tuple | None = None) -> Callable:
  """``(variables, x) -> {kernel path: (XᵀX, n)}`` over one batch (traceable): the
  interception behind `grams`, reused by RegMean++ on one block at a time.
  ``layers``: the Flax classes intercepted (None: `LAYERS`)."""
  nn = _nn()
  layers = (nn.Dense, nn.DenseGeneral, nn.Conv) if layers is None else layers

  def sums(variables, x):
    out: dict[str, tuple] = {}

    def intercept(next_fun, args, kwargs, ctx):
      if ctx.method_name == "__call__" and isinstance(ctx.module, layers) and args:
        rows = layer_inputs(ctx.module, args[0]).astype(jnp.float32)
        path = "/".join(ctx.module.path + ("kernel",))
        g, n = out.get(path, (0.0, 0))
        out[path] = (g + rows.T @ rows, n + rows.shape[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      apply(variables, x)
    return {k: (g, jnp.asarray(n, jnp.int32)) for k, (g, n) in out.items()}

  return sums


@functools.lru_cache(maxsize=32)
def _gram_step(model, apply_kwargs: tuple, layers: tuple) -> Callable:
  """The jitted accumulation step of `grams`, compiled once per model and options."""
  sums = gram_sums(_model_apply(model, dict(apply_kwargs)), layers)

  @jax.jit
  def step(acc, variables, x):
    new = sums(variables, x)
    if acc is None:
      return new
    if set(new) != set(acc):
      raise KfuseError("grams: batches of different shapes reached different layers")
    return {k: (acc[k][0] + g, acc[k][1] + n) for k, (g, n) in new.items()}

  return step


def grams(model: nn.Module | Callable, variables: PyTree, batches: Iterable[Any], *,
          max_examples: int | None = None, apply_kwargs: Mapping[str, Any] | None = None,
          layers: tuple | None = None, mesh=None) -> Statistics:
  """Input Grams ``G = XᵀX / n`` of every ``layers`` instance (see the module doc).

  Args:
    model: a Linen module (called as ``model.apply(variables, x, **apply_kwargs)``)
      or such an apply function.
    variables: the expert's variables (``{'params': ..., 'batch_stats': ...}``).
    batches: an iterable of mappings ``{'x': [B, ...]}`` (the expert's task data).
    max_examples: stop once this many examples were seen (whole batches;
      FusionBench's ``num_regmean_examples`` = 256).
    apply_kwargs: e.g. ``{'train': False}``.
    layers: the layer types whose inputs are collected (None: `LAYERS`).
    mesh: a 1-D `kfuse.shard.make_mesh` mesh (None: one device): each batch split
      over it along the example axis (see the module doc).
  Returns:
    `Statistics` with ``gram`` and ``tokens`` keyed by kernel path.
  """
  layers = __getattr__("LAYERS") if layers is None else layers
  opts = (model, tuple(sorted((apply_kwargs or {}).items())), tuple(layers))
  try:
    hash(opts)
  except TypeError:   # an unhashable model or option: compiled for this call only
    step = _gram_step.__wrapped__(*opts)
  else:
    step = _gram_step(*opts)
  acc, examples = None, 0
  variables = _replicate(variables, mesh)
  for x in _inputs(batches, max_examples, "grams"):
    acc = step(acc, variables, _place(x, mesh))
    examples += int(np.shape(x)[0])
  if not acc:
    raise KfuseError("grams: the model called none of the layers "
                     f"{[l.__name__ for l in layers]}; nothing to collect")
  tokens = {k: int(n) for k, (_, n) in jax.device_get(acc).items()}
  gram = {k: g / tokens[k] for k, (g, _) in acc.items()}
  _finite_or_raise(gram, "the Gram", "grams")
  return Statistics(gram=gram, tokens=tokens, examples=examples)


# ------------------------------------------------------------------ Fisher


def _score(apply_fn: Callable, params: PyTree, x: Array) -> Array:
  """``Σ_n Σ_c sg(√p_nc) log p_nc`` (FusionBench's label-free Fisher score)."""
  logits = apply_fn(params, x)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jax.lax.stop_gradient(jnp.sqrt(jnp.exp(logp))) * logp)


def fisher(apply_fn: Callable, params: PyTree, batches: Iterable[Any], *,
           mode: str = "per_example", max_examples: int | None = None,
           mesh=None) -> Statistics:
  """Diagonal Fisher of ``params`` under ``apply_fn(params, x) -> logits [B, C]``.

  ``mode``: 'per_example' (``vmap`` of per-example gradients, squared then summed)
  or 'batch' (FusionBench: the batch gradient squared). Divided by the number of
  examples seen. Keys are the paths of ``params``. ``mesh``: as in `grams` (each
  batch split over the devices; the squared gradients summed by the compiler).
  """
  if mode not in FISHER_MODES:
    from kfuse.registry import suggest
    raise KfuseError(f"fisher: unknown mode {mode!r}{suggest(mode, FISHER_MODES)};"
                     f" known: {', '.join(FISHER_MODES)}")

  if mode == "per_example":
    def sq_grads(p, x):
      one = lambda p, xi: jax.grad(_score, argnums=1)(apply_fn, p, xi[None])
      g = jax.vmap(one, in_axes=(None, 0))(p, x)
      return jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=0), g)
  else:
    def sq_grads(p, x):
      return jax.tree.map(jnp.square, jax.grad(_score, argnums=1)(apply_fn, p, x))

  @jax.jit
  def step(acc, p, x):
    g = sq_grads(p, x)
    return g if acc is None else jax.tree.map(jnp.add, acc, g)

  acc, examples = None, 0
  params = _replicate(params, mesh)
  for x in _inputs(batches, max_examples, "fisher"):
    acc = step(acc, params, _place(x, mesh))
    examples += int(np.shape(x)[0])
  flat = {k: v / examples for k, v in T.flatten(acc).items()}
  _finite_or_raise(flat, "the Fisher", "fisher")
  return Statistics(fisher=flat, examples=examples)


def collect(model: nn.Module, variables: PyTree, batches: Sequence[Any], *,
            fisher_mode: str | None = "per_example", max_examples: int | None = None,
            apply_kwargs: Mapping[str, Any] | None = None, mesh=None) -> Statistics:
  """Grams and (unless ``fisher_mode`` is None) the Fisher of ``variables['params']``
  for one expert; ``batches`` is iterated twice (give a list); ``mesh`` as in `grams`."""
  st = grams(model, variables, batches, max_examples=max_examples, apply_kwargs=apply_kwargs,
             mesh=mesh)
  if fisher_mode is None:
    return st
  rest = {k: v for k, v in variables.items() if k != "params"}
  apply = _model_apply(model, apply_kwargs)
  f = fisher(lambda p, x: apply({"params": p, **rest}, x), variables["params"], batches,
             mode=fisher_mode, max_examples=max_examples, mesh=mesh)
  return st.combine(f)


# ------------------------------------------------------------------ storage


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    *head, last = path.split("/")
    for h in head:
      d = d.setdefault(h, {})
    d[last] = v
  return out


def save(path: str | os.PathLike, stats: Statistics, overwrite: bool = False) -> str:
  """Save ``stats`` as an Orbax checkpoint (atomically), keyed by parameter path."""
  from kfuse.io.orbax_io import save_orbax
  tree: dict = {"examples": np.asarray(stats.examples, np.int64)}
  if stats.gram:
    tree["gram"] = _nest({k: np.asarray(v) for k, v in stats.gram.items()})
    tree["tokens"] = _nest({k: np.asarray(v, np.int64) for k, v in stats.tokens.items()})
  if stats.fisher:
    tree["fisher"] = _nest({k: np.asarray(v) for k, v in stats.fisher.items()})
  return save_orbax(path, tree, overwrite=overwrite)


def load(path: str | os.PathLike) -> Statistics:
  """Statistics saved by `save` (host NumPy arrays)."""
  from kfuse.io.orbax_io import restore_orbax
  p = os.fspath(path)
  tree = restore_orbax(p)
  if not isinstance(tree, Mapping) or "examples" not in tree:
    raise KfuseError(f"{p}: not a kfuse statistics checkpoint (no 'examples' entry)")
  gram = T.flatten(tree.get("gram", {}))
  tokens = {k: int(v) for k, v in T.flatten(tree.get("tokens", {})).items()}
  if set(gram) != set(tokens):
    raise KfuseError(f"{p}: Gram and token-count paths differ")
  return Statistics(gram=gram, tokens=tokens, fisher=T.flatten(tree.get("fisher", {})),
                    examples=int(tree["examples"]))
