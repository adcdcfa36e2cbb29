"""Knowledge-distillation losses: pure functions of logits, features and labels.

Conventions (read these once, they hold for every function below)
------------------------------------------------------------------
* ``student_logits`` / ``teacher_logits`` are ``[..., C]`` (C classes or a
  vocabulary); all leading axes are *positions* (samples, or tokens
  ``[B, L]``). Teacher and student must have the same shape.
* ``where`` (optional) is a boolean mask over the positions (shape
  ``logits.shape[:-1]``); masked positions contribute nothing and every
  loss is the **mean over valid positions** (``sum / max(#valid, 1)``),
  i.e. torch's ``reduction='batchmean'`` for ``[B, C]`` and TRL's
  sum-over-tokens / #valid-tokens for ``[B, L, V]``.
* ``labels`` are integer classes ``[...]`` or soft targets ``[..., C]``
  (e.g. mixup); soft targets give the soft cross-entropy.
* p^T = softmax(z / T). **Weights are named, never α**: ``ce_weight`` scales
  the hard-label cross-entropy and ``kd_weight`` the distillation term
  (torchdistill's α weights the CE, mdistiller's KD_WEIGHT the KD term).
  Every divergence is computed in log-space (``log_softmax``), so it is
  finite for any finite logits.
* KL(p ‖ q) = Σ_c p_c (log p_c − log q_c). ``forward_kl`` is KL(teacher ‖
  student) (mean-seeking), ``reverse_kl`` is KL(student ‖ teacher)
  (mode-seeking).

Bad inputs (mismatched shapes or vocabularies, temperature ≤ 0, negative
weights, a β outside [0, 1]) raise `kfuse.tree.KfuseError` naming the
argument. Checks run on static shapes and Python numbers, so every function
stays jit-able (traced hyper-parameters are not checked).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from kfuse.tree import KfuseError

__all__ = [
    "cross_entropy",
    "cross_entropy_rows",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "hinton",
    "dkd",
    "dkd_terms",
    "init_regressor",
    "regress",
    "fitnets",
    "rkd_distance",
    "rkd_angle",
    "rkd",
    "attention_map",
    "attention_transfer",
    "trg",
    "topk_from_logits",
    "topk_cross_entropy",
    "topk_cross_entropy_rows",
    "topk_kl",
    "masked_mean",
    "l2_normalize",
]

Array = jax.Array


# ------------------------------------------------------------------ checks


_NEG = -1e9  # finite "minus infinity" for masked logits: exp underflows to 0, gradients stay finite


def _is_concrete_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_temperature(temperature: Any, name: str = "temperature") -> None:
  """Raise unless a Python-number temperature is finite and > 0 (traced values pass)."""
  if _is_concrete_number(temperature) and not (math.isfinite(temperature) and temperature > 0):
    raise KfuseError(f"{name}: must be a finite number > 0, got {temperature}")


def check_weight(weight: Any, name: str) -> None:
  """Raise unless a Python-number loss weight is finite and ≥ 0 (traced values pass)."""
  if isinstance(weight, bool) or not (_is_concrete_number(weight) or isinstance(weight, jax.Array)):
    raise KfuseError(f"{name}: must be a number >= 0, got {weight!r}")
  if _is_concrete_number(weight) and not (math.isfinite(weight) and weight >= 0):
    raise KfuseError(f"{name}: must be a finite number >= 0, got {weight}")


def check_unit_interval(x: Any, name: str) -> None:
  if _is_concrete_number(x) and not (0.0 <= x <= 1.0):
    raise KfuseError(f"{name}: must be in [0, 1], got {x}")


def check_pair(student: Array, teacher: Array, student_name: str = "student_logits",
               teacher_name: str = "teacher_logits", what: str = "vocabulary") -> None:
  """Same shape for student and teacher; names the class / vocabulary axis if that differs."""
  s, t = tuple(jnp.shape(student)), tuple(jnp.shape(teacher))
  if len(s) < 1:
    raise KfuseError(f"{student_name}: need at least one axis (classes), got shape {s}")
  if s == t:
    return
  if len(s) == len(t) and s[:-1] == t[:-1]:
    raise KfuseError(f"{teacher_name}: {what} size {t[-1]} does not match {student_name}'s"
                     f" {s[-1]} (shapes {t} vs {s})")
  raise KfuseError(f"{teacher_name}: shape {t} does not match {student_name} shape {s}")


def _check_where(where: Array | None, positions: tuple, name: str = "where") -> None:
  if where is None:
    return
  shape = tuple(jnp.shape(where))
  if shape != positions:
    raise KfuseError(f"{name}: mask shape {shape} must equal the positions' shape {positions}")


def _check_labels(labels: Array, logits: Array, name: str = "labels") -> None:
  ls, zs = tuple(jnp.shape(labels)), tuple(jnp.shape(logits))
  if ls != zs[:-1] and ls != zs:
    raise KfuseError(f"{name}: shape {ls} must be {zs[:-1]} (integer classes) or {zs}"
                     " (soft targets)")


# ------------------------------------------------------------------ reductions


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(‖x‖₂, eps) along ``axis``, written x·rsqrt(max(Σx², eps²)): gradient-safe at 0.

  ``x / jnp.maximum(jnp.linalg.norm(x), eps)`` has a NaN gradient at x = 0 (the
  norm's derivative x/‖x‖ is 0/0 there, and NaN·0 is NaN), so one all-zero
  feature row (a blank input, a dead ReLU layer) made every parameter NaN.
  Here the clamp acts on Σx², whose derivative 2x is finite everywhere.
  """
  x = jnp.asarray(x)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps * eps, sq.dtype)))


