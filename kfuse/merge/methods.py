"""The registry of named merge methods, each a recipe built from stages.

Names, parameters and defaults follow mergekit 0.1.5 where the method exists
there; paper / FusionBench flavours are separate names or explicit options.
Every entry's docstring gives the formula and paper.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from kfuse.merge import kernels as K
from kfuse.merge import stages as S
from kfuse.merge.core import (NATIVE, REQUIRED, Method, Param, PrepareContext, TensorInfo, chain,
                              register, unless_rescaled)
from kfuse.tree import KfuseError

F32 = jnp.float32


# ------------------------------------------------------------- preparation


def _arr(v, dtype=F32):
  return jnp.asarray(np.asarray(v, dtype=np.dtype(dtype)))


def default_prepare(method: Method, values: Mapping[str, Any], info: TensorInfo, n: int,
                    ctx: PrepareContext = NATIVE):
  """Split resolved parameter values into static options and traced arrays."""
  static, hp = {}, {}
  for p in method.params:
    if p.name not in values:
      continue
    v = values[p.name]
    if p.static:
      static[p.name] = v
    elif p.name == "weight":
      continue  # carried separately as state.weights
    elif v is None:
      continue
    else:
      hp[p.name] = _arr(v)
  return static, hp


def _row_axis(info: TensorInfo) -> int:
  """The axis mergekit's row-wise rules reduce over, in this tensor's layout.

  mergekit works on PyTorch ``[out, in, ...]`` tensors and reduces over dim 1
  (DELLA) / dim −1 (filter-wise, nuslerp, arcee). For Flax ``[..., in, out]``
  kernels the same *input* axis is −2.
  """
  nd = len(info.shape)
  if info.layout == "flax" and nd >= 2:
    return nd - 2
  return 1 if nd >= 2 else 0


def _last_axis(info: TensorInfo) -> int:
  nd = len(info.shape)
  if info.layout == "flax" and nd == 2:
    return 0
  return -1


def _check_density(name, d, path):
  if not (0 < d <= 1):
    raise KfuseError(f"{path}: density {d} for {name} must be in (0, 1]")


def _gta_prepare(sparsify: str | None):
  def prepare(method, values, info, n, ctx=NATIVE):
    numel = int(np.prod(info.shape)) if info.shape else 1
    hp = {"lambda": _arr(values["lambda"])}
    dens = [float(d) for d in values.get("density", [1.0] * n)]
    if method.sparsifies and ctx.dialect != "mergekit":
      # mergekit itself accepts any density (<= 0 zeroes δ, >= 1 keeps it), which a
      # density gradient reaching 0 relies on; the native API insists on (0, 1].
      for d in dens:
        _check_density(method.name, d, info.path)
    if sparsify == "magnitude":
      hp["k"] = _arr([numel if d >= 1 else (0 if d <= 0 else max(1, int(d * numel)))
                      for d in dens], np.int32)
    elif sparsify == "outliers":
      gam = [float(g) for g in values["gamma"]]
      lo, hi = [], []
      for d, g in zip(dens, gam):
        if d >= 1:
          lo.append(0), hi.append(numel)
          continue
        target = max(int(d * numel), 0)
        n_top = int(g * numel)
        n_bot = max(0, numel - target - n_top)
        lo.append(n_bot), hi.append(n_bot + target)
      hp["lo"], hp["hi"] = _arr(lo, np.int32), _arr(hi, np.int32)
    elif sparsify in ("random", "della"):
      hp["density"] = _arr(dens)
      if sparsify == "della":
        eps = [float(e) for e in values["epsilon"]]
        for d, e in zip(dens, eps):
          if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise KfuseError(f"{info.path}: della needs density±epsilon in (0, 1), got "
                             f"density={d}, epsilon={e}")
        hp["epsilon"] = _arr(eps)
    static = {
        "normalize": bool(values["normalize"]),
        "rescale": bool(values["rescale"]),
    }
    if "rescale_mode" in values:
      static["rescale_mode"] = values["rescale_mode"]
    if sparsify == "della":
      static["axis"] = _row_axis(info)
    return static, hp

  return prepare


def _gta_recipe(sparsify: str | None, consensus: str | None):
  def build(normalize: bool, rescale: bool, rescale_mode: str = "l1", axis: int = 1, int8_mask=None):
    rs = rescale_mode if rescale else None
    st = [S.task_vectors()]
    if sparsify == "magnitude":
      st.append(S.trim_magnitude(rs))
    elif sparsify == "random":
      st.append(S.drop_random(rs))
    elif sparsify == "outliers":
      st.append(S.trim_outliers(rs))
    elif sparsify == "della":
      st.append(S.drop_magnitude_ranked(axis=axis, rescale=rs))
    st.append(S.weigh())
    if consensus:
      st.append(S.elect_sign(consensus))
    st += [S.combine(normalize=normalize), S.scale("lambda"), S.add_base()]
    return chain(*st)

  return build


def _negated(prepare):
  def prep(method, values, info, n, ctx=NATIVE):
    static, hp = prepare(method, values, info, n, ctx)
    hp["lambda"] = -hp["lambda"]
    return static, hp
  return prep


def _gta(name, sparsify, consensus, normalize, rescale, doc, extra=(), negate=False):
  params = (
      Param("weight", 1.0, per_model=True, doc="per-model weight w_i (mergekit requires it)"),
      Param("density", 1.0, per_model=True, doc="fraction of δ entries kept"),
      *extra,
      Param("lambda", 1.0, doc="final scale λ of the merged task vector"),
      Param("normalize", normalize, static=True, kind=bool),
      Param("rescale", rescale, static=True, kind=bool),
      Param("int8_mask", False, static=True, kind=bool,
            doc="memory-only option in mergekit; identical results"),
      Param("rescale_mode", "l1", static=True, kind=str, mergekit=False,
            doc="'l1' (mergekit: match ‖δ‖₁) or 'inverse' (DARE paper: 1/p)"),
  )
  return register(Method(
      name=name, recipe=_gta_recipe(sparsify, consensus), params=params,
      base="required",
      prepare=_negated(_gta_prepare(sparsify)) if negate else _gta_prepare(sparsify),
      random=sparsify in ("random", "della"),
      elementwise=unless_rescaled if sparsify in (None, "magnitude", "outliers") else False,
      selection={"magnitude": "magnitude", "outliers": "band"}.get(sparsify),
      sparsifies=sparsify is not None, doc=doc))


_gta("task_arithmetic", None, None, False, False, """Task Arithmetic.

  θ = θ_b + λ·Σ_i w_i δ_i  (normalize: divide by Σ_i w_i).
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
  FusionBench flavour: weight=1, lambda=0.3.""")

_gta("ties", "magnitude", "sum", True, False, """TIES-Merging (mergekit semantics, per-tensor trim).

  δ̂_i = top-k(δ_i), k = max(1, ⌊density·n⌋); wd_i = w_i δ̂_i;
  s = sign(Σ_i wd_i) (0 → +); m_i = [sign(wd_i) = s];
  θ = θ_b + λ·Σ m_i wd_i / Σ m_i w_i  (normalize=True; zero divisor → 1).
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
  NeurIPS 2023. The paper/FusionBench flavour (global trim, dis-sum) is
  `ties_paper`.""")

_gta("dare_ties", "random", "sum", False, True, """DARE + TIES sign consensus.

  δ̃_i = rescale(Bernoulli(density) ⊙ δ_i); TIES election on w_i δ̃_i;
  θ = θ_b + λ·Σ m_i w_i δ̃_i. rescale_mode 'l1' (mergekit: ‖δ̃‖₁ = ‖δ‖₁ per
  tensor) or 'inverse' (paper: divide by density).
  Yu et al., "Language Models are Super Mario", ICML 2024.""")

_gta("dare_linear", "random", None, False, True, """DARE + task arithmetic.

  θ = θ_b + λ·Σ w_i δ̃_i with δ̃_i as in dare_ties.
  Yu et al., "Language Models are Super Mario", ICML 2024.""")

_GAMMA = Param("gamma", 0.01, per_model=True, doc="fraction of largest-|δ| outliers dropped")
_EPS = Param("epsilon", 0.15, per_model=True, doc="DELLA keep-probability spread ε")

_gta("breadcrumbs", "outliers", None, False, False, """Model Breadcrumbs.

  Keep the ⌊density·n⌋ entries just below the top ⌊γ·n⌋ outliers by |δ|
  (fewer outliers dropped if needed to reach the density): with entries
  sorted by ascending |δ|, keep ranks [n − ⌊d·n⌋ − ⌊γ·n⌋, n − ⌊γ·n⌋) as δ̃_i;
  θ = θ_b + λ·Σ_i w_i δ̃_i. Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024.""", (_GAMMA,))

_gta("breadcrumbs_ties", "outliers", "sum", False, False, """Breadcrumbs mask + TIES sign consensus.

  Breadcrumbs' band mask on each δ_i, then the TIES election s = sign(Σ w_i δ̃_i)
  and θ = θ_b + λ·Σ m_i w_i δ̃_i (normalize=False). Davari & Belilovsky, ECCV
  2024; Yadav et al., NeurIPS 2023.""", (_GAMMA,))

_gta("della", "della", "sum", True, True, """DELLA-Merging (MagPrune + sign consensus).

  Per row (PyTorch dim 1): p_keep = (d−ε) + 2ε·r̂, r̂ the normalised |δ| rank;
  δ̃ = rescale(Bernoulli(p_keep) ⊙ δ); TIES election and disjoint mean.
  Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
  Magnitude-Based Sampling", 2024.""", (_EPS,))

