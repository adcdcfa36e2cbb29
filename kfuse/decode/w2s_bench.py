"""Weak-to-strong benchmark: proxy-tuning and Dynamic Logit Fusion on offline text, in bits/char.

    python -m kfuse.main --config=configs/w2s_bench.py[:quick]

Two Llama-shaped LMs (`kfuse.models.hf`), a larger and a smaller, are pre-trained on
general text (``config.general``: a mixture of `kfuse.data.text` domains); the small
one is then fine-tuned on each domain of ``config.domains`` (its experts), the large
one on the first domain (single task) and on all of them (multi-task): the upper
bounds. Every model is scored on each domain's test split, teacher-forced, as bits
per character (Σ −log₂ p(token) / characters of the scored tokens) through
`kfuse.decode.score`, i.e. the same fused next-token distributions `generate` samples:

* single task (domain d = ``domains[0]``): large alone, proxy-tuned (z_L + α(z_d − z_S),
  Liu et al., 2024), DLF with one expert (Fan et al., NeurIPS 2024), large fine-tuned on d;
* multi-task (every domain): large alone, multi-expert proxy-tuning, DLF with every
  expert, large fine-tuned on all domains.

% of the gap closed = (bpc_large − bpc_method) / (bpc_large − bpc_large_finetuned) · 100,
beside the papers' 88 % (proxy-tuning, 70B by 7B-chat), 96.4 % / 86.3 % (DLF single /
multi-task, 13B by 7B experts, task accuracy rather than bits per character).
One byte-level BPE tokenizer (`text.train_tokenizer`) serves every model, so the
vocabularies are shared as both rules need.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kfuse.bench.common import check_workdir, get, plain, to_dict, write_json, write_text
from kfuse.data import text
from kfuse.decode import loop as gen
from kfuse.decode import processors as P
from kfuse.errors import KfuseError
from kfuse.models import hf

__all__ = ["make_model", "token_stream", "train_lm", "bits_per_char", "run"]

EOS = 2   # text.SPECIAL_TOKENS: <unk>, <pad>, <eos>


def make_model(vocab: int, seq_len: int, dim: int, layers: int, heads: int, ffn: int,
               seed: int) -> nnx.Module:
  """A Llama-shaped LM (tied embeddings, RoPE, SwiGLU, RMSNorm), weights N(0, 0.02²)."""
  cfg = hf.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=dim,
                        intermediate_size=ffn, num_attention_heads=heads,
                        num_key_value_heads=heads, num_hidden_layers=layers,
                        max_position_embeddings=seq_len, tie_word_embeddings=True))
  model = hf.build(cfg)
  rng = np.random.default_rng(seed)
  params = {k: (np.ones(v.shape, np.float32) if k.endswith("norm.weight") else
                rng.normal(0.0, 0.02, v.shape).astype(np.float32))
            for k, v in hf.to_hf_dict(model).items()}
  return hf.with_hf_dict(model, params)


def token_stream(tok, docs) -> tuple[np.ndarray, np.ndarray]:
  """Documents as one id stream (an <eos> after each) and each token's character count.

  A token counts the characters its offsets end past the previous tokens' (byte-level
  pieces of one character share its offsets: the first piece counts it), so a
  document's counts sum to its length.
  """
  ids, chars = [], []
  for _, t in docs:
    enc = tok.encode(t)
    ids.append(enc.ids)
    ends = np.maximum.accumulate(enc.offsets[:, 1]) if len(enc.ids) else enc.offsets[:, 1]
    chars.append(np.diff(ends, prepend=0))
    ids.append(np.array([EOS], np.int32))
    chars.append(np.array([1]))          # the document break stands for its newline
  return np.concatenate(ids).astype(np.int32), np.concatenate(chars).astype(np.int64)


def _batches(streams, weights, batch: int, seq_len: int, rng):
  """Random windows [batch, seq_len] drawn from the streams in proportion ``weights``."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  while True:
    src = rng.choice(len(streams), size=batch, p=w)
    rows = []
    for s in src:
      lo = rng.integers(0, len(streams[s]) - seq_len)
      rows.append(streams[s][lo:lo + seq_len])
    yield np.stack(rows)


