"""Source representations: per sequence, top-K next-token log-probs + ids per position and CE.

FuseLLM's ``forward_for_logits.py`` stores, for every training sequence and source model, the
top-K (K = 10) logits and ids per position and the sequence-mean cross-entropy. Here a
source is any forward ``apply(tokens [B, T]) -> logits [B, T, V]`` with its tokenizer; the
job is sharded and resumable, and the files are plain NumPy (readable without kfuse).

Layout of a representation directory::

  manifest.json        {"format": 1, "k": K, "vocab": n, "context": T, "tokenizer_sha256",
                        "num_sequences", "shard_size", "shards": [{"file", "first", "count",
                        "sha256"}], "complete": bool, "meta": {...}}
  shard-00000.npz      sequences [first, first + count) of the corpus, ragged, concatenated:
    row_splits  int64 [n + 1]      sequence s owns rows row_splits[s]:row_splits[s+1]
    token_ids   int32 [N]          the source tokenizer's ids of each sequence's text
    offsets     int32 [N, 2]       character (start, end) of each token in the text
    topk_ids    int32 [N, K]       ids of the K most probable next tokens at each position
    topk_logprobs float32 [N, K]   their log-probabilities (log-softmax over the vocabulary)
    token_ce    float32 [N]        −log p(next token); NaN at each sequence's last position
    seq_ce      float32 [n]        mean token_ce of the sequence (its non-NaN entries)
    token_sha256 <U64 [n]          SHA-256 of the sequence's token_ids (int32 little-endian)

A sequence longer than the model's context is scored in consecutive windows of ``context``
tokens (FuseLLM's preprocessing splits long texts the same way); every window starts without
context, and each window's last position has ``token_ce`` NaN (its next token is in the next
window), so ``seq_ce`` averages the within-window predictions only.
Only the first ``vocab`` logits are ranked, ``vocab`` = the tokenizer's length: a model
whose ``config.vocab_size`` is larger (padded embeddings, FuseAI issue #13) is handled, a
smaller one is refused.

Shards are written atomically (temp file + rename) and recorded in the manifest after each
one; a killed job re-run with the same arguments skips the shards already recorded.
`read` streams sequences back and `check_tokens` verifies, by hash, that the file was made
from the same corpus, order and tokenizer as the caller's.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.errors import KfuseError
from kfuse.io.atomic import atomic_write_file

__all__ = ["FORMAT", "token_hash", "score_fn", "write", "read", "load_manifest", "check_tokens"]

FORMAT = 1
MANIFEST = "manifest.json"


def token_hash(ids) -> str:
  """SHA-256 (hex) of token ids as little-endian int32."""
  return hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest()


def score_fn(apply: Callable, k: int, vocab: int) -> Callable:
  """A jitted ``(tokens [B, T], valid [B, T]) -> (topk_logprobs, topk_ids, token_ce)``.

  ``token_ce[b, t] = −log p(tokens[b, t+1] | tokens[b, :t+1])`` (NaN where t+1 is not valid).
  """

  @jax.jit
  def fn(tokens, valid):
    logits = apply(tokens).astype(jnp.float32)
    if logits.shape[-1] < vocab:
      raise KfuseError(f"source model: {logits.shape[-1]} logits but the tokenizer has {vocab}"
                       " tokens (config.vocab_size < len(tokenizer))")
    logp = jax.nn.log_softmax(logits[..., :vocab], axis=-1)
    top_lp, top_id = jax.lax.top_k(logp, k)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    ce = -jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    has_next = jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, -1:])], axis=1)
    return top_lp, top_id.astype(jnp.int32), jnp.where(has_next & valid, ce, jnp.nan)

  return fn


def _atomic(path: str, write: Callable) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_file(path, write)


def _sha_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def load_manifest(path: str) -> dict:
  f = os.path.join(path, MANIFEST)
  if not os.path.isfile(f):
    raise KfuseError(f"{path}: no {MANIFEST} (not a representation directory)")
  with open(f, encoding="utf-8") as fh:
    return json.load(fh)


def _score_sequences(fn, seqs: Sequence[np.ndarray], context: int, pad: int, batch: int,
                     mesh=None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every sequence cut into windows of ``context`` tokens, the windows of all ``seqs`` scored
  ``batch`` at a time (always ``batch`` rows, padding rows invalid: one compiled shape; on a
  ``mesh``, ``batch`` rows per device of ``data`` x ``fsdp``); each window's last CE is NaN."""
  if mesh is not None:   # ``batch`` rows per data-parallel device: each runs the 1-device program
    batch *= int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))
  wins = [(i, s) for i, ids in enumerate(seqs) for s in range(0, len(ids), context)]
  parts: list[list] = [[] for _ in seqs]
  for b0 in range(0, len(wins), batch):
    chunk = wins[b0:b0 + batch]
    toks = np.full((batch, context), pad, np.int32)
    valid = np.zeros((batch, context), bool)
    for r, (i, s) in enumerate(chunk):
      w = seqs[i][s:s + context]
      toks[r, :len(w)], valid[r, :len(w)] = w, True
    if mesh is None:
      args = (jnp.asarray(toks), jnp.asarray(valid))
    else:
      from kfuse.models.hf import batch_sharding
      sh = batch_sharding(mesh, batch)
      args = (jax.device_put(toks, sh), jax.device_put(valid, sh))
    a, b, c = (np.asarray(v) for v in fn(*args))
    for r, (i, s) in enumerate(chunk):
      m = min(context, len(seqs[i]) - s)
      parts[i].append((a[r, :m], b[r, :m], c[r, :m]))
  return [tuple(np.concatenate([p[j] for p in ps]) for j in range(3)) if ps else None
          for ps in parts]


