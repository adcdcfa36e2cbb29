"""Logits processors: pure ``(logits_per_model, state) -> (logits, state)`` steps, chained like optax.

A `Processor` is a pair of pure functions (optax's `GradientTransformation` shape):

    state = proc.init(logits_per_model)                  # a pytree, sized by the logits
    logits, state = proc.apply(logits_per_model, state)  # one decoding step, jit-able

``logits_per_model`` is a tuple of ``[B, V]`` arrays, one per model, in the order the
rule documents (a bare array is one model); the result is one ``[B, V]`` array.
`chain(a, b, ...)` feeds a's result to b as a one-model tuple, so a fusion rule comes
first and per-distribution steps (`temperature`, `top_k`, `top_p`) after it::

    proc = chain(proxy_tune(alpha=1.0), top_p(0.9))      # models: (large, tuned, base)

Fusion rules here need one shared vocabulary (`check_models`); models with different
tokenizers need a cross-vocabulary ensemble: `kfuse.decode.unite` (UniTE) or
`kfuse.decode.deepen` (DeePEn), decoded by `kfuse.decode.crossvocab.generate_cross`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kfuse.errors import KfuseError

__all__ = ["Processor", "chain", "identity", "temperature", "top_k", "top_p", "proxy_tune",
           "dlf", "dlf_objective", "dlf_weights", "DLFState", "ensemble", "ENSEMBLE_RULES",
           "as_tuple", "NEG"]

NEG = -1e30   # a removed token's logit (finite: softmax stays NaN-free when all are removed)


class Processor(NamedTuple):
  """``init(logits_per_model) -> state``; ``apply(logits_per_model, state) -> (logits, state)``.

  ``models``: how many models the rule reads (None: any number ≥ 1); ``name`` for messages;
  ``vocab``: the `kfuse.decode.crossvocab.CrossVocab` of a cross-vocabulary rule (its result
  is over that union string vocabulary; decoded by `generate_cross`), None otherwise.
  """
  init: Callable[[tuple], Any]
  apply: Callable[[tuple, Any], tuple]
  models: int | None = 1
  name: str = "processor"
  vocab: Any = None


class EmptyState(NamedTuple):
  """The state of a stateless processor."""


def as_tuple(logits) -> tuple:
  """A bare ``[B, V]`` array as a one-model tuple; tuples / lists as tuples."""
  return tuple(logits) if isinstance(logits, (tuple, list)) else (logits,)


def _check_count(proc: Processor, logits: tuple) -> None:
  if proc.models is not None and len(logits) != proc.models:
    raise KfuseError(f"{proc.name}: reads {proc.models} model(s)' logits, got {len(logits)}")


def _stateless(name: str, fn: Callable[[tuple], jax.Array], models: int | None = 1) -> Processor:
  def init(logits):
    _check_count(proc, as_tuple(logits))
    return EmptyState()

  def apply(logits, state):
    return fn(as_tuple(logits)), state

  proc = Processor(init, apply, models, name)
  return proc


def chain(*procs: Processor) -> Processor:
  """Apply ``procs`` in order; the first reads the models' logits, each next one the result."""
  if not procs:
    return identity()
  for p in procs[1:]:
    if p.models not in (None, 1):
      raise KfuseError(f"chain: {p.name} reads {p.models} models, so it must come first")

  def init(logits):
    states, cur = [], as_tuple(logits)
    for p in procs:
      states.append(p.init(cur))
      cur, _ = p.apply(cur, states[-1])
      cur = (cur,)
    return tuple(states)

  def apply(logits, states):
    cur, new = as_tuple(logits), []
    for p, s in zip(procs, states):
      out, s = p.apply(cur, s)
      new.append(s)
      cur = (out,)
    return cur[0], tuple(new)

  return Processor(init, apply, procs[0].models,
                   "chain(" + ", ".join(p.name for p in procs) + ")", procs[0].vocab)


def identity() -> Processor:
  """One model's logits, unchanged."""
  return _stateless("identity", lambda z: z[0])


def _finite(name: str, value, lo=None, hi=None, lo_open=False) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise KfuseError(f"{name}: must be a number, got {value!r}") from None
  if not math.isfinite(v):
    raise KfuseError(f"{name}: must be finite, got {value!r}")
  if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and v > hi:
    rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else '∞'}]"
    raise KfuseError(f"{name}: must be in {rng}, got {value!r}")
  return v


