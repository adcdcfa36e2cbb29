"""Fusion losses (MinCE / AvgCE, sparse targets, λ·CLM + (1−λ)·fusion) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse.distill import losses as DL
from kfuse.errors import KfuseError
from kfuse.fusion import losses as F

S, B, T, V, K = 3, 2, 5, 40, 4


def _data(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(B, T, V)).astype(np.float32)
  idx = np.stack([[[rng.choice(V, K, replace=False) for _ in range(T)] for _ in range(B)]
                  for _ in range(S)]).astype(np.int32)
  lg = rng.normal(size=(S, B, T, K)).astype(np.float32) * 2
  idx[0, 0, 1, 1:] = -1          # a one-hot fallback (one stored entry)
  idx[1, 1, 2, 2:] = -1          # a short list
  ce_seq = rng.uniform(0.5, 3.0, size=(S, B)).astype(np.float32)
  ce_tok = rng.uniform(0.5, 3.0, size=(S, B, T)).astype(np.float32)
  where = np.ones((B, T), bool)
  where[1, -1] = False
  return z, idx, lg, ce_seq, ce_tok, where


def _dense_targets(idx, lg, temperature=1.0):
  """float64 [S, B, T, V]: softmax over the stored entries scattered into the vocabulary."""
  p = np.zeros(idx.shape[:-1] + (V,))
  for s, b, t in np.ndindex(*idx.shape[:-1]):
    keep = idx[s, b, t] >= 0
    e = np.exp(lg[s, b, t][keep].astype(np.float64) / temperature)
    p[s, b, t, idx[s, b, t][keep]] = e / e.sum()
  return p


def _np_weights(ce, fusion):
  r = np.exp(-ce.astype(np.float64))
  if fusion == "min_ce":
    return (np.arange(S)[:, None] == np.argmax(r, 0)[None]).reshape(r.shape).astype(float) \
        if r.ndim == 2 else (np.arange(S)[:, None, None] == np.argmax(r, 0)[None]).astype(float)
  e = np.exp(r - r.max(0))
  return e / e.sum(0)


def _np_loss(z, idx, lg, ce, fusion, where, temperature=1.0):
  logq = z.astype(np.float64) / temperature
  logq = logq - logq.max(-1, keepdims=True)
  logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
  w = _np_weights(ce, fusion)
  w = w[..., None] if w.ndim == 2 else w
  target = np.sum(w[..., None] * _dense_targets(idx, lg, temperature), axis=0)   # [B, T, V]
  per_tok = -np.sum(target * logq, -1)
  return (per_tok * where).sum() / where.sum()


@pytest.mark.parametrize("fusion", F.FUSIONS)
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_fusion_loss_matches_dense_float64(fusion, level):
  z, idx, lg, ce_seq, ce_tok, where = _data()
  ce = ce_seq if level == "sequence" else ce_tok
  got = F.fusion_loss(jnp.asarray(z), jnp.asarray(idx), jnp.asarray(lg), jnp.asarray(ce),
                      fusion, 1.0, jnp.asarray(where))
  np.testing.assert_allclose(float(got), _np_loss(z, idx, lg, ce, fusion, where), rtol=1e-5)
  got_t = F.fusion_loss(jnp.asarray(z), jnp.asarray(idx), jnp.asarray(lg), jnp.asarray(ce),
                        fusion, 2.0, jnp.asarray(where))
  np.testing.assert_allclose(float(got_t), _np_loss(z, idx, lg, ce, fusion, where, 2.0), rtol=1e-5)


def test_weights_are_softmax_of_exp_minus_ce_and_min_ce_picks_lowest_ce():
  ce = np.array([[1.0, 0.2], [0.5, 0.2], [2.0, 3.0]], np.float32)
  w = np.asarray(F.source_weights(jnp.asarray(ce), "avg_ce"))
  r = np.exp(-ce.astype(np.float64))
  np.testing.assert_allclose(w, np.exp(r) / np.exp(r).sum(0), rtol=1e-6)
  m = np.asarray(F.source_weights(jnp.asarray(ce), "min_ce"))
  assert m[:, 0].tolist() == [0, 1, 0] and m[:, 1].tolist() == [1, 0, 0]  # tie -> first source


def test_objective_total_is_lambda_clm_plus_fusion_and_decay():
  z, idx, lg, ce_seq, _, where = _data(1)
  y = np.random.default_rng(2).integers(0, V, (B, T)).astype(np.int32)
  batch = {"x": None, "y": jnp.asarray(y), "where": jnp.asarray(where),
           "topk_indices": jnp.asarray(idx), "topk_logits": jnp.asarray(lg),
           "topk_ce": jnp.asarray(ce_seq)}

  class Out:
    logits = jnp.asarray(z)
  logq = z.astype(np.float64) - np.log(np.exp(z.astype(np.float64)).sum(-1, keepdims=True))
  clm = -(np.take_along_axis(logq, y[..., None], -1)[..., 0] * where).sum() / where.sum()
  fuse = _np_loss(z, idx, lg, ce_seq, "avg_ce", where)
  obj = F.objective("avg_ce", 0.9)
  total, m = obj.loss({}, Out, None, batch, jnp.asarray(0))
  np.testing.assert_allclose(float(total), 0.9 * clm + 0.1 * fuse, rtol=1e-5)
  np.testing.assert_allclose(float(m["clm"]), clm, rtol=1e-5)
  dec = F.objective("avg_ce", 0.9, decay=True, total_steps=10)
  total5, _ = dec.loss({}, Out, None, batch, jnp.asarray(5))
  np.testing.assert_allclose(float(total5), 0.95 * clm + 0.05 * fuse, rtol=1e-5)
  total20, _ = dec.loss({}, Out, None, batch, jnp.asarray(20))
  np.testing.assert_allclose(float(total20), clm, rtol=1e-5)


def test_gradient_matches_dense_target_gradient():
  z, idx, lg, ce_seq, _, where = _data(3)
  g = jax.grad(lambda zz: F.fusion_loss(zz, jnp.asarray(idx), jnp.asarray(lg),
                                         jnp.asarray(ce_seq), "avg_ce", 1.0, jnp.asarray(where)))(
      jnp.asarray(z))
  w = _np_weights(ce_seq, "avg_ce")[..., None, None]
  target = np.sum(w * _dense_targets(idx, lg), 0)
  q = np.exp(z.astype(np.float64))
  q /= q.sum(-1, keepdims=True)
  want = (q * target.sum(-1, keepdims=True) - target) * where[..., None] / where.sum()
  np.testing.assert_allclose(np.asarray(g), want, atol=1e-6)


def test_the_step_trains_with_the_distill_step_builder():
  from kfuse import distill
  from kfuse.models import get_model
  model = get_model("gpt", vocab_size=V, max_len=T, dim=16, depth=1, num_heads=2)
  z, idx, lg, ce_seq, _, where = _data(4)
  x = jnp.asarray(np.random.default_rng(5).integers(0, V, (B, T)).astype(np.int32))
  variables = model.init(jax.random.key(0), x)
  step = distill.make_step(model, F.objective("min_ce"), optax.adam(1e-2))
  state = step.init(variables, x)
  batch = {"x": x, "y": jnp.roll(x, -1, 1), "where": jnp.asarray(where),
           "topk_indices": jnp.asarray(idx), "topk_logits": jnp.asarray(lg),
           "topk_ce": jnp.asarray(ce_seq)}
  losses = []
  for i in range(5):
    state, m = step(state, batch, jax.random.key(i))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] and np.isfinite(losses).all()


def test_bad_fusion_inputs():
  z, idx, lg, ce_seq, _, _ = _data()
  with pytest.raises(KfuseError, match="did you mean 'avg_ce'"):
    F.source_weights(jnp.asarray(ce_seq), "avgce")
  with pytest.raises(KfuseError, match="fusion ce"):
    F.fusion_loss(jnp.asarray(z), jnp.asarray(idx), jnp.asarray(lg), jnp.asarray(ce_seq[:2]))
  with pytest.raises(KfuseError, match="outside the student vocabulary"):
    F.fusion_loss(jnp.asarray(z[..., :10]), jnp.asarray(idx), jnp.asarray(lg), jnp.asarray(ce_seq))
  with pytest.raises(KfuseError, match="lm_loss_weight"):
    F.objective(lm_loss_weight=1.5)
  with pytest.raises(KfuseError, match="decay"):
    F.objective(decay=True)
