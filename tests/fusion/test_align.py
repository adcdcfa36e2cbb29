"""Tests for kfuse.fusion.align against pure-Python references (FuseAI's DTW, brute force)."""

import collections
import os
import random

import numpy as np
import pytest

from kfuse.data import text
from kfuse.errors import KfuseError
from kfuse.fusion import align as A
from tests.fusion import fuseai_ref as ref

HARD = "Ligne 1\r\n\tdef f(x):  # tab\té 😀 e\u0301 — ok\n\nreturn x  # done\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("kfuse_align_cache"))


@pytest.fixture(scope="module")
def toks(cache):
  kw = dict(domains=("pydoc",), max_chars=20_000, cache_dir=cache)
  return {"bpe": text.train_tokenizer("bpe", 400, True, **kw),
          "wp": text.train_tokenizer("wordpiece", 500, False, **kw),
          "bpe_char": text.train_tokenizer("bpe", 600, False, **kw)}


def _rand_bytes(rng, n):
  return [bytes(rng.choice(b"abcde ") for _ in range(rng.randint(0, 7))) for _ in range(n)]


def test_edit_distance_matches_levenshtein():
  rng = random.Random(0)
  a, b = _rand_bytes(rng, 40), _rand_bytes(rng, 30)
  d = A.edit_distance(a, b)
  want = np.array([[ref.levenshtein(x, y) for y in b] for x in a])
  np.testing.assert_array_equal(d, want)


def test_nearest_is_the_first_minimum():
  rng = random.Random(1)
  cands = _rand_bytes(rng, 200)
  for q in _rand_bytes(rng, 30):
    assert A.nearest(q, cands) == ref.nearest(q, cands)


def test_dtw_ranges_reproduce_fuseai_dtw_exactly():
  rng = random.Random(2)
  for _ in range(20):
    n, m = rng.randint(1, 12), rng.randint(1, 12)
    cost = np.array([[rng.randint(0, 3) for _ in range(m)] for _ in range(n)], float)
    _, want = ref.dtw(list(range(n)), list(range(m)), lambda i, j: cost[i, j])
    lo, hi = A.dtw_ranges(cost)
    assert [list(range(a, b)) for a, b in zip(lo, hi)] == want


def test_align_dtw_on_real_tokenizations_equals_reference(toks):
  sa, sb = A.surfaces(toks["bpe"]), A.surfaces(toks["wp"])
  doc = text.split("pydoc").test[0][1][:600]
  ia, ib = toks["bpe"].encode(doc).ids, toks["wp"].encode(doc).ids
  base, blend = [sa[i] for i in ia], [sb[i] for i in ib]
  lo, hi = A.align_dtw(base, blend)
  want = ref.fusellm_base_to_blending([s.replace(b" ", b"") for s in base],
                                      [s.replace(b" ", b"") for s in blend])
  assert [list(range(a, b)) for a, b in zip(lo, hi)] == want


def _brute_overlap(bo, jo):
  out = []
  for s, e in bo:
    hits = [j for j, (a, b) in enumerate(jo) if min(e, b) > max(s, a)]
    if not hits:
      hits = [max([j for j, (a, _) in enumerate(jo) if a <= s] or [0])]
    out.append(hits)
  return out


@pytest.mark.parametrize("pair", [("bpe", "wp"), ("wp", "bpe"), ("bpe", "bpe_char")])
def test_offsets_alignment_is_the_span_overlap(toks, pair):
  for t in (HARD, "", "x", text.split("pysource").test[0][1][:2000]):
    ea, eb = toks[pair[0]].encode(t), toks[pair[1]].encode(t)
    if not len(eb.ids):
      with pytest.raises(KfuseError, match="empty tokenization"):
        A.align_offsets(ea.offsets, eb.offsets)
      continue
    lo, hi = A.align_offsets(ea.offsets, eb.offsets)
    assert [list(range(a, b)) for a, b in zip(lo, hi)] == _brute_overlap(ea.offsets, eb.offsets)


def test_offsets_errors_are_one_line():
  with pytest.raises(KfuseError, match="non-decreasing"):
    A.align_offsets(np.array([[3, 4], [0, 1]]), np.array([[0, 4]]))
  with pytest.raises(KfuseError, match=r"\[N, 2\]"):
    A.align_offsets(np.zeros((3,)), np.array([[0, 4]]))


def test_surfaces_normalise_boundary_markers(toks):
  sa = A.surfaces(toks["bpe"])
  raw = toks["bpe"]._tok
  gid = raw.token_to_id("Ġthe")
  assert gid is not None and sa[gid] == b" the"
  assert sa[0] == b"\x00<unk>"
  sw = A.surfaces(toks["wp"])
  cont = [i for i in range(raw.get_vocab_size()) if (toks["wp"]._tok.id_to_token(i) or "").startswith("##")]
  assert cont and all(not sw[i].startswith(b"#") for i in cont[:20])
  assert sw[toks["wp"]._tok.token_to_id("\u2581the")] == b" the"


