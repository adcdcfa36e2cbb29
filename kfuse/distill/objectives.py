"""Distillation objectives: a loss of `kfuse.distill.losses` plus what the step must provide.

An `Objective` is a small value (optax-style): a pure ``loss`` function, an
``init`` for the parameters the objective learns itself (the FitNets
regressor; ``{}`` for most), and the module paths whose outputs it needs from
the student and the teachers. `combine` sums objectives. Build a step with
`kfuse.distill.steps.make_step(student, objective, optimizer, teachers)`.

Every constructor validates its hyper-parameters eagerly (temperature > 0,
weights ≥ 0 and not all zero, β in [0, 1]) and raises `KfuseError` naming
the argument. Defaults are the reference codes'; weights are
always named ``ce_weight`` (hard-label cross-entropy) and ``kd_weight`` /
``feat_weight`` (the distillation term), never α.

Loss signature: ``loss(aux, student, teachers, batch, step) -> (loss,
metrics)`` with ``student`` an `Outputs`, ``teachers`` a `TeacherOutputs`
(None without teachers), ``batch`` the mapping the step received (``y``
possibly mixed-up soft targets) and ``step`` the traced step counter.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kfuse.distill import losses as L
from kfuse.distill.ensembles import combine_logits
from kfuse.registry import Registry
from kfuse.tree import KfuseError

__all__ = [
    "Objective",
    "supervised",
    "hinton",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "dkd",
    "fitnets",
    "rkd",
    "attention",
    "trg",
    "topk",
    "kl_dp",
    "combine",
    "OBJECTIVES",
    "get",
    "names",
]

Array = jax.Array


def _no_aux(key, student, teachers):
  del key, student, teachers
  return {}


class Objective(NamedTuple):
  """A distillation objective (see module doc)."""
  name: str
  loss: Callable
  init: Callable = _no_aux
  student_features: tuple = ()
  teacher_features: tuple = ()
  needs_teachers: bool = True
  min_teachers: int = 0


# ------------------------------------------------------------------ validation helpers


def _weights(**weights: float) -> None:
  for name, w in weights.items():
    L.check_weight(w, name)
  if all(float(w) == 0.0 for w in weights.values()):
    raise KfuseError(f"{list(weights)[-1]}: all of {', '.join(weights)} are 0; nothing to train")


def _ce(student, batch):
  return L.cross_entropy(student.logits, batch["y"], batch.get("where"))


def _with_ce(ce_weight, student, batch, loss, metrics):
  """Feature objectives: ``loss + ce_weight·CE`` (the CE is skipped when ce_weight is 0)."""
  if ce_weight:
    ce = _ce(student, batch)
    metrics["ce"] = ce
    loss = loss + ce_weight * ce
  return loss, metrics


def _mean_over_teachers(fn, teachers) -> Array:
  """Σ_k w̄_k fn(k) with w̄_k the teachers' mean combination weight."""
  w = jnp.mean(teachers.weights.reshape(teachers.size, -1), axis=-1)
  return sum(w[k] * fn(k) for k in range(teachers.size))


# ------------------------------------------------------------------ logit objectives


OBJECTIVES = Registry("distillation objective")


@OBJECTIVES.register("supervised")
def supervised(ce_weight: float = 1.0) -> Objective:
  """Plain cross-entropy training (the "student alone" baseline): ce_weight·CE; needs no teacher."""
  _weights(ce_weight=ce_weight)

  def loss(aux, student, teachers, batch, step):
    ce = _ce(student, batch)
    return ce_weight * ce, {"ce": ce}

  return Objective("supervised", loss, needs_teachers=False)


def _logit_kd(name: str, temperature: float, ce_weight: float, kd_weight: float,
              divergence: Callable | None = None) -> Objective:
  """ce_weight·CE + kd_weight·T²·D(combined teachers at T, student): `losses.hinton`."""
  L.check_temperature(temperature)
  _weights(ce_weight=ce_weight, kd_weight=kd_weight)

  def loss(aux, student, teachers, batch, step):
    return L.hinton(student.logits, teachers.combined_logits(temperature), batch["y"],
                    temperature, ce_weight, kd_weight, batch.get("where"),
                    divergence=divergence, with_terms=True)

  return Objective(name, loss)


