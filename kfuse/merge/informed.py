"""Data-informed merges: Fisher merging, RegMean and RegMean++.

Each method needs statistics of the experts on a little data (`Method.data`),
collected once by `kfuse.merge.statistics` and bound to the method:

    st = [statistics.grams(model, v_i, task_batches_i, max_examples=256) for ...]
    merged = merge.merge(informed.with_statistics("regmean", st), experts)
    merged = informed.regmean_plusplus(stages, experts, task_inputs)   # needs the model

The registered methods run through `kfuse.merge.merge` once bound (their
statistics are their whole-model pre-pass, `Method.tree_stats`); unbound, or in
the streaming engine, they stop with one line saying what they need.
Statistics are keyed by parameter path (`Statistics.under('backbone')` when the
merged tree is a subtree); paths, shapes and finiteness are checked against the
models before anything is merged.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import tree as T
from kfuse.merge import api
from kfuse.merge import statistics as ST
from kfuse.merge.core import NATIVE, Method, Param, get_method, register
from kfuse.merge.kernels import _work_dtype
from kfuse.merge.statistics import Statistics
from kfuse.tree import KfuseError

PyTree = Any
Array = jax.Array

__all__ = ["with_statistics", "regmean_plusplus", "fisher_coefficients", "register_binder"]


# ------------------------------------------------------------ binding


def _unbound(name: str, hint: str):
  def tree_stats(base_flat, experts_flat, values):
    raise KfuseError(f"method {name!r} needs whole-model statistics from data ({hint}); "
                     f"bind them: merge.merge(informed.with_statistics({name!r}, stats), experts)")
  return tree_stats


def with_statistics(method: str | Method, statistics: Sequence[Statistics | str | os.PathLike]
                    ) -> Method:
  """``method`` with one `Statistics` per expert (objects or saved checkpoint paths),
  in the experts' order; the result runs through `kfuse.merge.merge`."""
  m = get_method(method)
  if m.name not in _BINDERS:
    raise KfuseError(f"method {m.name!r} uses no data statistics"
                     f" (data-informed: {', '.join(sorted(_BINDERS))})")
  if isinstance(statistics, (Statistics, str, os.PathLike)):
    raise KfuseError(f"with_statistics({m.name!r}): give a list with one statistics per expert,"
                     f" in the experts' order")
  stats = [ST.load(s) if isinstance(s, (str, os.PathLike)) else s for s in statistics]
  for i, s in enumerate(stats):
    if not isinstance(s, Statistics):
      raise KfuseError(f"statistics[{i}]: expected kfuse.merge.statistics.Statistics or a"
                       f" saved path, got {type(s).__name__}")
  return dataclasses.replace(m, tree_stats=functools.partial(_BINDERS[m.name], tuple(stats)))


def _check_count(stats, experts_flat, name):
  n = next(iter(experts_flat.values())).shape[0] if experts_flat else 0
  if len(stats) != n:
    raise KfuseError(f"{name}: {len(stats)} statistics for {n} models (one per expert, in order)")
  return n


def _check_finite(i: int, what: str, path: str, a) -> None:
  bad = int(np.sum(~np.isfinite(np.asarray(a))))
  if bad:
    raise KfuseError(f"statistics[{i}]: {what} of {path!r} holds {bad} NaN/Inf values")


# ------------------------------------------------------------- Fisher


def fisher_coefficients(fishers: Sequence[Mapping[str, Any]], normalize: bool = True,
                        epsilon: float = 1e-6) -> np.ndarray:
  """Per-model coefficients: ``c_i ∝ 1 / (‖F_i‖₂ + ε)`` over all of model i's Fisher
  tensors, summing to 1 (FusionBench ``normalize_fisher_weight``); ones without."""
  if not normalize:
    return np.ones(len(fishers))
  norms = np.array([np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64))))
                                for v in f.values())) for f in fishers])
  inv = 1.0 / (norms + epsilon)
  return inv / inv.sum()