_gta("della_linear", "della", None, False, True, """DELLA MagPrune without consensus.

  δ̃_i as in `della` (rank-dependent keep probability, L1 rescale);
  θ = θ_b + λ·Σ w_i δ̃_i. Deep et al., "DELLA-Merging", 2024.""", (_EPS,))


def _simple(name, recipe, params, doc, *, base="required", min_models=1, max_models=None,
            prepare=None, random=False, tree_stats=None, elementwise=False):
  return register(Method(name=name, recipe=recipe, params=tuple(params), base=base,
                         min_models=min_models, max_models=max_models,
                         prepare=prepare, random=random, tree_stats=tree_stats,
                         elementwise=elementwise, doc=doc))


_simple("linear", lambda normalize=True: K.linear(normalize), [
    Param("weight", 1.0, per_model=True), Param("normalize", True, static=True, kind=bool)],
    """Linear / model soup: θ = Σ w_i θ_i / Σ w_i (normalize=False: Σ w_i θ_i).

  Wortsman et al., "Model soups", ICML 2022. The base, if given, is not used
  (list it among the models to include it).""", base="unused", elementwise=True)

_simple("simple_average", lambda: K.simple_average(), [],
        """Simple average (uniform soup): θ = (1/N) Σ θ_i (FusionBench SimpleAverage).

  Wortsman et al., "Model soups", ICML 2022.""",
        base="unused", elementwise=True)


