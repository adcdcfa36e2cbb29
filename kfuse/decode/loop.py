"""Jit-compiled decoding with a KV cache for kfuse's HF causal LMs, one or several fused.

    out = generate([model], prompts, max_new_tokens=32)                        # greedy
    out = generate([large, small_base, small_tuned], prompts, 32,
                   processor=proxy_tune(1.0), temperature=0.7, top_p=0.9, key=key)
    out.tokens [B, N] (pad_id after a stop token), out.lengths [B], out.state

Prompts of different lengths are left-padded to the longest; each row's positions
count from its first real token and padded slots are masked in every layer, so a
row decodes as it would alone. The loop is one `jax.jit` program: a prefill of the
padded prompts into each model's cache (static size prompt + ``max_new_tokens``),
then a `lax.while_loop` that feeds the last token to every model (one cached
position each), fuses their logits with ``processor`` (`kfuse.decode.processors`),
applies temperature / top-k / top-p and picks the token (argmax when
``temperature`` = 0, else a categorical draw with key ``fold_in(key, step)``). It
stops early when every row has produced a stop token. Models are Flax NNX modules
with ``init_cache`` / ``decode`` (`kfuse.models.hf`: Llama, Mistral, Qwen2, GPT-2;
the zoo GPT through `kfuse.models.gpt.GPTDecoder`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kfuse.decode import processors as P
from kfuse.errors import KfuseError

__all__ = ["Generation", "generate", "score", "pad_prompts", "stop_token_ids", "check_models"]


class Generation(NamedTuple):
  """tokens [B, N] (pad_id after each row's stop token), lengths [B] (stop token included),
  state: the processor's state after the last step (e.g. DLF's weights), logits: the
  fused logits [B, N, V] each token was picked from (``return_logits=True``, else None)."""
  tokens: np.ndarray
  lengths: np.ndarray
  state: Any
  logits: Any = None


# one object: the jitted loop's cache is keyed on the processor, so a fresh identity()
# per call would recompile every call
_IDENTITY = P.identity()


def check_models(models: Sequence, processor: P.Processor) -> None:
  """One shared vocabulary and a model count the processor reads; one line otherwise."""
  if not models:
    raise KfuseError("generate: no models given")
  for i, m in enumerate(models):
    if not (hasattr(m, "decode") and hasattr(m, "init_cache")):
      raise KfuseError(f"generate: model {i} ({type(m).__name__}) has no KV-cache decode;"
                       " use a kfuse.models.hf model (Llama, Mistral, Qwen2, GPT-2) or a zoo"
                       " GPT wrapped as kfuse.models.gpt.GPTDecoder(model, variables)")
  if processor.vocab is not None:
    raise KfuseError(f"{processor.name}: a cross-vocabulary rule; decode it with"
                     " kfuse.decode.generate_cross (text prompts, one tokenizer per model)")
  vocabs = [int(m.config.vocab_size) for m in models]
  if len(set(vocabs)) > 1:
    raise KfuseError(f"{processor.name}: the models' vocabularies differ (vocab_size "
                     f"{' vs '.join(map(str, vocabs))}); it needs one shared vocabulary:"
                     " models with different tokenizers need a cross-vocabulary ensemble"
                     " (UniTE or DeePEn: decode.unite or decode.deepen with"
                     " decode.generate_cross)")
  if processor.models is not None and processor.models != len(models):
    raise KfuseError(f"{processor.name}: reads {processor.models} model(s)' logits, got"
                     f" {len(models)} models")


def pad_prompts(prompts, pad_id: int = 0):
  """Left-pad token-id lists: (ids [B, P] int32, mask [B, P] bool); empty prompts refused."""
  if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
    prompts = list(prompts)
  if not len(prompts):
    raise KfuseError("generate: no prompts given")
  rows = []
  for i, p in enumerate(prompts):
    a = np.asarray(p)
    if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
      raise KfuseError(f"prompt {i}: must be a 1-D list of token ids, got shape {a.shape}"
                       f" dtype {a.dtype}")
    if a.size == 0:
      raise KfuseError(f"prompt {i}: empty (a prompt needs at least one token, e.g. BOS)")
    rows.append(a.astype(np.int32))
  n = max(len(r) for r in rows)
  ids = np.full((len(rows), n), pad_id, np.int32)
  mask = np.zeros((len(rows), n), bool)
  for i, r in enumerate(rows):
    ids[i, n - len(r):] = r
    mask[i, n - len(r):] = True
  return ids, mask


def stop_token_ids(tokenizer, stops: Sequence) -> tuple:
  """Stop tokens as ids: ints pass through, strings must encode to exactly one token."""
  out = []
  for s in stops:
    if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
      out.append(int(s))
      continue
    ids = tokenizer.encode(str(s)).ids if tokenizer is not None else []
    if len(ids) != 1:
      raise KfuseError(f"stop token {s!r}: the tokenizer encodes it as {len(ids)} tokens"
                       f" {list(map(int, ids))}, not one; give a single-token string or an id")
    out.append(int(ids[0]))
  return tuple(out)


def _check_lengths(models, prompt_len: int, new: int) -> None:
  for i, m in enumerate(models):
    ctx = int(getattr(m.config, "max_positions", 0) or 0)
    if ctx and prompt_len + new > ctx:
      raise KfuseError(f"generate: prompt of {prompt_len} tokens + max_new_tokens = {new}"
                       f" exceeds model {i}'s context of {ctx} positions")


def _sample(logits, key, temperature: float, top_k: int, top_p: float):
  """The next token of each row from fused logits [B, V]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = logits.astype(jnp.float32) / temperature
  if top_k:
    z, _ = P.top_k(top_k).apply((z,), None)
  if top_p < 1.0:
    z, _ = P.top_p(top_p).apply((z,), None)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdefs", "processor", "new", "temperature",
                                             "top_k", "top_p", "stops", "pad_id", "keep"))
