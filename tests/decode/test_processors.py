"""Fusion rules: proxy-tuning, DLF and ensembles against float64 NumPy / SciPy references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from kfuse import decode
from kfuse.errors import KfuseError
from kfuse.models import hf

from .tiny import CONFIGS, tiny

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 30, 7], [33]]
IDS = np.array([[5, 17, 3, 8, 21, 40, 2, 9], [9, 1, 44, 2, 30, 7, 7, 12]], np.int32)


@pytest.fixture(scope="module")
def trio():
  large = tiny("llama", seed=10)
  small = tiny("llama", seed=11)
  return large, small, tiny("llama", seed=12, like=small, scale=0.1)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logits(model):
  return np.asarray(hf.forward(model, IDS), np.float64)[:, :-1]


def _picked(lp):
  return np.take_along_axis(lp, IDS[:, 1:, None], -1)[..., 0]


def test_proxy_tuning_with_alpha_zero_is_the_large_model(trio):
  large = trio[0]
  alone = decode.generate(large, PROMPTS, 6, return_logits=True)
  fused = decode.generate(list(trio), PROMPTS, 6, processor=decode.proxy_tune(0.0),
                          return_logits=True)
  np.testing.assert_array_equal(fused.tokens, alone.tokens)
  np.testing.assert_array_equal(fused.logits, alone.logits)


def test_proxy_tuning_scores_match_float64(trio):
  zl, zs, zt = (_logits(m) for m in trio)
  for alpha in (1.0, 0.5, 2.5):
    ref = _picked(_log_softmax(zl + alpha * (zt - zs)))
    got = decode.score(list(trio), IDS, decode.proxy_tune(alpha))
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_multi_expert_proxy_tuning_matches_float64(trio):
  large, small, t1 = trio
  t2 = tiny("llama", seed=13, like=small, scale=0.1)
  zl, zs, z1, z2 = (_logits(m) for m in (large, small, t1, t2))
  ref = _picked(_log_softmax(zl + 0.7 * (z1 - zs) + 0.4 * (z2 - zs)))
  got = decode.score([large, small, t1, t2], IDS, decode.proxy_tune((0.7, 0.4)))
  np.testing.assert_allclose(got, ref, atol=2e-4)


@pytest.mark.parametrize("rule", decode.ENSEMBLE_RULES)
def test_an_ensemble_of_identical_models_is_the_model(trio, rule):
  m = trio[0]
  alone = decode.generate(m, PROMPTS, 6)
  ens = decode.generate([m, m, m], PROMPTS, 6, processor=decode.ensemble(rule))
  np.testing.assert_array_equal(ens.tokens, alone.tokens)
  np.testing.assert_allclose(decode.score([m, m], IDS, decode.ensemble(rule, [0.3, 0.7])),
                             _picked(_log_softmax(_logits(m))), atol=2e-5)


def test_ensemble_rules_match_float64():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, (3, 4, 30)).astype(np.float32)
  w = np.array([0.2, 0.3, 0.5])
  lp = _log_softmax(z.astype(np.float64))
  ref = {"mean": np.log(np.einsum("m,mbv->bv", w, np.exp(lp))),
         "product": _log_softmax(np.einsum("m,mbv->bv", w, lp)),
         "max": lp.max(0)}
  for rule, r in ref.items():
    got, _ = decode.ensemble(rule, weights=list(w * 2)).apply(tuple(z), None)
    np.testing.assert_allclose(np.asarray(got), r, atol=1e-5)


# ----------------------------------------------------------------------------- DLF

def _kl(lp, lq):
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _dlf_f64(alpha, zl, zs, ze):
  """The paper's squared KL residuals, float64 NumPy (see processors.dlf_objective)."""
  ll, ls, le = _log_softmax(zl), _log_softmax(zs), _log_softmax(ze)
  lf = _log_softmax(zl + alpha @ (ze - zs))
  return float(np.sum((_kl(lf, ll) - _kl(le, ls)) ** 2 + (_kl(lf, le) - _kl(ll, ls)) ** 2))


def _dlf_solve_f64(zl, zs, ze, lo=0.0, hi=2.0):
  """Global minimum over [lo, hi]^T: a dense grid, then L-BFGS-B from the 5 best points."""
  t = ze.shape[0]
  g = np.linspace(lo, hi, 401 if t == 1 else 41)
  pts = np.stack(np.meshgrid(*[g] * t, indexing="ij"), -1).reshape(-1, t)
  vals = np.array([_dlf_f64(a, zl, zs, ze) for a in pts])
  best = (np.inf, None)
  for a0 in pts[np.argsort(vals)[:5]]:
    r = optimize.minimize(_dlf_f64, a0, args=(zl, zs, ze), method="L-BFGS-B",
                          bounds=[(lo, hi)] * t, options=dict(ftol=1e-15, gtol=1e-12))
    best = min(best, (r.fun, tuple(r.x)))
  return best[0], np.array(best[1])