def _slerp_prepare(method, values, info, n, ctx=NATIVE):
  return {}, {"t": _arr(values["t"])}


_simple("slerp", lambda: K.slerp(), [Param("t", REQUIRED)],
        """SLERP between θ_b (t=0) and one other model (t=1).

  cosΩ = ⟨θ_b/‖θ_b‖, θ_1/‖θ_1‖⟩ over the flattened tensor; if |cosΩ| > 0.9995
  lerp, else sin((1−t)Ω)/sinΩ·θ_b + sin(tΩ)/sinΩ·θ_1. Shoemake, SIGGRAPH 1985.""",
        min_models=1, max_models=1, prepare=_slerp_prepare)


def _nuslerp_prepare(method, values, info, n, ctx=NATIVE):
  flat = bool(values["nuslerp_flatten"])
  axis = 0 if values["nuslerp_row_wise"] else -1
  if info.layout == "flax" and len(info.shape) == 2:
    axis = -1 if axis == 0 else 0
  return {"flatten": flat, "axis": axis}, {}


_simple("nuslerp", lambda flatten=True, axis=-1: K.nuslerp(flatten, axis), [
    Param("weight", 1.0, per_model=True),
    Param("nuslerp_flatten", True, static=True, kind=bool),
    Param("nuslerp_row_wise", False, static=True, kind=bool)],
    """NuSLERP: slerp of two models (or their task vectors, with a base) at
  t = w_2/(w_1+w_2), over the flattened tensor or row/column vectors:
  cosΩ = ⟨v_1/‖v_1‖, v_2/‖v_2‖⟩, v = (sin((1−t)Ω)·v_1 + sin(tΩ)·v_2)/sinΩ
  (lerp when colinear); θ = θ_b + v with a base. mergekit's nuslerp:
  Goddard et al., "Arcee's MergeKit", EMNLP 2024 (arXiv:2403.13257).""",
    base="optional", min_models=2, max_models=2, prepare=_nuslerp_prepare)


