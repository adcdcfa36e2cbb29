"""UniTE: the union of every model's top-k tokens, across tokenizers (Yao et al., ICLR 2025).

"Determine-Then-Ensemble: Necessity of Top-k Union for Large Language Model Ensembling"
(official code: ``unite2.py``). Per step, over models i = 1..M with their own vocabularies:

    U   = ∪_i { surface(v) : v ∈ top-k(z_i) }              union of top-k strings
    z_i(s) = z_i[fill_i(s)]   for s ∈ U                    the same token, else the first
                                                          token of model i's encoding of s
    p_i = softmax_{s ∈ U} z_i(s),   p = Σ_i w_i p_i        (w normalised; UniTE: w_i = 1/M)
    next string = argmax_s p(s)                           (greedy in the paper)

Returned as logits over the union string vocabulary ``S`` of a `CrossVocab`: log p(s) on U,
`processors.NEG` elsewhere, so temperature / top-k / top-p sampling applies unchanged.
A string proposed by several models counts once. Ids a model has beyond its tokenizer
never enter U. With one model, or identical models and tokenizers, p is the model's own
distribution renormalised over its top-k, so greedy decoding is the model's.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kfuse.decode import processors as P
from kfuse.decode.crossvocab import CrossVocab
from kfuse.errors import KfuseError

__all__ = ["unite", "unite_union", "UniTEState"]


class UniTEState(NamedTuple):
  """The vocabulary tables (per model: sid [V_i], fill [|S|]), carried as arrays."""
  sid: tuple
  fill: tuple


def unite_union(logits: Sequence[jax.Array], sid: Sequence[jax.Array],
                fill: Sequence[jax.Array], k: int, weights: jax.Array):
  """The union and its averaged distribution: (cand [B, C] S-indices, p [B, C]), C = M·k.

  ``logits``: per model [B, V_i]; ``sid``/``fill``: the `CrossVocab` tables; ``weights`` [M]
  summing to 1. A repeated candidate (same string from another model or rank) and the
  "no string" entry 0 have p = 0.
  """
  cands = []
  for z, s in zip(logits, sid):
    z = jnp.where(s[None] > 0, z.astype(jnp.float32), P.NEG)
    cands.append(s[jax.lax.top_k(z, min(k, z.shape[-1]))[1]])
  cand = jnp.concatenate(cands, axis=1)                                   # [B, C]
  c = cand.shape[1]
  earlier = jnp.tril(jnp.ones((c, c), bool), -1)                          # [i, j]: j < i
  dup = jnp.any((cand[:, :, None] == cand[:, None, :]) & earlier[None], axis=-1)
  valid = ~dup & (cand > 0)
  p = jnp.zeros(cand.shape, jnp.float32)
  for z, f, w in zip(logits, fill, weights):
    ids = f[cand]
    zc = jnp.take_along_axis(z.astype(jnp.float32), jnp.maximum(ids, 0), axis=-1)
    zc = jnp.where(valid & (ids >= 0), zc, P.NEG)
    p = p + w * jax.nn.softmax(zc, axis=-1)
  return cand, jnp.where(valid, p, 0.0)


def unite(vocab: CrossVocab, k: int = 10, weights: Sequence[float] | None = None) -> P.Processor:
  """UniTE over the models of ``vocab`` (in its order): logits over its strings ``S``.

  ``k``: each model's top-k (the paper's k = 10); ``weights``: one per model (default equal,
  the paper's λ = 0.5 for two), normalised to sum 1. Decode with `generate_cross`.
  """
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise KfuseError(f"unite: k must be an integer >= 1, got {k!r}")
  m = len(vocab.tokenizers)
  w = [1.0] * m if weights is None else [P._finite("unite: weight", x, 0.0) for x in weights]
  if len(w) != m or sum(w) <= 0:
    raise KfuseError(f"unite: need {m} non-negative weights with a positive sum, got {weights}")
  w = tuple(x / sum(w) for x in w)
  n = len(vocab)

  def init(logits):
    P._check_count(proc, P.as_tuple(logits))
    return UniTEState(tuple(jnp.asarray(s) for s in vocab.sid),
                      tuple(jnp.asarray(f) for f in vocab.fill))

  def apply(logits, state):
    cand, p = unite_union(P.as_tuple(logits), state.sid, state.fill, k, jnp.asarray(w))
    rows = jnp.arange(cand.shape[0])[:, None]
    lp = jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-38)), P.NEG)
    return jnp.full((cand.shape[0], n), P.NEG, jnp.float32).at[rows, cand].max(lp), state

  proc = P.Processor(init, apply, m, f"unite(k={k})", vocab)
  return proc
