"""ESM: Essential Subspace Merging (data-informed, training-free).

    st = [statistics.grams(model, v_i, task_i_batches, max_examples=32) for ...]  # expert i, task i
    merged = merge.merge(informed.with_statistics("esm", st), experts, base,
                         params={"lambda": 1.0})

Li, Qi, Tian & Geng, "Model Merging in the Essential Subspace", CVPR 2026
(arXiv 2602.20208); reference implementation ``kiddo127/ESM`` (``ESM-ViT``:
``essential_subspace_decomposition.py``, ``src/utils/esm_utils.py``). Notation in
PyTorch layout: ΔW_i = θ_i − θ₀ is ``[out, in]`` (a Flax kernel ``[in, out]`` is
its transpose; a DenseGeneral / Conv kernel is flattened to ``[d_in, d_out]``
along the axes its Gram contracts).

**Essential subspace decomposition (ESD).** The activation shift of task i on
its own proxy data is ΔO_i = X_i ΔW_iᵀ ``[n, out]``, X_i the layer's inputs in
expert i on 32 unlabeled samples of task i (every token a row). Its principal
directions are the eigenvectors of the uncentred covariance
ΔO_iᵀΔO_i / (n−1) = n/(n−1) · ΔW_i G_i ΔW_iᵀ with G_i = X_iᵀX_i / n, the input
Gram `statistics.grams` already collects, so ESM needs no new statistic:
C_i = ΔW_i G_i ΔW_iᵀ = U_i diag(e_i) U_iᵀ (``eigh``, e descending; the
factor n/(n−1) cancels below). V_i = U_iᵀ ΔW_i, so ΔW_i = U_i V_i exactly and
the top-k rows keep the directions carrying most of the output shift.

**Merge (polarised scaling, then orthogonalisation)**, k = ⌊out / T⌋ (the
reference's ``sv_reduction = 1/T``), p = 2 (``power``), q = 0.15 (``eig_power``):

1. inter-task: V_i ← V_i ‖V_i‖_F^p, and after concatenation ÷ (mean_i ‖V_i‖_F)^p;
2. eigenvalue weights: s_i = (ē_i / mean ē_i)^q / mean(·) with ē_i = e_i[:k];
   Ū = [U_i[:, :k] diag(s_i)]_i ``[out, T k]``, V̄ = [diag(s_i) V_i[:k]]_i ``[T k, in]``;
3. inter-dimension (task consensus): column j of V̄ × (c_j / mean c)^p with
   c_j = ‖V̄[:, j]‖₂;
4. orthogonalise: Ū = PΣQᵀ → U⊥ = mean(Σ)·PQᵀ, likewise V⊥; Δ = 2·U⊥V⊥;
5. inter-layer: Δ_l × (‖Δ_l‖_F / mean_{l'∈g} ‖Δ_{l'}‖_F)^p over the group g of
   the same matrix in every block (the path with its block index removed:
   ``layers_3/mlp/fc_in/kernel`` → ``layers_#/mlp/fc_in/kernel``);

θ = θ₀ + λ·Δ for matrices; 2-D weights without a Gram (a leaf named ``kernel``
or ``weight``) get TSV-M's merge (`subspace.tsv_m_delta`, as the reference does
for its matrices without ESD) and join the inter-layer groups; every other
tensor (biases, including DenseGeneral's 2-D ``[heads, head_dim]`` ones, norms,
embeddings) gets θ₀ + λ·mean_i τ_i.

**Choices the paper / reference leave open, made here:**

- every layer with a Gram is decomposed: Dense, the separate attention
  query / key / value / out projections (the reference decomposes the fused
  ``in_proj`` of CLIP's attention and merges ``out_proj`` with TSV-M since its
  hook is commented out), and Conv patches (the reference averages ``conv1``);
- ‖V_i‖_F is computed as ‖ΔW_i‖_F (equal: U_i is a full orthonormal basis;
  the reference pads its SVD basis with identity columns when n < out);
- eigenvalues are clipped at 0 (``eigh`` round-off); a task whose top-k
  eigenvalues are all 0 (ΔW_i X_iᵀ = 0: no shift on its data) contributes 0;
  a zero column-norm mean or zero inter-layer group mean leaves the factor at 1;
- X_i is taken in *expert i* (as the reference: the fine-tuned model's hooks);
- the reference chooses λ on validation (golden-section search on [0, 2] of
  the average accuracy); the default here is λ = 1, and the benchmark row
  selects λ from a grid on its labelled validation split.

``polarize=False`` (a kfuse ablation, not from the paper) keeps only the ESD:
Δ = Σ_i U_i[:, :k] U_i[:, :k]ᵀ ΔW_i (each task vector projected onto its own
essential subspace, summed), with k = out when ``rank="full"``; then one
expert merged alone is that expert.

Bad input is one line: statistics of a different model (paths / shapes, via
the RegMean checks), NaN in a Gram, and a Gram from fewer input rows than the
k directions kept ("too few samples").
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import tree as T
from kfuse.merge import api
from kfuse.merge import informed
from kfuse.merge import stages as S
from kfuse.merge.core import NATIVE, Method, Param, chain, register
from kfuse.merge.subspace import check_finite_param, polar, tsv_m_delta
from kfuse.tree import KfuseError

__all__ = ["esd", "esm_delta", "projected_delta", "layer_group", "ESM", "RANKS"]

RANKS = ("per_task", "full")


# ------------------------------------------------------------------ maths


def esd(dw: jax.Array, gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Essential subspace decomposition of one task matrix ``dw`` [out, in] with its input
  Gram ``gram`` [in, in]: ``(e, U)`` with C = dw·G·dwᵀ = U diag(e) Uᵀ, e descending,
  clipped at 0 (the uncentred PCA of the activation shift X dwᵀ, up to n/(n−1))."""
  c = dw @ gram @ dw.T
  e, u = jnp.linalg.eigh((c + c.T) / 2)
  return jnp.maximum(e[::-1], 0.0), u[:, ::-1]


