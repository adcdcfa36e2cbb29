"""Alignment between two tokenizations of the same text: tokens, vocabularies, distributions.

A *base* tokenizer (the target's) and a *blending* tokenizer (a source's) cut the same text
differently. Fusion needs, for every base position ``i``, the blending model's next-token
distribution re-expressed over the base vocabulary.

Token alignment (``base -> blending`` positions, as contiguous ranges ``[lo[i], hi[i])``):

* ``"offsets"`` (default): exact, from both tokenizers' character offsets: base token ``i``
  maps to the blending tokens whose character spans overlap its own. Vectorised
  (``np.searchsorted`` over the sorted span ends), no string comparison at all.
* ``"dtw"``: FuseLLM's alignment (Wan et al., "Knowledge Fusion of Large Language Models",
  ICLR 2024; FuseAI ``FuseLLM/src/utils/others.py:dtw``): dynamic time warping with the edit
  distance between token strings (boundary markers stripped) as cell cost, FuseAI's
  back-tracking tie rule (diagonal, then up, then left). Each DTW row is one min-plus scan
  (``np.minimum.accumulate``), so the table costs O(L_b) numpy calls, not L_b·L_j Python ones.

Vocabulary maps (blending id -> base id, ``-1`` = none), computed once per tokenizer pair and
cached (`vocab_map`):

* ``"mined"`` (FuseLLM ``vocab_mapping.py``): the token's surface bytes after boundary-marker
  normalisation (byte-level ``Ġ`` and Metaspace ``▁`` both become a space, a WordPiece ``##``
  prefix is dropped); the same surface in the base vocabulary, else the base token at the
  smallest edit distance (the first in id order among equals).
* ``"ms"`` (FuseChat-2 "mapping statistics", Wan et al., "FuseChat: Knowledge Fusion of Chat
  Models", 2024; ``FuseChat/train/align_token_and_vocab.py:token_align_mapping``): aligned
  (base id, blending id) pairs counted over a corpus, kept sparse (`pair_counts`, COO, never a
  |V_b| x |V_j| matrix); each blending token maps to the co-occurring base token minimising
  ``edit_distance · w · sigmoid(count)`` (w = 0.1 when one surface contains the other); tokens
  that never co-occur fall back to ``"mined"``.

Distribution alignment (`align_topk`): the blending model's top-K at position ``j`` predicts
the text after blending token ``j``'s end; the base position ``i`` predicts the text after
base token ``i``'s end. With offsets, the source distribution is used at ``i`` exactly when a
blending token ends where base token ``i`` ends: 1:1, the last base token of an n:1 group
("learn from the last token") and the last piece of a 1:n group (FuseChat-2's rule). Its
top-K ids go through the vocabulary map (first occurrence per base id kept, unmapped ids
dropped). Every other position is a one-hot on the **next** base token (the label), not the
current one (FuseAI issues #27/#28). With ``"dtw"`` the FuseChat-2 string rules decide
instead: 1:1 when the base surface is contained in the blending one; 1:n the last piece that
is a suffix of the base surface.

The aligned top-K is ``(indices [L, K] int32, logits [L, K] float32)`` with ``-1`` padding;
a one-hot fallback is one entry (id = label, logit 0.0), i.e. probability 1 under
`kfuse.distill.losses.topk_cross_entropy`'s softmax over stored entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from kfuse.errors import KfuseError
from kfuse.registry import suggest

__all__ = [
    "TOKEN_ALIGNMENTS",
    "VOCAB_MAPS",
    "surfaces",
    "edit_distance",
    "nearest",
    "align_offsets",
    "align_dtw",
    "dtw_ranges",
    "token_costs",
    "aligned_pairs",
    "pair_counts",
    "vocab_map",
    "align_topk",
]

TOKEN_ALIGNMENTS = ("offsets", "dtw")
VOCAB_MAPS = ("mined", "ms")

_BYTE_DECODER = None


def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
  global _BYTE_DECODER
  if _BYTE_DECODER is None:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
      if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
    _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
  return _BYTE_DECODER


def _raw(tok):
  return getattr(tok, "_tok", tok)


def _scheme(raw) -> tuple[bool, str | None]:
  """(byte_level, wordpiece continuation prefix or None) from the tokenizer's JSON."""
  spec = json.loads(raw.to_str())
  text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
  model = spec.get("model") or {}
  prefix = model.get("continuing_subword_prefix") if model.get("type") == "WordPiece" else None
  return '"ByteLevel"' in text, prefix


