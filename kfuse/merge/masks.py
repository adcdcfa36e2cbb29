"""Mask merges: per-entry selections and masks over task vectors.

EMR (elect, mask, rescale: one shared vector plus per-task masks and rescalers),
TALL masks and Consensus (masks from the distance to the multi-task vector),
MagMax (the largest-magnitude change) and PCB (parameter competition balancing).

EMR and TALL masks keep one model per task: `emr` / `consensus_*` / `magmax` /
`pcb` give one merged model, while `emr_task` and `tall_mask` *materialise task
i's model* from the shared vector and task i's mask (``params={"task": i}``;
`emr_task_model` / `tall_task_model` are the Python shorthands). Zero counts as
a negative sign in EMR's election, as in its reference code.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.merge import stages as S
from kfuse.merge.core import NATIVE, Method, MergeState, Param, Stage, chain, get_method, register
from kfuse.merge.methods import _arr, default_prepare
from kfuse.merge.subspace import check_finite_param
from kfuse.tree import KfuseError

F32 = jnp.float32


def _check_floats(method, values, path):
  for p in method.params:
    if p.kind is float and values.get(p.name) is not None and not p.per_model:
      check_finite_param(method.name, p.name, values[p.name], path)


def _task_index(method, values, n, path) -> int:
  t = int(values["task"])
  if not 0 <= t < n:
    raise KfuseError(f"{path}: {method.name} task={t} is not one of the {n} task models"
                     f" (0..{n - 1})")
  return t


# ------------------------------------------------------------------ EMR


def emr_elect(tv: jax.Array):
  """EMR election over task vectors ``tv`` [T, ...]: γ = sign(Σ_i τ_i) with 0 → −1;
  masks M_i = [τ_i γ > 0]; τ_uni = γ ⊙ max_i |M_i ⊙ τ_i|. Returns (τ_uni, M)."""
  gamma = jnp.where(S.sum_models(tv) > 0, 1, -1).astype(tv.dtype)
  masks = tv * gamma[None] > 0
  mag = jnp.max(jnp.abs(jnp.where(masks, tv, 0)), axis=0)
  return gamma * mag, masks


def _emr_recipe(task: int = -1):
  def pick(s: MergeState) -> MergeState:
    uni, masks = emr_elect(s.values)
    if task < 0:
      return s.replace(result=uni)
    r = s.hp["rescaler"].astype(uni.dtype)
    return s.replace(result=r * jnp.where(masks[task], uni, 0))
  return chain(S.task_vectors(), pick, S.add_base())


def _emr_stats(base_flat, experts_flat, values):
  """EMR's rescalers λ_i = Σ_tensors mean|τ_i| / Σ_tensors mean|M_i ⊙ τ_uni| (whole model).

  Zero-size tensors are skipped (no mean); λ_i = 1 where M_i ⊙ τ_uni = 0 everywhere, since
  task i's model is then θ_b whatever λ_i is."""
  t = np.shape(next(iter(experts_flat.values())))[0]
  num = den = jnp.zeros((t,), F32)
  for nm, stack in experts_flat.items():
    if not np.prod(np.shape(stack)[1:]):
      continue
    tv = jnp.asarray(stack, F32) - jnp.asarray(base_flat[nm], F32)[None]
    uni, masks = emr_elect(tv)
    axes = tuple(range(1, tv.ndim))
    num = num + jnp.mean(jnp.abs(tv), axis=axes)
    den = den + jnp.mean(jnp.abs(jnp.where(masks, uni[None], 0)), axis=axes)
  return {"rescaler": jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 1.0)}


def _emr_task_prepare(method, values, info, n, ctx=NATIVE):
  t = _task_index(method, values, n, info.path)
  if ctx.stats is None:
    raise KfuseError(f"{info.path}: method 'emr_task' needs whole-model rescalers (its tree_stats"
                     f" pre-pass); use kfuse.merge.merge or emr_task_model in Python")
  return {"task": t}, {"rescaler": jnp.asarray(ctx.stats["rescaler"], F32)[t]}