def _safe_ratio(a: jax.Array, mean: jax.Array) -> jax.Array:
  """a / mean, 1 where mean is 0 (nothing to rescale)."""
  ok = mean > 0
  return jnp.where(ok, a / jnp.where(ok, mean, 1.0), 1.0)


def _iso(a: jax.Array) -> jax.Array:
  """mean(Σ)·PQᵀ for a = PΣQᵀ (thin SVD)."""
  p, s, qt = jnp.linalg.svd(a, full_matrices=False)
  return (p @ qt) * jnp.mean(s)


def esm_delta(dw: jax.Array, grams: jax.Array, k: int, power: float = 2.0,
              eig_power: float = 0.15) -> jax.Array:
  """Steps 1-4 of ESM (module doc) for task matrices ``dw`` [T, out, in] and input Grams
  ``grams`` [T, in, in]: the merged task matrix [out, in] before inter-layer scaling."""
  t = dw.shape[0]
  us, vs, norms = [], [], []
  for i in range(t):
    e, u = esd(dw[i], grams[i])
    v = u.T @ dw[i]
    n_i = jnp.sqrt(jnp.sum(jnp.square(dw[i])))
    norms.append(n_i)
    v = v * n_i ** power
    ek = e[:k]
    mean_e = jnp.mean(ek)
    s = jnp.where(mean_e > 0, (ek / jnp.where(mean_e > 0, mean_e, 1.0)) ** eig_power, 0.0)
    mean_s = jnp.mean(s)
    s = jnp.where(mean_s > 0, s / jnp.where(mean_s > 0, mean_s, 1.0), 0.0)
    us.append(u[:, :k] * s[None, :])
    vs.append(v[:k] * s[:, None])
  ub = jnp.concatenate(us, axis=1)
  vb = jnp.concatenate(vs, axis=0)
  mean_n = jnp.mean(jnp.stack(norms))
  vb = vb / jnp.where(mean_n > 0, mean_n, 1.0) ** power
  col = jnp.sqrt(jnp.sum(jnp.square(vb), axis=0))
  vb = vb * _safe_ratio(col, jnp.mean(col))[None, :] ** power
  return 2.0 * _iso(ub) @ _iso(vb)


def projected_delta(dw: jax.Array, grams: jax.Array, k: int) -> jax.Array:
  """The ``polarize=False`` ablation: Σ_i U_i[:, :k] U_i[:, :k]ᵀ ΔW_i."""
  out = jnp.zeros(dw.shape[1:], dw.dtype)
  for i in range(dw.shape[0]):
    _, u = esd(dw[i], grams[i])
    uk = u[:, :k]
    out = out + uk @ (uk.T @ dw[i])
  return out