def temperature(t: float) -> Processor:
  """z / t (t > 0); sampling at t → 0 is greedy (`generate`'s ``temperature=0``)."""
  t = _finite("temperature", t, 0.0, lo_open=True)
  return _stateless(f"temperature({t})", lambda z: z[0] / t)


def top_k(k: int) -> Processor:
  """Keep the k largest logits per row (ties at the k-th value kept), the rest → −∞."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise KfuseError(f"top_k: k must be an integer >= 1, got {k!r}")

  def fn(z):
    z = z[0]
    kth = jax.lax.top_k(z, min(k, z.shape[-1]))[0][..., -1:]
    return jnp.where(z >= kth, z, NEG)

  return _stateless(f"top_k({k})", fn)


def top_p(p: float) -> Processor:
  """Nucleus (Holtzman et al., 2020): the smallest set of most probable tokens whose mass
  reaches p; a token is kept when the mass strictly above it is < p (the top one always)."""
  p = _finite("top_p", p, 0.0, 1.0, lo_open=True)

  def fn(z):
    z = z[0]
    order = jnp.argsort(-z, axis=-1)
    zs = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(zs.astype(jnp.float32), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = above < p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(z.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, z, NEG)

  return _stateless(f"top_p({p})", fn)


def _alphas(alpha, n: int | None, name: str) -> tuple:
  vals = alpha if isinstance(alpha, (tuple, list)) else (alpha,) * (n or 1)
  return tuple(_finite(f"{name}: alpha", a) for a in vals)


def proxy_tune(alpha=1.0, experts: int | None = None) -> Processor:
  """Proxy-tuning / EFT: z = z_L + Σ_i α_i (z_i − z_S) over logits (z_L, z_S, z_1, ..., z_T).

  Liu et al., 2024, "Tuning Language Models by Proxy" (α = 1, one expert: z_L +
  (z_tuned − z_base)); Mitchell et al., 2024, "An Emulator for Fine-Tuning Large
  Language Models" (EFT up-scaling). The multi-expert form sums each tuned small model's
  shift from the one shared untuned small model z_S. Model order: large, small untuned,
  then the T tuned small models. ``alpha``: one number for every expert or one per
  expert (finite); ``experts``: T (default: ``len(alpha)`` or 1). α = 0 is the large model.
  """
  if experts is None:
    experts = len(alpha) if isinstance(alpha, (tuple, list)) else 1
  a = _alphas(alpha, experts, "proxy_tune")
  if len(a) != experts or experts < 1:
    raise KfuseError(f"proxy_tune: {len(a)} alpha value(s) for {experts} expert(s)")

  def fn(z):
    zl, zs = z[0].astype(jnp.float32), z[1].astype(jnp.float32)
    return zl + sum(ai * (zi.astype(jnp.float32) - zs) for ai, zi in zip(a, z[2:]))

  return _stateless(f"proxy_tune(alpha={a if experts > 1 else a[0]})", fn, 2 + experts)


# ----------------------------------------------------------------------------- DLF

def _kl(logp, logq):
  """KL(p ‖ q) = Σ p (log p − log q) over the last axis (log-probabilities in)."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


class _DLFTerms(NamedTuple):
  """The α-independent parts of one row's DLF objective (computed once per row and step)."""
  zl: jax.Array            # [V]
  d: jax.Array             # [T, V]: z_t − z_S
  c: jax.Array             # [T, V]: z_L − z_t
  lz_l: jax.Array          # log Σ exp z_L
  lz_e: jax.Array          # [T]: log Σ exp z_t
  target_shift: jax.Array  # [T]: KL(p_t ‖ p_S)
  target_gap: jax.Array    # KL(p_L ‖ p_S)


def _dlf_terms(zl, zs, ze) -> _DLFTerms:
  lse = jax.nn.logsumexp
  lz_l, lz_s, lz_e = lse(zl), lse(zs), lse(ze, axis=-1)
  ll, ls, le = zl - lz_l, zs - lz_s, ze - lz_e[:, None]
  return _DLFTerms(zl, ze - zs[None], zl[None] - ze, lz_l, lz_e, _kl(le, ls[None]), _kl(ll, ls))


