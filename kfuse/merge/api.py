"""Tree-level merging: apply a registered method to whole parameter pytrees.

    merged = merge("ties", experts, base, params={"density": 0.2, "weight": [1., .5]})

Works on any pytree (Flax params, a flat dict of HF tensors, an ``nnx.State``, merged as
its Linen variables layout by `kfuse.nnx.to_variables` and returned as an ``nnx.State``) and under
`jax.jit` (parameter resolution is host-side Python over static paths and
shapes; value checks are skipped on tracers).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import nnx as knnx
from kfuse import tree as T
from kfuse.merge import params as P
from kfuse.merge.core import (NATIVE, REQUIRED, Method, PrepareContext, TensorInfo, check_models,
                              get_method)
from kfuse.merge.methods import default_prepare
from kfuse.tree import KfuseError

PyTree = Any


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def path_key(key: jax.Array, path: str) -> jax.Array:
  """A per-tensor key derived from the run key and the tensor's name."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def canonical_params(params: Mapping[str, Any] | None) -> dict:
  """Accept ``lambda_`` (a Python keyword cannot be a config field) for ``lambda``."""
  out = dict(params or {})
  if "lambda_" in out:
    if "lambda" in out:
      raise KfuseError("params: give either 'lambda' or 'lambda_', not both")
    out["lambda"] = out.pop("lambda_")
  return out


def validate_params(method: Method, params: Mapping[str, Any], n: int, *, where: str = "params") -> None:
  """Unknown names, wrong per-model list lengths, missing required parameters."""
  spec = method.param_map
  for name, v in params.items():
    if name not in spec:
      known = ", ".join(sorted(spec)) or "none"
      raise KfuseError(f"{where}: unknown parameter {name!r} for method {method.name!r}"
                       f" (known: {known})")
    p = spec[name]
    if p.per_model and isinstance(v, (list, tuple)) and not P.is_rule_list(v):
      if len(v) != n:
        raise KfuseError(f"{where}: parameter {name!r} has {len(v)} per-model values"
                         f" for {n} models")
  for p in method.params:
    if p.default is REQUIRED and p.name not in params:
      raise KfuseError(f"{where}: method {method.name!r} requires parameter {p.name!r}")


def resolve_values(method: Method, params: Mapping[str, Any], info: TensorInfo, n: int,
                   *, model_params: Sequence[Mapping[str, Any]] | None = None) -> dict:
  """Python values of every parameter for one tensor (per-model ones as lists):
  `params.resolve` with ``model_params[i]`` before ``params``."""
  return P.resolve(method, [params], [[mp] for mp in model_params] if model_params else None,
                   info.path, P.layer_position(info.layer, info.num_layers), n)


def merge_tensor(method: Method | str, base, experts, values: Mapping[str, Any],
                 info: TensorInfo, key: jax.Array | None = None, stats: Mapping | None = None,
                 ctx: PrepareContext = NATIVE):
  """Merge one tensor. ``experts`` is ``[N, ...]``; ``values`` from `resolve_values`;
  ``stats``: the method's ``tree_stats`` result (passed to its prepare as ``ctx.stats``)."""
  method = get_method(method)
  n = experts.shape[0]
  vals = dict(values)
  if stats is not None:
    ctx = dataclasses.replace(ctx, stats=stats)
  prep = method.prepare or default_prepare
  static, hp = prep(method, vals, info, n, ctx)
  if "weight" in method.param_map:
    weights = jnp.asarray(np.asarray(vals["weight"], np.float32))
  else:
    weights = jnp.ones((n,), jnp.float32)
  if method.random and key is None:
    raise KfuseError(f"method {method.name!r} is random: pass key=jax.random.key(seed)")
  rng = key if key is not None else jax.random.key(0)
  return method.kernel(static)(base, experts, weights, hp, rng)


def layout_of(names: Iterable[str]) -> str:
  """Row-wise rules' layout for tensors with these names (or a flat dict's keys):
  'torch' ([out, in]) when every name is a dotted HF name (``model.layers.0.mlp.up_proj.weight``),
  else 'flax' ([in, out], e.g. ``params/Dense_0/kernel``)."""
  names = list(names)
  if names and all(n.endswith((".weight", ".bias")) or "." in n and "/" not in n for n in names):
    return "torch"
  return "flax"