def train_lm(model: nnx.Module, streams, weights, steps: int, batch: int, seq_len: int,
             lr: float, seed: int, label: str = "", progress: bool = False) -> nnx.Module:
  """AdamW (warm-up 5 %, cosine decay, clip 1) on next-token cross-entropy; a new model."""
  graphdef, params = nnx.split(model)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt = tx.init(params)

  def loss_fn(p, x):
    logits = nnx.merge(graphdef, p)(x[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

  @jax.jit
  def step(p, o, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  data = _batches(streams, weights, batch, seq_len + 1, np.random.default_rng(seed))
  start = time.time()
  for i in range(steps):
    params, opt, loss = step(params, opt, next(data))
    if progress and (i + 1) % max(1, steps // 5) == 0:
      print(f"w2s_bench: {label} step {i + 1}/{steps} loss {float(loss):.3f}"
            f" ({time.time() - start:.0f} s)", file=sys.stderr)
  return nnx.merge(graphdef, params)


def _eval_windows(stream, chars, seq_len: int, max_windows: int):
  n = min(len(stream) // seq_len, max_windows)
  if n < 1:
    raise KfuseError(f"w2s_bench: test split has {len(stream)} tokens, fewer than seq_len")
  return (stream[:n * seq_len].reshape(n, seq_len), chars[:n * seq_len].reshape(n, seq_len))


def bits_per_char(models, processor, windows, chars, batch: int) -> float:
  """Σ −log₂ p over the predicted tokens (all but each window's first) / their characters."""
  nats = 0.0
  for lo in range(0, len(windows), batch):
    lp = gen.score(models, windows[lo:lo + batch], processor)
    nats -= float(np.sum(lp, dtype=np.float64))
  return nats / math.log(2) / float(chars[:, 1:].sum())


def _gap(large: float, method: float, tuned: float) -> float:
  return 100.0 * (large - method) / (large - tuned) if large != tuned else float("nan")


def run(config: Any, workdir: Optional[str] = None) -> dict:
  """``configs/w2s_bench.py``: tokenizer, pre-training, fine-tuning, scoring, tables."""
  workdir = check_workdir(workdir or get(config, "workdir"), bool(get(config, "overwrite")))
  progress = bool(get(config, "progress"))
  seed = int(get(config, "seed"))
  general = dict(to_dict(get(config, "general")))
  domains = tuple(get(config, "domains"))
  for d in list(general) + list(domains):
    if d not in text.DOMAINS:
      raise KfuseError(f"w2s_bench: unknown text domain {d!r}; one of {', '.join(text.DOMAINS)}")
  seq_len, batch = int(get(config, "seq_len")), int(get(config, "batch_size"))
  t0 = time.time()
  tok = text.train_tokenizer("bpe", int(get(config, "vocab_size")), byte_level=True,
                             domains=tuple(sorted(set(general) | set(domains))))
  vocab = tok.vocab_size
  names = sorted(set(general) | set(domains))
  train = {d: token_stream(tok, text.split(d).train)[0] for d in names}
  test = {d: _eval_windows(*token_stream(tok, text.split(d).test), seq_len,
                           int(get(config, "eval_windows"))) for d in domains}

  def build(size: str, s: int):
    m = dict(to_dict(get(config, size)))
    return make_model(vocab, seq_len, int(m["dim"]), int(m["layers"]), int(m["heads"]),
                      int(m["ffn"]), s)

  def fit(model, which, steps_key, lr_key, s, label):
    ws = list(which.values())
    return train_lm(model, [train[d] for d in which], ws, int(get(config, steps_key)), batch,
                    seq_len, float(get(config, lr_key)), s, label, progress)

  times = {}

  def timed(key, fn):
    t = time.time()
    out = fn()
    times[key] = round(time.time() - t, 1)
    return out

  large = timed("pretrain_large", lambda: fit(build("large", seed), general, "pretrain_steps",
                                              "pretrain_lr", seed, "large"))
  small = timed("pretrain_small", lambda: fit(build("small", seed + 1), general,
                                              "pretrain_steps", "pretrain_lr", seed + 1, "small"))
  experts = {d: timed(f"finetune_small_{d}", lambda d=d: fit(
      small, {d: 1.0}, "finetune_steps", "finetune_lr", seed + 10 + i, f"small/{d}"))
      for i, d in enumerate(domains)}
  large_single = timed("finetune_large_single", lambda: fit(
      large, {domains[0]: 1.0}, "finetune_steps", "finetune_lr", seed + 20,
      f"large/{domains[0]}"))
  large_multi = (timed("finetune_large_multi", lambda: fit(
      large, {d: 1.0 for d in domains}, "finetune_steps", "finetune_lr", seed + 21, "large/all"))
      if len(domains) > 1 else None)

  alpha = float(get(config, "alpha"))
  dlf_kw = dict(to_dict(get(config, "dlf")))
  eb = int(get(config, "eval_batch_size"))

  def bpc(models, proc, d):
    return bits_per_char(models, proc, *test[d], eb)

  d0 = domains[0]
  e0 = experts[d0]
  single = {
      "large": bpc([large], None, d0),
      "small": bpc([small], None, d0),
      "small_tuned": bpc([e0], None, d0),
      "proxy_tuned": bpc([large, small, e0], P.proxy_tune(alpha), d0),
      "dlf": bpc([large, small, e0], P.dlf(1, **dlf_kw), d0),
      "large_tuned": bpc([large_single], None, d0),
  }
  table = {"single": {d0: single}}
  if large_multi is not None:
    all_e = [experts[d] for d in domains]
    multi = {}
    for d in domains:
      multi[d] = {
          "large": bpc([large], None, d),
          "proxy_tuned": bpc([large, small] + all_e,
                             P.proxy_tune((alpha,) * len(domains)), d),
          "dlf": bpc([large, small] + all_e, P.dlf(len(domains), **dlf_kw), d),
          "large_tuned": bpc([large_multi], None, d),
      }
    table["multi"] = multi
  for rows in table.values():
    for r in rows.values():
      for k in ("proxy_tuned", "dlf"):
        r[f"{k}_gap_closed_pct"] = _gap(r["large"], r[k], r["large_tuned"])
  res = dict(bits_per_char=table, vocab_size=vocab, domains=list(domains), general=general,
             large=to_dict(get(config, "large")), small=to_dict(get(config, "small")),
             params={"large": _count(large), "small": _count(small)},
             seconds=dict(times, total=round(time.time() - t0, 1)),
             config=plain(to_dict(config)))
  write_json(os.path.join(workdir, "results.json"), res)
  write_text(os.path.join(workdir, "results.md"), _markdown(table))
  print(json.dumps(plain(res["bits_per_char"])))
  return res


def _count(model) -> int:
  return int(sum(np.size(v) for v in hf.to_hf_dict(model).values()))


def _markdown(table) -> str:
  lines = ["| setting | domain | large | proxy-tuned | DLF | large fine-tuned |"
           " proxy gap closed | DLF gap closed |", "|---|---|---|---|---|---|---|---|"]
  for setting, rows in table.items():
    for d, r in rows.items():
      lines.append(f"| {setting} | {d} | {r['large']:.3f} | {r['proxy_tuned']:.3f} |"
                   f" {r['dlf']:.3f} | {r['large_tuned']:.3f} |"
                   f" {r['proxy_tuned_gap_closed_pct']:.1f} % | {r['dlf_gap_closed_pct']:.1f} % |")
  return "\n".join(lines) + "\n"