def _dlf_loss(alpha, terms: _DLFTerms):
  """`dlf_objective` from the precomputed terms: one logsumexp and 2T dot products over V.

  With u = z_L + Σ_t α_t d_t, log Z = log Σ exp u, p̃ = exp(u − log Z) and E = E_p̃:
  KL(p̃ ‖ p_L) = α·E[d] − log Z + log Z_L;
  KL(p̃ ‖ p_t) = E[z_L − z_t] + α·E[d] − log Z + log Z_t.
  """
  u = terms.zl + alpha @ terms.d
  lz = jax.nn.logsumexp(u)
  p = jnp.exp(u - lz)
  ad = alpha @ (terms.d @ p)
  shift = ad - lz + terms.lz_l                        # KL(p̃ ‖ p_L)
  gap = terms.c @ p + ad - lz + terms.lz_e            # [T]: KL(p̃ ‖ p_t)
  return jnp.sum(jnp.square(shift - terms.target_shift) + jnp.square(gap - terms.target_gap))


def dlf_objective(alpha, zl, zs, ze):
  """Dynamic Logit Fusion's per-step loss of weights α [T] (one row: zl, zs [V], ze [T, V]).

  Fused: z̃(α) = z_L + Σ_t α_t (z_t − z_S), p̃ = softmax(z̃). The paper asks the fused large
  model to move from the large base as far as each small expert moved from the small
  base, KL(p̃ ‖ p_L) = KL(p_t ‖ p_S), and to sit from the expert as far as the large base
  sits from the small base, KL(p̃ ‖ p_t) = KL(p_L ‖ p_S), and solves the squared residuals:

      f(α) = Σ_t [KL(p̃ ‖ p_L) − KL(p_t ‖ p_S)]² + [KL(p̃ ‖ p_t) − KL(p_L ‖ p_S)]²

  The α-independent parts (the targets, log Z of z_L and of each z_t) are computed once
  (`_dlf_terms`); each evaluation at α is then one logsumexp and 2T dot products (`_dlf_loss`).
  """
  return _dlf_loss(alpha, _dlf_terms(zl, zs, ze))


def _dlf_starts(t: int, lo: float, hi: float, grid: int):
  """Start points: the grid on the diagonal α_1 = .. = α_T and each single expert's axis."""
  g = jnp.linspace(lo, hi, grid)
  diag = jnp.repeat(g[:, None], t, axis=1)
  if t == 1:
    return diag
  axes = jnp.where(jnp.eye(t, dtype=bool)[:, None, :], g[None, :, None], 0.0 if lo <= 0 <= hi
                   else lo).reshape(t * grid, t)
  return jnp.concatenate([diag, axes], axis=0)


def dlf_weights(zl, zs, ze, lo: float = 0.0, hi: float = 2.0, grid: int = 21,
                newton_steps: int = 10):
  """Per-row DLF weights α [B, T] minimising `dlf_objective` over the box [lo, hi]^T.

  zl, zs: [B, V]; ze: [B, T, V]. Solver (the paper gives the objective, not a solver):
  the best of a grid of ``grid`` values on the diagonal and on each expert's axis, then
  ``newton_steps`` box-projected Newton steps (Levenberg damping, a step kept only when
  it lowers f). All in float32 inside the decoding loop.
  """
  t = ze.shape[1]
  starts = _dlf_starts(t, lo, hi, grid)

  def row(zl, zs, ze):
    terms = _dlf_terms(*(x.astype(jnp.float32) for x in (zl, zs, ze)))
    f = lambda a: _dlf_loss(a, terms)
    grad = jax.grad(f)
    vals = jax.vmap(f)(starts)
    a0 = starts[jnp.argmin(vals)]

    def newton(carry, _):
      a, fa, lam = carry
      h, g = jax.jacfwd(lambda x: (grad(x), grad(x)), has_aux=True)(a)
      step = jnp.linalg.solve(h + (lam + 1e-12) * jnp.eye(t), g)
      cand = jnp.clip(a - step, lo, hi)
      fc = f(cand)
      better = fc < fa
      return (jnp.where(better, cand, a), jnp.where(better, fc, fa),
              jnp.where(better, lam * 0.1, jnp.maximum(lam, 1e-6) * 10.0)), None

    (a, _, _), _ = jax.lax.scan(newton, (a0, f(a0), jnp.float32(1e-3)), None,
                                length=newton_steps)
    return a

  return jax.vmap(row)(zl, zs, ze)


class DLFState(NamedTuple):
  """The weights α [B, T] DLF used at the last step."""
  alpha: jax.Array