_EMR_DOC = """EMR-Merging (Elect, Mask & Rescale).

  γ = sign(Σ_i τ_i) (0 → −1); τ_uni = γ ⊙ max_i |τ_i ⊙ [τ_i γ > 0]|;
  M_i = [τ_i γ > 0]; λ_i = Σ_t mean|τ_i,t| / Σ_t mean|M_i,t ⊙ τ_uni,t| over the
  model's tensors t. Task i's model: θ_b + λ_i·M_i ⊙ τ_uni (`emr_task`,
  ``task=i``); `emr` returns the shared θ_b + τ_uni. Huang et al., "EMR-Merging:
  Tuning-Free High-Performance Model Merging", NeurIPS 2024; FusionBench
  `emr_merge`."""

EMR = register(Method(
    name="emr", recipe=lambda: _emr_recipe(-1), params=(), base="required",
    prepare=lambda m, v, info, n, ctx=NATIVE: ({}, {}), elementwise=True,
    doc=_EMR_DOC.replace("EMR-Merging (Elect", "EMR-Merging's shared vector (Elect", 1)))

EMR_TASK = register(Method(
    name="emr_task", recipe=_emr_recipe, params=(
        Param("task", 0, static=True, kind=int, mergekit=False,
              doc="index of the task model to materialise"),),
    base="required", prepare=_emr_task_prepare, tree_stats=_emr_stats, elementwise=True,
    doc=_EMR_DOC))


def emr_task_model(experts: Sequence[Any], base: Any, task: int, **kw):
  """Task ``task``'s EMR model θ_b + λ_task·M_task ⊙ τ_uni (`merge` with ``emr_task``)."""
  from kfuse.merge.api import merge
  return merge("emr_task", experts, base, params={"task": task}, **kw)


# ------------------------------------------------------------------ TALL masks / Consensus


def tall_masks(tv: jax.Array, lam) -> jax.Array:
  """TALL masks m_i = [|τ_i| > λ·|τ_MTL − τ_i|], τ_MTL = Σ_j τ_j (strict >, as the reference)."""
  mtl = S.sum_models(tv)
  return jnp.abs(tv) > lam * jnp.abs(mtl[None] - tv)


def consensus_mask(tv: jax.Array, lam, k: int) -> jax.Array:
  """Consensus mask c = [Σ_i m_i ≥ k] (k = 2 drops 'selfish' and 'catastrophic' weights)."""
  return S.sum_models(tall_masks(tv, lam).astype(jnp.int32)) >= k


def consensus(k: int = 2, name: str = "tall_lambda"):
  """Wrap a recipe: keep its merged change only where the consensus mask is set,
  θ = c ? θ_m : θ_b (exactly θ_b + c ⊙ (θ_m − θ_b)); the masks come from the
  original task vectors, λ = ``hp[name]``."""

  def wrap(inner: Stage) -> Stage:
    def apply(s: MergeState) -> MergeState:
      out = inner(s)
      tv = s.values.astype(s.base.dtype) - s.base[None]
      c = consensus_mask(tv, s.hp[name].astype(tv.dtype), k)
      return out.replace(result=jnp.where(c, out.result, s.base))
    return apply

  return wrap


def with_consensus(method, name: str, defaults=None, doc: str = "") -> Method:
  """``method`` with the Consensus mask applied to its merged change (a new `Method`):
  its parameters plus ``tall_lambda`` (0.6) and ``consensus_k`` (2)."""
  import dataclasses
  m = get_method(method)
  over = dict(defaults or {})
  params = tuple(dataclasses.replace(p, default=over[p.name]) if p.name in over else p
                 for p in m.params)
  params += (Param("tall_lambda", 0.6, mergekit=False, doc="TALL mask threshold λ"),
             Param("consensus_k", 2, static=True, kind=int, mergekit=False,
                   doc="minimum number of tasks whose TALL mask keeps an entry"))
  inner_prepare = m.prepare or default_prepare

  def prepare(method_, values, info, n, ctx=NATIVE):
    lam = check_finite_param(method_.name, "tall_lambda", values["tall_lambda"], info.path)
    static, hp = inner_prepare(method_, values, info, n, ctx)
    hp["tall_lambda"] = _arr(lam)
    return {**static, "consensus_k": int(values["consensus_k"])}, hp

  def recipe(consensus_k: int = 2, **static):
    return consensus(consensus_k)(m.recipe(**static))

  return dataclasses.replace(m, name=name, recipe=recipe, params=params, prepare=prepare,
                             doc=doc)


