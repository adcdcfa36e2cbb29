"""Pytree utilities shared by every kfuse pillar.

Conventions
-----------
* A *path* is the '/'-joined sequence of keys leading to a leaf, e.g.
  ``params/Dense_0/kernel`` for Flax or ``model.layers.3.mlp.up_proj.weight``
  for a flat dict of HF tensors (dict keys are used verbatim, so dotted HF
  names stay intact).
* *Experts* are held as ONE pytree whose leaves carry a leading expert axis
  ``[N, ...]`` (`stack`); this lets every merge rule be a vectorised array
  function.
* Nothing here mutates its inputs.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.errors import KfuseError  # JAX-free home; re-exported here

PyTree = Any

__all__ = [
    "KfuseError",
    "path_str",
    "flatten",
    "unflatten",
    "paths",
    "stack",
    "unstack",
    "check_same_structure",
    "check_finite",
    "task_vectors",
    "add_task_vector",
    "matches_filter",
    "RegexRules",
    "layer_index",
    "num_layers",
    "cast",
    "resolve_dtype",
]


def _key_name(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath: Sequence[Any]) -> str:
  """'/'-joined name of a jax key path."""
  return "/".join(_key_name(k) for k in keypath)


def flatten(tree: PyTree) -> dict[str, Any]:
  """Flat ``{path: leaf}`` dict, in the tree's leaf order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for kp, leaf in leaves:
    out[path_str(kp)] = leaf
  return out


def paths(tree: PyTree) -> list[str]:
  return list(flatten(tree).keys())


def unflatten(like: PyTree, flat: Mapping[str, Any]) -> PyTree:
  """Rebuild a tree with the structure of ``like`` from a ``{path: leaf}`` dict."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  missing = [path_str(kp) for kp, _ in leaves if path_str(kp) not in flat]
  if missing:
    raise KfuseError(f"unflatten: no value for key {missing[0]!r}"
                     f" ({len(missing)} missing)")
  return jax.tree_util.tree_unflatten(
      treedef, [flat[path_str(kp)] for kp, _ in leaves])


def check_same_structure(trees: Sequence[PyTree],
                         names: Sequence[str] | None = None,
                         *, check_dtype: bool = True) -> None:
  """Raise a one-line `KfuseError` on missing/extra keys, shape or dtype mismatch."""
  if not trees:
    raise KfuseError("empty model list: at least one model is required")
  names = list(names) if names is not None else [f"model[{i}]" for i in range(len(trees))]
  ref = flatten(trees[0])
  for name, t in zip(names[1:], trees[1:]):
    cur = flatten(t)
    extra = [k for k in cur if k not in ref]
    if extra:
      raise KfuseError(f"{name}: extra key {extra[0]!r} not in {names[0]}")
    missing = [k for k in ref if k not in cur]
    if missing:
      raise KfuseError(f"{name}: missing key {missing[0]!r} present in {names[0]}")
    for k, v in ref.items():
      a = cur[k]
      if tuple(np.shape(a)) != tuple(np.shape(v)):
        raise KfuseError(f"{name}: key {k!r} has shape {tuple(np.shape(a))},"
                         f" expected {tuple(np.shape(v))} as in {names[0]}")
      if check_dtype and np.dtype(a.dtype) != np.dtype(v.dtype):
        raise KfuseError(f"{name}: key {k!r} has dtype {np.dtype(a.dtype)},"
                         f" expected {np.dtype(v.dtype)} as in {names[0]}")


def check_finite(tree: PyTree, name: str = "model") -> None:
  """Raise if any leaf holds NaN or Inf (host-side check; do not call under jit)."""
  for k, v in flatten(tree).items():
    a = np.asarray(v)
    if a.dtype.kind in "fc" or a.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
      if not np.all(np.isfinite(a.astype(np.float32) if a.dtype.name == "bfloat16" else a)):
        bad = "NaN" if np.any(np.isnan(a.astype(np.float32))) else "Inf"
        raise KfuseError(f"{name}: key {k!r} (shape {a.shape}) contains {bad}")


def stack(trees: Sequence[PyTree], names: Sequence[str] | None = None) -> PyTree:
  """Stack N same-structured trees into one tree with a leading expert axis."""
  check_same_structure(trees, names)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
  """Inverse of `stack`."""
  leaves, treedef = jax.tree.flatten(tree)
  n = leaves[0].shape[0]
  return [jax.tree.unflatten(treedef, [l[i] for l in leaves]) for i in range(n)]


def task_vectors(base: PyTree, experts: PyTree) -> PyTree:
  """δ_i = θ_i − θ_base for stacked experts ``[N, ...]``, computed in the base dtype."""
  return jax.tree.map(lambda b, e: e.astype(b.dtype) - b[None], base, experts)


def add_task_vector(base: PyTree, delta: PyTree, scale: float = 1.0) -> PyTree:
  """θ_base + scale·δ (δ without expert axis); result in the base dtype."""
  return jax.tree.map(
      lambda b, d: (b + scale * d.astype(b.dtype)).astype(b.dtype), base, delta)


# ------------------------------------------------------------------ filters


def matches_filter(name: str, flt: str | None) -> bool:
  """mergekit semantics: None / '*' match everything, otherwise substring test."""
  if flt is None or flt == "*":
    return True
  return flt in name


class RegexRules:
  """Ordered ``[(regex, value), ...]``; the first regex that `re.search`-es a path wins."""

  def __init__(self, rules: Iterable[tuple[str, Any]]):
    self.rules = [(re.compile(p), v) for p, v in rules]

  def lookup(self, path: str, default: Any = None) -> Any:
    for pat, v in self.rules:
      if pat.search(path):
        return v
    return default

  def map(self, tree: PyTree, fn: Callable[[Any, Any], Any] | None = None) -> PyTree:
    """Tree of looked-up values (or ``fn(value, leaf)``) with the tree's structure."""
    flat = flatten(tree)
    out = {k: (self.lookup(k) if fn is None else fn(self.lookup(k), v)) for k, v in flat.items()}
    return unflatten(tree, out)