@OBJECTIVES.register("hinton")
def hinton(temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> Objective:
  """Hinton KD: ce_weight·CE + kd_weight·T²·KL(p_t^T ‖ p_s^T) (`losses.hinton`).

  With several teachers p_t is their combined mixture at temperature T.
  Defaults: mdistiller ``CFG.KD`` (T = 4, CE 0.1, KD 0.9). Hinton, Vinyals &
  Dean, "Distilling the Knowledge in a Neural Network" (2015).
  """
  return _logit_kd("hinton", temperature, ce_weight, kd_weight)


@OBJECTIVES.register("forward_kl")
def forward_kl(temperature: float = 1.0, ce_weight: float = 0.0, kd_weight: float = 1.0) -> Objective:
  """ce_weight·CE + kd_weight·T²·KL(p_t ‖ p_s) (`losses.hinton` with `losses.forward_kl`)."""
  return _logit_kd("forward_kl", temperature, ce_weight, kd_weight, L.forward_kl)


@OBJECTIVES.register("reverse_kl")
def reverse_kl(temperature: float = 1.0, ce_weight: float = 0.0, kd_weight: float = 1.0) -> Objective:
  """ce_weight·CE + kd_weight·T²·KL(p_s ‖ p_t) (`losses.reverse_kl`, mode-seeking; MiniLLM)."""
  return _logit_kd("reverse_kl", temperature, ce_weight, kd_weight, L.reverse_kl)


@OBJECTIVES.register("jsd")
def jsd(beta: float = 0.5, temperature: float = 1.0, ce_weight: float = 0.0,
        kd_weight: float = 1.0) -> Objective:
  """ce_weight·CE + kd_weight·T²·JSD(β) (`losses.generalized_jsd`; TRL GKD defaults β = 0.5, T = 1).

  Agarwal et al., "On-Policy Distillation of Language Models" (GKD, ICLR 2024).
  """
  L.check_unit_interval(beta, "beta")
  div = lambda s, t, temp, where: L.generalized_jsd(s, t, beta, temp, where)
  return _logit_kd("jsd", temperature, ce_weight, kd_weight, div)


@OBJECTIVES.register("dkd")
def dkd(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
        warmup_epochs: float = 20.0, steps_per_epoch: int | None = None) -> Objective:
  """Decoupled KD (`losses.dkd`): ce_weight·CE + min(epoch/warmup, 1)·(α·TCKD + β·NCKD).

  ``epoch = step / steps_per_epoch``; without ``steps_per_epoch`` the
  warm-up is off. Defaults: mdistiller ``CFG.DKD`` (CE 1, α 1, β 8, T 4,
  warm-up 20 epochs). Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).
  """
  L.check_temperature(temperature)
  _weights(ce_weight=ce_weight, alpha=alpha, beta=beta)
  if steps_per_epoch is not None and int(steps_per_epoch) < 1:
    raise KfuseError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
  if warmup_epochs < 0:
    raise KfuseError(f"warmup_epochs: must be >= 0, got {warmup_epochs}")

  def loss(aux, student, teachers, batch, step):
    epoch = None if steps_per_epoch is None else (
        jnp.asarray(step, jnp.float32) / float(steps_per_epoch))
    return L.dkd(student.logits, teachers.combined_logits(temperature), batch["y"], alpha, beta,
                 temperature, ce_weight, epoch, warmup_epochs, batch.get("where"),
                 with_terms=True)

  return Objective("dkd", loss)


@OBJECTIVES.register("topk")
def topk(k: int = 10, temperature: float = 1.0, ce_weight: float = 0.0, kd_weight: float = 1.0,
         kind: str = "kl") -> Objective:
  """Distil from a teacher's sparse top-k (indices, logits) without densifying the vocabulary.

  The target comes from ``batch['topk_indices']`` / ``batch['topk_logits']``
  when the batch carries them (stored FuseLLM-style representations, no
  teacher forward), else from the top-k of the combined teacher logits.
  ``kind``: ``kl`` (`losses.topk_kl`) or ``ce`` (`losses.topk_cross_entropy`);
  total ce_weight·CE + kd_weight·T²·D (`losses.hinton`). Wan et al.,
  "Knowledge Fusion of Large Language Models" (FuseLLM, ICLR 2024).
  """
  L.check_temperature(temperature)
  _weights(ce_weight=ce_weight, kd_weight=kd_weight)
  if int(k) < 1:
    raise KfuseError(f"k: must be >= 1, got {k}")
  if kind not in ("kl", "ce"):
    raise KfuseError(f"kind: expected 'kl' or 'ce', got {kind!r}")
  fn = L.topk_kl if kind == "kl" else L.topk_cross_entropy
  div = lambda s, target, temp, where: fn(s, target[0], target[1], temp, where)

  def loss(aux, student, teachers, batch, step):
    if "topk_indices" in batch:
      target = (batch["topk_indices"], batch["topk_logits"])
    elif teachers is not None:
      target = L.topk_from_logits(teachers.combined_logits(1.0), k)
    else:
      raise KfuseError("teachers: topk needs a teacher or batch['topk_indices'/'topk_logits']")
    return L.hinton(student.logits, target, batch["y"], temperature, ce_weight, kd_weight,
                    batch.get("where"), divergence=div, with_terms=True)

  return Objective("topk", loss, needs_teachers=False)


@OBJECTIVES.register("kl_dp")
def kl_dp(temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
          criterion: str = "max_confidence") -> Objective:
  """Fantastic Gains' KL+DP transfer: per-sample choice between teacher and frozen initial student.

  Needs exactly two teachers in this order: the teacher t, and the student's
  own frozen initial copy st. Per sample, m_t = 1[conf_t > conf_st] (``max_confidence``:
  conf = max_c softmax(z)_c, label-free; ``true_class``: conf = softmax(z)_y),
  and the target is p = m_t·p_t^T + (1 − m_t)·p_st^T: samples the teacher is
  more confident on are taught by it, the rest are retained from the initial
  student. Loss = ce_weight·CE + kd_weight·T²·KL(p ‖ p_s^T) (`losses.hinton`).
  Roth et al., "Fantastic Gains and Where to Find Them: On the Existence and
  Prospect of General Knowledge Transfer between Any Pretrained Model" (ICLR 2024).
  """
  L.check_temperature(temperature)
  _weights(ce_weight=ce_weight, kd_weight=kd_weight)
  if criterion not in ("max_confidence", "true_class"):
    raise KfuseError(f"criterion: expected 'max_confidence' or 'true_class', got {criterion!r}")

  def loss(aux, student, teachers, batch, step):
    if teachers.size != 2:
      raise KfuseError(f"teachers: kl_dp needs exactly 2 teachers (teacher, frozen initial"
                       f" student), got {teachers.size}")
    if criterion == "max_confidence":
      conf = jnp.max(jax.nn.log_softmax(teachers.logits.astype(jnp.float32), axis=-1), axis=-1)
    else:
      conf = -L.cross_entropy_rows(teachers.logits, batch["y"])   # log p_k(y)
    m_t = (conf[0] > conf[1]).astype(jnp.float32)
    target = combine_logits(teachers.logits, jnp.stack([m_t, 1.0 - m_t]), temperature)
    total, metrics = L.hinton(student.logits, target, batch["y"], temperature, ce_weight,
                              kd_weight, batch.get("where"), with_terms=True)
    metrics["teacher_fraction"] = L.masked_mean(m_t, batch.get("where"))
    return total, metrics

  return Objective("kl_dp", loss, min_teachers=2)


# ------------------------------------------------------------------ feature objectives


def _feature_dim(shape_struct, path, who):
  if path not in shape_struct.features:
    raise KfuseError(f"{who}: no feature {path!r} in the model outputs")
  return shape_struct.features[path].shape[-1]


@OBJECTIVES.register("fitnets")
def fitnets(student_feature: str = "backbone", teacher_feature: str = "backbone",
            feat_weight: float = 1.0, ce_weight: float = 1.0) -> Objective:
  """FitNets hints, single stage: ce_weight·CE + feat_weight·mean_k ½‖F_t^k − r_k(F_s)‖².

  One learned linear regressor r_k per teacher member (``state.aux``),
  trained with the student by the same optimizer (`losses.fitnets`).
  mdistiller's single-stage recipe is CE 1.0 + 100·MSE (= 200/d_t here).
  Romero et al. (ICLR 2015).
  """
  _weights(ce_weight=ce_weight, feat_weight=feat_weight)

  def init(key, student, teachers):
    d_s = _feature_dim(student, student_feature, "student_feature")
    keys = jax.random.split(key, max(1, len(teachers)))
    return {"regressors": [L.init_regressor(keys[i], d_s, _feature_dim(t, teacher_feature,
                                                                       "teacher_feature"))
                           for i, t in enumerate(teachers)]}

  def loss(aux, student, teachers, batch, step):
    fs = student.features[student_feature]
    where = batch.get("where")
    where = where if where is not None and where.shape == fs.shape[:-1] else None
    hint = _mean_over_teachers(
        lambda k: L.fitnets(fs, teachers.features[k][teacher_feature], aux["regressors"][k], where),
        teachers)
    return _with_ce(ce_weight, student, batch, feat_weight * hint, {"hint": hint})

  return Objective("fitnets", loss, init, (student_feature,), (teacher_feature,))


def _first(x: Array | None, n: int | None) -> Array | None:
  return x if (x is None or n is None) else x[:n]


@OBJECTIVES.register("rkd")
def rkd(student_feature: str = "backbone", teacher_feature: str = "backbone",
        distance_weight: float = 25.0, angle_weight: float = 50.0, ce_weight: float = 1.0,
        max_samples: int | None = None) -> Objective:
  """RKD: ce_weight·CE + distance_weight·RKD-D + angle_weight·RKD-A on per-sample features.

  Defaults: mdistiller's CIFAR recipe (CE 1, distance 25, angle 50);
  torchdistill's factors are 1 / 2 (`losses.rkd`). The angle term costs
  O(B³): ``max_samples`` restricts both relation terms to the first n samples
  of each (shuffled) batch, an unbiased subsample of the pairs / triplets (the
  CE still uses the whole batch). Park et al. (CVPR 2019).
  """
  _weights(ce_weight=ce_weight, distance_weight=distance_weight, angle_weight=angle_weight)
  if max_samples is not None and int(max_samples) < 3:
    raise KfuseError(f"max_samples: need at least 3 samples for angles, got {max_samples}")
  n = None if max_samples is None else int(max_samples)

  def loss(aux, student, teachers, batch, step):
    fs = _first(student.features[student_feature], n)
    where = batch.get("where")
    where = _first(where, n) if where is not None and where.shape == student.features[
        student_feature].shape[:1] else None
    ft = lambda k: _first(teachers.features[k][teacher_feature], n)
    dist = _mean_over_teachers(lambda k: L.rkd_distance(fs, ft(k), where), teachers)
    ang = _mean_over_teachers(lambda k: L.rkd_angle(fs, ft(k), where), teachers)
    out = distance_weight * dist + angle_weight * ang
    return _with_ce(ce_weight, student, batch, out, {"rkd_distance": dist, "rkd_angle": ang})

  return Objective("rkd", loss, student_features=(student_feature,),
                   teacher_features=(teacher_feature,))


@OBJECTIVES.register("attention")
def attention(student_features: Sequence[str], teacher_features: Sequence[str], p: float = 2.0,
              feat_weight: float = 1000.0, ce_weight: float = 1.0) -> Objective:
  """Attention transfer on paired spatial maps: ce_weight·CE + feat_weight·AT (`losses.attention_transfer`).

  Defaults: mdistiller ``CFG.AT`` (p = 2, FEAT_WEIGHT 1000, CE 1).
  Zagoruyko & Komodakis (ICLR 2017).
  """
  sf, tf = tuple(student_features), tuple(teacher_features)
  if not sf or len(sf) != len(tf):
    raise KfuseError(f"teacher_features: need one teacher map per student map, got {len(tf)}"
                     f" for {len(sf)}")
  _weights(ce_weight=ce_weight, feat_weight=feat_weight)
  if p <= 0:
    raise KfuseError(f"p: must be > 0, got {p}")

  def loss(aux, student, teachers, batch, step):
    s_maps = [student.features[f] for f in sf]
    at = _mean_over_teachers(
        lambda k: L.attention_transfer(s_maps, [teachers.features[k][f] for f in tf], p), teachers)
    return _with_ce(ce_weight, student, batch, feat_weight * at, {"at": at})

  return Objective("attention", loss, student_features=sf, teacher_features=tf)


def _pool_tokens(x: Array, pool: int) -> Array:
  """Average non-overlapping groups of ``pool`` consecutive tokens: [B, L, d] -> [B, L // pool, d]."""
  if pool == 1:
    return x
  b, l, d = x.shape
  if l % pool:
    raise KfuseError(f"token_pool: {pool} does not divide the {l} tokens")
  return x.reshape(b, l // pool, pool, d).mean(axis=2)


@OBJECTIVES.register("trg")
def trg(student_feature: str, teacher_feature: str, temperature: float = 0.1,
        graph_weight: float = 1.0, context_weight: float = 1.0, feat_weight: float = 1.0,
        ce_weight: float = 1.0, token_pool: int = 1, max_samples: int | None = None) -> Objective:
  """Token-level relationship graph KD on ``[B, L, d]`` token features (`losses.trg`).

  ce_weight·CE + feat_weight·(graph_weight·graph + context_weight·context).
  The graph has B·L nodes (O((B·L)²) cost): ``token_pool`` averages groups of
  consecutive tokens first and ``max_samples`` keeps the first n samples of
  each (shuffled) batch. With ``token_pool > 1`` a ``where`` token mask is not
  applied. Compose with `hinton` via `combine` for the paper's logit term.
  Zhang, Liu & He (2023).
  """
  L.check_temperature(temperature)
  _weights(ce_weight=ce_weight, feat_weight=feat_weight)
  _weights(graph_weight=graph_weight, context_weight=context_weight)
  if int(token_pool) < 1:
    raise KfuseError(f"token_pool: must be >= 1, got {token_pool}")
  if max_samples is not None and int(max_samples) < 1:
    raise KfuseError(f"max_samples: must be >= 1, got {max_samples}")
  pool, n = int(token_pool), None if max_samples is None else int(max_samples)

  def loss(aux, student, teachers, batch, step):
    raw = student.features[student_feature]
    fs = _pool_tokens(_first(raw, n), pool)
    where = batch.get("where")
    where = _first(where, n) if (pool == 1 and where is not None
                                 and where.shape == raw.shape[:2]) else None
    ft = lambda k: _pool_tokens(_first(teachers.features[k][teacher_feature], n), pool)
    g = _mean_over_teachers(
        lambda k: L.trg(fs, ft(k), temperature, graph_weight, context_weight, where), teachers)
    return _with_ce(ce_weight, student, batch, feat_weight * g, {"trg": g})

  return Objective("trg", loss, student_features=(student_feature,),
                   teacher_features=(teacher_feature,))


# ------------------------------------------------------------------ composition


def combine(*objectives: Objective, name: str | None = None) -> Objective:
  """Sum of objectives. ``aux`` is a tuple (one entry each); metrics are prefixed by name.

  Put the cross-entropy in one member only (e.g. ``combine(hinton(),
  fitnets(ce_weight=0.0, ...))``).
  """
  if not objectives:
    raise KfuseError("objectives: combine needs at least one objective")
  for i, o in enumerate(objectives):
    if not isinstance(o, Objective):
      raise KfuseError(f"objectives[{i}]: expected an Objective, got {type(o)}")
  names = [o.name for o in objectives]

  def init(key, student, teachers):
    keys = jax.random.split(key, len(objectives))
    return tuple(o.init(k, student, teachers) for o, k in zip(objectives, keys))

  def loss(aux, student, teachers, batch, step):
    total, metrics = jnp.zeros((), jnp.float32), {}
    for i, o in enumerate(objectives):
      li, mi = o.loss(aux[i], student, teachers, batch, step)
      total = total + li
      prefix = o.name if names.count(o.name) == 1 else f"{o.name}{i}"
      metrics.update({f"{prefix}/{k}": v for k, v in mi.items()})
    return total, metrics

  feats = lambda attr: tuple(dict.fromkeys(f for o in objectives for f in getattr(o, attr)))
  return Objective(name or "+".join(names), loss, init, feats("student_features"),
                   feats("teacher_features"), any(o.needs_teachers for o in objectives),
                   max(o.min_teachers for o in objectives))


# ------------------------------------------------------------------ by name (configs)


def names() -> list[str]:
  """Objective names accepted by `get` (`OBJECTIVES`)."""
  return OBJECTIVES.names()


def get(spec: Any, **kwargs: Any) -> Objective:
  """An objective from a name and keyword arguments, a ``{'name': ..., **kwargs}`` dict, or a list of them (summed).

  ``get('hinton', temperature=2.0)``, ``get({'name': 'dkd', 'beta': 4.0})``,
  ``get([{'name': 'hinton'}, {'name': 'fitnets', 'ce_weight': 0.0}])``. Names
  and defaults come from `OBJECTIVES`.
  """
  if isinstance(spec, (list, tuple)):
    if kwargs:
      raise KfuseError("objective: keyword arguments go inside each entry of a list spec")
    return combine(*(get(s) for s in spec))
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if isinstance(spec, dict):
    spec = dict(spec)
    if "name" not in spec:
      raise KfuseError(f"objective: a dict spec needs a 'name' (one of {', '.join(names())})")
    name = spec.pop("name")
    kwargs = {**spec, **kwargs}
  else:
    name = spec
  try:
    fn = OBJECTIVES.get(name).fn
  except KfuseError as e:
    raise KfuseError(f"objective: {e}") from None
  try:
    inspect.signature(fn).bind(**kwargs)
  except TypeError as e:
    raise KfuseError(f"objective.{name}: {e}") from None
  return fn(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