def _run(states, ids, mask, key, *, graphdefs, processor, new, temperature, top_k, top_p,
         stops, pad_id, keep):
  models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
  b, plen = ids.shape
  size = plen + new
  key_valid = jnp.zeros((b, size), bool).at[:, :plen].set(mask)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  caches, last = [], []
  for m in models:
    logits, c = m.decode(ids, positions, m.init_cache(b, size), 0, key_valid)
    caches.append(c)
    last.append(logits[:, -1])
  pstate = processor.init(tuple(last))
  stop_arr = jnp.asarray(stops if stops else (-1,), jnp.int32)

  def pick(logits_per_model, pstate, step):
    fused, pstate = processor.apply(tuple(logits_per_model), pstate)
    tok = _sample(fused, jax.random.fold_in(key, step), temperature, top_k, top_p)
    return tok, pstate, fused.astype(jnp.float32)

  tok, pstate, fused = pick(last, pstate, 0)
  kept = jnp.zeros((b, new if keep else 1, fused.shape[-1]), jnp.float32)
  if keep:
    kept = kept.at[:, 0].set(fused)
  done = jnp.isin(tok, stop_arr)
  out = jnp.full((b, new), pad_id, jnp.int32).at[:, 0].set(tok)
  lengths = jnp.ones((b,), jnp.int32)
  next_pos = positions[:, -1] + 1

  def cond(c):
    return (c[0] < new) & ~jnp.all(c[3])

  def body(c):
    step, tok, caches, done, out, lengths, key_valid, pstate, kept = c
    slot = plen + step - 1
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((b, 1), bool), (0, slot))
    pos = (next_pos + step - 1)[:, None]
    logits, new_caches = [], []
    for m, cache in zip(models, caches):
      z, cache = m.decode(tok[:, None], pos, cache, slot, key_valid)
      logits.append(z[:, 0])
      new_caches.append(cache)
    nxt, pstate, fused = pick(logits, pstate, step)
    if keep:
      kept = jax.lax.dynamic_update_slice(kept, fused[:, None], (0, step, 0))
    nxt = jnp.where(done, pad_id, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(nxt, stop_arr)
    return step + 1, nxt, new_caches, done, out, lengths, key_valid, pstate, kept

  c = (jnp.int32(1), tok, caches, done, out, lengths, key_valid, pstate, kept)
  c = jax.lax.while_loop(cond, body, c)
  return c[4], c[5], c[7], c[8]


def _split(models):
  pairs = [nnx.split(m) for m in models]
  return tuple(g for g, _ in pairs), tuple(s for _, s in pairs)


def generate(models, prompts, max_new_tokens: int, *, processor: P.Processor | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence = (), tokenizer=None, key=None,
             pad_id: int = 0, return_logits: bool = False) -> Generation:
  """Decode ``max_new_tokens`` tokens after each prompt (lists of token ids).

  ``models``: one model or a list; their next-token logits go through ``processor``
  (default: the one model's logits). ``temperature`` 0 = greedy (no key needed),
  else sampling with ``key``, after optional ``top_k`` / ``top_p`` truncation.
  ``stop_tokens``: ids, or strings the ``tokenizer`` encodes as one token each.
  ``return_logits``: also return the fused logits of every step (before temperature).
  """
  models = list(models) if isinstance(models, (list, tuple)) else [models]
  processor = processor or _IDENTITY
  check_models(models, processor)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise KfuseError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  temperature = P._finite("temperature", temperature, 0.0)
  top_p = P._finite("top_p", top_p, 0.0, 1.0, lo_open=True)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise KfuseError(f"top_k: must be an integer >= 0 (0 = off), got {top_k!r}")
  if temperature > 0 and key is None:
    raise KfuseError("generate: sampling (temperature > 0) needs key=jax.random.key(seed)")
  stops = stop_token_ids(tokenizer, stop_tokens)
  vocab = int(models[0].config.vocab_size)
  for s in stops:
    if not 0 <= s < vocab:
      raise KfuseError(f"stop token {s}: outside the vocabulary [0, {vocab})")
  ids, mask = pad_prompts(prompts, pad_id)
  if ids.max() >= vocab or ids.min() < 0:
    raise KfuseError(f"prompts: token id {int(ids.max())} outside the vocabulary [0, {vocab})")
  _check_lengths(models, ids.shape[1], int(max_new_tokens))
  graphdefs, states = _split(models)
  key = jax.random.key(0) if key is None else key
  tokens, lengths, state, logits = _run(states, jnp.asarray(ids), jnp.asarray(mask), key,
                                        graphdefs=graphdefs, processor=processor,
                                        new=int(max_new_tokens), temperature=temperature,
                                        top_k=int(top_k), top_p=top_p, stops=stops,
                                        pad_id=int(pad_id), keep=bool(return_logits))
  return Generation(np.asarray(tokens), np.asarray(lengths), state,
                    np.asarray(logits) if return_logits else None)


@functools.partial(jax.jit, static_argnames=("graphdefs", "processor"))
def _score(states, ids, *, graphdefs, processor):
  models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
  logits = [m(ids)[:, :-1] for m in models]
  b, t, v = logits[0].shape
  flat = tuple(z.reshape(b * t, v) for z in logits)
  fused, _ = processor.apply(flat, processor.init(flat))
  lp = jax.nn.log_softmax(fused.astype(jnp.float32), axis=-1).reshape(b, t, v)
  return jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]


def score(models, ids, processor: P.Processor | None = None) -> np.ndarray:
  """Teacher-forced log-probabilities [B, T−1] (nats) of ids[:, 1:] under the fused
  next-token distribution (each position fused on its own, as in decoding)."""
  models = list(models) if isinstance(models, (list, tuple)) else [models]
  processor = processor or _IDENTITY
  check_models(models, processor)
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 2 or ids.shape[1] < 2:
    raise KfuseError(f"score: ids must be [B, T] with T >= 2, got shape {ids.shape}")
  _check_lengths(models, ids.shape[1], 0)
  graphdefs, states = _split(models)
  return np.asarray(_score(states, jnp.asarray(ids), graphdefs=graphdefs, processor=processor))