def masked_mean(values: Array, where: Array | None = None) -> Array:
  """Mean of ``values`` over entries where ``where`` is True: Σ w·v / max(Σ w, 1)."""
  values = jnp.asarray(values)
  if where is None:
    return jnp.mean(values)
  w = jnp.asarray(where, values.dtype)
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def _log_probs(logits: Array, temperature: Any = 1.0) -> Array:
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating) or logits.dtype in (jnp.bfloat16, jnp.float16):
    logits = logits.astype(jnp.float32)
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def _tempered_pair(student_logits: Array, teacher_logits: Array, temperature: Any,
                   where: Array | None) -> tuple[Array, Array]:
  """(log p_s^T, log p_t^T) of a student / teacher logit pair after the shared checks
  (temperature, matching shapes, ``where`` over the positions) of every divergence."""
  check_temperature(temperature)
  check_pair(student_logits, teacher_logits)
  _check_where(where, tuple(student_logits.shape[:-1]))
  return _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)


def _kl_rows(log_p: Array, log_q: Array, support: Array | None = None) -> Array:
  """KL(p ‖ q) = Σ p (log p − log q) per position, from finite log-probabilities.

  ``support`` (bool, same shape) restricts the sum; entries outside it are
  replaced by 0 *before* any arithmetic, so no inf/nan reaches a gradient.
  """
  if support is not None:
    log_p = jnp.where(support, log_p, 0.0)
    log_q = jnp.where(support, log_q, 0.0)
    p = jnp.where(support, jnp.exp(log_p), 0.0)
  else:
    p = jnp.exp(log_p)
  return jnp.sum(p * (log_p - log_q), axis=-1)


def _soft_targets(labels: Array, logits: Array, dtype) -> Array:
  if tuple(labels.shape) == tuple(logits.shape):
    return labels.astype(dtype)
  return jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)


def _hard_labels(labels: Array, logits: Array) -> Array:
  """Integer labels; soft targets are reduced to their argmax class."""
  if tuple(labels.shape) == tuple(logits.shape):
    return jnp.argmax(labels, axis=-1)
  return labels.astype(jnp.int32)


# ------------------------------------------------------------------ logit losses


def _is_soft(labels: Array, logits: Array) -> bool:
  """Soft targets: the labels' shape is a suffix of the logits' (class axis included) and they
  are the logits' full shape or floating (so integer labels [B] never read as [C] targets)."""
  n = labels.ndim
  return (n >= 1 and tuple(labels.shape) == tuple(logits.shape[logits.ndim - n:])
          and (n == logits.ndim or jnp.issubdtype(labels.dtype, jnp.floating)))


def cross_entropy_rows(logits: Array, labels: Array) -> Array:
  """Per-position softmax cross-entropy −Σ_c y_c log softmax(z)_c, shape ``logits.shape[:-1]``.

  ``labels`` are integer classes or soft targets ``[..., C]`` (mixup). Extra
  leading axes of ``logits`` broadcast against the labels (K teachers
  ``[K, B, C]`` scored on ``[B]`` labels).
  """
  log_q = _log_probs(logits)
  labels = jnp.asarray(labels)
  y = (labels.astype(log_q.dtype) if _is_soft(labels, log_q)
       else jax.nn.one_hot(labels, logits.shape[-1], dtype=log_q.dtype))
  return -jnp.sum(y * log_q, axis=-1)


def cross_entropy(logits: Array, labels: Array, where: Array | None = None) -> Array:
  """Softmax cross-entropy −Σ_c y_c log softmax(z)_c, mean over valid positions.

  ``labels`` are integer classes or soft targets ``[..., C]`` (mixup).
  """
  _check_labels(labels, logits)
  _check_where(where, tuple(logits.shape[:-1]))
  return masked_mean(cross_entropy_rows(logits, labels), where)