def surfaces(tok) -> list[bytes]:
  """Every token id's surface bytes, boundary markers normalised to a space.

  Byte-level (``Ġ``-style) tokens are mapped back to their bytes; Metaspace ``▁`` becomes
  ``b" "``; a WordPiece continuation prefix (``##``) is dropped. Added / special tokens get
  ``b"\\x00" + content`` so they only ever match each other.
  """
  raw = _raw(tok)
  byte_level, prefix = _scheme(raw)
  dec = _byte_decoder()
  added = {a.content for a in raw.get_added_tokens_decoder().values()}
  out = []
  for i in range(raw.get_vocab_size(with_added_tokens=True)):
    t = raw.id_to_token(i)
    if t is None:
      out.append(b"\x00")
    elif t in added:
      out.append(b"\x00" + t.encode("utf-8"))
    else:
      if prefix and t.startswith(prefix) and len(t) > len(prefix):
        t = t[len(prefix):]
      if byte_level and all(c in dec for c in t):
        out.append(bytes(dec[c] for c in t))
      else:
        out.append(t.replace("\u2581", " ").encode("utf-8"))
  return out


# ------------------------------------------------------------------ edit distance


def _pad(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  lens = np.fromiter((len(s) for s in strings), np.int64, len(strings))
  m = max(1, int(lens.max(initial=0)))
  arr = np.full((len(strings), m), -1, np.int16)
  for r, s in enumerate(strings):
    arr[r, :len(s)] = np.frombuffer(s, np.uint8)
  return arr, lens


def edit_distance(a: Sequence[bytes], b: Sequence[bytes]) -> np.ndarray:
  """Levenshtein distances ``[len(a), len(b)]`` between byte strings (unit costs).

  Wagner-Fischer over all pairs at once: O(max|a|·max|b|) numpy steps on ``[len(a), len(b)]``.
  """
  A, la = _pad(a)
  B, lb = _pad(b)
  na, nb, mb = len(a), len(b), B.shape[1]
  prev = np.broadcast_to(np.arange(mb + 1, dtype=np.int32), (na, nb, mb + 1)).copy()
  out = np.where(la[:, None] == 0, lb[None, :], 0).astype(np.int32)
  for r in range(A.shape[1]):
    cur = np.empty_like(prev)
    cur[:, :, 0] = r + 1
    neq = (A[:, r][:, None, None] != B[None, :, :]).astype(np.int32)
    sub = prev[:, :, :-1] + neq
    dele = prev[:, :, 1:] + 1
    best = np.minimum(sub, dele)
    for k in range(mb):
      cur[:, :, k + 1] = np.minimum(best[:, :, k], cur[:, :, k] + 1)
    prev = cur
    done = la == r + 1
    if done.any():
      out[done] = np.take_along_axis(prev[done], lb[None, :, None].repeat(done.sum(), 0), 2)[..., 0]
  return out


def nearest(query: bytes, cands: Sequence[bytes], lens: np.ndarray | None = None) -> int:
  """Index of the first candidate at the smallest edit distance from ``query``.

  Candidates are visited by length difference (a lower bound of the distance), so the
  search stops as soon as no unvisited candidate can tie the best distance found.
  """
  lens = np.fromiter((len(c) for c in cands), np.int64, len(cands)) if lens is None else lens
  gap = np.abs(lens - len(query))
  best, best_ids = None, []
  for d in np.unique(gap):
    if best is not None and d > best:
      break
    ids = np.nonzero(gap == d)[0]
    dist = edit_distance([query], [cands[i] for i in ids])[0]
    m = int(dist.min())
    if best is None or m < best:
      best, best_ids = m, list(ids[dist == m])
    elif m == best:
      best_ids += list(ids[dist == m])
  return int(min(best_ids))


# ------------------------------------------------------------------ token alignment


def _check_offsets(offsets: np.ndarray, name: str) -> np.ndarray:
  o = np.asarray(offsets, np.int64)
  if o.ndim != 2 or o.shape[1] != 2:
    raise KfuseError(f"{name}: offsets must be [N, 2] (start, end), got shape {o.shape}")
  if len(o) and ((o[:, 1] < o[:, 0]).any() or (np.diff(o[:, 0]) < 0).any()):
    raise KfuseError(f"{name}: offsets must be non-decreasing spans (start <= end); not one"
                     " tokenization of one text?")
  return o


def align_offsets(base_offsets: np.ndarray, blend_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact token alignment from character offsets: ``(lo, hi)`` blending ranges per base token.

  Base token ``i`` (span ``[s, e)``) maps to the blending tokens ``j`` with ``end_j > s`` and
  ``start_j < e`` (overlapping spans). An empty or uncovered span maps to the blending token
  covering its start (the last one starting at or before it). Both tokenizations must be
  of the same text.
  """
  bo = _check_offsets(base_offsets, "base")
  jo = _check_offsets(blend_offsets, "blending")
  if not len(jo):
    raise KfuseError("blending: empty tokenization (no tokens) to align to")
  ends = np.maximum.accumulate(jo[:, 1])
  lo = np.searchsorted(ends, bo[:, 0], side="right")
  hi = np.searchsorted(jo[:, 0], bo[:, 1], side="left")
  empty = hi <= lo
  fallback = np.clip(np.searchsorted(jo[:, 0], bo[:, 0], side="right") - 1, 0, len(jo) - 1)
  lo = np.where(empty, fallback, lo)
  hi = np.where(empty, fallback + 1, hi)
  return lo.astype(np.int64), hi.astype(np.int64)


def dtw_ranges(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """FuseAI's DTW over a cost matrix ``[L_blend, L_base]``: ``(lo, hi)`` per base position.

  Accumulated table ``D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])``; the
  path is traced back from the last cell choosing, among (diagonal, up, left), the first
  minimum, as ``others.py:dtw`` does. Row ``i`` is a min-plus scan:
  ``D[i, j] = C[j] + min_{k<=j}(a[k] - C[k])`` with ``a[k] = cost[i, k] + min(D[i-1, k],
  D[i-1, k-1])`` and ``C`` the row's cumulative cost.
  """
  c = np.asarray(cost, np.float64)
  n, m = c.shape
  D = np.empty((n, m))
  prev = np.full(m + 1, np.inf)
  prev[0] = 0.0
  for i in range(n):
    a = c[i] + np.minimum(prev[1:], prev[:-1])
    C = np.cumsum(c[i])
    D[i] = C + np.minimum.accumulate(a - C)
    prev = np.concatenate(([np.inf], D[i]))
  lo = np.full(m, n, np.int64)
  hi = np.zeros(m, np.int64)
  i, j = n - 1, m - 1
  while True:
    lo[j], hi[j] = min(lo[j], i), max(hi[j], i + 1)
    if i == 0 and j == 0:
      break
    diag = D[i - 1, j - 1] if i > 0 and j > 0 else np.inf
    up = D[i - 1, j] if i > 0 else np.inf
    left = D[i, j - 1] if j > 0 else np.inf
    move = int(np.argmin([diag, up, left]))
    if move == 0:
      i, j = i - 1, j - 1
    elif move == 1:
      i -= 1
    else:
      j -= 1
  return lo, hi


def token_costs(blend_strings: Sequence[bytes], base_strings: Sequence[bytes]) -> np.ndarray:
  """Edit distances ``[L_blend, L_base]`` between token strings, computed on unique pairs."""
  ub, inv_b = np.unique(np.array(blend_strings, dtype=object), return_inverse=True)
  ua, inv_a = np.unique(np.array(base_strings, dtype=object), return_inverse=True)
  d = edit_distance(list(ub), list(ua))
  return d[inv_b[:, None], inv_a[None, :]]


def _strip(s: bytes) -> bytes:
  return s.replace(b" ", b"")


def align_dtw(base_surfaces: Sequence[bytes], blend_surfaces: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """FuseLLM's MinED DTW on token surfaces with boundary markers (spaces) stripped."""
  cost = token_costs([_strip(s) for s in blend_surfaces], [_strip(s) for s in base_surfaces])
  return dtw_ranges(cost)


