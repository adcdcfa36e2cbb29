"""Cross-vocabulary ensembles (UniTE, DeePEn) scored teacher-forced in bits per character.

    python experiments/decode_bench/xvocab_bench.py --workdir=/tmp/xv  # ~6 min on 2 loaded cores

Two Llama-shaped LMs of the same size (`kfuse.decode.w2s_bench.make_model` / `train_lm`)
are pre-trained on the same general mixture of `kfuse.data.text` domains, each with its own
tokenizer (`text.train_tokenizer`: a byte-level BPE and a byte-level Unigram of different
sizes). Held-out text: the test split of each scored domain, cut into chunks of ``chars``
characters; every chunk is scored after one ``<eos>`` (the document break the models were
trained on), so every row scores the same characters.

Metric (`score_cross`): a segmentation s_1..s_n of the chunk into strings of the union
vocabulary ``S`` (`CrossVocab`) is fixed: the tokenization of one member, the rule's
"main" model. Each model i is fed <eos> and then every s_j in its own tokens (the same
token, else its encoding: `CrossVocab.pieces`, exactly what `generate_cross` feeds); its
next-token logits before s_j are those after the last token of s_{j-1}. The rule maps them
to logits over ``S`` (the distribution `generate_cross` samples from) and

    bits per character = Σ_j −log₂ p_rule(s_j | s_<j) / characters of the chunk.

A member alone is scored the same way on its own tokenization with its own softmax: its
usual teacher-forced bits per character. Under a fixed segmentation −log₂ p is the cost of
one path to the text (other segmentations are not summed), as for a single LM scored on its
canonical tokenization. UniTE's distribution is zero outside the union of the members'
top-k: a reference string outside it costs infinitely many bits, so UniTE (k = 10, the
paper's) is reported as next-string top-1 accuracy and coverage (share of reference
strings inside the union), and as bits per character with k = every string (the union is
``S``). Top-1 accuracy: argmax of the rule's distribution over ``S`` (of the model's over
its vocabulary, alone) equals the reference string / token.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kfuse import decode
from kfuse.bench.common import write_json
from kfuse.data import text
from kfuse.decode import w2s_bench as W
from kfuse.errors import KfuseError
from kfuse.models import hf

BOS = "<eos>"   # the document break of `w2s_bench.token_stream`, fed before every chunk


def segment(vocab: decode.CrossVocab, i: int, chunk: str) -> np.ndarray:
  """``S`` indices of ``chunk`` in model i's tokenization."""
  ids = np.asarray(vocab.tokenizers[i].encode(chunk).ids, np.int64)
  segs = vocab.sid[i][ids] if len(ids) else np.zeros((0,), np.int32)
  if not len(segs) or (segs == 0).any():
    raise KfuseError(f"xvocab_bench: tokenizer {i} encodes {chunk[:30]!r} to no tokens or to a"
                     " token without a string")
  return segs