def forward_kl(student_logits: Array, teacher_logits: Array, temperature: float = 1.0,
               where: Array | None = None) -> Array:
  """Forward KL(p_t^T ‖ p_s^T) = Σ_c p_t(c)(log p_t(c) − log p_s(c)), mean over valid positions.

  Mean-seeking (covers every teacher mode). No T² factor: `hinton` adds it.
  Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).
  """
  log_s, log_t = _tempered_pair(student_logits, teacher_logits, temperature, where)
  return masked_mean(_kl_rows(log_t, log_s), where)


def reverse_kl(student_logits: Array, teacher_logits: Array, temperature: float = 1.0,
               where: Array | None = None) -> Array:
  """Reverse KL(q_s^T ‖ p_t^T) = Σ_c q_s(c)(log q_s(c) − log p_t(c)), mean over valid positions.

  Mode-seeking: the student may drop teacher modes it cannot represent.
  Used token-level for LLMs by MiniLLM (Gu et al., 2024) and as the β = 1 end
  of GKD's generalized JSD (Agarwal et al., 2024).
  """
  log_s, log_t = _tempered_pair(student_logits, teacher_logits, temperature, where)
  return masked_mean(_kl_rows(log_s, log_t), where)


def generalized_jsd(student_logits: Array, teacher_logits: Array, beta: float = 0.5,
                    temperature: float = 1.0, where: Array | None = None) -> Array:
  """Generalized Jensen-Shannon divergence of GKD, mean over valid positions.

  With p_T = softmax(z_t/T), p_S = softmax(z_s/T) and the mixture
  M = β·p_T + (1−β)·p_S::

      JSD(β) = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M)        for 0 < β < 1
      JSD(0) = KL(p_T ‖ p_S)   (forward KL)              by convention
      JSD(1) = KL(p_S ‖ p_T)   (reverse KL)              by convention

  log M is formed in log-space with logsumexp. Note the interior formula
  tends to 0 at both ends (JSD(β) ≈ β·KL(p_T‖p_S) as β → 0 and
  ≈ (1−β)·KL(p_S‖p_T) as β → 1): the endpoints are conventions (TRL's
  ``generalized_jsd_loss``), not limits; divide by β(1−β) for a
  continuous interpolation. Agarwal et al., "On-Policy Distillation of
  Language Models: Learning from Self-Generated Mistakes" (GKD, ICLR 2024).
  """
  check_unit_interval(beta, "beta")
  log_s, log_t = _tempered_pair(student_logits, teacher_logits, temperature, where)
  if _is_concrete_number(beta) and beta == 0.0:
    return masked_mean(_kl_rows(log_t, log_s), where)
  if _is_concrete_number(beta) and beta == 1.0:
    return masked_mean(_kl_rows(log_s, log_t), where)
  beta = jnp.asarray(beta, log_s.dtype)
  log_m = jnp.logaddexp(log_t + jnp.log(beta), log_s + jnp.log1p(-beta))
  jsd = beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)
  return masked_mean(jsd, where)


def hinton(student_logits: Array, teacher_logits: Any, labels: Array | None = None,
           temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
           where: Array | None = None, *, divergence: Callable | None = None,
           with_terms: bool = False) -> Any:
  """Hinton KD: ce_weight·CE(z_s, y) + kd_weight·T²·D(p_t^T, p_s^T), mean over valid positions.

  D is `forward_kl` (KL(p_t^T ‖ p_s^T), the paper's loss) unless ``divergence``
  is given: any ``divergence(student_logits, teacher_logits, temperature, where)``
  (`reverse_kl`, a `generalized_jsd` with its β bound, a sparse top-k KL whose
  ``teacher_logits`` is the ``(indices, logits)`` pair). This is the one
  implementation of the "weighted CE + T²-scaled divergence" total: every
  logit objective and the mutual-learning step call it.

  T² keeps the gradient scale of the soft term comparable across T (its
  gradient is (p_s^T − p_t^T)/T per logit). Defaults are mdistiller's CIFAR
  ``CFG.KD`` (T = 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9). torchdistill's
  ``KDLoss(alpha=a)`` is ``ce_weight=a, kd_weight=1−a``. ``labels=None``
  requires ``ce_weight=0`` (a Python 0 also skips the CE). ``with_terms``:
  return ``(loss, {'kd': D, 'ce': CE})`` (``ce`` only when computed). Hinton,
  Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).
  """
  check_weight(ce_weight, "ce_weight")
  check_weight(kd_weight, "kd_weight")
  d = (divergence or forward_kl)(student_logits, teacher_logits, temperature, where)
  loss, terms = kd_weight * temperature ** 2 * d, {"kd": d}
  if not (_is_concrete_number(ce_weight) and ce_weight == 0):
    if labels is None:
      raise KfuseError("labels: hinton with ce_weight > 0 needs labels (or pass ce_weight=0)")
    terms["ce"] = cross_entropy(student_logits, labels, where)
    loss = loss + ce_weight * terms["ce"]
  return (loss, terms) if with_terms else loss