# ------------------------------------------------------------------ vocabulary maps


def aligned_pairs(base_ids, base_offsets, blend_ids, blend_offsets) -> tuple[np.ndarray, np.ndarray]:
  """Every aligned (base id, blending id) pair of one text (offsets alignment), for `pair_counts`."""
  lo, hi = align_offsets(base_offsets, blend_offsets)
  n = hi - lo
  cols = np.repeat(lo - np.cumsum(np.concatenate(([0], n[:-1]))), n) + np.arange(int(n.sum()))
  return np.repeat(np.asarray(base_ids, np.int64), n), np.asarray(blend_ids, np.int64)[cols]


def pair_counts(pairs_base: np.ndarray, pairs_blend: np.ndarray, blend_vocab: int) -> tuple[np.ndarray, ...]:
  """Sparse counts of aligned (base id, blending id) pairs: COO ``(base, blend, count)``."""
  key = np.asarray(pairs_base, np.int64) * blend_vocab + np.asarray(pairs_blend, np.int64)
  u, c = np.unique(key, return_counts=True)
  return u // blend_vocab, u % blend_vocab, c


def _mined(base_s: list[bytes], blend_s: list[bytes]) -> np.ndarray:
  """Exact surface match, else the nearest base surface by edit distance (first minimum)."""
  index: dict[bytes, int] = {}
  for i, s in enumerate(base_s):
    index.setdefault(s, i)
  plain_ids = np.array([i for i, s in enumerate(base_s) if not s.startswith(b"\x00")])
  plain = [base_s[i] for i in plain_ids]
  lens = np.fromiter((len(s) for s in plain), np.int64, len(plain))
  out = np.full(len(blend_s), -1, np.int64)
  for j, s in enumerate(blend_s):
    if s in index:
      out[j] = index[s]
    elif not s.startswith(b"\x00") and len(plain):
      out[j] = plain_ids[nearest(s, plain, lens)]
  return out