def write(path: str, texts: Sequence[str], tokenizer, apply: Callable, *, k: int = 10,
          context: int = 2048, shard_size: int = 256, batch: int = 8, pad_id: int = 0,
          meta: dict | None = None, progress: Callable[[str], None] | None = None,
          mesh=None) -> dict:
  """Score ``texts`` with a source model and write (or resume) its representation directory.

  Args:
    path: output directory (created; an existing one with the same arguments is resumed).
    texts: the corpus, in order (the fusion corpus's sequence texts).
    tokenizer: the source's `kfuse.models.hf.tokenizer.Tokenizer`.
    apply: ``tokens [B, T] -> logits [B, T, V]`` (jit-able), V ≥ the tokenizer's length.
    k: top-K kept per position (≤ the vocabulary).
    context: the model's context; longer sequences are scored in windows.
    meta: anything JSON-serialisable recorded in the manifest (source name, corpus ...).
    mesh: a ``(data, fsdp, tensor)`` mesh (`kfuse.fusion.mesh`): ``batch`` windows per device
      of ``data`` x ``fsdp``; place the parameters ``apply`` closes over
      with `kfuse.fusion.mesh.place`. The files do not depend on the mesh.

  Returns:
    The manifest.
  """
  vocab = int(tokenizer.vocab_size)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise KfuseError(f"k: must be an int >= 1, got {k!r}")
  if k > vocab:
    raise KfuseError(f"k: top-{k} is larger than the source vocabulary ({vocab} tokens)")
  if context < 1 or shard_size < 1:
    raise KfuseError(f"context / shard_size: must be >= 1, got {context} / {shard_size}")
  spec = {"format": FORMAT, "k": k, "vocab": vocab, "context": int(context),
          "shard_size": int(shard_size), "num_sequences": len(texts),
          "tokenizer_sha256": hashlib.sha256(tokenizer._tok.to_str().encode()).hexdigest(),
          "texts_sha256": hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest(),
          "meta": meta or {}}
  manifest = dict(spec, shards=[], complete=False)
  if os.path.isfile(os.path.join(path, MANIFEST)):
    old = load_manifest(path)
    if any(old.get(key) != val for key, val in spec.items()):
      diff = [key for key, val in spec.items() if old.get(key) != val]
      raise KfuseError(f"{path}: holds representations made with a different {diff[0]}"
                       " (another corpus, tokenizer or settings); use a new directory")
    manifest["shards"] = [s for s in old["shards"]
                          if os.path.isfile(os.path.join(path, s["file"]))
                          and _sha_file(os.path.join(path, s["file"])) == s["sha256"]]
  done = {s["first"] for s in manifest["shards"]}
  fn = score_fn(apply, k, vocab)
  for first in range(0, len(texts), shard_size):
    if first in done:
      continue
    rows = {"token_ids": [], "offsets": [], "topk_ids": [], "topk_logprobs": [], "token_ce": []}
    splits, seq_ce, hashes = [0], [], []
    encs = [tokenizer.encode(t) for t in texts[first:first + shard_size]]
    seqs = [enc.ids.astype(np.int32) for enc in encs]
    empty = (np.zeros((0, k), np.float32), np.zeros((0, k), np.int32), np.zeros((0,), np.float32))
    scored = _score_sequences(fn, seqs, context, pad_id, batch, mesh)
    for enc, ids, out in zip(encs, seqs, scored):
      lp, ti, ce = empty if out is None else out   # empty text: no positions
      ce = ce.astype(np.float32)
      rows["token_ids"].append(ids)
      rows["offsets"].append(enc.offsets.astype(np.int32).reshape(-1, 2))
      rows["topk_ids"].append(ti)
      rows["topk_logprobs"].append(lp.astype(np.float32))
      rows["token_ce"].append(ce)
      splits.append(splits[-1] + len(ids))
      finite = ce[np.isfinite(ce)]
      seq_ce.append(float(finite.mean()) if len(finite) else float("nan"))
      hashes.append(token_hash(ids))
    arrays = {key: np.concatenate(v) for key, v in rows.items()}
    arrays.update(row_splits=np.asarray(splits, np.int64), seq_ce=np.asarray(seq_ce, np.float32),
                  token_sha256=np.asarray(hashes, "<U64"))
    name = f"shard-{first // shard_size:05d}.npz"
    _atomic(os.path.join(path, name), lambda f: np.savez(f, **arrays))
    manifest["shards"].append({"file": name, "first": first, "count": len(hashes),
                               "sha256": _sha_file(os.path.join(path, name))})
    manifest["shards"].sort(key=lambda s: s["first"])
    _atomic(os.path.join(path, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if progress:
      progress(f"{path}: shard {name} ({first + len(hashes)}/{len(texts)} sequences)")
  manifest["complete"] = True
  _atomic(os.path.join(path, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
  return manifest


def read(path: str) -> Iterator[dict]:
  """Yield each sequence's arrays (``token_ids``, ``offsets``, ``topk_ids``,
  ``topk_logprobs``, ``token_ce``, ``seq_ce``, ``token_sha256``), in corpus order."""
  man = load_manifest(path)
  if not man.get("complete"):
    raise KfuseError(f"{path}: representations incomplete ({sum(s['count'] for s in man['shards'])}"
                     f"/{man['num_sequences']} sequences); re-run the job to resume")
  for s in man["shards"]:
    with np.load(os.path.join(path, s["file"])) as z:
      a = {key: z[key] for key in z.files}
    sp = a["row_splits"]
    for r in range(len(sp) - 1):
      sl = slice(sp[r], sp[r + 1])
      yield {"token_ids": a["token_ids"][sl], "offsets": a["offsets"][sl],
             "topk_ids": a["topk_ids"][sl], "topk_logprobs": a["topk_logprobs"][sl],
             "token_ce": a["token_ce"][sl], "seq_ce": float(a["seq_ce"][r]),
             "token_sha256": str(a["token_sha256"][r])}


def check_tokens(path: str, seq: int, ids) -> None:
  """Refuse a representation whose sequence ``seq`` is not these token ids (hash check)."""
  man = load_manifest(path)
  for s in man["shards"]:
    if s["first"] <= seq < s["first"] + s["count"]:
      with np.load(os.path.join(path, s["file"])) as z:
        have = str(z["token_sha256"][seq - s["first"]])
      if have != token_hash(ids):
        raise KfuseError(f"{path}: sequence {seq}'s token ids differ from the corpus'"
                         " (made from a different corpus, order or tokenizer)")
      return
  raise KfuseError(f"{path}: has no sequence {seq} ({man['num_sequences']} sequences)")