_BLOCK = re.compile(r"((?:^|[./_])(?:layers|layer|h|blocks|block|encoderblock|decoderblock)[._/]?)"
                    r"(\d+)(?=[./_]|$)", re.IGNORECASE)


def layer_group(path: str) -> str:
  """The inter-layer group of ``path``: the path with its block index replaced by '#'
  (``backbone/layers_3/mlp/fc_in/kernel`` → ``backbone/layers_#/mlp/fc_in/kernel``);
  a path outside the blocks is its own group."""
  if T.layer_index(path) is None:
    return path
  return _BLOCK.sub(lambda m: m.group(1) + "#", path, count=1)


# ------------------------------------------------------------------ whole-model pass


_WEIGHT_NAMES = ("kernel", "weight")


def _rank(rank: str, out: int, t: int) -> int:
  return out if rank == "full" else out // t


def _as_matrix(path: str, shape: tuple, d_in: int | None, torch_layout: bool):
  """(to [out, in], back to the tensor's shape) for a kernel of ``shape``."""
  if torch_layout:   # PyTorch [out, in]
    return (lambda w: w), (lambda m: m)
  if d_in is None:   # a Flax 2-D kernel without Gram
    d_in = shape[0]
  return (lambda w: w.reshape(d_in, -1).T), (lambda m: m.T.reshape(shape))


def _esm_stats(stats, ref_flat, experts_flat, values) -> dict:
  """Whole-model pre-pass: Δ of every matrix, inter-layer scaled (module doc)."""
  power = check_finite_param("esm", "power", values.get("power", 2.0), "esm")
  eig_power = check_finite_param("esm", "eig_power", values.get("eig_power", 0.15), "esm")
  polarize = bool(values.get("polarize", True))
  rank = str(values.get("rank", "per_task"))
  if rank not in RANKS:
    from kfuse.registry import suggest
    raise KfuseError(f"esm: unknown rank {rank!r}{suggest(rank, RANKS)}; known: {', '.join(RANKS)}")
  # paths, shapes, counts and finiteness of the Grams: the RegMean checks (ridge > 0 only
  # switches off RegMean's invertibility check, which ESM does not need)
  grams = informed._regmean_stats(stats, ref_flat, experts_flat,
                                  {"alpha": 0.95, "ridge": 1.0})["gram"]
  t = len(stats)
  torch_layout = api.layout_of(ref_flat) == "torch"
  deltas: dict[str, jax.Array] = {}
  for path in sorted(experts_flat):
    shape = tuple(experts_flat[path].shape[1:])
    g = grams.get(path)
    if g is None and not (len(shape) == 2 and path.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
                          in _WEIGHT_NAMES):
      continue   # averaged in the recipe
    if g is not None and torch_layout and len(shape) != 2:
      raise KfuseError(f"esm: {path!r} is {shape} with a Gram; PyTorch-layout kernels must be"
                       f" 2-D [out, in]")
    d_in = None if g is None else int(np.shape(g)[-1])
    to_m, back = _as_matrix(path, shape, d_in, torch_layout)
    dw = jnp.stack([to_m(experts_flat[path][i].astype(jnp.float32) - ref_flat[path].astype(jnp.float32))
                    for i in range(t)])
    out = dw.shape[1]
    if g is None:
      if 0 < min(dw.shape[1:]) < t:
        raise KfuseError(f"{path}: esm merges this {shape} matrix without a Gram by TSV-M, which"
                         f" keeps ⌊r/T⌋ triplets per task and r = {min(dw.shape[1:])} < T = {t}")
      d = _tsv(dw)
    else:
      k = _rank(rank, out, t)
      if k < 1:
        raise KfuseError(f"{path}: esm keeps ⌊out/T⌋ directions per task and out = {out} < T = {t}"
                         f" tasks (every task would keep none)")
      for i, s in enumerate(stats):
        n = int(s.tokens.get(path, 0))
        if n < k:
          raise KfuseError(f"statistics[{i}]: Gram of {path!r} is from {n} input rows, fewer than"
                           f" the k = {k} essential directions kept per task: too few samples"
                           f" (the paper uses 32 unlabeled samples per task)")
      d = (_esm if polarize else _projected)(dw, jnp.asarray(g, jnp.float32), k, power, eig_power)
    deltas[path] = (d, back)
  if polarize:
    groups: dict[str, list[str]] = {}
    for path in deltas:
      groups.setdefault(layer_group(path), []).append(path)
    norms = {p: float(jnp.linalg.norm(d)) for p, (d, _) in deltas.items()}
    for members in groups.values():
      mean = float(np.mean([norms[p] for p in members]))
      for p in members:
        if mean > 0:
          d, back = deltas[p]
          deltas[p] = (d * (norms[p] / mean) ** power, back)
  return {"delta": {p: back(d) for p, (d, back) in deltas.items()}}