def _fisher_stats(stats, ref_flat, experts_flat, values):
  _check_count(stats, experts_flat, "fisher")
  want = {k: tuple(v.shape[1:]) for k, v in experts_flat.items()}
  for i, s in enumerate(stats):
    have = dict(s.fisher)
    if not have:
      raise KfuseError(f"statistics[{i}]: no Fisher (collect it with statistics.fisher)")
    for k in have:
      if k not in want:
        raise KfuseError(f"statistics[{i}]: Fisher of {k!r} matches no parameter of the models"
                         f" (statistics of a different model?{_hint(k, want)})")
    for k, shape in want.items():
      if k not in have:
        raise KfuseError(f"statistics[{i}]: no Fisher for parameter {k!r} (statistics of a"
                         f" different model?)")
      if tuple(np.shape(have[k])) != shape:
        raise KfuseError(f"statistics[{i}]: Fisher of {k!r} has shape {tuple(np.shape(have[k]))},"
                         f" the parameter {shape}")
      _check_finite(i, "the Fisher", k, have[k])
      if np.any(np.asarray(have[k]) < 0):
        raise KfuseError(f"statistics[{i}]: Fisher of {k!r} has negative entries")
  coef = fisher_coefficients([s.fisher for s in stats], bool(values.get("normalize", True)),
                             float(values.get("epsilon", 1e-6)))
  return {"fisher": {k: np.stack([np.asarray(s.fisher[k], np.float32) for s in stats])
                     for k in want},
          "coef": coef.astype(np.float32)}


def _hint(k, known):
  from kfuse.registry import suggest
  return suggest(k, known)


def _fisher_prepare(method, values, info, n, ctx=NATIVE):
  if ctx.stats is None:
    raise KfuseError(f"method {method.name!r} needs Fisher statistics (with_statistics)")
  return ({"normalize": bool(values["normalize"])},
          {"fisher": jnp.asarray(ctx.stats["fisher"][info.path]),
           "coef": jnp.asarray(ctx.stats["coef"]), "epsilon": jnp.asarray(values["epsilon"])})


def _fisher_recipe(normalize: bool = True):
  """θ* = Σ_i c_i w_i (F_i + ε) θ_i / Σ_i c_i w_i (F_i + ε)."""

  def apply(s):
    wd = _work_dtype(s.values)
    v = s.values.astype(wd)
    w = s.weights.astype(wd)
    if normalize:
      w = w * s.hp["coef"].astype(wd)
    w = w.reshape((-1,) + (1,) * (v.ndim - 1))
    f = s.hp["fisher"].astype(wd) + s.hp["epsilon"].astype(wd)
    out = jnp.sum(w * f * v, axis=0) / jnp.sum(w * f, axis=0)
    return s.replace(result=out.astype(s.values.dtype))

  return apply


FISHER = register(Method(
    name="fisher", recipe=_fisher_recipe, base="unused", prepare=_fisher_prepare,
    tree_stats=_unbound("fisher", "a diagonal Fisher per expert"),
    params=(Param("weight", 1.0, per_model=True, mergekit=False,
                  doc="per-model scaling (FusionBench fisher_scaling_coefficients)"),
            Param("normalize", True, static=True, kind=bool, mergekit=False,
                  doc="c_i ∝ 1/‖F_i‖₂ (FusionBench normalize_fisher_weight)"),
            Param("epsilon", 1e-6, mergekit=False,
                  doc="added to every Fisher entry (FusionBench minimal_fisher_weight)")),
    data="a diagonal Fisher per expert: 256 unlabeled examples of its task (the model's own"
         " predictions; statistics.fisher)",
    doc="""Fisher merging: θ* = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε), elementwise.

  F_i: expert i's diagonal Fisher on its own task's inputs (`statistics.fisher`,
  label-free score Σ_c √p_c log p_c); c_i = w_i / (‖F_i‖₂ + ε) normalised to sum
  to 1 (``normalize``), ε = 1e-6. Every parameter is merged this way. Matena &
  Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022;
  defaults of FusionBench's ``fisher_merging`` (256 examples, batch 32)."""))