def _feed(vocab, i: int, segs) -> tuple[np.ndarray, np.ndarray]:
  """Model i's ids for <eos> s_1 .. s_n, and the position whose logits predict each s_j."""
  ids, last = [], []
  for s in [vocab.lookup(BOS)] + [int(x) for x in segs]:
    p = vocab.pieces(i, s)
    if not len(p):
      raise KfuseError(f"xvocab_bench: model {i} cannot encode {vocab.strings[s]!r}")
    ids.extend(int(x) for x in p)
    last.append(len(ids) - 1)
  return np.asarray(ids, np.int32), np.asarray(last[:-1], np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(state, ids, *, graphdef):
  return nnx.merge(graphdef, state)(ids).astype(jnp.float32)


def _logits(model, ids: np.ndarray) -> np.ndarray:
  """Full-context next-token logits [T, V] (ids padded to the context: one compiled shape)."""
  ctx = int(model.config.max_positions)
  if len(ids) > ctx:
    raise KfuseError(f"xvocab_bench: {len(ids)} tokens exceed the model's context of {ctx};"
                     " score shorter chunks")
  graphdef, state = nnx.split(model)
  padded = np.zeros((1, ctx), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(_forward(state, jnp.asarray(padded), graphdef=graphdef)[0, :len(ids)])


@functools.partial(jax.jit, static_argnames=("processor",))
def _fuse(logits, target, *, processor):
  out, _ = processor.apply(logits, processor.init(logits))
  lp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
  got = jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
  return got, jnp.argmax(out, axis=-1) == target


def score_cross(models, vocab: decode.CrossVocab, chunk: str, processor=None, main: int = 0,
                rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forced (log p [n] in nats, top-1 hit [n]) of ``chunk``'s strings in model
  ``main``'s tokenization, after <eos>, under ``processor`` (a cross-vocabulary rule on
  ``vocab``); ``processor=None``: model ``main`` alone, its own softmax over its vocabulary.
  ``rows``: positions fused per call (UniTE's dedup is [rows, M·k, M·k])."""
  segs = segment(vocab, main, chunk)
  if processor is None:
    ids, last = _feed(vocab, main, segs)
    z = _logits(models[main], ids)[last].astype(np.float64)
    tgt = ids[last + 1]
    lp = z - z.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    return lp[np.arange(len(tgt)), tgt], z.argmax(1) == tgt
  if getattr(processor, "vocab", None) is not vocab:
    raise KfuseError(f"xvocab_bench: {processor.name} is not a rule built on this CrossVocab")
  zs = []
  for i, m in enumerate(models):
    ids, last = _feed(vocab, i, segs)
    zs.append(_logits(m, ids)[last])
  lps, hits = [], []
  for lo in range(0, len(segs), rows):
    part = tuple(jnp.asarray(_pad_rows(z[lo:lo + rows], rows)) for z in zs)
    tgt = jnp.asarray(_pad_rows(segs[lo:lo + rows].astype(np.int32), rows))
    lp, hit = _fuse(part, tgt, processor=processor)
    n = min(rows, len(segs) - lo)
    lps.append(np.asarray(lp)[:n])
    hits.append(np.asarray(hit)[:n])
  return np.concatenate(lps).astype(np.float64), np.concatenate(hits)


def _pad_rows(x, rows):
  """x with its first row repeated up to ``rows`` rows (one compiled shape)."""
  return np.concatenate([x, np.repeat(x[:1], rows - len(x), 0)]) if len(x) < rows else x


def coverage(vocab: decode.CrossVocab, models, chunk: str, k: int, main: int = 0) -> float:
  """Share of the reference strings inside UniTE's union of top-k (where p > 0)."""
  lp, _ = score_cross(models, vocab, chunk, decode.unite(vocab, k=k), main)
  return float(np.mean(lp > -1e20))


def chunks(domain: str, chars: int, count: int) -> list[str]:
  """The first ``count`` chunks of ``chars`` characters of the domain's test documents."""
  out = []
  for _, t in text.split(domain).test:
    for lo in range(0, len(t) - chars + 1, chars):
      out.append(t[lo:lo + chars])
      if len(out) == count:
        return out
  return out


def run(args) -> dict:
  t0 = time.time()
  general = dict(shakespeare=0.45, pydoc=0.45, pysource=0.1)   # w2s_bench's mixture
  names = tuple(sorted(general))
  toks = [text.train_tokenizer(kind, size, byte_level=True, domains=names)
          for kind, size in (("bpe", args.vocab_a), ("unigram", args.vocab_b))]
  labels = [f"bpe{toks[0].vocab_size}", f"unigram{toks[1].vocab_size}"]
  size = dict(dim=args.dim, layers=args.layers, heads=4, ffn=3 * args.dim)
  models, times = [], {}
  for i, tok in enumerate(toks):
    streams = [W.token_stream(tok, text.split(d).train)[0] for d in general]
    t = time.time()
    m = W.make_model(tok.vocab_size, args.seq_len, size["dim"], size["layers"], size["heads"],
                     size["ffn"], args.seed + i)
    saved = os.path.join(args.workdir, f"model_{labels[i]}_{args.steps}.npz")
    if os.path.isfile(saved):                 # a trained model of an interrupted run
      with np.load(saved) as f:
        models.append(hf.with_hf_dict(m, dict(f)))
      continue
    models.append(W.train_lm(m, streams, list(general.values()), args.steps, args.batch,
                             args.seq_len, args.lr, args.seed + i, labels[i], True))
    os.makedirs(args.workdir, exist_ok=True)
    np.savez(saved, **{k: np.asarray(v) for k, v in hf.to_hf_dict(models[-1]).items()})
    times[f"train_{labels[i]}"] = round(time.time() - t, 1)
  vocab = decode.CrossVocab(toks, [t.vocab_size for t in toks])
  full = max(t.vocab_size for t in toks)
  rules = {}
  for main in (0, 1):
    rules[f"unite_k10_seg{main}"] = (decode.unite(vocab, k=10), main)
    rules[f"unite_kall_seg{main}"] = (decode.unite(vocab, k=full), main)
    rules[f"deepen_main{main}"] = (decode.deepen(vocab, models, main=main), main)
  def fits(c):      # every model's feeding of c, cut at either tokenization, fits its context
    return all(len(_feed(vocab, i, segment(vocab, main, c))[0]) <= args.seq_len
               for i in (0, 1) for main in (0, 1))

  table = {}
  t = time.time()
  for d in args.domains:
    texts = [c for c in chunks(d, args.chars, args.chunks + args.spare) if fits(c)][:args.chunks]
    nchar = sum(len(c) for c in texts)
    rows = {}
    for name, (proc, main) in [(f"{labels[0]} alone", (None, 0)),
                               (f"{labels[1]} alone", (None, 1))] + list(rules.items()):
      lp, hit = zip(*(score_cross(models, vocab, c, proc, main) for c in texts))
      lp, hit = np.concatenate(lp), np.concatenate(hit)
      rows[name] = dict(bpc=float(-lp.sum() / math.log(2) / nchar) if np.all(lp > -1e20)
                        else float("inf"), top1=float(hit.mean()),
                        coverage=float(np.mean(lp > -1e20)), strings=int(len(lp)))
      print(f"xvocab_bench: {d} {name} {rows[name]}", file=sys.stderr)
    table[d] = dict(rows=rows, chars=nchar)
  times["score"] = round(time.time() - t, 1)
  times["total"] = round(time.time() - t0, 1)
  res = dict(table=table, tokenizers=labels, union_strings=len(vocab),
             anchors=int(len(vocab.common())), model=size, steps=args.steps, seconds=times,
             args=vars(args))
  os.makedirs(args.workdir, exist_ok=True)
  write_json(os.path.join(args.workdir, "results.json"), res)
  print(json.dumps(res["table"]))
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="workdirs/xvocab_bench")
  p.add_argument("--vocab_a", type=int, default=1024, help="byte-level BPE size")
  p.add_argument("--vocab_b", type=int, default=768, help="byte-level Unigram size")
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--domains", nargs="+", default=["pysource", "pydoc"])
  p.add_argument("--chars", type=int, default=128, help="characters per scored chunk")
  p.add_argument("--chunks", type=int, default=16, help="chunks scored per domain")
  p.add_argument("--spare", type=int, default=16,
                 help="further chunks to draw from when one does not fit a model's context")
  run(p.parse_args(argv))


if __name__ == "__main__":
  main()