def _ms(base_s: list[bytes], blend_s: list[bytes], counts: tuple[np.ndarray, ...]) -> np.ndarray:
  """FuseChat-2 MS: per blending token, argmin over co-occurring base tokens of d·w·sigmoid(n)."""
  out = _mined(base_s, blend_s)
  rows, cols, n = counts
  order = np.lexsort((rows, cols))
  rows, cols, n = rows[order], cols[order], n[order]
  starts = np.searchsorted(cols, np.arange(len(blend_s) + 1))
  for j in range(len(blend_s)):
    a, b = starts[j], starts[j + 1]
    if a == b or blend_s[j].startswith(b"\x00"):
      continue
    q = _strip(blend_s[j])
    cand = [_strip(base_s[i]) for i in rows[a:b]]
    d = edit_distance([q], cand)[0].astype(np.float64)
    w = np.array([0.1 if (q in c or c in q) else 1.0 for c in cand])
    score = d * w / (1.0 + np.exp(-n[a:b].astype(np.float64)))
    out[j] = rows[a + int(np.argmin(score))]
  return out


def _tok_hash(tok) -> str:
  return hashlib.sha256(_raw(tok).to_str().encode("utf-8")).hexdigest()


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
  from kfuse.io.atomic import atomic_write_file   # lazily: it imports jax
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_file(path, lambda f: np.save(f, arr))


def vocab_map(base_tok, blend_tok, kind: str = "mined", counts: tuple | None = None,
              cache_dir: str | None = None) -> np.ndarray:
  """Blending id -> base id (``-1`` = none) for a tokenizer pair, cached per pair.

  ``kind="mined"``: exact surface, else minimum edit distance over the base vocabulary.
  ``kind="ms"``: FuseChat-2's statistics mapping from ``counts`` (`pair_counts`).
  The map is cached under ``<cache>/fusion/vocab_maps/`` keyed by both tokenizers' JSON
  (and the counts for ``ms``); ``cache_dir=""`` uses ``$KFUSE_CACHE``, ``None`` disables it.
  """
  if kind not in VOCAB_MAPS:
    raise KfuseError(f"vocab map: unknown kind {kind!r}, expected one of {VOCAB_MAPS}{suggest(str(kind), VOCAB_MAPS)}")
  if kind == "ms" and counts is None:
    raise KfuseError("vocab map 'ms': needs the corpus pair counts (fusion.align.pair_counts)")
  path = None
  if cache_dir is not None:
    from kfuse.data.sources import cache_dir as _cache_dir
    h = hashlib.sha256((_tok_hash(base_tok) + _tok_hash(blend_tok) + kind).encode())
    if counts is not None:
      for a in counts:
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    path = os.path.join(_cache_dir(cache_dir or None), "fusion", "vocab_maps", f"{kind}-{h.hexdigest()[:20]}.npy")
    if os.path.isfile(path):
      try:
        return np.load(path)
      except (OSError, ValueError):
        pass
  base_s, blend_s = surfaces(base_tok), surfaces(blend_tok)
  out = _mined(base_s, blend_s) if kind == "mined" else _ms(base_s, blend_s, counts)
  if path:
    _save_npy_atomic(path, out)
  return out