def dkd_terms(student_logits: Array, teacher_logits: Array, labels: Array,
              temperature: float = 4.0) -> tuple[Array, Array]:
  """Per-position DKD terms ``(TCKD, NCKD)``, each already multiplied by T².

  With g the target class and p = softmax(z/T):

  * binary split b = [p_g, 1 − p_g]; TCKD = T²·KL(b_t ‖ b_s);
  * non-target distribution p̂_c = p_c / (1 − p_g) over c ≠ g
    (= softmax of z/T with the target removed); NCKD = T²·KL(p̂_t ‖ p̂_s).

  log(1 − p_g) is computed as logsumexp over the non-target log-probs and the
  target is removed with −inf (mdistiller subtracts 1000 instead), so both
  terms are exact and finite. Soft labels are reduced to their argmax.
  """
  check_temperature(temperature)
  check_pair(student_logits, teacher_logits)
  _check_labels(labels, student_logits)
  labels = _hard_labels(jnp.asarray(labels), student_logits)
  c = student_logits.shape[-1]
  if c < 2:
    raise KfuseError(f"student_logits: DKD needs at least 2 classes, got {c}")
  gt = jax.nn.one_hot(labels, c, dtype=bool)

  def split(logits):
    logp = _log_probs(logits, temperature)
    log_pg = jnp.sum(jnp.where(gt, logp, 0.0), axis=-1)
    others = jnp.where(gt, _NEG, logp)                   # drop the target class
    log_rest = jax.nn.logsumexp(others, axis=-1)          # log(1 − p_g)
    binary = jnp.stack([log_pg, log_rest], axis=-1)
    non_target = others - log_rest[..., None]            # log p̂ over c ≠ g
    return binary, non_target

  b_s, n_s = split(student_logits)
  b_t, n_t = split(teacher_logits)
  t2 = temperature ** 2
  tckd = t2 * _kl_rows(b_t, b_s)
  nckd = t2 * _kl_rows(n_t, n_s, support=~gt)
  return tckd, nckd


def dkd(student_logits: Array, teacher_logits: Array, labels: Array, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
        epoch: Any = None, warmup_epochs: float = 20.0, where: Array | None = None, *,
        with_terms: bool = False) -> Any:
  """Decoupled KD: ce_weight·CE + min(epoch/warmup_epochs, 1)·(α·TCKD + β·NCKD).

  TCKD / NCKD as in `dkd_terms` (target-class binary KL and non-target KL,
  both T²-scaled), each a mean over valid positions. ``epoch`` may be a traced
  scalar (e.g. ``step / steps_per_epoch``); ``None`` means warm-up done.
  ``with_terms``: return ``(loss, {'tckd', 'nckd', 'ce'})`` (means, before
  the warm-up factor). Defaults are mdistiller's ``CFG.DKD`` (CE 1.0, α 1.0,
  β 8.0, T 4.0, warm-up 20 epochs). Zhao et al., "Decoupled Knowledge
  Distillation" (CVPR 2022).
  """
  for name, w in (("alpha", alpha), ("beta", beta), ("ce_weight", ce_weight)):
    check_weight(w, name)
  if _is_concrete_number(warmup_epochs) and warmup_epochs < 0:
    raise KfuseError(f"warmup_epochs: must be >= 0, got {warmup_epochs}")
  _check_where(where, tuple(student_logits.shape[:-1]))
  tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
  terms = {"tckd": masked_mean(tckd, where), "nckd": masked_mean(nckd, where)}
  kd = alpha * terms["tckd"] + beta * terms["nckd"]
  if epoch is not None and not (_is_concrete_number(warmup_epochs) and warmup_epochs == 0):
    kd = kd * jnp.minimum(jnp.asarray(epoch, kd.dtype) / warmup_epochs, 1.0)
  terms["ce"] = cross_entropy(student_logits, labels, where)
  loss = ce_weight * terms["ce"] + kd
  return (loss, terms) if with_terms else loss


# ------------------------------------------------------------------ feature losses


def init_regressor(key: Array, student_dim: int, teacher_dim: int) -> dict:
  """Parameters of the FitNets regressor r(f) = f·W + b (a 1×1 conv on the channel axis).

  W ~ LeCun normal (variance 1/student_dim), b = 0.
  """
  if int(student_dim) < 1 or int(teacher_dim) < 1:
    raise KfuseError(f"student_dim/teacher_dim: must be >= 1, got {student_dim}, {teacher_dim}")
  w = jax.random.normal(key, (int(student_dim), int(teacher_dim)), jnp.float32)
  return {"kernel": w / jnp.sqrt(float(student_dim)), "bias": jnp.zeros((int(teacher_dim),))}