@jax.jit
def _tsv(dw):
  return tsv_m_delta(dw)


_esm = jax.jit(esm_delta, static_argnums=(2,))
_projected = jax.jit(lambda dw, g, k, power, eig_power: projected_delta(dw, g, k),
                     static_argnums=(2,))


# ------------------------------------------------------------------ the method


def _prepare(method, values, info, n, ctx=NATIVE):
  if ctx.stats is None:
    raise KfuseError(f"method {method.name!r} needs Gram statistics (with_statistics)")
  lam = check_finite_param(method.name, "lambda", values["lambda"], info.path)
  d = ctx.stats["delta"].get(info.path)
  hp = {"lambda": jnp.asarray(lam, jnp.float32)}
  if d is None:
    return {"matrix": False}, hp
  return {"matrix": True}, {**hp, "delta": jnp.asarray(d)}


def _recipe(matrix: bool = False):
  """θ₀ + λ·Δ (Δ from the pre-pass) for matrices, θ₀ + λ·mean_i τ_i otherwise."""

  def merged(s):
    d = s.hp["delta"].astype(s.base.dtype) if matrix else S.sum_models(s.values) / s.values.shape[0]
    return s.replace(result=d)

  return chain(S.task_vectors(), merged, S.scale("lambda"), S.add_base())


ESM = register(Method(
    name="esm", recipe=_recipe, base="required", prepare=_prepare, elementwise=False,
    tree_stats=informed._unbound("esm", "input Grams per expert on 32 samples of its task"),
    params=(Param("lambda", 1.0, mergekit=False,
                  doc="scale λ of the merged task vector (the reference picks it on validation in [0, 2])"),
            Param("power", 2.0, mergekit=False,
                  doc="exponent p of the inter-task / -dimension / -layer polarised scaling"),
            Param("eig_power", 0.15, mergekit=False,
                  doc="exponent q of the eigenvalue weights (ē/mean ē)^q"),
            Param("polarize", True, static=True, kind=bool, mergekit=False,
                  doc="False: the ESD-only ablation Σ_i U_k U_kᵀ τ_i (kfuse)"),
            Param("rank", "per_task", static=True, kind=str, mergekit=False,
                  doc="directions kept per task: 'per_task' = ⌊out/T⌋ (reference), 'full' = out")),
    data="input Grams of every linear layer per expert: 32 unlabeled examples of its task"
         " through that expert (statistics.grams, max_examples=32)",
    doc="""ESM (Essential Subspace Merging): per linear layer, PCA of each task's activation shift
  X_i ΔW_iᵀ (via its Gram: C_i = ΔW_i G_i ΔW_iᵀ = U_i diag(e_i) U_iᵀ), each task matrix
  expressed in its essential subspace (V_i = U_iᵀ ΔW_i, top k = ⌊out/T⌋ directions),
  polarised scaling (inter-task ‖ΔW_i‖^p, eigenvalue weights (e/mean e)^0.15,
  inter-dimension column norms^p, inter-layer norms^p, p = 2), orthogonalised
  concatenations Δ = 2·U⊥V⊥; θ = θ₀ + λΔ; 2-D kernels without a Gram by TSV-M, other
  tensors θ₀ + λ·mean τ. Li et al., "Model Merging in the Essential Subspace", CVPR 2026
  (arXiv 2602.20208), reference implementation kiddo127/ESM; every choice it leaves
  open is listed in `kfuse.merge.essential`."""))

informed.register_binder("esm", _esm_stats)