_CONSENSUS = """  TALL masks m_i = [|τ_i| > λ_t·|τ_MTL − τ_i|] with τ_MTL = Σ_j τ_j (λ_t =
  tall_lambda = 0.6, FusionBench's default; the paper picks it per task on
  validation data); consensus c = [Σ_i m_i ≥ k] (k = 2); θ = θ_b + c ⊙ Δ.
  Wang et al., "Localizing Task Information for Improved Model Merging and
  Compression", ICML 2024; FusionBench `tall_mask`."""

register(with_consensus("task_arithmetic", "consensus_ta", {"lambda": 0.3}, doc=(
    "Consensus Task Arithmetic: Δ = λ·Σ_i w_i τ_i (λ = 0.3), masked by the consensus.\n\n"
    + _CONSENSUS)))

register(with_consensus("ties", "consensus_ties", {"density": 0.2, "normalize": False,
                                                   "lambda": 0.3}, doc=(
    "Consensus TIES: Δ = TIES (per-tensor top-20% trim, sign election, disjoint sum,\n"
    "  λ = 0.3), masked by the consensus.\n\n" + _CONSENSUS)))


def _tall_recipe(task: int = 0):
  def pick(s: MergeState) -> MergeState:
    m = tall_masks(s.values, s.hp["tall_lambda"].astype(s.values.dtype))[task]
    return s.replace(result=jnp.where(m, S.sum_models(s.values), 0))
  return chain(S.task_vectors(), pick, S.add_base())


def _tall_prepare(method, values, info, n, ctx=NATIVE):
  t = _task_index(method, values, n, info.path)
  lam = check_finite_param(method.name, "tall_lambda", values["tall_lambda"], info.path)
  return {"task": t}, {"tall_lambda": _arr(lam)}


register(Method(
    name="tall_mask", recipe=_tall_recipe, params=(
        Param("task", 0, static=True, kind=int, mergekit=False,
              doc="index of the task model to materialise"),
        Param("tall_lambda", 0.6, mergekit=False, doc="TALL mask threshold λ")),
    base="required", prepare=_tall_prepare, elementwise=True,
    doc="""TALL-mask retrieval of task i's model from the multi-task vector.

  τ_MTL = Σ_j τ_j; m_i = [|τ_i| > λ·|τ_MTL − τ_i|] (λ = 0.6, FusionBench's
  default); θ_i = θ_b + m_i ⊙ τ_MTL (``task=i``). Wang et al., "Localizing Task
  Information for Improved Model Merging and Compression", ICML 2024;
  FusionBench `TallMaskTaskArithmeticAlgorithm` (with the masks of its
  `tall_mask/utils.py`, which compare |θ_i − θ_b|, the paper's rule).""", ))


def tall_task_model(experts: Sequence[Any], base: Any, task: int, **kw):
  """Task ``task``'s TALL-mask model θ_b + m_task ⊙ τ_MTL (`merge` with ``tall_mask``)."""
  from kfuse.merge.api import merge
  params = {"task": task, **kw.pop("params", {})}
  return merge("tall_mask", experts, base, params=params, **kw)


# ------------------------------------------------------------------ MagMax


def magmax_select(tv: jax.Array) -> jax.Array:
  """τ_max: per entry the task vector of largest magnitude; ties go to the later task
  (a running selection replaced where |τ_i| ≥ |current|, as the reference)."""
  sel = tv[0]
  for i in range(1, tv.shape[0]):
    sel = jnp.where(jnp.abs(tv[i]) >= jnp.abs(sel), tv[i], sel)
  return sel


def _magmax_prepare(method, values, info, n, ctx=NATIVE):
  _check_floats(method, values, info.path)
  return default_prepare(method, values, info, n, ctx)


register(Method(
    name="magmax", recipe=lambda: chain(
        S.task_vectors(), lambda s: s.replace(result=magmax_select(s.values)),
        S.scale("lambda"), S.add_base()),
    params=(Param("lambda", 0.5, mergekit=False, doc="scale λ of the selected task vector"),),
    base="required", prepare=_magmax_prepare, elementwise=True,
    doc="""MagMax: the largest-magnitude change per entry.

  τ_max[j] = τ_{i*}[j], i* = argmax_i |τ_i[j]| (ties: the later task);
  θ = θ_b + λ·τ_max (λ = 0.5, the official 8-task script and FusionBench's
  config). Marczak et al., "MagMax: Leveraging Model Merging for Seamless
  Continual Learning", ECCV 2024; FusionBench `MagMaxAlgorithm`."""))