def regress(regressor: Mapping[str, Array], features: Array) -> Array:
  """r(f) = f·W + b over the last (channel) axis."""
  return features @ regressor["kernel"] + regressor["bias"]


def fitnets(student_features: Array, teacher_features: Array, regressor: Mapping[str, Array],
            where: Array | None = None) -> Array:
  """FitNets hint loss ½‖F_t − r(F_s)‖², summed over channels, mean over valid positions.

  ``student_features`` ``[..., d_s]`` and ``teacher_features`` ``[..., d_t]``
  share their leading (batch / spatial / token) axes; r is the learned linear
  regressor of `init_regressor` (trained with the student). mdistiller's
  ``F.mse_loss`` (mean over channels too) equals this × 2/d_t. Romero et
  al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).
  """
  s, t = tuple(student_features.shape), tuple(teacher_features.shape)
  if s[:-1] != t[:-1]:
    raise KfuseError(f"teacher_features: leading shape {t[:-1]} does not match"
                     f" student_features {s[:-1]}")
  w = regressor["kernel"].shape if "kernel" in regressor else None
  if w is None or tuple(w) != (s[-1], t[-1]):
    raise KfuseError(f"regressor: kernel shape {w} must be ({s[-1]}, {t[-1]})")
  _check_where(where, s[:-1])
  diff = jnp.asarray(teacher_features, jnp.float32) - regress(regressor, student_features)
  return masked_mean(0.5 * jnp.sum(diff * diff, axis=-1), where)


def _flat_samples(x: Array) -> Array:
  return jnp.reshape(jnp.asarray(x, jnp.float32), (x.shape[0], -1))


def _pair_mask(where: Array | None, n: int, dtype) -> Array:
  if where is None:
    return jnp.ones((n, n), dtype)
  w = jnp.asarray(where, dtype)
  return w[:, None] * w[None, :]