# ------------------------------------------------------------------ distribution alignment


def _source_positions(lo, hi, base_offsets, blend_offsets, method, base_surf, blend_surf):
  """Per base position the blending position whose distribution applies, or -1."""
  L = len(lo)
  src = np.full(L, -1, np.int64)
  if method == "offsets":
    last = hi - 1
    ok = np.asarray(blend_offsets)[last, 1] == np.asarray(base_offsets)[:, 1]
    src[ok] = last[ok]
    return src
  for i in range(L):
    b = _strip(base_surf[i])
    if hi[i] - lo[i] == 1:
      if b in _strip(blend_surf[lo[i]]):
        src[i] = lo[i]
      continue
    for j in range(hi[i] - 1, lo[i] - 1, -1):
      piece = _strip(blend_surf[j])
      if piece and b.endswith(piece):
        src[i] = j
        break
  return src


def align_topk(base_ids: np.ndarray, base_offsets: np.ndarray, blend_offsets: np.ndarray,
               blend_topk_ids: np.ndarray, blend_topk_logits: np.ndarray, vmap: np.ndarray,
               method: str = "offsets", base_surfaces: Sequence[bytes] | None = None,
               blend_surfaces: Sequence[bytes] | None = None,
               next_id: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A blending model's top-K re-expressed at the base positions, in base ids.

  Args:
    base_ids: base token ids ``[L]``; the label of position ``i`` is ``base_ids[i+1]``
      (``next_id`` for the last position, else the last token itself, as FuseChat's
      ``tokens[1:] + [tokens[-1]]``).
    base_offsets, blend_offsets: character spans ``[L, 2]``, ``[L_j, 2]`` of the same text.
    blend_topk_ids, blend_topk_logits: the blending model's top-K ``[L_j, K]``.
    vmap: `vocab_map` (blending id -> base id, -1 = none).
    method: ``"offsets"`` or ``"dtw"`` (needs ``base_surfaces`` / ``blend_surfaces``: the
      `surfaces` of each sequence's tokens, one per position).

  Returns:
    ``(indices [L, K] int32, logits [L, K] float32, matched [L] bool)``; unmatched positions
    are one-hot on the label (one entry, logit 0), padding is ``-1`` / 0.
  """
  if method not in TOKEN_ALIGNMENTS:
    raise KfuseError(f"token alignment: unknown method {method!r}, expected one of"
                     f" {TOKEN_ALIGNMENTS}{suggest(str(method), TOKEN_ALIGNMENTS)}")
  base_ids = np.asarray(base_ids, np.int64)
  ti = np.asarray(blend_topk_ids, np.int64)
  tl = np.asarray(blend_topk_logits, np.float32)
  L, K = len(base_ids), ti.shape[-1]
  if ti.shape != tl.shape or ti.ndim != 2 or ti.shape[0] != len(blend_offsets):
    raise KfuseError(f"blending top-k: ids {ti.shape} and logits {tl.shape} must be [L_blend={len(blend_offsets)}, K]")
  if len(base_offsets) != L:
    raise KfuseError(f"base: {L} ids but {len(base_offsets)} offsets")
  if method == "offsets":
    lo, hi = align_offsets(base_offsets, blend_offsets)
  else:
    if base_surfaces is None or blend_surfaces is None:
      raise KfuseError("token alignment 'dtw': needs base_surfaces and blend_surfaces")
    lo, hi = align_dtw(base_surfaces, blend_surfaces)
  src = _source_positions(lo, hi, base_offsets, blend_offsets, method, base_surfaces, blend_surfaces)
  labels = np.empty(L, np.int64)
  labels[:-1] = base_ids[1:]
  if L:
    labels[-1] = base_ids[-1] if next_id is None else next_id
  out_i = np.full((L, K), -1, np.int32)
  out_l = np.zeros((L, K), np.float32)
  mapped = np.where((ti >= 0) & (ti < len(vmap)), vmap[np.clip(ti, 0, len(vmap) - 1)], -1)
  matched = np.zeros(L, bool)
  for i in range(L):
    j = src[i]
    if j >= 0:
      seen, k = set(), 0
      for t, lg in zip(mapped[j], tl[j]):
        if t >= 0 and t not in seen:
          seen.add(t)
          out_i[i, k], out_l[i, k] = t, lg
          k += 1
      if k:
        matched[i] = True
        continue
    out_i[i, 0], out_l[i, 0] = labels[i], 0.0
  return out_i, out_l, matched
