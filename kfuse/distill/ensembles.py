"""Combining several teachers, and building teachers from a run's own checkpoints.

Multi-teacher combination is two steps, both pure ``jnp``:

1. `teacher_weights` turns the K teachers' logits ``[K, ..., C]`` (and, for
   label-aware rules, the labels) into per-position convex weights
   ``[K, ...]`` (Σ_k w_k = 1);
2. `combine_logits` returns logits whose tempered softmax is the weighted
   mean *in probability space*:
   z̄ = T·log Σ_k w_k softmax(z_k / T)  ⇒  softmax(z̄ / T) = Σ_k w_k p_k^T,
   so any single-teacher loss of `kfuse.distill.losses` applied at the same
   T distils from the mixture. (big_vision sums per-teacher KLs instead,
   which has the same student gradient as KL to the uniform mixture up to a
   constant factor, because cross-entropy is linear in its target.)

Checkpoint ensembles (Forget-Me-Not): `stack_checkpoints` stacks a run's
checkpoints into one pytree with a leading member axis, which
`kfuse.distill.steps.Teacher(..., stacked=True)` evaluates with ``vmap``;
`forgetting_scores` and `greedy_selection` pick the members on validation
data (host-side NumPy, outside ``jit``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse import tree as ktree
from kfuse.distill.losses import check_temperature, cross_entropy_rows
from kfuse.tree import KfuseError

__all__ = [
    "RULES",
    "teacher_weights",
    "combine_logits",
    "stack_checkpoints",
    "forgetting_scores",
    "greedy_selection",
]

PyTree = Any
Array = jax.Array

RULES = ("mean", "confidence", "entropy", "min_ce", "max_confidence")
_NEG = -1e9


def _per_teacher_ce(logits: Array, labels: Array) -> Array:
  """CE_k = −Σ_c y_c log softmax(z_k)_c per teacher and position, ``[K, ...]`` (`losses.cross_entropy_rows`)."""
  return cross_entropy_rows(logits, labels)


def teacher_weights(teacher_logits: Array, labels: Array | None = None, rule: str = "mean",
                    temperature: float = 1.0) -> Array:
  """Per-position convex weights ``[K, ...]`` over K teachers.

  Rules (p_k = softmax(z_k), CE_k = −log p_k(y), H_k = entropy of p_k):

  * ``mean``: w_k = 1/K (You et al., "Learning from Multiple Teacher
    Networks", KDD 2017; big_vision's summed KLs);
  * ``confidence``: w_k = (1 − softmax_k(CE)) / (K − 1), teachers that are
    more confident in the true label weigh more (Zhang, Chen & Wang,
    "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022);
    needs labels; K = 1 gives w = 1;
  * ``entropy``: w_k = softmax_k(−H_k / temperature), label-free
    uncertainty weighting (low-entropy teachers weigh more);
  * ``min_ce``: one-hot on argmin_k CE_k (FuseLLM's MinCE, per position);
  * ``max_confidence``: one-hot on argmax_k max_c p_k(c), the teacher most
    confident in its own top-1 prediction. With teachers (teacher, frozen
    initial student) this is Fantastic Gains' data partitioning (Roth et al.,
    ICLR 2024), label-free.
  """
  if rule not in RULES:
    raise KfuseError(f"combine: unknown rule {rule!r}; known: {', '.join(RULES)}")
  check_temperature(temperature)
  k = teacher_logits.shape[0]
  positions = teacher_logits.shape[1:-1]
  if rule == "mean" or k == 1:
    return jnp.full((k,) + positions, 1.0 / k, jnp.float32)
  if rule in ("confidence", "min_ce"):
    if labels is None:
      raise KfuseError(f"labels: combine rule {rule!r} needs labels")
    ce = _per_teacher_ce(teacher_logits, jnp.asarray(labels))
    if rule == "confidence":
      return (1.0 - jax.nn.softmax(ce, axis=0)) / (k - 1)
    return jax.nn.one_hot(jnp.argmin(ce, axis=0), k, axis=0, dtype=jnp.float32)
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  if rule == "entropy":
    h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jax.nn.softmax(-h / temperature, axis=0)
  conf = jnp.max(logp, axis=-1)
  return jax.nn.one_hot(jnp.argmax(conf, axis=0), k, axis=0, dtype=jnp.float32)


def combine_logits(teacher_logits: Array, weights: Array | None = None,
                   temperature: float = 1.0) -> Array:
  """z̄ = T·log Σ_k w_k softmax(z_k/T): the weighted mixture in probability space at temperature T.

  ``teacher_logits`` ``[K, ..., C]``, ``weights`` ``[K, ...]`` (default:
  uniform). softmax(z̄/T) = Σ_k w_k p_k^T exactly; zero-weight teachers drop
  out. Computed with logsumexp in log space.
  """
  check_temperature(temperature)
  k = teacher_logits.shape[0]
  if weights is None:
    weights = jnp.full((k,) + teacher_logits.shape[1:-1], 1.0 / k, jnp.float32)
  if tuple(weights.shape) != tuple(teacher_logits.shape[:-1]):
    raise KfuseError(f"weights: shape {tuple(weights.shape)} must be"
                     f" {tuple(teacher_logits.shape[:-1])} (teachers x positions)")
  if k == 1:
    return teacher_logits[0]
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  logw = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)), _NEG)
  return temperature * jax.nn.logsumexp(logp + logw[..., None], axis=0)


# ------------------------------------------------------------------ checkpoint ensembles


def stack_checkpoints(checkpoints: Sequence[PyTree]) -> PyTree:
  """Stack same-structured checkpoints (variables) into one tree with a leading member axis."""
  if not checkpoints:
    raise KfuseError("checkpoints: need at least one checkpoint to build an ensemble")
  return ktree.stack(list(checkpoints), [f"checkpoints[{i}]" for i in range(len(checkpoints))])


def forgetting_scores(correct: np.ndarray) -> np.ndarray:
  """Forgetting of each checkpoint: the fraction of examples it gets wrong that an earlier one got right.

  ``correct`` ``[N_ckpt, n]`` (bool, checkpoints in training order) →
  ``[N_ckpt]``, score_e = mean_i 1[∃ e' < e: correct[e', i]] · 1[¬correct[e, i]].
  Stern & Weinshall's forgetting measure of local overfitting ("Relearning
  Forgotten Knowledge", 2023; "Forget Me Not", 2025), on validation data.
  """
  c = np.asarray(correct, bool)
  if c.ndim != 2:
    raise KfuseError(f"correct: need [checkpoints, examples], got shape {c.shape}")
  seen = np.zeros(c.shape[1], bool)
  out = np.zeros(c.shape[0])
  for e in range(c.shape[0]):
    out[e] = float(np.mean(seen & ~c[e])) if c.shape[1] else 0.0
    seen |= c[e]
  return out


def greedy_selection(probs: np.ndarray, labels: np.ndarray, max_members: int | None = None,
                     start: int = -1) -> list[int]:
  """Greedy forward selection of checkpoint-ensemble members on validation data.

  ``probs`` ``[N_ckpt, n, C]`` (softmax outputs), ``labels`` ``[n]``. Starts
  from checkpoint ``start`` (default: the final model) and repeatedly adds
  the checkpoint whose inclusion most raises the validation accuracy of the
  mean probability (ties: lower mean NLL), stopping when nothing improves or
  at ``max_members``. Returns the member indices in order of inclusion.
  (Forget-Me-Not adds the checkpoints that recover the most forgotten
  examples; greedy validation accuracy is kfuse's proxy for that.)
  """
  p = np.asarray(probs, np.float64)
  y = np.asarray(labels)
  if p.ndim != 3 or p.shape[1] != len(y):
    raise KfuseError(f"probs: need [checkpoints, {len(y)}, classes], got shape {p.shape}")
  n = p.shape[0]
  limit = n if max_members is None else int(max_members)
  if limit < 1:
    raise KfuseError(f"max_members: must be >= 1, got {max_members}")
  first = start % n

  def score(total, count):
    mean = total / count
    acc = float(np.mean(mean.argmax(-1) == y))
    nll = float(-np.mean(np.log(np.maximum(mean[np.arange(len(y)), y], 1e-12))))
    return acc, -nll

  members, total = [first], p[first].copy()
  best = score(total, 1)
  while len(members) < limit:
    cands = [(score(total + p[j], len(members) + 1), j) for j in range(n) if j not in members]
    if not cands:
      break
    (s, j) = max(cands, key=lambda c: c[0])
    if s <= best:
      break
    members.append(j)
    total += p[j]
    best = s
  return members
