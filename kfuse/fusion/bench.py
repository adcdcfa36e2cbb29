"""FuseLLM / FuseChat jobs on offline text with really different tokenizers (`configs/fusellm.py`,
`configs/fusechat.py`), and the bits-per-character benchmark.

Pipeline (every stage cached in the workdir, so a re-run resumes):

1. Tokenizers (`kfuse.data.text.train_tokenizer`): the target's and one per source, each its
   own algorithm, vocabulary size and training domains.
2. Models: zoo GPTs (`kfuse.models.gpt`); each source trained with CLM on its domains, the
   target briefly on all domains (a weak starting point); Orbax checkpoints in
   ``models/<name>-<hash of its settings, seed, seq_len>`` (representations and alignments
   are keyed the same way, so a changed setting never reuses a stale file).
3. Fusion corpus: train documents of every domain cut into sequences of ``seq_len`` target
   tokens; each sequence's text is scored by every source (and by the target itself, the
   "reference model" of FuseLLM) into `kfuse.fusion.representations` directories.
4. Alignment (`kfuse.fusion.align`): each source's top-K mapped to the target's positions and
   vocabulary (offsets alignment, MinED vocabulary map by default). The CE that weighs
   sources is FuseLLM's per-token mean (``fusion.ce_unit="token"``) or nats per character
   (``"char"``): per-token CEs of different tokenizers are not comparable (a tokenizer with
   shorter tokens has a lower per-token CE whatever the model's quality).
5. Training: copies of the target continued for ``fusion.steps`` on the same batches with
   λ·CLM + (1−λ)·fusion (`kfuse.fusion.losses.objective`); variants: CLM only (the control),
   single-source KD, FuseLLM MinCE / AvgCE over all sources; FuseChat: pairwise fusion of each
   source into a copy of the target, then `kfuse.merge` methods over the fused targets.
6. Bits per character on each domain's test documents: Σ NLL / (ln 2 · characters predicted).
   ``job="fusechat"`` shares the workdir (models, representations, alignments) with
   ``job="fusellm"``; results go to ``results_<job>.json`` and ``table_<job>.md``.

A source may instead be an HF causal-LM directory (``sources.<name>.model_dir``, `hf_source`),
scored as it is. ``config.mesh`` (``data``, ``fsdp``, ``tensor``) shards the representation
pass and the fusion training (`kfuse.fusion.mesh`).

Wan et al., "Knowledge Fusion of Large Language Models" (FuseLLM, ICLR 2024); Wan et al.,
"FuseChat: Knowledge Fusion of Chat Models" (2024).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfuse.bench.common import check_workdir, plain, write_json, write_text
from kfuse.data import text
from kfuse.errors import KfuseError

__all__ = ["run", "bits_per_char", "fusion_corpus", "hf_source"]


def _log(config, msg: str) -> None:
  if config.get("progress", True):
    print(f"[fusion] {msg}", flush=True)


# ------------------------------------------------------------------ models


def _gpt(cfg: dict, vocab: int, seq_len: int):
  from kfuse.models import get_model
  return get_model("gpt", vocab_size=vocab, max_len=seq_len, dim=int(cfg["dim"]),
                   depth=int(cfg["depth"]), num_heads=int(cfg["num_heads"]))


def hf_source(model_dir: str, tokenizer: str = "", mesh=None):
  """``(apply, tokenizer)`` of an HF causal-LM directory (`kfuse.models.hf`: Llama, Mistral,
  Qwen2, GPT-2) used as a fusion source: ``apply(tokens [B, T]) -> logits [B, T, V]`` (a pure
  function of the loaded parameters, placed on ``mesh`` by the HF partition rules) and its
  tokenizer.json (``tokenizer``; '' = ``model_dir``'s), whose ids and offsets the alignment
  uses. A tokenizer with more tokens than the model's embedding is refused."""
  from flax import nnx
  from kfuse.models import hf
  model = hf.load(model_dir, mesh=mesh)
  tok = hf.load_tokenizer(tokenizer or model_dir)
  tok.check_model(model.config.vocab_size, os.path.join(model_dir, "config.json"))
  graphdef, state = nnx.split(model)
  return (lambda x: nnx.merge(graphdef, state)(x)), tok


class _Apply:
  """``apply(variables, x)`` of a closed forward function (an HF source beside zoo GPTs)."""

  def __init__(self, fn):
    self.fn = fn

  def apply(self, variables, x):
    del variables
    return self.fn(x)


def _windows(ids_list, seq_len: int) -> np.ndarray:
  """Non-overlapping windows of ``seq_len + 1`` tokens (x = w[:-1], y = w[1:])."""
  out = []
  for ids in ids_list:
    for s in range(0, len(ids) - seq_len - 1 + 1, seq_len):
      out.append(ids[s:s + seq_len + 1])
  if not out:
    raise KfuseError(f"seq_len: {seq_len} is longer than every training document")
  return np.stack(out).astype(np.int32)


def _train_clm(model, variables, windows: np.ndarray, steps: int, batch: int, lr: float, key):
  """CLM with the distillation step builder's ``supervised`` objective (no teacher)."""
  from kfuse import distill
  from kfuse.distill.objectives import supervised
  step = distill.make_step(model, supervised(), {"name": "adamw", "learning_rate": lr,
                                                 "schedule": "cosine", "warmup_steps": steps // 20,
                                                 "clip_norm": 1.0}, total_steps=steps)
  state = step.init(variables, jnp.asarray(windows[:batch, :-1]))
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
  t0 = time.time()
  for i in range(steps):
    b = windows[rng.integers(0, len(windows), batch)]
    state, m = step(state, {"x": jnp.asarray(b[:, :-1]), "y": jnp.asarray(b[:, 1:])},
                    jax.random.fold_in(key, i))
  jax.block_until_ready(state.params)
  tps = steps * batch * (windows.shape[1] - 1) / max(time.time() - t0, 1e-9)
  return {"params": state.params}, float(m["loss"]), tps


def _key(*parts) -> str:
  """A short hash of JSON-able settings: cached models / representations are keyed by them."""
  import hashlib
  import json
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _save(path: str, variables) -> None:
  from kfuse.io.orbax_io import save_orbax
  save_orbax(path, jax.device_get(variables), overwrite=True)


def _load(path: str):
  from kfuse.io.orbax_io import is_orbax_checkpoint, restore_orbax
  return restore_orbax(path) if os.path.exists(path) and is_orbax_checkpoint(path) else None


# ------------------------------------------------------------------ evaluation


def bits_per_char(apply, tok, texts: list[str], seq_len: int, batch: int = 16) -> float:
  """Σ_t −log₂ p(token_t | window) / Σ_t characters of token t, over non-overlapping windows.

  Token t's characters run from the previous token's end to its own end, so whitespace
  between tokens counts; every window's first token is context only (not predicted).
  """
  rows, chars = [], 0
  for t in texts:
    enc = tok.encode(t)
    ends = enc.offsets[:, 1]
    for s in range(0, len(enc.ids) - 1, seq_len):
      w = enc.ids[s:s + seq_len + 1]
      if len(w) < 2:
        continue
      rows.append(np.pad(w, (0, seq_len + 1 - len(w)), constant_values=-1))
      chars += int(ends[s + len(w) - 1] - ends[s])
  fn = jax.jit(lambda x, y: -jnp.take_along_axis(jax.nn.log_softmax(apply(x).astype(jnp.float32)),
                                                 jnp.maximum(y, 0)[..., None], -1)[..., 0] * (y >= 0))
  total = 0.0
  rows = np.stack(rows)
  for b0 in range(0, len(rows), batch):
    r = rows[b0:b0 + batch]
    if len(r) < batch:
      r = np.concatenate([r, np.full((batch - len(r), r.shape[1]), -1, r.dtype)])
    total += float(jnp.sum(fn(jnp.asarray(np.maximum(r[:, :-1], 0)), jnp.asarray(r[:, 1:]))))
  return total / math.log(2) / max(chars, 1)


def _eval(config, apply, tok, seq_len: int) -> dict[str, float]:
  cap = int(config.eval_chars)
  out = {}
  for d in config.domains:
    docs = [t for _, t in text.split(d).test]
    budget, texts = cap, []
    for t in docs:
      if budget <= 0:
        break
      texts.append(t[:budget])
      budget -= len(texts[-1])
    out[d] = bits_per_char(apply, tok, texts, seq_len)
  return out


# ------------------------------------------------------------------ fusion corpus


def fusion_corpus(tok, domains, seq_len: int, per_domain: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
  """Sequences of ``seq_len`` target tokens from each domain's train documents.

  Returns ``(texts, ids [N, L], offsets [N, L, 2] into each text, next_ids [N])``; a
  sequence's text runs from its first token's start to its last token's end.
  """
  texts, ids, offs, nxt = [], [], [], []
  for d in domains:
    n = 0
    for _, doc in text.split(d).train:
      enc = tok.encode(doc)
      for s in range(0, len(enc.ids) - seq_len, seq_len * 3):   # spread over the document
        if n >= per_domain:
          break
        o = enc.offsets[s:s + seq_len]
        a, b = int(o[0, 0]), int(o[-1, 1])
        texts.append(doc[a:b])
        ids.append(enc.ids[s:s + seq_len])
        offs.append(o - a)
        nxt.append(enc.ids[s + seq_len])
        n += 1
      if n >= per_domain:
        break
  return texts, np.stack(ids).astype(np.int32), np.stack(offs), np.asarray(nxt, np.int32)


def _aligned(config, wd, name, rep_dir, tgt_tok, src_tok, texts, ids, offs, nxt):
  """[N, L, K] aligned targets and [N] CE of one source (cached in the workdir)."""
  from kfuse.fusion import align as A
  from kfuse.fusion import representations as R
  path = os.path.join(wd, "aligned", f"{name}.npz")
  unit = str(config.fusion.ce_unit)
  if unit not in ("token", "char"):
    raise KfuseError(f"fusion.ce_unit: expected 'token' or 'char', got {unit!r}")
  if os.path.isfile(path):
    with np.load(path) as z:
      return z["indices"], z["logits"], z[f"ce_{unit}"], float(z["matched"])
  kind = str(config.fusion.vocab_map)
  counts = None
  if kind == "ms":  # FuseChat-2: aligned pair statistics over the fusion corpus, sparse
    pairs = [A.aligned_pairs(ids[n], offs[n], rec["token_ids"], rec["offsets"])
             for n, rec in enumerate(R.read(rep_dir))]
    counts = A.pair_counts(np.concatenate([p[0] for p in pairs]),
                           np.concatenate([p[1] for p in pairs]), src_tok.vocab_size)
  vm = A.vocab_map(tgt_tok, src_tok, kind, counts=counts, cache_dir=config.data.cache_dir)
  I, Lg, ce, ce_char, matched = [], [], [], [], []
  for n, rec in enumerate(R.read(rep_dir)):
    if rec["token_sha256"] != R.token_hash(src_tok.encode(texts[n]).ids):
      raise KfuseError(f"{rep_dir}: sequence {n}'s token ids differ from the corpus'"
                       " (made from a different corpus, order or tokenizer)")
    i, l, m = A.align_topk(ids[n], offs[n], rec["offsets"], rec["topk_ids"],
                           rec["topk_logprobs"], vm, next_id=int(nxt[n]))
    I.append(i)
    Lg.append(l)
    ce.append(rec["seq_ce"])
    # nats per character of the text the source predicted (comparable across tokenizers)
    tce, off = rec["token_ce"], rec["offsets"]
    ok = np.isfinite(tce)
    chars = int(np.sum(off[1:, 1] - off[:-1, 1])) if len(off) > 1 else 0
    ce_char.append(float(np.sum(tce[ok])) / max(chars, 1))
    matched.append(m.mean())
  arrays = dict(indices=np.stack(I), logits=np.stack(Lg), ce_token=np.asarray(ce, np.float32),
                ce_char=np.asarray(ce_char, np.float32), matched=float(np.mean(matched)))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", **arrays)
  os.replace(path + ".tmp.npz", path)
  return arrays["indices"], arrays["logits"], arrays[f"ce_{unit}"], arrays["matched"]


def _fuse(config, model, variables, ids, nxt, targets, fusion: str, steps: int, key, mesh=None):
  """Continue ``variables`` with λ·CLM + (1−λ)·fusion over the given sources' targets.

  On a ``mesh`` (`kfuse.fusion.mesh`) the state is placed by the partition rules and each
  batch split over ``data`` x ``fsdp``; the returned parameters are on the host.
  """
  from kfuse import distill
  from kfuse.fusion import mesh as M
  from kfuse.fusion.losses import objective
  f = config.fusion
  lam = 1.0 if not targets else float(f.lm_loss_weight)
  obj = objective(fusion, lam, float(f.temperature)) if targets else None
  if obj is None:
    from kfuse.distill.objectives import supervised
    obj = supervised()
  opt = {"name": "adamw", "learning_rate": float(f.learning_rate), "schedule": "cosine",
         "warmup_steps": steps // 20, "clip_norm": 1.0}
  opt.update(plain(f.get("optimizer") or {}))     # `kfuse.optim` fields overriding the default
  step = distill.make_step(model, obj, opt, total_steps=steps)
  y_all = np.concatenate([ids[:, 1:], nxt[:, None]], axis=1)
  bs = int(f.batch_size)
  state = M.place(step.init(variables, jnp.asarray(ids[:bs])), mesh)
  rng = np.random.default_rng(int(config.seed))          # the same batches for every variant
  t0 = time.time()
  for i in range(steps):
    b = rng.integers(0, len(ids), bs)
    batch = {"x": ids[b], "y": y_all[b]}
    if targets:
      batch["topk_indices"] = np.stack([t[0][b] for t in targets])
      batch["topk_logits"] = np.stack([t[1][b] for t in targets])
      batch["topk_ce"] = np.stack([t[2][b] for t in targets])
    batch = M.place_batch(batch, mesh) if mesh is not None else jax.tree.map(jnp.asarray, batch)
    state, m = step(state, batch, jax.random.fold_in(key, i))
  jax.block_until_ready(state.params)
  tps = steps * bs * ids.shape[1] / max(time.time() - t0, 1e-9)
  return {"params": jax.device_get(state.params)}, tps


# ------------------------------------------------------------------ the job


def run(config: Any, workdir: str | None = None) -> dict:
  """Run the FuseLLM / FuseChat benchmark of ``config`` (see ``configs/fusellm.py``)."""
  t_start = time.time()
  if config.job not in ("fusellm", "fusechat"):
    raise KfuseError(f"job: expected 'fusellm' or 'fusechat', got {config.job!r}")
  wd = check_workdir(workdir or config.workdir, bool(config.overwrite), f"results_{config.job}.json")
  for d in config.domains:
    text._check_domain(d)
  seq_len = int(config.seq_len)
  key = jax.random.key(int(config.seed))
  cache = config.data.cache_dir or None
  # 1. tokenizers and 2. models
  tgt_cfg = plain(config.target)
  tgt_tok = text.train_tokenizer(tgt_cfg["tokenizer"], int(tgt_cfg["vocab_size"]),
                                 domains=tuple(config.domains), cache_dir=cache)
  models, results = {}, {"bpc": {}, "tokens_per_second": {}, "matched": {}}
  from kfuse.fusion import mesh as M
  mesh = M.from_config(plain(config.get("mesh", {})))
  srcs = plain(config.sources)
  for i, (name, s) in enumerate(sorted(srcs.items())):
    if s.get("model_dir"):   # an HF causal LM: used as it is, never trained here
      fn, tok = hf_source(s["model_dir"], s.get("tokenizer", ""), mesh)
      models[name] = (_Apply(fn), {}, tok, _key(s, seq_len))
      results["bpc"][f"source:{name}"] = _eval(config, fn, tok, seq_len)
      continue
    tok = text.train_tokenizer(s["tokenizer"], int(s["vocab_size"]), domains=tuple(s["domains"]),
                               cache_dir=cache)
    model = _gpt(s, tok.vocab_size, seq_len)
    mkey = _key(s, int(config.seed), seq_len)
    path = os.path.join(wd, "models", f"{name}-{mkey}")
    variables = _load(path)
    if variables is None:
      wins = _windows([tok.encode(t).ids for t in text.texts(s["domains"])], seq_len)
      init = model.init(jax.random.fold_in(key, 100 + i), jnp.asarray(wins[:1, :-1]))
      variables, loss, tps = _train_clm(model, init, wins, int(s["steps"]), int(s["batch_size"]),
                                        float(s["learning_rate"]), jax.random.fold_in(key, 200 + i))
      _save(path, variables)
      _log(config, f"source {name}: {tok.vocab_size} tokens, final loss {loss:.3f}, {tps:.0f} tok/s")
    models[name] = (model, variables, tok, mkey)
    results["bpc"][f"source:{name}"] = _eval(config, lambda x, m=model, v=variables: m.apply(v, x), tok, seq_len)
  tmodel = _gpt(tgt_cfg, tgt_tok.vocab_size, seq_len)
  tkey = _key(tgt_cfg, int(config.seed), seq_len)
  tpath = os.path.join(wd, "models", f"target-{tkey}")
  tvars = _load(tpath)
  if tvars is None:
    wins = _windows([tgt_tok.encode(t).ids for t in text.texts(config.domains)], seq_len)
    init = tmodel.init(jax.random.fold_in(key, 1), jnp.asarray(wins[:1, :-1]))
    tvars, loss, tps = _train_clm(tmodel, init, wins, int(tgt_cfg["steps"]), int(tgt_cfg["batch_size"]),
                                  float(tgt_cfg["learning_rate"]), jax.random.fold_in(key, 2))
    _save(tpath, tvars)
    _log(config, f"target: {tgt_tok.vocab_size} tokens, final loss {loss:.3f}")
  apply_t = lambda v: (lambda x: tmodel.apply(v, x))
  results["bpc"]["target"] = _eval(config, apply_t(tvars), tgt_tok, seq_len)
  # 3. fusion corpus and representations
  from kfuse.fusion import representations as R
  ftexts, ids, offs, nxt = fusion_corpus(tgt_tok, config.domains, seq_len, int(config.fusion.sequences_per_domain))
  ckey = _key(int(config.fusion.sequences_per_domain), int(config.fusion.k), tkey)
  reps = {"target": (os.path.join(wd, "reps", f"target-{tkey}-{ckey}"), tgt_tok, tmodel, tvars)}
  reps.update({n: (os.path.join(wd, "reps", f"{n}-{k}-{ckey}"), t, m, v)
               for n, (m, v, t, k) in models.items()})
  for n, (path, tok, model, variables) in reps.items():
    v = M.place(variables, mesh)
    R.write(path, ftexts, tok, lambda x, m=model, v=v: m.apply(v, x), k=int(config.fusion.k),
            context=seq_len, shard_size=64, meta={"source": n}, mesh=mesh)
  # 4. alignment
  targets = {}
  for n, (path, tok, _, _) in reps.items():
    targets[n] = _aligned(config, wd, os.path.basename(path) + "-" + str(config.fusion.vocab_map),
                          path, tgt_tok, tok, ftexts, ids, offs, nxt)
    results["matched"][n] = targets[n][3]
  # 5. variants
  steps = int(config.fusion.steps)
  variants = {}
  if config.job == "fusellm":
    variants["clm"] = ("min_ce", [])
    for n in models:
      variants[f"kd:{n}"] = ("min_ce", [n])
    for fusion in config.fusion.rules:
      variants[f"fusellm:{fusion}"] = (fusion, ["target", *models])
  else:
    for n in models:
      variants[f"pair:{n}"] = ("min_ce", ["target", n])
  trained = {}
  for i, (label, (fusion, names)) in enumerate(variants.items()):
    v, tps = _fuse(config, tmodel, tvars, ids, nxt, [targets[n] for n in names], fusion, steps,
                   jax.random.fold_in(key, 1000 + i), mesh)
    trained[label] = v
    results["tokens_per_second"][label] = tps
    results["bpc"][label] = _eval(config, apply_t(v), tgt_tok, seq_len)
    _log(config, f"{label}: {results['bpc'][label]} ({tps:.0f} tok/s)")
  if config.job == "fusechat":
    from kfuse import merge
    experts = [trained[f"pair:{n}"]["params"] for n in models]
    for label, spec in plain(config.merges).items():
      merged = merge.merge(spec["name"], experts, tvars["params"], params=spec.get("params") or {})
      results["bpc"][f"fusechat:{label}"] = _eval(config, apply_t({"params": merged}), tgt_tok, seq_len)
      _log(config, f"fusechat:{label}: {results['bpc'][f'fusechat:{label}']}")
  results["seconds"] = time.time() - t_start
  results["config"] = plain(config.to_dict())
  write_json(os.path.join(wd, f"results_{config.job}.json"), results)
  write_text(os.path.join(wd, f"table_{config.job}.md"), _table(results, list(config.domains)))
  _log(config, "\n" + _table(results, list(config.domains)))
  return results


def _table(results: dict, domains: list[str]) -> str:
  head = "| model | " + " | ".join(domains) + " | mean |\n|---|" + "---:|" * (len(domains) + 1) + "\n"
  rows = []
  for label, bpc in results["bpc"].items():
    vals = [bpc[d] for d in domains]
    rows.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
  return head + "\n".join(rows) + "\n"