_simple("multislerp", lambda normalize_weights=True, eps=1e-8: K.multislerp(normalize_weights, eps), [
    Param("weight", 1.0, per_model=True),
    Param("normalize_weights", True, static=True, kind=bool),
    Param("eps", 1e-8, static=True)],
    """Multi-SLERP: barycentric interpolation on the hypersphere (tangent space at
  the weighted mean direction), scaled by Σ w_i‖x_i‖; task vectors with a base.
  u_i = x_i/‖x_i‖, μ = Σ w_i u_i/‖Σ w_i u_i‖, T = Σ w_i (u_i − ⟨u_i, μ⟩μ);
  θ = (μ cos‖T‖ + T sin‖T‖/‖T‖)·Σ w_i‖x_i‖ (+ θ_b).
  Goddard, "Multi-SLERP" (2024), https://goddard.blog/posts/multislerp-wow-what-a-cool-idea""",
    base="optional")

_simple("karcher", lambda max_iter=10: K.karcher(int(max_iter)), [
    Param("max_iter", 10, static=True, kind=int), Param("tol", 1e-5)],
    """Karcher mean on the unit sphere of the models' directions, times their mean
  norm (uniform α_i = 1/N; a given base is one more point). Karcher, 1977.""",
    base="include")

_simple("model_stock", lambda filter_wise=False, axis=-1: K.model_stock(filter_wise, axis), [
    Param("filter_wise", False, static=True, kind=bool)],
    """Model Stock: t = N·cosθ/(1+(N−1)cosθ) from the mean pairwise cosine of the
  offsets θ_i − θ_b; θ = t·mean(θ_i) + (1−t)·θ_b. Jang et al., ECCV 2024.""",
    min_models=2,
    prepare=lambda m, v, info, n, ctx=NATIVE: ({"filter_wise": bool(v["filter_wise"]), "axis": _last_axis(info)}, {}))

_simple("sce", lambda fork_weights_only=False, int8_mask=False: K.sce(fork_weights_only), [
    Param("select_topk", 1.0), Param("int8_mask", False, static=True, kind=bool),
    Param("fork_weights_only", False, static=True, kind=bool, mergekit=False)],
    """SCE (FuseChat-2.0): Select the top select_topk fraction of positions by
  variance across models, Calculate weights ω_i = mean(τ_i²)/Σ_j mean(τ_j²),
  Erase minority signs; θ_b + Σ ω_i m_i τ_i / Σ ω_i m_i. Wan et al., 2024.""")

_simple("ram", lambda: K.ram(False), [Param("epsilon", 1e-5)],
        """RAM (Reinforced Agent Merging): unique changes kept, shared changes
  averaged over the models that made them (|δ| > ε): a_i = [|δ_i| > ε],
  c = Σ_i a_i, θ = θ_b + Σ_i a_i δ_i·([c = 1] + [c > 1]/c). arXiv:2601.13572.""",
        elementwise=True)

_simple("ramplus_tl", lambda: K.ram(True), [
    Param("r", 0.1), Param("alpha", 0.2), Param("epsilon", 1e-5)],
    """RAM+ (tensor-local): as RAM, unique changes scaled by
  λ_i = 1 + r·clip(shared_i/unique_i, 0, α), where shared_i / unique_i count
  model i's changed entries that other models also change / that only it
  changes, in this tensor. arXiv:2601.13572.""")

_simple("nearswap", lambda: K.nearswap(), [Param("t", REQUIRED)],
        """NearSwap: w = clip(t/|θ_b−θ_1|, 0, 1) per entry; w·θ_1 + (1−w)·θ_b.

  alchemonaut (2024), https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001""",
        min_models=1, max_models=1, prepare=_slerp_prepare, elementwise=True)

