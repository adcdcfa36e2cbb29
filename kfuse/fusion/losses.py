"""Fusion losses over sparse, aligned source distributions (FuseLLM / FuseChat).

Each source ``s`` gives, at every target position, a sparse distribution in the target's
vocabulary: ``indices [S, B, L, K]`` (``-1`` pads), ``logits [S, B, L, K]``, with
``P_s = softmax(logits / T)`` over the stored entries (a one-hot fallback is one entry), and
its cross-entropy on the text ``ce [S, B]`` (per sequence) or ``[S, B, L]`` (per token).

* Rewards ``r_s = exp(−CE_s)``. **MinCE**: the target is ``P_{argmax_s r_s}`` (the first
  maximum); **AvgCE**: ``Σ_s softmax_s(r)·P_s`` — the softmax over exp(−CE), as the released
  FuseLLM code does (``trainer.py``, ``distill_weighted_as_gt``), not over −CE.
* The fusion loss is ``CE(student, target) = Σ_s w_s · CE(student, P_s)`` (CE is linear in the
  target), each term `kfuse.distill.losses.topk_cross_entropy_rows`: the student's
  log-softmax gathered at the K ids, never a ``[B, L, |V|]`` target.
* Total: ``λ·CLM + (1 − λ)·fusion``, λ = 0.9 (``lm_loss_weight``); ``decay`` ramps λ linearly
  to 1 over ``total_steps`` (FuseLLM's ``hard_and_decay``).

Wan et al., "Knowledge Fusion of Large Language Models" (FuseLLM, ICLR 2024); Wan et al.,
"FuseChat: Knowledge Fusion of Chat Models" (2024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfuse.distill import losses as L
from kfuse.distill.objectives import Objective
from kfuse.errors import KfuseError
from kfuse.registry import suggest

__all__ = ["FUSIONS", "source_weights", "fusion_loss", "lm_weight", "objective"]

FUSIONS = ("min_ce", "avg_ce")
Array = jax.Array


def _check_fusion(fusion: str) -> None:
  if fusion not in FUSIONS:
    raise KfuseError(f"fusion: unknown rule {fusion!r}, expected one of {FUSIONS}{suggest(str(fusion), FUSIONS)}")


def source_weights(ce: Array, fusion: str = "min_ce") -> Array:
  """Per-source weights ``[S, ...]`` from cross-entropies ``ce [S, ...]`` (source axis first).

  ``min_ce``: one-hot on the largest reward exp(−CE) (first on ties); ``avg_ce``:
  ``softmax_s(exp(−CE_s))``.
  """
  _check_fusion(fusion)
  reward = jnp.exp(-jnp.asarray(ce, jnp.float32))
  if fusion == "min_ce":
    return jax.nn.one_hot(jnp.argmax(reward, axis=0), reward.shape[0], axis=0, dtype=reward.dtype)
  return jax.nn.softmax(reward, axis=0)


def fusion_loss(student_logits: Array, indices: Array, logits: Array, ce: Array,
                fusion: str = "min_ce", temperature: float = 1.0,
                where: Array | None = None) -> Array:
  """``mean_{b,l} Σ_s w_s · CE(student_{b,l}, P_s)`` over the sparse aligned targets.

  Args:
    student_logits: ``[B, L, V]``.
    indices, logits: ``[S, B, L, K]`` sparse targets in the student's vocabulary.
    ce: ``[S, B]`` (sequence-level weights) or ``[S, B, L]`` (token-level).
    fusion: ``"min_ce"`` or ``"avg_ce"``.
    where: ``[B, L]`` positions that count (padding excluded).
  """
  _check_fusion(fusion)
  s, shape = indices.shape[0], tuple(student_logits.shape[:-1])
  if tuple(indices.shape[1:-1]) != shape or logits.shape != indices.shape:
    raise KfuseError(f"fusion targets: indices {tuple(indices.shape)} / logits"
                     f" {tuple(logits.shape)} must be [S, {', '.join(map(str, shape))}, K]")
  if tuple(ce.shape) not in ((s, shape[0]), (s, *shape)):
    raise KfuseError(f"fusion ce: shape {tuple(ce.shape)} must be [S={s}, B] or [S, B, L]")
  L.check_temperature(temperature)
  for i in range(s):
    L._check_topk(student_logits, indices[i], logits[i])
  rows = jax.vmap(L.topk_cross_entropy_rows, in_axes=(None, 0, 0, None))(
      student_logits, indices, logits, temperature)                # [S, B, L]
  w = jax.lax.stop_gradient(source_weights(ce, fusion))
  w = w[..., None] if w.ndim == 2 else w
  return L.masked_mean(jnp.sum(w * rows, axis=0), where)


def lm_weight(lm_loss_weight: float, step: Array, total_steps: int = 0, decay: bool = False) -> Array:
  """λ, or with ``decay`` λ + (1 − λ)·min(1, step / total_steps) (FuseLLM ``hard_and_decay``)."""
  lam = jnp.asarray(lm_loss_weight, jnp.float32)
  if not decay:
    return lam
  if total_steps <= 0:
    raise KfuseError("decay: needs total_steps > 0")
  return lam + (1.0 - lam) * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / total_steps)


def objective(fusion: str = "min_ce", lm_loss_weight: float = 0.9, temperature: float = 1.0,
              decay: bool = False, total_steps: int = 0) -> Objective:
  """A `kfuse.distill` objective: ``λ·CE(student, y) + (1 − λ)·fusion_loss``.

  The batch carries ``x``, ``y`` (next tokens), ``where`` and the sources' aligned sparse
  targets ``topk_indices``, ``topk_logits`` ``[S, B, L, K]`` and their cross-entropies
  ``topk_ce`` (``[S, B]`` or ``[S, B, L]``). Build the step with ``kfuse.distill.make_step(student, objective(...),
  optimizer)``.
  """
  _check_fusion(fusion)
  L.check_unit_interval(lm_loss_weight, "lm_loss_weight")
  L.check_temperature(temperature)
  if decay and total_steps <= 0:
    raise KfuseError("decay: needs total_steps > 0")

  def loss(aux, student, teachers, batch, step):
    del aux, teachers
    where = batch.get("where")
    clm = L.cross_entropy(student.logits, batch["y"], where)
    fuse = fusion_loss(student.logits, batch["topk_indices"], batch["topk_logits"],
                       batch["topk_ce"], fusion, temperature, where)
    lam = lm_weight(lm_loss_weight, step, total_steps, decay)
    return lam * clm + (1.0 - lam) * fuse, {"clm": clm, "fusion": fuse}

  return Objective(f"fusion_{fusion}", loss, needs_teachers=False)
