"""DeePEn: ensembling across vocabularies in a shared relative space (Huang et al., NeurIPS 2024).

"Ensemble Learning for Heterogeneous Large Language Models with Deep Parallel Collaboration"
(official code: ``src/transfer_matrix/transfer_matrix.py``,
``src/logits_processor/based_on_probaility_transfer_logits_processor.py``).

Anchors A: the token strings every vocabulary has. Each model's relative representation
of its tokens, from its input embeddings E_i (rows e_v):

    R_i[v, a] = cos(e_v, e_a)                        [V_i, |A|]
    P_i       = softmax_a(R_i / τ)                   the transfer matrix (rows sum to 1)

Per step, from each model's distribution p_i = softmax(z_i) [V_i]:

    r_i = p_i P_i,   r̄ = Σ_i w_i r_i                 fusion in the relative space [|A|]
    z*  = argmin_z KL(r̄ ‖ softmax(z) P_main),  z started at z_main, ``steps`` Adam steps

and the next token is picked from z* (the main model's vocabulary). The inverse map's
gradient is written in closed form, with q = softmax(z) P_main and s = softmax(z):

    ∂KL/∂z_v = −s_v Σ_a P_main[v, a] (r̄_a / q_a − 1)

(equal to the autodiff gradient because the rows of P sum to 1), so it is exactly zero when
r̄ = q: with identical models and tokenizers, or weight only on the main model, z* = z_main.

Choices the paper / code leave open or set differently, as made here:
- τ = 0.1 by default (a softmax over cosines at τ = 1 is nearly uniform over anchors);
- Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay; the code's AdamW decays the logits) at
  learning rate 0.15 (the code's example) with a cosine decay over ``steps`` = 5 steps;
- the transfer matrices are computed once on the host (float64, stored float32) and carried
  in the processor's state; ids beyond a tokenizer's vocabulary are given no probability.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.decode import processors as P
from kfuse.decode.crossvocab import CrossVocab, input_embeddings
from kfuse.errors import KfuseError

__all__ = ["deepen", "transfer_matrix", "relative", "inverse_map", "inverse_grad", "DeePEnState"]


def transfer_matrix(emb, anchors, temperature: float = 0.1, dtype=np.float32) -> np.ndarray:
  """P = softmax_a(cos(E, E[anchors]) / τ): [V, |A|] from embeddings [V, d] (float64 inside)."""
  e = np.asarray(emb, np.float64)
  e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  r = e @ e[np.asarray(anchors)].T / temperature
  r = np.exp(r - r.max(1, keepdims=True))
  return (r / r.sum(1, keepdims=True)).astype(dtype)


def _float(x):
  """At least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def relative(z, p_matrix, valid):
  """r = softmax(z) P over the ids ``valid`` [V] marks: [B, |A|]."""
  z = jnp.where(valid[None], _float(z), P.NEG)
  return jax.nn.softmax(z, axis=-1) @ p_matrix


def inverse_grad(z, target, p_matrix):
  """∂/∂z KL(target ‖ softmax(z) P) = −s ⊙ (P (target / q − 1)), q = softmax(z) P."""
  s = jax.nn.softmax(z, axis=-1)
  q = s @ p_matrix
  ratio = jnp.where(target > 0, target / jnp.maximum(q, 1e-30), 0.0)
  return -s * ((ratio - 1.0) @ p_matrix.T)


def inverse_map(z0, target, p_matrix, steps: int = 5, lr: float = 0.15):
  """``steps`` Adam steps (cosine-decayed ``lr``) on KL(target ‖ softmax(z) P) from z0 [B, V]."""
  b1, b2, eps = 0.9, 0.999, 1e-8

  def step(carry, t):
    z, m, v = carry
    g = inverse_grad(z, target, p_matrix)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    rate = lr * 0.5 * (1 + jnp.cos(jnp.pi * t / steps))
    return (z - rate * mh / (jnp.sqrt(vh) + eps), m, v), None

  z0 = _float(z0)
  zeros = jnp.zeros_like(z0)
  (z, _, _), _ = jax.lax.scan(step, (z0, zeros, zeros), jnp.arange(steps, dtype=z0.dtype))
  return z


class DeePEnState(NamedTuple):
  """Per model: transfer matrix P_i [V_i, |A|] and valid ids [V_i]; the main model's sid."""
  p: tuple
  valid: tuple
  sid: jax.Array


def deepen(vocab: CrossVocab, models: Sequence = (), *, embeddings: Sequence = (), main: int = 0,
           weights: Sequence[float] | None = None, temperature: float = 0.1, steps: int = 5,
           lr: float = 0.15) -> P.Processor:
  """DeePEn over the models of ``vocab``: logits over its strings ``S`` (the main model's
  tokens after the inverse map). Give the models (their input embeddings are read) or
  ``embeddings`` [V_i, d] directly. Decode with `generate_cross`."""
  m = len(vocab.tokenizers)
  embs = ([input_embeddings(x) for x in models] if len(models)
          else [np.asarray(e) for e in embeddings])
  if len(embs) != m:
    raise KfuseError(f"deepen: {len(embs)} models / embeddings for {m} tokenizers")
  for i, e in enumerate(embs):
    if e.ndim != 2 or e.shape[0] != len(vocab.sid[i]):
      raise KfuseError(f"deepen: embeddings {i} have shape {e.shape}, expected"
                       f" [{len(vocab.sid[i])}, d]")
  if not (isinstance(main, int) and 0 <= main < m):
    raise KfuseError(f"deepen: main must be a model index in [0, {m}), got {main!r}")
  w = [1.0] * m if weights is None else [P._finite("deepen: weight", x, 0.0) for x in weights]
  if len(w) != m or sum(w) <= 0:
    raise KfuseError(f"deepen: need {m} non-negative weights with a positive sum, got {weights}")
  w = tuple(x / sum(w) for x in w)
  temperature = P._finite("deepen: temperature", temperature, 0.0, lo_open=True)
  lr = P._finite("deepen: lr", lr, 0.0)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise KfuseError(f"deepen: steps must be an integer >= 0, got {steps!r}")
  anchors = vocab.common()
  if not len(anchors):
    raise KfuseError("deepen: the tokenizers share no token string (no anchors)")
  mats = tuple(transfer_matrix(e, vocab.fill[i][anchors], temperature) for i, e in enumerate(embs))
  n = len(vocab)

  def init(logits):
    P._check_count(proc, P.as_tuple(logits))
    return DeePEnState(tuple(jnp.asarray(x) for x in mats),
                       tuple(jnp.asarray(s > 0) for s in vocab.sid), jnp.asarray(vocab.sid[main]))

  def apply(logits, state):
    z = P.as_tuple(logits)
    rbar = sum(wi * relative(zi, pi, vi) for wi, zi, pi, vi in zip(w, z, state.p, state.valid)
               if wi > 0)
    zm = jnp.where(state.valid[main][None], _float(z[main]), P.NEG)
    zs = inverse_map(zm, rbar, state.p[main], steps, lr)
    zs = jnp.where(state.valid[main][None], zs, P.NEG)
    out = jnp.full((zs.shape[0], n), P.NEG, zs.dtype).at[:, state.sid].max(zs)
    return out.at[:, 0].set(P.NEG), state

  proc = P.Processor(init, apply, m, f"deepen(main={main}, steps={steps})", vocab)
  return proc