# ------------------------------------------------------------------ PCB


def _minmax_rows(x: jax.Array) -> jax.Array:
  """(x − min)/(max − min) per row; a constant row (nothing to rank) maps to 1."""
  lo = jnp.min(x, axis=1, keepdims=True)
  hi = jnp.max(x, axis=1, keepdims=True)
  rng = hi - lo
  return jnp.where(rng > 0, (x - lo) / jnp.where(rng > 0, rng, 1), 1)


def _clamp_rows(x: jax.Array, lo_idx: int, hi_idx: int) -> jax.Array:
  """Clip each row to its sorted values at ``lo_idx`` and ``hi_idx``."""
  srt = jnp.sort(x, axis=1)
  return jnp.clip(x, srt[:, lo_idx:lo_idx + 1], srt[:, hi_idx:hi_idx + 1])


def pcb_indices(d: int, ratio: float, clip: float = 1e-4) -> tuple[int, int, int]:
  """Host-side quantile ranks of PCB for d entries per task, as its reference:
  the |τ| clip at sorted ranks ⌊d·clip⌋ and ⌊d(1 − clip) − 1⌋, the score floor at
  ⌊d(1 − ratio)⌋."""
  lo = int(d * clip)
  hi = max(int(d * (1 - clip) - 1), 0)
  top = min(int(d * (1 - ratio)), d - 1)
  return lo, hi, top


def pcb_delta(tv: jax.Array, ratio: float) -> jax.Array:
  """PCB merged task vector from ``tv`` [T, ...] (flattened per task; see `PCB`)."""
  t = tv.shape[0]
  x = tv.reshape(t, -1)
  d = x.shape[1]
  if d == 0:
    return jnp.zeros(tv.shape[1:], tv.dtype)
  lo, hi, top = pcb_indices(d, ratio)
  mag = _clamp_rows(jnp.abs(x), lo, hi)
  clipped = jnp.sign(x) * mag
  intra = jnp.exp(t * jnp.square(_minmax_rows(mag)))
  inter = jnp.tanh(x * S.sum_models(x)[None])
  score = intra * inter
  srt = jnp.sort(score, axis=1)
  scale = _minmax_rows(jnp.clip(score, srt[:, top:top + 1], srt[:, -1:]))
  out = S.sum_models(clipped * scale) / jnp.maximum(S.sum_models(scale), 1e-12)
  return out.reshape(tv.shape[1:])


def _pcb_prepare(method, values, info, n, ctx=NATIVE):
  _check_floats(method, values, info.path)
  r = float(values["pcb_ratio"])
  if not 0 < r <= 1:
    raise KfuseError(f"{info.path}: pcb_ratio must be in (0, 1], got {r}")
  static, hp = default_prepare(method, values, info, n, ctx)
  return static, hp


register(Method(
    name="pcb", recipe=lambda pcb_ratio=0.1: chain(
        S.task_vectors(), lambda s: s.replace(result=pcb_delta(s.values, float(pcb_ratio))),
        S.scale("lambda"), S.add_base()),
    params=(Param("pcb_ratio", 0.1, static=True, mergekit=False,
                  doc="fraction of each task's entries kept by their balancing score"),
            Param("lambda", 1.0, mergekit=False, doc="scale λ (the paper searches it)")),
    base="required", prepare=_pcb_prepare, elementwise=False,
    doc="""PCB-Merging (Parameter Competition Balancing), per tensor.

  Per task i over the tensor's d entries: |τ̃_i| = |τ_i| clipped to its sorted
  ranks [⌊d·1e-4⌋, ⌊d(1−1e-4)−1⌋], τ̃_i = sign(τ_i)|τ̃_i|; intra-balancing
  exp(T·minmax(|τ̃_i|)²); inter-balancing tanh(τ_i ⊙ Σ_j τ_j); score = intra ⊙
  inter, clipped below at its ⌊d(1−r)⌋-th value (r = pcb_ratio = 0.1) and
  min-max normalised to s_i ∈ [0, 1] (a constant row → 1);
  θ = θ_b + λ·Σ_i s_i τ̃_i / max(Σ_i s_i, 1e-12). The reference flattens the
  whole model into one vector per task; kfuse balances per tensor (so it
  streams). Du et al., "Parameter Competition Balancing for Model Merging",
  NeurIPS 2024 (github.com/duguodong7/pcb-merging).""",
))