def merge(method: str | Method, experts: Sequence[PyTree], base: PyTree | None = None, *,
          params: Mapping[str, Any] | None = None,
          model_params: Sequence[Mapping[str, Any]] | None = None,
          key: jax.Array | None = None, layout: str | None = None,
          check: bool = True, allow_nonfinite: bool = False) -> PyTree:
  """Merge N expert pytrees (optionally relative to a base) with a named method.

  Args:
    method: registry name (see `kfuse.merge.names()`) or a `Method`.
    experts: N pytrees with identical structure, shapes and dtypes.
    base: the base / pretrained pytree; required by task-vector methods.
    params: parameter settings (scalars, per-model lists of length N,
      `Gradient`s or filter-rule lists; see `kfuse.merge.params`).
    model_params: optional per-model dicts (mergekit's ``models[i].parameters``).
    key: PRNG key, required by random methods (DARE, DELLA).
    layout: 'torch' ([out, in]) or 'flax' ([in, out]) for row-wise rules;
      inferred from the names when None (dotted HF names → torch).
    check: validate structure and finiteness (skipped under jit).
    allow_nonfinite: return results holding NaN/Inf (e.g. `linear` with weights
      summing to 0) instead of raising `KfuseError` (checked outside jit only).
  Returns:
    The merged pytree, with the structure and dtypes of the base (or of the
    first expert when the method uses no base). Integer and bool leaves are
    not merged: the base's (first expert's) leaf is returned unchanged when all
    models agree, else `KfuseError`; float64 leaves are computed in float64.
  """
  method = get_method(method)
  params = canonical_params(params)
  experts = list(experts)
  like = _nnx_like(base, experts)
  if like is not None:    # NNX: merge the variables layout, hand back an nnx.State
    out = merge(method, [_nnx_arrays(e) for e in experts], _nnx_arrays(base), params=params,
                model_params=model_params, key=key, layout=layout, check=check,
                allow_nonfinite=allow_nonfinite)
    return knnx.to_state(out, like=like)
  if not experts:
    raise KfuseError("empty model list: merge needs at least one expert")
  if method.base == "include" and base is not None:
    experts = [base] + experts
  use_base = base if method.base in ("required", "optional") else None
  n = len(experts)
  check_models(method, n, base is not None)
  validate_params(method, params, n)
  if model_params is not None:
    if len(model_params) != n:
      raise KfuseError(f"model_params has {len(model_params)} entries for {n} models")
    for i, mp in enumerate(model_params):
      validate_params(method, {k: v for k, v in mp.items()}, n, where=f"model_params[{i}]")

  trees = ([use_base] if use_base is not None else []) + experts
  names = (["base"] if use_base is not None else []) + [f"expert[{i}]" for i in range(n)]
  leaves0 = jax.tree.leaves(trees[0])
  concrete = not any(_is_tracer(l) for l in leaves0)
  if check:
    T.check_same_structure(trees, names)
    if concrete:
      for nm, t in zip(names, trees):
        T.check_finite(t, nm)

  ref = use_base if use_base is not None else experts[0]
  ref_flat = T.flatten(ref)
  exp_flat = [T.flatten(e) for e in experts]
  layout = layout or layout_of(ref_flat)
  L = T.num_layers(ref_flat)
  exact = {k for k, v in ref_flat.items() if not _is_inexact(v)}
  all_flat = ([ref_flat] if use_base is not None else []) + exp_flat   # order of `names`
  stacked = {k: jnp.stack([jnp.asarray(e[k]) for e in exp_flat]) for k in ref_flat
             if k not in exact}
  stats = None
  if method.tree_stats is not None:
    glob = resolve_values(method, params, TensorInfo("", (), None), n, model_params=model_params)
    stats = method.tree_stats({k: jnp.asarray(v) for k, v in ref_flat.items()}, stacked, glob)
  out = {}
  for path, leaf in ref_flat.items():
    if path in exact:   # integer / bool: copied, never averaged (nor truncated)
      out[path] = agreed_leaf(path, [t[path] for t in all_flat], names, concrete)
      continue
    if _dtype(leaf) == np.float64 and concrete:
      with jax.enable_x64(True):   # float64 leaves are computed in float64
        out[path] = _merge_leaf(method, params, model_params, path, leaf, use_base, exp_flat,
                                n, L, layout, key, stats)
      continue
    out[path] = _merge_leaf(method, params, model_params, path, leaf, use_base, exp_flat,
                            n, L, layout, key, stats, stacked[path])
  if concrete and not allow_nonfinite:
    check_finite_results(out, method.name)
  return T.unflatten(ref, out)