def dlf(experts: int = 1, lo: float = 0.0, hi: float = 2.0, grid: int = 21,
        newton_steps: int = 10) -> Processor:
  """Dynamic Logit Fusion: z̃ = z_L + Σ_t α_t (z_t − z_S) with α re-solved at every step.

  Fan et al., NeurIPS 2024, "On Giant's Shoulders: Effortless Weak to Strong by Dynamic
  Logits Fusion". α minimises `dlf_objective` (the paper's KL constraints) per row and
  step, in the box [lo, hi]^T (`dlf_weights`). Model order as `proxy_tune`: large, small
  untuned, then the T tuned small models. The state holds the last step's α.

  Choices the paper leaves open, as made here:
  - the two KL equalities are solved as one least-squares problem (sum of squared
    residuals, equal weights), summed over the T experts in the multi-task case;
  - KL directions: KL(p̃ ‖ p_L), KL(p_t ‖ p_S), KL(p̃ ‖ p_t), KL(p_L ‖ p_S) (the fused /
    tuned distribution first), over the full vocabulary at temperature 1;
  - α is boxed to [lo, hi] = [0, 2] by default (0: no transfer; 2: twice the small
    model's shift) and solved by a grid then projected Newton steps (`dlf_weights`),
    in float32, independently for every row and every step;
  - every expert is a fine-tune of the one small base model z_S (one anti-expert).
  """
  if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
    raise KfuseError(f"dlf: experts must be an integer >= 1, got {experts!r}")
  lo, hi = _finite("dlf: lo", lo), _finite("dlf: hi", hi)
  if not lo < hi:
    raise KfuseError(f"dlf: need lo < hi, got lo={lo}, hi={hi}")
  if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
    raise KfuseError(f"dlf: grid must be an integer >= 2, got {grid!r}")

  def init(logits):
    logits = as_tuple(logits)
    _check_count(proc, logits)
    return DLFState(jnp.zeros((logits[0].shape[0], experts), jnp.float32))

  def apply(logits, state):
    z = as_tuple(logits)
    zl, zs = z[0].astype(jnp.float32), z[1].astype(jnp.float32)
    ze = jnp.stack([e.astype(jnp.float32) for e in z[2:]], axis=1)
    a = dlf_weights(zl, zs, ze, lo, hi, grid, newton_steps)
    return zl + jnp.einsum("bt,btv->bv", a, ze - zs[:, None]), DLFState(a)

  proc = Processor(init, apply, 2 + experts, f"dlf(experts={experts})")
  return proc


# ----------------------------------------------------------------------------- ensembles

ENSEMBLE_RULES = ("mean", "product", "max")


def ensemble(rule: str = "mean", weights: Sequence[float] | None = None,
             models: int | None = None) -> Processor:
  """Shared-vocabulary ensemble of M models' next-token distributions, as log-probabilities.

  mean: log Σ_m w_m p_m (w normalised to sum 1); product: Σ_m w_m log p_m (a
  product of experts, Hinton 2002; renormalised by the sampler's softmax); max:
  log max_m p_m. Identical models give back the model's distribution.
  """
  if rule not in ENSEMBLE_RULES:
    from kfuse.registry import suggest
    raise KfuseError(f"ensemble: unknown rule {rule!r}{suggest(rule, ENSEMBLE_RULES)};"
                     f" one of {', '.join(ENSEMBLE_RULES)}")
  w = None
  if weights is not None:
    w = [_finite("ensemble: weight", x, 0.0) for x in weights]
    if sum(w) <= 0:
      raise KfuseError(f"ensemble: weights must have a positive sum, got {list(weights)}")
    if models is not None and len(w) != models:
      raise KfuseError(f"ensemble: {len(w)} weights for {models} models")
    models = len(w)

  def fn(z):
    lp = jnp.stack([jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in z])
    ww = jnp.asarray(w if w is not None else [1.0] * len(z), jnp.float32)
    ww = ww / jnp.sum(ww)
    if rule == "mean":
      return jax.nn.logsumexp(lp + jnp.log(ww)[:, None, None], axis=0)
    if rule == "product":
      return jax.nn.log_softmax(jnp.einsum("m,mbv->bv", ww, lp), axis=-1)
    return jnp.max(lp, axis=0)

  return _stateless(f"ensemble({rule})", fn, models)