def _centered_gram(x: Array, where: Array | None) -> Array:
  """Gram matrix of ``x`` after subtracting the (valid-sample) mean: distances and angles are
  translation invariant, and centring keeps the Gram identities below well conditioned."""
  w = jnp.ones((x.shape[0],), x.dtype) if where is None else jnp.asarray(where, x.dtype)
  mean = jnp.sum(x * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  xc = x - mean
  return xc @ xc.T


def _sq_dists(g: Array) -> Array:
  """‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij, clipped at 0."""
  d = jnp.diagonal(g)
  return jnp.maximum(d[:, None] + d[None, :] - 2.0 * g, 0.0)


def _pdist(g: Array, eps: float = 1e-12) -> Array:
  """Euclidean distances from a Gram matrix, sqrt(max(·, eps)), with an exact zero diagonal."""
  d = jnp.sqrt(jnp.maximum(_sq_dists(g), eps))
  return d * (1.0 - jnp.eye(g.shape[0], dtype=g.dtype))


def _huber(x: Array) -> Array:
  """Smooth-L1 (δ = 1): ½x² for |x| < 1, |x| − ½ otherwise."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _check_batch(student: Array, teacher: Array, sn: str, tn: str) -> None:
  if student.shape[0] != teacher.shape[0]:
    raise KfuseError(f"{tn}: batch size {teacher.shape[0]} does not match {sn}'s"
                     f" {student.shape[0]}")


def rkd_distance(student_features: Array, teacher_features: Array,
                 where: Array | None = None) -> Array:
  """RKD distance term: mean over pairs of SmoothL1(ψ_D(s_i,s_j), ψ_D(t_i,t_j)).

  ψ_D(x_i, x_j) = ‖x_i − x_j‖ / μ, μ = mean of the non-zero pairwise distances
  among valid samples. Features ``[B, ...]`` are flattened per sample (dims
  may differ between student and teacher). The mean runs over all B² ordered
  pairs of valid samples, diagonal (0 − 0) included, as torchdistill's
  ``reduction='mean'``. Park et al., "Relational Knowledge Distillation"
  (CVPR 2019).
  """
  _check_batch(student_features, teacher_features, "student_features", "teacher_features")
  _check_where(where, (student_features.shape[0],))
  s, t = _flat_samples(student_features), _flat_samples(teacher_features)
  pm = _pair_mask(where, s.shape[0], s.dtype)

  def normalized(x):
    d = _pdist(_centered_gram(x, where)) * pm
    mu = jnp.sum(d) / jnp.maximum(jnp.sum((d > 0).astype(d.dtype)), 1.0)
    return d / jnp.maximum(mu, 1e-12)

  return jnp.sum(_huber(normalized(s) - normalized(t)) * pm) / jnp.maximum(
      jnp.sum(pm), 1.0)


def rkd_angle(student_features: Array, teacher_features: Array,
              where: Array | None = None) -> Array:
  """RKD angle term: mean over triplets of SmoothL1(ψ_A(s), ψ_A(t)).

  ψ_A(x_i, x_j, x_k) = ⟨e_ij, e_kj⟩ = cos∠x_i x_j x_k with
  e_ij = (x_i − x_j)/‖x_i − x_j‖ (a zero vector when i = j). The mean runs over
  all B³ ordered triplets of valid samples (degenerate ones are 0 − 0), as
  torchdistill's ``reduction='mean'``. Park et al. (CVPR 2019).
  """
  _check_batch(student_features, teacher_features, "student_features", "teacher_features")
  _check_where(where, (student_features.shape[0],))
  s, t = _flat_samples(student_features), _flat_samples(teacher_features)
  n = s.shape[0]
  w = jnp.ones((n,), s.dtype) if where is None else jnp.asarray(where, s.dtype)
  tm = w[:, None, None] * w[None, :, None] * w[None, None, :]

  def cosines(x):
    # cos∠(x_i, x_j, x_k) = ⟨x_i − x_j, x_k − x_j⟩ / (‖x_i − x_j‖‖x_k − x_j‖) from the Gram
    # matrix G: the numerator is G_ik − G_ij − G_jk + G_jj, so the cost is O(B³), not O(B³·d)
    g = _centered_gram(x, where)
    d2 = _sq_dists(g)
    diag = jnp.diagonal(g)
    num = g[None, :, :] - g[:, :, None] - g[:, None, :] + diag[:, None, None]   # [j, i, k]
    scale = jnp.maximum(jnp.max(diag), 1e-30)
    ok = d2 > 1e-10 * scale                                     # i ≠ j (and distinct points)
    inv = jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, d2, 1.0)), 0.0)               # 1/‖x_i − x_j‖
    return num * inv[:, :, None] * inv[:, None, :]

  err = _huber(cosines(s) - cosines(t))
  return jnp.sum(err * tm) / jnp.maximum(jnp.sum(tm), 1.0)


def rkd(student_features: Array, teacher_features: Array, distance_weight: float = 1.0,
        angle_weight: float = 2.0, where: Array | None = None) -> Array:
  """RKD = distance_weight·`rkd_distance` + angle_weight·`rkd_angle`.

  Defaults are torchdistill's ``RKDLoss(dist_factor=1.0, angle_factor=2.0)``
  (mdistiller uses 25 / 50). Park et al. (CVPR 2019).
  """
  check_weight(distance_weight, "distance_weight")
  check_weight(angle_weight, "angle_weight")
  out = jnp.zeros((), jnp.float32)
  if not (_is_concrete_number(distance_weight) and distance_weight == 0):
    out = out + distance_weight * rkd_distance(student_features, teacher_features, where)
  if not (_is_concrete_number(angle_weight) and angle_weight == 0):
    out = out + angle_weight * rkd_angle(student_features, teacher_features, where)
  return out


def attention_map(features: Array, p: float = 2.0) -> Array:
  """Spatial attention Q = vec(mean_c |A_c|^p) / ‖·‖₂ for channels-last maps ``[B, *spatial, C]``."""
  a = jnp.mean(jnp.abs(jnp.asarray(features, jnp.float32)) ** p, axis=-1)
  a = a.reshape((a.shape[0], -1))
  return l2_normalize(a, axis=-1)


def attention_transfer(student_features: Array | Sequence[Array],
                       teacher_features: Array | Sequence[Array], p: float = 2.0,
                       where: Array | None = None) -> Array:
  """Attention transfer: Σ_layers mean_{b, positions} (Q_s − Q_t)², Q = `attention_map`.

  Channels-last maps ``[B, *spatial, C]``; spatial sizes must match per layer,
  channel counts may differ. ``where`` masks samples ``[B]``. The reduction
  (mean of squares over batch and positions) follows the paper's released
  code, whose β = 1000 is mdistiller's ``AT.FEAT_WEIGHT``; p = 2. Zagoruyko &
  Komodakis, "Paying More Attention to Attention" (ICLR 2017).
  """
  if _is_concrete_number(p) and p <= 0:
    raise KfuseError(f"p: must be > 0, got {p}")
  ss = list(student_features) if isinstance(student_features, (list, tuple)) else [student_features]
  ts = list(teacher_features) if isinstance(teacher_features, (list, tuple)) else [teacher_features]
  if len(ss) != len(ts):
    raise KfuseError(f"teacher_features: {len(ts)} maps but student_features has {len(ss)}")
  total = jnp.zeros((), jnp.float32)
  for i, (s, t) in enumerate(zip(ss, ts)):
    if s.shape[:-1] != t.shape[:-1]:
      raise KfuseError(f"teacher_features[{i}]: spatial shape {tuple(t.shape[:-1])} does not"
                       f" match student_features[{i}] {tuple(s.shape[:-1])}")
    _check_where(where, (s.shape[0],))
    err = jnp.mean((attention_map(s, p) - attention_map(t, p)) ** 2, axis=-1)
    total = total + masked_mean(err, where)
  return total


# ------------------------------------------------------------------ token relationship graph


def _cosine_logits(x: Array, temperature: Any) -> Array:
  x = jnp.asarray(x, jnp.float32)
  x = l2_normalize(x, axis=-1)
  return (x @ x.T) / temperature


def _row_kl_masked(t_logits: Array, s_logits: Array, edges: Array) -> Array:
  """Per-row KL(softmax_edges(t) ‖ softmax_edges(s)); rows without edges give 0."""
  lt = jax.nn.log_softmax(jnp.where(edges, t_logits, _NEG), axis=-1)
  ls = jax.nn.log_softmax(jnp.where(edges, s_logits, _NEG), axis=-1)
  kl = _kl_rows(lt, ls, support=edges)
  return jnp.where(jnp.any(edges, axis=-1), kl, 0.0)


def trg(student_tokens: Array, teacher_tokens: Array, temperature: float = 0.1,
        graph_weight: float = 1.0, context_weight: float = 1.0,
        where: Array | None = None) -> Array:
  """Token-level relationship-graph distillation (TRG): graph + contextual losses.

  Tokens are ``[B, L, d]`` (patches, positions of a feature map, or text
  tokens; student and teacher widths may differ, B and L must match). Each
  token is a node; edges carry cosine similarities turned into a relation
  distribution per node, A_i = softmax_{j ∈ N(i)}(cos(u_i, u_j)/τ):

  * **graph loss** (cross-instance): N(i) = every other valid token of the
    batch; mean over nodes of KL(A_i^t ‖ A_i^s), so the student reproduces
    the teacher's token-level relationship graph across samples;
  * **contextual loss** (inner-instance): N(i) = the other valid tokens of
    the same sample; mean over nodes of KL(C_i^t ‖ C_i^s).

  L = graph_weight·graph + context_weight·contextual. ``where`` ``[B, L]``
  masks tokens (padding). Cost is O((B·L)²) memory for the graph. Zhang, Liu
  & He, "Knowledge Distillation via Token-level Relationship Graph" (2023):
  kfuse re-derives both terms from the paper's description (token graph
  across instances + token-wise contextual loss); the paper's exact edge
  sparsification is not reproduced.
  """
  check_temperature(temperature)
  check_weight(graph_weight, "graph_weight")
  check_weight(context_weight, "context_weight")
  s, t = jnp.asarray(student_tokens), jnp.asarray(teacher_tokens)
  if s.ndim != 3 or t.ndim != 3:
    raise KfuseError(f"student_tokens/teacher_tokens: need [B, L, d] tokens, got shapes"
                     f" {tuple(s.shape)} and {tuple(t.shape)}")
  if s.shape[:2] != t.shape[:2]:
    raise KfuseError(f"teacher_tokens: [B, L] = {tuple(t.shape[:2])} does not match"
                     f" student_tokens {tuple(s.shape[:2])}")
  b, l = s.shape[:2]
  _check_where(where, (b, l))
  valid = jnp.ones((b, l), bool) if where is None else jnp.asarray(where, bool)
  total = jnp.zeros((), jnp.float32)
  if not (_is_concrete_number(graph_weight) and graph_weight == 0):
    sf, tf, vf = s.reshape(b * l, -1), t.reshape(b * l, -1), valid.reshape(b * l)
    edges = vf[:, None] & vf[None, :] & ~jnp.eye(b * l, dtype=bool)
    kl = _row_kl_masked(_cosine_logits(tf, temperature), _cosine_logits(sf, temperature), edges)
    total = total + graph_weight * masked_mean(kl, vf)
  if not (_is_concrete_number(context_weight) and context_weight == 0):
    edges = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(l, dtype=bool)[None]
    kl = jax.vmap(lambda ts, ss, e: _row_kl_masked(_cosine_logits(ts, temperature),
                                                   _cosine_logits(ss, temperature), e))(t, s, edges)
    total = total + context_weight * masked_mean(kl, valid)
  return total


# ------------------------------------------------------------------ sparse top-k targets


def topk_from_logits(teacher_logits: Array, k: int) -> tuple[Array, Array]:
  """``(indices, logits)`` of the k largest teacher logits per position (``lax.top_k``)."""
  if int(k) < 1 or int(k) > teacher_logits.shape[-1]:
    raise KfuseError(f"k: must be in [1, {teacher_logits.shape[-1]}], got {k}")
  values, indices = jax.lax.top_k(teacher_logits, int(k))
  return indices.astype(jnp.int32), values


def _check_topk(student_logits: Array, topk_indices: Array, topk_logits: Array) -> None:
  zi, zl = tuple(jnp.shape(topk_indices)), tuple(jnp.shape(topk_logits))
  if zi != zl:
    raise KfuseError(f"topk_logits: shape {zl} does not match topk_indices {zi}")
  if zi[:-1] != tuple(student_logits.shape[:-1]):
    raise KfuseError(f"topk_indices: positions {zi[:-1]} do not match student_logits'"
                     f" {tuple(student_logits.shape[:-1])}")
  if not jnp.issubdtype(jnp.asarray(topk_indices).dtype, jnp.integer):
    raise KfuseError(f"topk_indices: must be integers, got {jnp.asarray(topk_indices).dtype}")
  try:
    hi = int(jnp.max(topk_indices)) if jnp.size(topk_indices) else -1
  except jax.errors.ConcretizationTypeError:
    return  # traced under jit: indices are checked by the caller's data pipeline
  vocab = student_logits.shape[-1]
  if hi >= vocab:
    raise KfuseError(f"topk_indices: index {hi} is outside the student vocabulary of {vocab}"
                     " (teacher and student vocabularies differ? align them first)")


def _topk_parts(student_logits, topk_indices, topk_logits, temperature):
  """Teacher log-probs over its k entries and the student's log-probs at those ids."""
  valid = topk_indices >= 0                              # -1 pads short lists
  log_s = _log_probs(student_logits, temperature)       # normaliser over the full vocab
  idx = jnp.where(valid, topk_indices, 0)
  log_s_k = jnp.take_along_axis(log_s, idx, axis=-1)
  t = jnp.where(valid, jnp.asarray(topk_logits, log_s.dtype) / temperature, _NEG)
  log_p = jax.nn.log_softmax(t, axis=-1)
  return valid, log_p, log_s_k