_ARCEE_SAMPLE = 1_000_000


def _arcee_prepare(method, values, info, n, ctx=NATIVE):
  numel = int(np.prod(info.shape)) if info.shape else 1
  return {"axis": _last_axis(info), "sample": _ARCEE_SAMPLE if numel > _ARCEE_SAMPLE else 0}, {}


_simple("arcee_fusion", lambda axis=-1, sample=0: K.arcee_fusion(axis, sample), [],
        """Arcee Fusion: keep θ_1's change where |θ_1−θ_b|·KL(softmax θ_1‖softmax θ_b)
  ≥ median + 1.5·IQR of that importance (sampled quantiles above 1e6 entries:
  random, from the explicit key). mergekit's arcee_fusion (https://arcee.ai):
  Goddard et al., "Arcee's MergeKit", EMNLP 2024 (arXiv:2403.13257).""",
        min_models=1, max_models=1, prepare=_arcee_prepare, random=True)


def _passthrough_prepare(method, values, info, n, ctx=NATIVE):
  sc = values.get("scale", [None])[0]
  return {}, {"scale": _arr(1.0 if sc is None else sc)}


_simple("passthrough", lambda: K.passthrough(), [Param("scale", None, per_model=True)],
        """Passthrough: the single input tensor, θ = scale·θ_1. Used with slices for
  layer stacking ("frankenmerges"). Goddard et al., "Arcee's MergeKit", EMNLP 2024
  (arXiv:2403.13257).""", base="unused", min_models=1, max_models=1,
        prepare=_passthrough_prepare, elementwise=True)


# ------------------------------------------------------- kfuse extensions


_simple("varm", lambda weighting="square", softmax=False: K.varm(weighting, softmax), [
    Param("weighting", "square", static=True, kind=str, mergekit=False),
    Param("softmax", False, static=True, kind=bool, mergekit=False),
    Param("temperature", 1.0, mergekit=False)],
    """VaRM (FuseChat-1.0): w_{i,m} = mean((θ_{i,m}−θ_{b,m})²)/Σ_j mean((θ_{j,m}−θ_{b,m})²)
  per tensor m (``weighting='abs'``: mean |·|), optionally softmax(w/T);
  θ_m = Σ_i w_{i,m} θ_{i,m}. Wan et al., "FuseChat: Knowledge Fusion of Chat
  Models", 2024 (arXiv:2402.16107).""")

_simple("wise_ft", lambda: K.interpolate(), [Param("alpha", 0.5, mergekit=False)],
        """WiSE-FT weight-space ensemble: θ = (1−α)·θ_zero-shot + α·θ_fine-tuned.
  Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.""",
        min_models=1, max_models=1, elementwise=True)


_gta("task_negation", None, None, False, False, """Task negation (forgetting).

  θ = θ_b − λ·Σ_i w_i δ_i: subtracting a task vector removes the behaviour it
  encodes. Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.""",
     negate=True)


def _layer_swap_prepare(method, values, info, n, ctx=NATIVE):
  k = int(values["num_layers"])
  side = values["side"]
  if side not in ("top", "bottom"):
    raise KfuseError(f"layer_swap: side must be 'top' or 'bottom', got {side!r}")
  take = False
  if info.layer is not None and info.num_layers:
    take = info.layer >= info.num_layers - k if side == "top" else info.layer < k
  return {"take_expert": take}, {}


_simple("layer_swap", lambda take_expert=False: K.select(take_expert), [
    Param("num_layers", 1, static=True, kind=int, mergekit=False),
    Param("side", "top", static=True, kind=str, mergekit=False)],
    """Layer swapping: take the top (or bottom) ``num_layers`` transformer blocks
  from the other model, every other tensor from the base: for block ℓ of L,
  θ_ℓ = θ_1,ℓ if ℓ ≥ L − num_layers (top; bottom: ℓ < num_layers) else θ_b,ℓ.
  Bandarkar et al.,
  "Layer Swapping for Zero-Shot Cross-Lingual Transfer", 2024.""",
    min_models=1, max_models=1, prepare=_layer_swap_prepare, elementwise=True)