# ------------------------------------------------------------- RegMean


# GPT-2's Conv1D weights are stored [in, out] among torch-layout [out, in] tensors
_INPUTS_FIRST = re.compile(r"(^|\.)(c_attn|c_fc|c_proj|q_attn)\.weight$")


def _transposed(path: str, shape: tuple, torch_layout: bool) -> bool:
  """Whether a 2-D weight is ``[out, in]`` (torch.nn.Linear), so RegMean transposes it."""
  return torch_layout and len(shape) == 2 and not _INPUTS_FIRST.search(path)


def _split(shape: tuple, d: int) -> int | None:
  """k such that prod(shape[:k]) == d (the kernel's contracted axes), else None."""
  p = 1
  for k, s in enumerate(shape):
    if p == d and k > 0:
      return k
    p *= s
  return len(shape) if p == d else None


def _regmean_stats(stats, ref_flat, experts_flat, values):
  _check_count(stats, experts_flat, "regmean")
  alpha, ridge = float(values.get("alpha", 0.95)), float(values.get("ridge", 0.0))
  if not 0.0 <= alpha <= 1.0:
    raise KfuseError(f"regmean: alpha (off-diagonal scale) must be in [0, 1], got {alpha}")
  if ridge < 0:
    raise KfuseError(f"regmean: ridge must be >= 0, got {ridge}")
  paths = set(stats[0].gram)
  for i, s in enumerate(stats):
    if set(s.gram) != paths:
      diff = sorted(set(s.gram) ^ paths)[0]
      raise KfuseError(f"statistics[{i}]: Gram paths differ from statistics[0]'s (e.g. {diff!r})")
  torch_layout = api.layout_of(ref_flat) == "torch"
  out = {}
  for k in sorted(paths):
    if k not in experts_flat:
      raise KfuseError(f"statistics: Gram of {k!r} matches no parameter of the models"
                       f" (statistics of a different model?{_hint(k, experts_flat)})")
    shape = tuple(experts_flat[k].shape[1:])
    g = []
    for i, s in enumerate(stats):
      a = np.asarray(s.gram[k], np.float32)
      d = a.shape[0]
      fits = (shape[-1] == d if _transposed(k, shape, torch_layout)
              else _split(shape, d) is not None)
      if a.ndim != 2 or a.shape[1] != d or not fits:
        raise KfuseError(f"statistics[{i}]: Gram of {k!r} is {a.shape}, the kernel {shape}"
                         f" has no input size {d} (statistics of a different model?)")
      _check_finite(i, "the Gram", k, a)
      n = int(s.tokens.get(k, 0))
      if n < d and alpha == 1.0 and ridge == 0.0:
        raise KfuseError(f"statistics[{i}]: Gram of {k!r} is from {n} input rows < d_in={d}:"
                         f" rank-deficient, not invertible; use alpha < 1 (off-diagonal"
                         f" shrink) or ridge > 0, or more data")
      g.append(a)
    g = np.stack(g)
    diag = np.einsum("nii->i", g)
    if ridge == 0.0 and np.any(diag <= 0):
      j = int(np.argmin(diag))
      raise KfuseError(f"statistics: input {j} of {k!r} is zero on every calibration row of"
                       f" every model, so Σ_i G_i is singular; pass ridge > 0")
    out[k] = g
  return {"gram": out}


def _regmean_prepare(method, values, info, n, ctx=NATIVE):
  if ctx.stats is None:
    raise KfuseError(f"method {method.name!r} needs Gram statistics (with_statistics)")
  g = ctx.stats["gram"].get(info.path)
  if g is None:
    return {"solve": False}, {}
  return ({"solve": True, "transpose": _transposed(info.path, info.shape, info.layout == "torch")},
          {"gram": jnp.asarray(g), "alpha": jnp.asarray(values["alpha"], jnp.float32),
           "ridge": jnp.asarray(values["ridge"], jnp.float32)})