def _nnx_like(base: PyTree | None, experts: Sequence[PyTree]):
  """The ``nnx.State`` whose structure the result takes (base, else first expert), or None."""
  ref = base if base is not None else (experts[0] if experts else None)
  return ref if knnx.is_state(ref) else None


def _nnx_arrays(tree: PyTree | None) -> PyTree | None:
  """An ``nnx.State``'s variables layout with RNG keys as key data (copied, never merged)."""
  return knnx.key_data(knnx.as_variables(tree)) if knnx.is_state(tree) else tree


def _is_inexact(x) -> bool:
  return _dtype(x).kind in "fc" or _dtype(x).name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _dtype(x) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def agreed_leaf(path: str, leaves: Sequence[Any], names: Sequence[str], concrete: bool = True):
  """An integer / bool leaf is not merged: the base's (or first expert's) leaf,
  unchanged, when every model agrees; else a one-line `KfuseError` (not checked
  on tracers)."""
  ref = leaves[0]
  if concrete:
    r = np.asarray(ref)
    for name, x in zip(names[1:], leaves[1:]):
      x = np.asarray(x)
      if x.shape != r.shape or not np.array_equal(x, r):
        raise KfuseError(f"{path!r}: {r.dtype} leaf differs between {names[0]} and {name};"
                         f" integer and bool leaves are copied, not merged, so all models"
                         f" must agree")
  return ref


def _merge_leaf(method, params, model_params, path, leaf, use_base, exp_flat, n, L, layout,
                key, stats, stacked=None):
  leaf = jnp.asarray(leaf)
  if stacked is None:
    stacked = jnp.stack([jnp.asarray(e[path]) for e in exp_flat])
  info = TensorInfo(path=path, shape=tuple(leaf.shape), dtype=leaf.dtype,
                    layer=T.layer_index(path), num_layers=L, layout=layout)
  values = resolve_values(method, params, info, n, model_params=model_params)
  k = path_key(key, path) if key is not None else None
  return merge_tensor(method, leaf if use_base is not None else None, stacked,
                      values, info, k, stats)


def check_finite_results(out: Mapping[str, Any], method: str) -> None:
  """`KfuseError` naming the first result leaf holding NaN/Inf (one device sync)."""
  counts = {p: jnp.sum(~jnp.isfinite(v)) for p, v in out.items() if _is_inexact(v)}
  for path, n in jax.device_get(counts).items():
    if n:
      raise KfuseError(f"{path!r}: method {method!r} gave {int(n)} NaN/Inf values from finite"
                       f" inputs (e.g. weights summing to 0); pass allow_nonfinite=True to"
                       f" return them anyway")


def merge_by_path(rules: Iterable[tuple[str, str | Method, Mapping[str, Any] | None]],
                  experts: Sequence[PyTree], base: PyTree | None = None, *,
                  key: jax.Array | None = None, layout: str | None = None,
                  allow_nonfinite: bool = False) -> PyTree:
  """Different methods for different leaves: ``[(regex, method, params), ...]``.

  The first regex that `re.search`-es a leaf's path chooses its method; a leaf
  no rule matches is an error. Each method sees only its own leaves.
  """
  import re
  rules = [(re.compile(r), get_method(m), dict(p or {})) for r, m, p in rules]
  like = _nnx_like(base, experts)
  if like is not None:
    out = merge_by_path(rules, [_nnx_arrays(e) for e in experts], _nnx_arrays(base), key=key,
                        layout=layout, allow_nonfinite=allow_nonfinite)
    return knnx.to_state(out, like=like)
  ref = base if base is not None else experts[0]
  flat = T.flatten(ref)
  groups: dict[int, list[str]] = {}
  for path in flat:
    for i, (rx, _, _) in enumerate(rules):
      if rx.search(path):
        groups.setdefault(i, []).append(path)
        break
    else:
      raise KfuseError(f"merge_by_path: no rule matches leaf {path!r}")
  out = {}
  eflat = [T.flatten(e) for e in experts]
  bflat = T.flatten(base) if base is not None else None
  for i, paths in groups.items():
    _, m, p = rules[i]
    sub_e = [{k: e[k] for k in paths} for e in eflat]
    sub_b = {k: bflat[k] for k in paths} if bflat is not None else None
    out.update(merge(m, sub_e, sub_b, params=p, key=key, layout=layout or layout_of(flat),
                     allow_nonfinite=allow_nonfinite))
  return T.unflatten(ref, out)