@pytest.mark.parametrize("experts", [1, 2, 3])
def test_dlf_objective_matches_float64_kls(experts):
  """The closed form over precomputed terms (one logsumexp, 2T dots per α) = the KLs."""
  rng = np.random.default_rng(10 + experts)
  zl = rng.normal(0, 2, 50)
  zs = zl + rng.normal(0, 1, 50)
  ze = zs + rng.normal(0, 1, (experts, 50))
  for alpha in rng.uniform(0, 2, (5, experts)):
    got = float(decode.dlf_objective(alpha.astype(np.float32), *(x.astype(np.float32)
                                                                  for x in (zl, zs, ze))))
    ref = _dlf_f64(alpha, zl, zs, ze)
    assert abs(got - ref) <= 1e-5 + 1e-5 * ref, (alpha, got, ref)


@pytest.mark.parametrize("experts", [1, 2])
def test_dlf_weights_reach_the_float64_optimum(experts):
  rng = np.random.default_rng(experts)
  b, v = 6, 40
  zl = rng.normal(0, 2, (b, v))
  zs = zl + rng.normal(0, 1, (b, v))          # the small model: near the large one
  ze = zs[:, None] + rng.normal(0, 1, (b, experts, v)) * rng.uniform(0.3, 2, (b, experts, 1))
  got = np.asarray(decode.dlf_weights(*(x.astype(np.float32) for x in (zl, zs, ze))),
                   np.float64)
  assert got.shape == (b, experts) and (got >= 0).all() and (got <= 2).all()
  for i in range(b):
    f_ref, a_ref = _dlf_solve_f64(zl[i], zs[i], ze[i])
    f_got = _dlf_f64(got[i], zl[i], zs[i], ze[i])
    assert f_got <= f_ref + 1e-5 + 1e-3 * f_ref, (i, got[i], a_ref, f_got, f_ref)
    if experts == 1:
      assert abs(got[i, 0] - a_ref[0]) < 2e-2, (i, got[i], a_ref)


@pytest.mark.slow
def test_dlf_generation_reports_weights_and_is_the_large_model_when_experts_did_not_move(trio):
  large, small, tuned = trio
  out = decode.generate([large, small, tuned, small], PROMPTS, 5, processor=decode.dlf(2))
  alpha = np.asarray(out.state.alpha)
  assert alpha.shape == (3, 2) and (alpha >= 0).all() and (alpha <= 2).all()
  alone = decode.generate(large, PROMPTS, 5, return_logits=True)
  same = decode.generate([large, small, small], PROMPTS, 5, processor=decode.dlf(1),
                         return_logits=True)
  np.testing.assert_array_equal(same.tokens, alone.tokens)
  np.testing.assert_allclose(same.logits, alone.logits, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_line(trio):
  large, small, tuned = trio

  cases = [
      (lambda: decode.proxy_tune(float("inf")), "alpha: must be finite"),
      (lambda: decode.proxy_tune((1.0, float("nan")), experts=2), "must be finite"),
      (lambda: decode.generate(large, [[1, 2], []], 3), "prompt 1: empty"),
      (lambda: decode.generate(large, [], 3), "no prompts"),
      (lambda: decode.generate(large, [list(range(60))], 10), "exceeds model 0's context of 64"),
      (lambda: decode.generate([large, small], PROMPTS, 3, processor=decode.proxy_tune(1.0)),
       "reads 3 model(s)' logits, got 2 models"),
      (lambda: decode.generate(large, PROMPTS, 3, stop_tokens=[999]), "outside the vocabulary"),
      (lambda: decode.generate(large, PROMPTS, 3, temperature=1.0), "needs key="),
      (lambda: decode.ensemble("mena"), "did you mean 'mean'"),
  ]
  for fn, msg in cases:
    with pytest.raises(KfuseError) as e:
      fn()
    assert msg in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))


def test_different_vocabularies_name_the_method_to_use_instead(trio):
  large, small, tuned = trio
  cfg = dict(CONFIGS["llama"], vocab_size=80)
  wide = hf.build(hf.from_hf(cfg))
  with pytest.raises(KfuseError) as e:
    decode.generate([wide, small, tuned], PROMPTS, 3, processor=decode.proxy_tune(1.0))
  msg = str(e.value)
  assert "vocab_size 80 vs 61 vs 61" in msg and "UniTE or DeePEn" in msg and "\n" not in msg


def test_a_stop_string_must_be_one_token():
  from tokenizers import Tokenizer, models, pre_tokenizers
  raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = hf.Tokenizer(raw, "tok.json")
  assert decode.stop_token_ids(tok, ["b", 7]) == (1, 7)
  with pytest.raises(KfuseError, match=r"stop token 'a b': the tokenizer encodes it as 2"):
    decode.stop_token_ids(tok, ["a b"])