def _regmean_recipe(solve: bool = False, transpose: bool = False):
  """W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i for kernels with a Gram, the mean otherwise."""

  def apply(s):
    wd = _work_dtype(s.values)
    v = s.values.astype(wd)
    if not solve:
      return s.replace(result=jnp.mean(v, axis=0).astype(s.values.dtype))
    g = s.hp["gram"].astype(wd)
    n, d = g.shape[0], g.shape[-1]
    eye = jnp.eye(d, dtype=wd)
    a = s.hp["alpha"].astype(wd)
    g = g * (a + (1 - a) * eye)                                    # shrink off-diagonals
    scale = jnp.einsum("nii->n", g) / d
    g = g + s.hp["ridge"].astype(wd) * scale[:, None, None] * eye  # ridge, relative to mean diag
    w = jnp.swapaxes(v, 1, 2) if transpose else v.reshape(n, d, -1)
    out = jnp.linalg.solve(jnp.sum(g, axis=0), jnp.einsum("nij,njk->ik", g, w))
    out = out.T if transpose else out.reshape(v.shape[1:])
    return s.replace(result=out.astype(s.values.dtype))

  return apply


_REGMEAN_PARAMS = (
    Param("alpha", 0.95, mergekit=False,
          doc="off-diagonal scale of each Gram (FusionBench reduce_non_diagonal_ratio)"),
    Param("ridge", 0.0, mergekit=False,
          doc="+ ridge·mean(diag G_i)·I per Gram (kfuse; 0 = none, as the paper)"))

REGMEAN = register(Method(
    name="regmean", recipe=_regmean_recipe, base="unused", prepare=_regmean_prepare,
    tree_stats=_unbound("regmean", "input Grams per expert"), params=_REGMEAN_PARAMS,
    data="input Grams of every linear layer per expert: 256 unlabeled examples of its task"
         " (statistics.grams)",
    doc="""RegMean: per linear layer W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i, every other tensor averaged.

  G_i = X_iᵀX_i / n: expert i's layer inputs on its task (`statistics.grams`;
  Dense, attention projections, Conv patches); G̃_i = α·G_i + (1−α)·diag(G_i)
  with α = 0.95 (``alpha``) and optionally + ridge·mean(diag G_i)·I. The kernel
  is ``[d_in, ...]`` (Flax; PyTorch ``[out, in]`` weights are transposed, as
  FusionBench's ``weight_transpose``). Solved with ``linalg.solve``. Jin et al.,
  "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023;
  defaults of FusionBench's ``regmean`` (256 examples, ratio 0.95)."""))


# ------------------------------------------------------------ RegMean++

Stage = tuple  # (key or tuple of keys of the params tree, fn(sub_params, h) -> h)


def _select(params: Mapping[str, Any], keys) -> tuple[Any, str]:
  if isinstance(keys, str):
    if keys not in params:
      raise KfuseError(f"regmean_plusplus: stage key {keys!r} not in the params"
                       f"{_hint(keys, params)}")
    return params[keys], keys + "/"
  missing = [k for k in keys if k not in params]
  if missing:
    raise KfuseError(f"regmean_plusplus: stage key {missing[0]!r} not in the params"
                     f"{_hint(missing[0], params)}")
  return {k: params[k] for k in keys}, ""