def topk_cross_entropy(student_logits: Array, topk_indices: Array, topk_logits: Array,
                       temperature: float = 1.0, where: Array | None = None) -> Array:
  """CE to a teacher's sparse top-k: −Σ_{k} p_k·log softmax(z_s/T)[idx_k], mean over valid positions.

  p = softmax(topk_logits/T) renormalised over the k stored entries (FuseLLM's
  target: softmax of the top-k logits scattered into the vocabulary, as in
  the FuseLLM reference code). The student's log-probs are gathered at the k indices
  (``take_along_axis``), so no ``[..., V]`` teacher tensor is ever built.
  Indices < 0 mark padding entries. Wan et al., "Knowledge Fusion of Large
  Language Models" (FuseLLM, ICLR 2024).
  """
  check_temperature(temperature)
  _check_topk(student_logits, topk_indices, topk_logits)
  _check_where(where, tuple(student_logits.shape[:-1]))
  return masked_mean(topk_cross_entropy_rows(student_logits, topk_indices, topk_logits,
                                             temperature), where)


def topk_cross_entropy_rows(student_logits: Array, topk_indices: Array, topk_logits: Array,
                            temperature: float = 1.0) -> Array:
  """`topk_cross_entropy` per position (``[...]``, no mean): −Σ_k p_k·log softmax(z_s/T)[idx_k]."""
  valid, log_p, log_s_k = _topk_parts(student_logits, topk_indices, topk_logits, temperature)
  p = jnp.where(valid, jnp.exp(log_p), 0.0)
  return -jnp.sum(p * jnp.where(valid, log_s_k, 0.0), axis=-1)


def topk_kl(student_logits: Array, topk_indices: Array, topk_logits: Array,
            temperature: float = 1.0, where: Array | None = None) -> Array:
  """KL(p_topk ‖ q_s) = Σ_k p_k (log p_k − log q_s[idx_k]) = `topk_cross_entropy` − H(p).

  Same sparse target as `topk_cross_entropy`; equals `forward_kl` when the k
  entries cover the whole vocabulary. Never densifies the vocabulary.
  """
  check_temperature(temperature)
  _check_topk(student_logits, topk_indices, topk_logits)
  _check_where(where, tuple(student_logits.shape[:-1]))
  valid, log_p, log_s_k = _topk_parts(student_logits, topk_indices, topk_logits, temperature)
  kl = _kl_rows(log_p, log_s_k, support=valid)
  return masked_mean(kl, where)
