"""Cross-vocabulary ensembles: UniTE and DeePEn against float64 NumPy restatements, and
identical / single-weight ensembles against the one model's own greedy decoding."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

from kfuse import decode
from kfuse.data import text
D = importlib.import_module("kfuse.decode.deepen")   # the module (decode.deepen is the rule)
from kfuse.errors import KfuseError
from kfuse.fusion.align import surfaces

from .tiny import tiny

PROMPT = "def main(x):"
NEW = 8


@pytest.fixture(scope="module")
def toks():
  """Two byte-level BPE tokenizers trained on different text: different vocabularies."""
  return (text.train_tokenizer("bpe", 300, domains=("pysource",)),
          text.train_tokenizer("bpe", 320, domains=("shakespeare",)))


@pytest.fixture(scope="module")
def pair(toks):
  a = tiny("llama", seed=20, scale=0.15, vocab=300)
  b = tiny("gpt2", seed=21, scale=0.15, vocab=320)
  return a, b, decode.CrossVocab(list(toks), [300, 320])


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


# ---------------------------------------------------------------- the union vocabulary


def test_cross_vocab_tables_follow_the_tokenizers(toks):
  vocab = decode.CrossVocab(list(toks), [300, 330])      # the second model has 10 spare ids
  assert len(set(vocab.strings)) == len(vocab.strings)
  for i, tok in enumerate(toks):
    surf = surfaces(tok)
    assert (vocab.sid[i][len(surf):] == 0).all()
    for t, s in enumerate(surf):
      if not s.startswith(b"\x00"):
        assert vocab.strings[vocab.sid[i][t]] == s
    first = {}
    for t, s in enumerate(surf):
      first.setdefault(s, t)
    for j, s in enumerate(vocab.strings[1:], 1):
      if s.startswith(b"\x00"):
        continue
      if s in first:
        assert vocab.exact[i][j] and vocab.fill[i][j] == first[s]
        continue
      ids = tok.encode(s.decode("utf-8", errors="replace")).ids
      assert not vocab.exact[i][j] and vocab.fill[i][j] == ids[0]
      np.testing.assert_array_equal(vocab.pieces(i, j), ids)
      try:
        s.decode("utf-8")
      except UnicodeDecodeError:
        continue
      assert b"".join(surf[t] for t in vocab.pieces(i, j)) == s
  common = (set(surfaces(toks[0])) & set(surfaces(toks[1]))) - {b"\x00"}   # shared specials too
  assert {vocab.strings[j] for j in vocab.common()} == common


# ---------------------------------------------------------------- UniTE


def _np_unite(logits, toks, k, weights):
  """UniTE restated over surface strings in float64: {string: averaged probability}."""
  surf = [surfaces(t) for t in toks]
  ids = [{} for _ in toks]
  for d, s in zip(ids, surf):
    for t, x in enumerate(s):
      d.setdefault(x, t)
  union = []
  for z, s in zip(logits, surf):
    real = np.array([x != b"\x00" for x in s] + [False] * (len(z) - len(s)))
    zz = np.where(real, z, -np.inf)
    for t in np.argsort(-zz, kind="stable")[:k]:
      if s[t] not in union:
        union.append(s[t])
  p = np.zeros(len(union))
  for z, d, tok, w in zip(logits, ids, toks, weights):
    pick = [d[s] if s in d else -1 if s.startswith(b"\x00")
            else tok.encode(s.decode("utf-8", errors="replace")).ids[0] for s in union]
    zz = np.where(np.asarray(pick) >= 0, np.asarray(z, np.float64)[pick], -np.inf)
    p += w * _softmax(zz)
  return dict(zip(union, p))


@pytest.mark.parametrize("k,weights", [(1, (0.5, 0.5)), (5, (0.5, 0.5)), (10, (0.8, 0.2))])
def test_unite_matches_a_float64_restatement(pair, toks, k, weights):
  vocab = pair[2]
  rng = np.random.default_rng(k)
  logits = (rng.normal(0, 3, (3, 300)).astype(np.float32),
            rng.normal(0, 3, (3, 320)).astype(np.float32))
  proc = decode.unite(vocab, k=k, weights=weights)
  out, _ = jax.jit(proc.apply)(logits, proc.init(logits))
  out = np.asarray(out)
  for r in range(3):
    ref = _np_unite([z[r] for z in logits], toks, k, weights)
    got = {vocab.strings[j]: np.exp(out[r, j]) for j in np.flatnonzero(out[r] > -1e29)}
    assert set(got) == set(ref)
    for s, p in ref.items():
      np.testing.assert_allclose(got[s], p, rtol=1e-5, atol=1e-7)


def test_unite_and_deepen_of_identical_models_are_the_model(toks):
  model = tiny("llama", seed=22, scale=0.15, vocab=300)
  vocab = decode.CrossVocab([toks[0], toks[0]], [300, 300])
  alone = decode.generate(model, [toks[0].encode(PROMPT).ids.tolist()], NEW,
                          return_logits=True)
  for proc in (decode.unite(vocab, k=10), decode.deepen(vocab, [model, model])):
    out = decode.generate_cross([model, model], vocab, [PROMPT], NEW, processor=proc)
    assert out.tokens[0][0] == out.tokens[0][1] == alone.tokens[0].tolist(), proc.name
  # the fused distribution itself: DeePEn gives the logits back (the inverse map's gradient
  # is exactly 0 at r̄ = q), UniTE the model's softmax renormalised over its top-k
  z = alone.logits[0]
  for proc in (decode.deepen(vocab, [model, model]), decode.unite(vocab, k=10)):
    out, _ = jax.jit(proc.apply)((z, z), proc.init((z, z)))
    real = vocab.sid[0] > 0          # all but the byte-0 token (surface b"\x00" = no string)
    assert real.sum() == 299
    got = np.asarray(out)[:, vocab.sid[0][real]]
    if proc.name.startswith("deepen"):
      np.testing.assert_allclose(got, z[:, real], rtol=0, atol=1e-5)
    else:
      for g, row in zip(got, z[:, real].astype(np.float64)):
        top = np.argsort(-row)[:10]
        np.testing.assert_allclose(np.exp(g[top]), _softmax(row[top]), rtol=1e-5)
        assert (g[np.argsort(-row)[10:]] < -1e29).all()


def test_all_weight_on_one_model_decodes_that_model_beside_another_vocabulary(pair, toks):
  a, b, vocab = pair
  alone = decode.generate(a, [toks[0].encode(PROMPT).ids.tolist()], NEW).tokens[0].tolist()
  for proc in (decode.unite(vocab, weights=(1.0, 0.0)),
               decode.deepen(vocab, [a, b], weights=(1.0, 0.0))):
    out = decode.generate_cross([a, b], vocab, [PROMPT], NEW, processor=proc)
    assert out.tokens[0][0] == alone, proc.name
    # both feeding paths ran: one program for one-token strings, and a string that is
    # several tokens for the second model (fed one by one, then fused and picked)
    assert any(len(vocab.pieces(1, s)) > 1 for s in out.strings[0][:-1])
    assert any(len(vocab.pieces(1, s)) == 1 for s in out.strings[0][:-1])
    fed_b = b"".join(surfaces(toks[1])[t] for t in out.tokens[0][1])
    want = b"".join(vocab.strings[s] for s in out.strings[0])
    assert fed_b.decode("utf-8", "replace") == want.decode("utf-8", "replace")


# ---------------------------------------------------------------- DeePEn


def _np_kl_to(target, z, p):
  q = _softmax(z) @ p
  return float(np.sum(target * np.log(target / q)))


def test_deepen_inverse_gradient_matches_finite_differences():
  rng = np.random.default_rng(3)
  p = rng.dirichlet(np.ones(6), size=9)                 # [V=9, A=6], rows sum to 1
  target = rng.dirichlet(np.ones(6))
  z = rng.normal(0, 1, 9)
  h = 1e-6
  fd = np.array([(_np_kl_to(target, z + h * e, p) - _np_kl_to(target, z - h * e, p)) / (2 * h)
                 for e in np.eye(9)])
  got = np.asarray(D.inverse_grad(z[None].astype(np.float32), target[None].astype(np.float32),
                                  p.astype(np.float32)))[0]
  np.testing.assert_allclose(got, fd, atol=2e-6)


def _np_deepen(logits, embs, anchors, weights, tau, steps, lr):
  """DeePEn restated in float64: transfer matrices, relative fusion, Adam inverse map."""
  mats = []
  for e, a in zip(embs, anchors):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    r = e @ e[a].T / tau
    r = np.exp(r - r.max(1, keepdims=True))
    mats.append(r / r.sum(1, keepdims=True))
  rbar = sum(w * (_softmax(z) @ m) for w, z, m in zip(weights, logits, mats))
  z, m1, m2 = logits[0].astype(np.float64), 0.0, 0.0
  for t in range(steps):
    s = _softmax(z)
    q = s @ mats[0]
    g = -np.array([s[v] * np.sum(rbar / q * (mats[0][v] - q)) for v in range(len(z))])
    m1 = 0.9 * m1 + 0.1 * g
    m2 = 0.999 * m2 + 0.001 * g * g
    rate = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
    z = z - rate * (m1 / (1 - 0.9 ** (t + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (t + 1))) + 1e-8)
  return z, rbar, mats


def test_deepen_matches_a_float64_restatement(pair):
  a, b, vocab = pair
  rng = np.random.default_rng(5)
  embs = [rng.normal(0, 1, (300, 16)), rng.normal(0, 1, (320, 16))]
  logits = (rng.normal(0, 2, (2, 300)), rng.normal(0, 2, (2, 320)))
  anchors_s = vocab.common()
  anchors = [vocab.fill[i][anchors_s] for i in range(2)]
  for i in range(2):   # anchors are the same strings in both vocabularies
    assert [surfaces(vocab.tokenizers[i])[t] for t in anchors[i]] == \
        [vocab.strings[j] for j in anchors_s]
  real = [vocab.sid[i] > 0 for i in range(2)]
  proc = decode.deepen(vocab, embeddings=embs, weights=(0.6, 0.4), temperature=0.2, steps=4,
                       lr=0.15)
  f32 = tuple(z.astype(np.float32) for z in logits)
  out32 = np.asarray(jax.jit(proc.apply)(f32, proc.init(f32))[0])
  with jax.enable_x64(True):      # the same maths in float64: the rule itself, to rounding
    mats = [D.transfer_matrix(e, x, 0.2, np.float64) for e, x in zip(embs, anchors)]
    rbar = 0.6 * D.relative(logits[0], mats[0], real[0]) + \
        0.4 * D.relative(logits[1], mats[1], real[1])
    z64 = np.asarray(D.inverse_map(np.where(real[0], logits[0], -1e30), rbar, mats[0], 4, 0.15))
  for r in range(2):
    ref, rbar_r, mats_r = _np_deepen([np.where(real[0], logits[0][r], -np.inf),
                                      np.where(real[1], logits[1][r], -np.inf)],
                                     embs, anchors, (0.6, 0.4), 0.2, 4, 0.15)
    np.testing.assert_allclose(z64[r, real[0]], ref[real[0]], rtol=0, atol=1e-9)
    # float32 (the processor): Adam divides by sqrt(v) + 1e-8, so logits of tokens whose
    # gradient is near 1e-8 move by a float32-sensitive amount; measured ≤ 0.02 here
    np.testing.assert_allclose(out32[r, vocab.sid[0][real[0]]], ref[real[0]], atol=0.03)
    # the map moved the main model's relative representation toward the fused one
    kl = lambda z: np.sum(rbar_r * np.log(rbar_r / (_softmax(z[real[0]]) @ mats_r[0][real[0]])))
    assert kl(ref) < kl(logits[0][r])


# ---------------------------------------------------------------- decoding and bad input


def test_cross_vocab_decoding_stops_and_is_deterministic(pair):
  a, b, vocab = pair
  proc = decode.unite(vocab, k=5)
  free = decode.generate_cross([a, b], vocab, [PROMPT, "To be"], NEW, processor=proc)
  assert [len(s) for s in free.strings] == [NEW, NEW]
  again = decode.generate_cross([a, b], vocab, [PROMPT, "To be"], NEW, processor=proc)
  assert again.strings == free.strings and again.texts == free.texts
  stop = vocab.strings[free.strings[0][2]]
  if not stop.startswith(b"\x00"):
    cut = decode.generate_cross([a, b], vocab, [PROMPT], NEW, processor=proc,
                                stop=[stop.decode("utf-8", "replace")])
    first = free.strings[0].index(free.strings[0][2])
    assert cut.strings[0] == free.strings[0][:first + 1]


def test_cross_vocab_bad_input_is_one_line(pair, toks):
  a, b, vocab = pair
  cases = [
      (lambda: decode.generate([a, b], [[1, 2]], 3, processor=decode.unite(vocab)),
       "generate_cross"),
      (lambda: decode.generate_cross([a, b], vocab, [PROMPT], 3,
                                     processor=decode.ensemble("mean")), "decode.generate"),
      (lambda: decode.generate_cross([a, b], vocab, [""], 3, processor=decode.unite(vocab)),
       "prompt 0: must be a non-empty string"),
      (lambda: decode.generate_cross([a, b], vocab, [PROMPT], 3, processor=decode.unite(vocab),
                                     stop=["no such token at all"]), "not a token of any"),
      (lambda: decode.CrossVocab(list(toks), [300, 100]), "not this model's tokenizer"),
      (lambda: decode.unite(vocab, weights=(1.0,)), "need 2 non-negative weights"),
      (lambda: decode.unite(vocab, k=0), "k must be an integer >= 1"),
      (lambda: decode.deepen(vocab, [a]), "1 models / embeddings for 2 tokenizers"),
      (lambda: decode.deepen(vocab, [a, b], temperature=float("nan")), "must be finite"),
  ]
  for fn, msg in cases:
    with pytest.raises(KfuseError) as e:
      fn()
    assert msg in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))