def regmean_plusplus(stages: Sequence[Stage], experts: Sequence[PyTree],
                     inputs: Sequence[Sequence[Any]], *, alpha: float = 0.95, ridge: float = 0.0,
                     max_examples: int | None = None) -> PyTree:
  """RegMean++: RegMean stage by stage, each expert's Grams taken on inputs that went
  through the *merged* earlier stages.

  For stage l: G_i^l = Grams of expert i's stage l on h_i^l; merge stage l with
  RegMean (`regmean`, same ``alpha`` / ``ridge``); then h_i^{l+1} = merged stage
  l (h_i^l). h_i^0 = task i's inputs. Nguyen et al., "RegMean++: Enhancing
  Effectiveness and Generalization of Regression Mean for Model Merging", 2025;
  FusionBench ``regmean_plusplus`` (its CLIP version: embeddings first, then each
  encoder block).

  Args:
    stages: ``(keys, fn)`` in forward order: ``keys`` a top-level key of the
      params tree (``fn`` gets that subtree) or a tuple of keys (``fn`` gets
      ``{k: params[k]}``); ``fn(sub_params, h) -> h`` calls Flax modules, whose
      Dense / DenseGeneral / Conv inputs are intercepted, e.g.
      ``("layers_0", lambda p, h: block.apply({"params": p}, h))``.
    experts: N params trees of the same structure.
    inputs: per expert, its task's calibration batches (arrays or ``{'x': ...}``).
    alpha, ridge: as `regmean`. max_examples: per task (whole batches).
  Returns:
    The merged params tree; top-level keys no stage names are averaged.
  """
  experts = list(experts)
  if len(inputs) != len(experts):
    raise KfuseError(f"regmean_plusplus: {len(inputs)} input streams for {len(experts)} experts")
  T.check_same_structure(experts, [f"expert[{i}]" for i in range(len(experts))])
  hs = []
  for i, batches in enumerate(inputs):
    xs = [b["x"] if isinstance(b, Mapping) else b for b in batches]
    xs = list(ST._inputs(({"x": x} for x in xs), max_examples, f"regmean_plusplus input[{i}]"))
    hs.append([jnp.asarray(x) for x in xs])
  merged: dict = {}
  for keys, fn in stages:
    subs = [_select(e, keys)[0] for e in experts]
    stats = []
    for sub, h in zip(subs, hs):
      try:
        stats.append(ST.grams(fn, sub, ({"x": x} for x in h)))
      except KfuseError as e:
        if "called none of the layers" not in str(e):
          raise
        stats.append(Statistics(examples=sum(len(x) for x in h)))   # no linear layer here
    part = api.merge(with_statistics("regmean_plusplus", stats), subs,
                     params={"alpha": alpha, "ridge": ridge})
    if isinstance(keys, str):
      merged[keys] = part
    else:
      merged.update(part)
    step = jax.jit(fn)
    hs = [[step(part, x) for x in h] for h in hs]
  rest = [k for k in experts[0] if k not in merged]
  if rest:
    merged.update(api.merge("simple_average", [{k: e[k] for k in rest} for e in experts]))
  return {k: merged[k] for k in experts[0]}


REGMEAN_PLUSPLUS = register(dataclasses.replace(
    REGMEAN, name="regmean_plusplus",
    tree_stats=_unbound("regmean_plusplus", "the model and each task's inputs: use"
                        " informed.regmean_plusplus(stages, experts, inputs); binding Grams"),
    data="the model (stage functions) and 256 unlabeled examples per task, propagated"
         " through the merged prefix (informed.regmean_plusplus)",
    doc="""RegMean++: RegMean's per-layer formula with Grams taken on inputs propagated
  through the already *merged* earlier layers (`informed.regmean_plusplus`, which
  needs the model). W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i per linear layer, α = 0.95, other
  tensors averaged. Nguyen et al., "RegMean++", 2025; FusionBench
  ``regmean_plusplus``."""))

_BINDERS = {"fisher": _fisher_stats, "regmean": _regmean_stats,
            "regmean_plusplus": _regmean_stats}


def register_binder(name: str, fn: Callable) -> None:
  """Let `with_statistics` bind method ``name`` (registered elsewhere, e.g. `essential`):
  ``fn(stats, base_flat, experts_flat, values) -> ctx.stats`` (its whole-model pre-pass)."""
  _BINDERS[name] = fn