_LAYER_RE = re.compile(r"(?:^|[./_])(?:layers|layer|h|blocks|block|encoderblock|decoderblock)[._/]?(\d+)(?:[./_]|$)")


def layer_index(path: str) -> int | None:
  """Transformer-block index of a leaf path, or None for embeddings/heads/norms.

  Recognises HF names (``model.layers.3.``, ``transformer.h.3.``, ``blocks.3``)
  and Flax module names (``layers_3/``, ``block_3/``, ``Block_3``).
  """
  m = _LAYER_RE.search(path)
  if m is None:
    m = re.search(r"(?:^|/)(?:[Ll]ayers?|[Bb]locks?|[Ee]ncoder[Bb]lock|[Dd]ecoder[Bb]lock)_(\d+)(?:/|$)", path)
  return int(m.group(1)) if m else None


def num_layers(names: Iterable[str]) -> int:
  idx = [i for i in (layer_index(n) for n in names) if i is not None]
  return max(idx) + 1 if idx else 0


# ------------------------------------------------------------------ dtypes

_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "float": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
    "float64": jnp.float64,
}


def resolve_dtype(name: str | None):
  if name is None:
    return None
  if not isinstance(name, str):
    return np.dtype(name)
  key = name.lower().replace("torch.", "")
  if key not in _DTYPES:
    raise KfuseError(f"unknown dtype {name!r}; expected one of {sorted(set(_DTYPES))}")
  return np.dtype(_DTYPES[key])


def cast(tree: PyTree, dtype, *, only_floating: bool = True) -> PyTree:
  """Cast floating leaves to ``dtype`` (integer/bool leaves are left alone)."""
  dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
  if dt is None:
    return tree

  def f(x):
    if only_floating and not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(dt)

  return jax.tree.map(f, tree)
