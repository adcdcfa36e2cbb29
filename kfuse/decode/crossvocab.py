"""Decoding with models whose tokenizers differ: a union string vocabulary and a host loop.

    vocab = CrossVocab([tok_a, tok_b], [model_a.config.vocab_size, model_b.config.vocab_size])
    out = generate_cross([model_a, model_b], vocab, ["def f("], 32, processor=unite(vocab))
    out.texts[0], out.strings[0]          # generated text; the chosen union-string ids

The union vocabulary ``S`` is every token surface of every tokenizer (boundary markers
normalised, `kfuse.fusion.align.surfaces`), one entry per distinct string; entry 0 is
"no string" (ids a model has beyond its tokenizer's). A cross-vocabulary rule
(`kfuse.decode.unite`, `kfuse.decode.deepen`) reads each model's next-token logits
over its own vocabulary and returns logits over ``S``; the next string is picked from
them (greedy, or temperature / top-k / top-p as `generate`). Each model is then fed that
string in its own tokens: the token with the same surface when its vocabulary has one,
else its tokenizer's encoding of the string (UniTE's and DeePEn's rule; both reference
implementations re-tokenise the whole text instead, which costs every model's KV cache
at every step: here each model keeps its cache and only the new string is encoded).

Per host-side step, when the picked string is one token for every model (the common case)
one jitted program feeds it to every model and fuses and picks the next string; otherwise
each model runs its jitted one-token cached decode once per token, then the fusion + pick.
Rows are decoded one at a time (each model advances by a different number of tokens per
row). This is a host loop, not `generate`'s single `lax.while_loop`: a token count that
depends on the picked string has no static shape.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kfuse.decode import loop as L
from kfuse.decode import processors as P
from kfuse.errors import KfuseError
from kfuse.fusion.align import surfaces

__all__ = ["CrossVocab", "CrossGeneration", "generate_cross", "input_embeddings"]

_SPECIAL = b"\x00"   # `surfaces` prefix of added / special tokens


class CrossVocab:
  """Host tables between M tokenizers and their union string vocabulary ``S``.

  Attributes:
    strings: ``S`` as surface bytes (``strings[0]`` = b"" = no string).
    sid: per model, ``[V_i]`` int32: the ``S`` index of each token id (0 beyond the tokenizer,
      and for a byte-level byte-0 token, whose surface b"\x00" `surfaces` also gives to ids
      without a token: such ids are never proposed nor fed).
    fill: per model, ``[|S|]`` int32: the token whose logit stands for string s in model i:
      the same surface, else the first token of the model's encoding of s; -1 when the
      model cannot encode s (another tokenizer's special token).
    exact: per model, ``[|S|]`` bool: fill[i][s] is s itself.
    longest: per model, the most tokens one string of ``S`` encodes to.
  """

  def __init__(self, tokenizers: Sequence, vocab_sizes: Sequence[int]):
    if len(tokenizers) != len(vocab_sizes) or not tokenizers:
      raise KfuseError(f"CrossVocab: {len(tokenizers)} tokenizers for {len(vocab_sizes)} models")
    self.tokenizers = list(tokenizers)
    surf = [surfaces(t) for t in self.tokenizers]
    for i, (s, v) in enumerate(zip(surf, vocab_sizes)):
      if len(s) > int(v):
        raise KfuseError(f"CrossVocab: tokenizer {i} has {len(s)} tokens but model {i} has"
                         f" vocab_size = {v}: not this model's tokenizer")
    strings = sorted({x for s in surf for x in s if x not in (_SPECIAL, b"")})
    self.strings = [b""] + strings
    index = {s: j for j, s in enumerate(self.strings)}
    self.index = index
    self.sid, self.fill, self.exact, self.longest = [], [], [], []
    self._pieces = [dict() for _ in self.tokenizers]
    for i, (tok, s) in enumerate(zip(self.tokenizers, surf)):
      sid = np.zeros(int(vocab_sizes[i]), np.int32)
      fill = np.full(len(self.strings), -1, np.int32)
      for t in range(len(s) - 1, -1, -1):        # the first id of a repeated surface wins
        if s[t] in index:
          sid[t] = index[s[t]]
          fill[sid[t]] = t
      exact = fill >= 0
      todo = [j for j in range(1, len(self.strings))
              if not exact[j] and not self.strings[j].startswith(_SPECIAL)]
      encoded = self._encode(tok, [self.strings[j] for j in todo])
      for j, ids in zip(todo, encoded):
        self._pieces[i][j] = ids
        if len(ids):
          fill[j] = ids[0]
      self.sid.append(sid)
      self.fill.append(fill)
      self.exact.append(exact)
      self.longest.append(max([1] + [len(e) for e in encoded]))

  @staticmethod
  def _encode(tok, strings):
    raw = getattr(tok, "_tok", tok)
    texts = [s.decode("utf-8", errors="replace") for s in strings]
    return [np.asarray(e.ids, np.int32) for e in raw.encode_batch(texts, add_special_tokens=False)]

  def __len__(self) -> int:
    return len(self.strings)

  def pieces(self, i: int, s: int) -> np.ndarray:
    """Model i's token ids for string s: its own token of that surface, else its encoding."""
    got = self._pieces[i].get(s)
    if got is None:
      if self.exact[i][s]:
        got = np.asarray([self.fill[i][s]], np.int32)
      elif self.strings[s].startswith(_SPECIAL):
        got = np.zeros((0,), np.int32)
      else:
        got = self._encode(self.tokenizers[i], [self.strings[s]])[0]
      self._pieces[i][s] = got
    return got

  def common(self) -> np.ndarray:
    """``S`` indices of the strings every vocabulary has (DeePEn's anchor tokens)."""
    return np.flatnonzero(np.logical_and.reduce(self.exact))[:]

  def lookup(self, text: str) -> int:
    """The ``S`` index of a token string (a special token's content, e.g. '<eos>', too)."""
    for key in (_SPECIAL + text.encode("utf-8"), text.encode("utf-8")):
      if key in self.index and key:
        return self.index[key]
    raise KfuseError(f"stop token {text!r}: not a token of any model's vocabulary; give one"
                     " token's text (special tokens by their content, e.g. '<eos>')")

  def text(self, ids) -> str:
    """The text of a sequence of ``S`` indices (special tokens left out)."""
    parts = (self.strings[int(s)] for s in ids)
    out = b"".join(x for x in parts if not x.startswith(_SPECIAL))
    return out.decode("utf-8", errors="replace")


def input_embeddings(model) -> np.ndarray:
  """The input embedding matrix ``[V, d]`` of a `kfuse.models.hf` model (Llama family: model.
  embed_tokens, GPT-2: transformer.wte)."""
  inner = getattr(model, "model", None)
  emb = inner.embed_tokens if inner is not None else model.transformer.wte
  return np.asarray(emb.weight[...], np.float32)


class CrossGeneration(NamedTuple):
  """texts: the generated text per prompt; strings: the picked ``S`` indices per prompt
  (stop string included); tokens: per prompt, per model, the picked strings in that model's
  token ids (what it was fed after its prompt, and the last string's)."""
  texts: list
  strings: list
  tokens: list


def _decode(state, ids, cache, start, graphdef):
  """Logits after ids [1, n] fed at cache slots start.. (positions = slots), and the cache."""
  m = nnx.merge(graphdef, state)
  n, size = ids.shape[1], cache[0][0].shape[1]
  key_valid = (jnp.arange(size) < start + n)[None]
  pos = (start + jnp.arange(n, dtype=jnp.int32))[None]
  logits, cache = m.decode(ids, pos, cache, start, key_valid)
  return logits[:, -1], cache


_feed = jax.jit(_decode, static_argnames=("graphdef",))


def _pick_fn(logits, pstate, key, step, processor, temperature, top_k, top_p):
  fused, pstate = processor.apply(logits, pstate)
  return L._sample(fused, jax.random.fold_in(key, step), temperature, top_k, top_p), pstate


_pick = jax.jit(_pick_fn, static_argnames=("processor", "temperature", "top_k", "top_p"))


@functools.partial(jax.jit, static_argnames=("graphdefs", "processor", "temperature", "top_k",
                                             "top_p"))
def _step(states, toks, caches, starts, pstate, key, step, *, graphdefs, processor, temperature,
          top_k, top_p):
  """The common case in one program: one token into every model, then fuse and pick."""
  last, new = [], []
  for st, t, c, s0, g in zip(states, toks, caches, starts, graphdefs):
    z, c = _decode(st, jnp.reshape(t, (1, 1)), c, s0, g)
    last.append(z)
    new.append(c)
  s, pstate = _pick_fn(tuple(last), pstate, key, step, processor, temperature, top_k, top_p)
  return s, tuple(last), new, pstate


def generate_cross(models, vocab: CrossVocab, prompts: Sequence[str], max_new_tokens: int, *,
                   processor: P.Processor, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, stop: Sequence[str] = (), key=None) -> CrossGeneration:
  """Generate up to ``max_new_tokens`` union strings after each text prompt.

  ``processor``: a cross-vocabulary rule built on ``vocab`` (`unite`, `deepen`), optionally
  chained with per-distribution steps; ``stop``: token texts that end a row (kept in
  ``strings``, left out of ``texts``). A row also ends when a model's cache (prompt +
  ``max_new_tokens`` x the longest encoding of a string, capped at its context) is full.
  """
  models = list(models)
  if getattr(processor, "vocab", None) is not vocab:
    raise KfuseError(f"generate_cross: {processor.name} is not a cross-vocabulary rule built on"
                     " this CrossVocab (use decode.unite(vocab) or decode.deepen(vocab, models));"
                     " models sharing one tokenizer use decode.generate")
  if len(models) != len(vocab.tokenizers):
    raise KfuseError(f"generate_cross: {len(models)} models for {len(vocab.tokenizers)} tokenizers")
  for i, m in enumerate(models):
    if not (hasattr(m, "decode") and hasattr(m, "init_cache")):
      raise KfuseError(f"generate_cross: model {i} ({type(m).__name__}) has no KV-cache decode")
    if int(m.config.vocab_size) != len(vocab.sid[i]):
      raise KfuseError(f"generate_cross: model {i} has vocab_size {m.config.vocab_size}, the"
                       f" CrossVocab was built for {len(vocab.sid[i])}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise KfuseError(f"generate_cross: max_new_tokens must be an integer >= 1, got"
                     f" {max_new_tokens!r}")
  if isinstance(prompts, str):
    prompts = [prompts]
  if not len(prompts):
    raise KfuseError("generate_cross: no prompts given")
  temperature = P._finite("temperature", temperature, 0.0)
  top_p = P._finite("top_p", top_p, 0.0, 1.0, lo_open=True)
  if temperature > 0 and key is None:
    raise KfuseError("generate_cross: sampling (temperature > 0) needs key=jax.random.key(seed)")
  stops = {vocab.lookup(s) for s in stop}
  key = jax.random.key(0) if key is None else key
  graphdefs, states = L._split(models)
  longest = vocab.longest
  texts, picked, fed = [], [], []
  for r, prompt in enumerate(prompts):
    if not isinstance(prompt, str) or not prompt:
      raise KfuseError(f"prompt {r}: must be a non-empty string, got {prompt!r}")
    caches, starts, last = [], [], []
    for i, (g, st, m) in enumerate(zip(graphdefs, states, models)):
      ids = vocab.tokenizers[i].encode(prompt).ids
      if not len(ids):
        raise KfuseError(f"prompt {r}: tokenizer {i} encodes {prompt!r} as no tokens")
      ctx = int(getattr(m.config, "max_positions", 0) or 0)
      size = len(ids) + int(max_new_tokens) * longest[i]
      if ctx:
        if len(ids) + int(max_new_tokens) > ctx:
          raise KfuseError(f"generate_cross: prompt {r} of {len(ids)} tokens + max_new_tokens"
                           f" = {max_new_tokens} exceeds model {i}'s context of {ctx} positions")
        size = min(size, ctx)
      z, c = _feed(st, jnp.asarray(ids, jnp.int32)[None], m.init_cache(1, size), 0, graphdef=g)
      caches.append(c)
      starts.append(len(ids))
      last.append(z)
    pstate = processor.init(tuple(last))
    opts = dict(processor=processor, temperature=temperature, top_k=int(top_k), top_p=top_p)
    base = r * int(max_new_tokens)
    s, pstate = _pick(tuple(last), pstate, key, base, **opts)
    row, row_fed = [], [[] for _ in models]
    for step in range(int(max_new_tokens)):
      s = int(s[0])
      row.append(s)
      pieces = [vocab.pieces(i, s) for i in range(len(models))]
      for i, p in enumerate(pieces):
        row_fed[i].extend(int(x) for x in p)
      if s in stops or step + 1 == max_new_tokens:
        break
      if any(starts[i] + len(p) > caches[i][0][0].shape[1] for i, p in enumerate(pieces)) \
          or not all(len(p) for p in pieces):
        break                       # a cache is full, or a model cannot encode the string
      if all(len(p) == 1 for p in pieces):      # one program: feed every model, fuse, pick
        s, last, caches, pstate = _step(states, tuple(jnp.int32(p[0]) for p in pieces),
                                        caches, tuple(jnp.int32(x) for x in starts), pstate,
                                        key, base + step + 1, graphdefs=graphdefs, **opts)
        last = list(last)
        starts = [x + 1 for x in starts]
        continue
      for i, p in enumerate(pieces):
        for t in p:                 # one token at a time: one compiled step per model
          last[i], caches[i] = _feed(states[i], jnp.full((1, 1), t, jnp.int32), caches[i],
                                     starts[i], graphdef=graphdefs[i])
          starts[i] += 1
      s, pstate = _pick(tuple(last), pstate, key, base + step + 1, **opts)
    picked.append(row)
    texts.append(vocab.text([s for s in row if s not in stops]))
    fed.append(row_fed)
  return CrossGeneration(texts, picked, fed)