# ---------------------------------------------- FusionBench / paper TIES


def _ties_paper_stats(base_flat, experts_flat, values):
  """Global top-k threshold per model and the global majority sign (two passes).

  Pure `jnp` (works under jit); holds one flattened copy of the task vectors.
  """
  k_frac = float(values["k"])
  if not (0 < k_frac <= 1):
    raise KfuseError(f"ties_paper: k (fraction kept) must be in (0, 1], got {k_frac}")
  names = list(base_flat)
  absd = jnp.concatenate(
      [jnp.abs(jnp.asarray(experts_flat[nm], F32) - jnp.asarray(base_flat[nm], F32)[None])
       .reshape(jnp.shape(experts_flat[nm])[0], -1) for nm in names], axis=1)
  d = absd.shape[1]
  # FusionBench topk_values_mask: kthvalue(d - int(d*K)) (1-indexed), keep |δ| >= it.
  kk = max(d - int(d * k_frac), 1)
  # zero-size tensors only: no entry to rank, any threshold keeps nothing
  thr = jnp.sort(absd, axis=1)[:, kk - 1] if d else jnp.zeros(absd.shape[0], F32)
  total = 0.0
  for nm in names:
    tv = jnp.asarray(experts_flat[nm], F32) - jnp.asarray(base_flat[nm], F32)[None]
    tv = jnp.where(jnp.abs(tv) >= thr.reshape((-1,) + (1,) * (tv.ndim - 1)), tv, 0)
    total = total + jnp.sum(jnp.sign(jnp.sum(tv, axis=0)))
  return {"thr": thr, "zero_sign": jnp.where(total >= 0, 1.0, -1.0)}


def _ties_paper_prepare(method, values, info, n, ctx=NATIVE):
  st = ctx.stats
  if st is None:
    raise KfuseError(f"method {method.name!r} needs whole-model statistics (its tree_stats"
                     f" pre-pass); use kfuse.merge.merge in Python")
  return ({"reduce": values["disjoint"]},
          {"thr": jnp.asarray(st["thr"], F32), "zero_sign": jnp.asarray(st["zero_sign"], F32), "lambda": _arr(values["lambda"])})


def _ties_paper_recipe(reduce="sum"):
  def trim_global(s):
    keep = jnp.abs(s.values) >= S.bcast(s.hp["thr"].astype(s.values.dtype), s.values.ndim)
    return s.replace(values=jnp.where(keep, s.values, 0))

  def elect(s):
    tot = jnp.sign(jnp.sum(s.values, axis=0))
    tot = jnp.where(tot == 0, s.hp["zero_sign"].astype(tot.dtype), tot)
    agree = jnp.where(tot[None] > 0, s.values > 0, s.values < 0)
    return s.replace(mask=agree)

  return chain(S.task_vectors(), trim_global, elect, S.disjoint(reduce),
               S.scale("lambda"), S.add_base())


_simple("ties_paper", _ties_paper_recipe, [
    Param("k", 0.2, mergekit=False, doc="global fraction of |δ| kept (FusionBench threshold/100)"),
    Param("lambda", 0.3, mergekit=False),
    Param("disjoint", "sum", static=True, kind=str, mergekit=False,
          doc="'sum' (dis-sum), 'mean' (dis-mean) or 'max' (dis-max)")],
    """TIES-Merging as in the paper code / FusionBench (`ties_merging`).

  Global trim: each model's task vector, flattened over ALL tensors, keeps
  |δ| ≥ its (d − ⌊d·k⌋)-th smallest value; elected sign = sign(Σ_i δ̂_i)
  (zeros take the sign of the total of elected signs); disjoint merge of the
  agreeing entries (sum / mean over non-zero / max-magnitude);
  θ = θ_b + λ·merged with λ = 0.3. Yadav et al., NeurIPS 2023.""",
    prepare=_ties_paper_prepare, tree_stats=_ties_paper_stats)

# Families in their own modules register on import (kept last: they import this module).
from kfuse.merge import masks as _masks, subspace as _subspace  # noqa: E402,F401
from kfuse.merge import informed as _informed  # noqa: E402,F401  (registers fisher, regmean, regmean_plusplus)