def test_mined_vocab_map_exact_then_nearest_and_cached(toks, cache, monkeypatch):
  base, blend = toks["bpe"], toks["wp"]
  vm = A.vocab_map(base, blend, "mined", cache_dir=cache)
  sa, sb = A.surfaces(base), A.surfaces(blend)
  index = {}
  for i, s in enumerate(sa):
    index.setdefault(s, i)
  plain = [i for i, s in enumerate(sa) if not s.startswith(b"\x00")]
  rng = random.Random(3)
  for j in rng.sample(range(len(sb)), 40) + [0, 1, 2]:
    if sb[j] in index:
      assert vm[j] == index[sb[j]]
    else:
      assert vm[j] == plain[ref.nearest(sb[j], [sa[i] for i in plain])]
  assert vm[2] == 2  # <eos> <-> <eos>
  files = os.listdir(os.path.join(cache, "fusion", "vocab_maps"))
  assert len(files) == 1 and not files[0].startswith(".tmp")
  monkeypatch.setattr(A, "_mined", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
  np.testing.assert_array_equal(A.vocab_map(base, blend, "mined", cache_dir=cache), vm)


def test_ms_counts_are_sparse_and_mapping_follows_fusechat(toks):
  base, blend = toks["bpe"], toks["wp"]
  bases, blends = [], []
  for _, t in text.split("pydoc").val[:2]:
    ea, eb = base.encode(t[:1500]), blend.encode(t[:1500])
    lo, hi = A.align_offsets(ea.offsets, eb.offsets)
    for i, (a, b) in enumerate(zip(lo, hi)):
      for j in range(a, b):
        bases.append(ea.ids[i])
        blends.append(eb.ids[j])
  rows, cols, n = A.pair_counts(np.array(bases), np.array(blends), blend.vocab_size)
  assert dict(zip(zip(rows.tolist(), cols.tolist()), n.tolist())) == collections.Counter(zip(bases, blends))
  vm = A.vocab_map(base, blend, "ms", counts=(rows, cols, n), cache_dir=None)
  sa, sb = A.surfaces(base), A.surfaces(blend)
  for j in sorted(set(cols.tolist()))[:25]:
    if sb[j].startswith(b"\x00"):
      continue
    cand = [(r, c) for r, cj, c in zip(rows, cols, n) if cj == j]
    q = sb[j].replace(b" ", b"")

    def score(rc):
      s = sa[rc[0]].replace(b" ", b"")
      w = 0.1 if (q in s or s in q) else 1.0
      return ref.levenshtein(q, s) * w / (1 + np.exp(-float(rc[1])))
    scores = [score(rc) for rc in cand]
    assert vm[j] == cand[int(np.argmin(scores))][0]


def test_align_topk_one_to_one_n_to_one_one_to_n_and_next_token_fallback():
  # text "going home": base [go|ing| home], blending [going| ho|me]
  base_ids = np.array([10, 11, 12])
  base_off = np.array([[0, 2], [2, 5], [5, 10]])
  blend_off = np.array([[0, 5], [5, 8], [8, 10]])
  vm = np.full(50, -1)
  vm[[20, 21, 22, 23]] = [30, 31, 30, 32]            # 20 and 22 both map to base 30
  tid = np.array([[20, 21, 22], [23, 24, 20], [22, 20, 21]])
  tlg = np.array([[3., 2., 1.], [5., 4., 3.], [9., 8., 7.]], np.float32)
  idx, lg, matched = A.align_topk(base_ids, base_off, blend_off, tid, tlg, vm, next_id=13)
  # position 0 ("go"): no blending token ends at 2 -> one-hot on the NEXT token (11), not 10
  assert idx[0].tolist() == [11, -1, -1] and not matched[0]
  # position 1 ("ing" ends where "going" ends: n:1, learn from the last token)
  assert idx[1].tolist() == [30, 31, -1] and lg[1, :2].tolist() == [3., 2.] and matched[1]
  # position 2 (" home" = " ho" + "me": 1:n, the last piece's top-k; 24 unmapped dropped)
  assert idx[2].tolist() == [30, 31, -1] and lg[2, :2].tolist() == [9., 7.] and matched[2]


def test_align_topk_dtw_uses_fusechat_string_rules():
  base_s = [b"go", b"ing", b" home"]
  blend_s = [b"going", b" ho", b"me"]
  base_off = np.array([[0, 2], [2, 5], [5, 10]])
  blend_off = np.array([[0, 5], [5, 8], [8, 10]])
  vm = np.arange(50)
  tid = np.array([[1, 2], [3, 4], [5, 6]])
  tlg = np.zeros((3, 2), np.float32)
  idx, _, matched = A.align_topk(np.array([7, 8, 9]), base_off, blend_off, tid, tlg, vm,
                                 method="dtw", base_surfaces=base_s, blend_surfaces=blend_s)
  lo, hi = A.align_dtw(base_s, blend_s)
  want = ref.fusellm_base_to_blending([b"go", b"ing", b"home"], [b"going", b"ho", b"me"])
  assert [list(range(a, b)) for a, b in zip(lo, hi)] == want
  for i, js in enumerate(want):
    if len(js) == 1:
      assert matched[i] == (base_s[i].strip() in blend_s[js[0]])


def test_align_topk_bad_inputs():
  off = np.array([[0, 1]])
  with pytest.raises(KfuseError, match="did you mean 'offsets'"):
    A.align_topk(np.array([1]), off, off, np.zeros((1, 2), int), np.zeros((1, 2)), np.arange(3),
                 method="offset")
  with pytest.raises(KfuseError, match="blending top-k"):
    A.align_topk(np.array([1]), off, off, np.zeros((2, 2), int), np.zeros((2, 2)), np.arange(3))
  with pytest.raises(KfuseError, match="did you mean 'mined'"):
    A.vocab_map(None, None, "mind")


def test_aligned_pairs_enumerate_every_overlap(toks):
  ea, eb = toks["bpe"].encode(HARD), toks["wp"].encode(HARD)
  b, j = A.aligned_pairs(ea.ids, ea.offsets, eb.ids, eb.offsets)
  want = [(ea.ids[i], eb.ids[k]) for i, ks in enumerate(_brute_overlap(ea.offsets, eb.offsets)) for k in ks]
  assert list(zip(b.tolist(), j.tolist())) == want
