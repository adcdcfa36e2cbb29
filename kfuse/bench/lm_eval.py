"""Perplexity of an HF causal LM (Llama, Mistral, Qwen2, GPT-2) on a text file.

    python -m kfuse.main --config=configs/lm_eval.py:PATH --config.text_file=FILE

The text is tokenized whole (tokenizer.json of the model directory, or
``config.tokenizer``), cut into consecutive non-overlapping windows of
``seq_len`` tokens (the last one may be shorter), and each window is scored on
its own: token t+1 is predicted from tokens ≤ t of the same window. With N the
number of predicted tokens (every window's length − 1),

    NLL = −(1/N) Σ_windows Σ_t log p(x_{t+1} | x_≤t),     perplexity = exp(NLL)

— what transformers reports as ``exp(loss)`` for ``labels=input_ids`` per window,
weighted by the window's predicted tokens.
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
from flax import nnx

from kfuse.bench.common import check_workdir, get, write_json
from kfuse.errors import KfuseError
from kfuse.models import hf

__all__ = ["window_nll", "perplexity", "run"]


@nnx.jit
def window_nll(model: nnx.Module, ids: jax.Array) -> jax.Array:
  """Σ_t −log p(ids[b, t+1] | ids[b, ≤t]) per window b, in float32: ``[B]``."""
  logp = jax.nn.log_softmax(model(ids).astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(picked, axis=-1)


def perplexity(model: nnx.Module, ids: np.ndarray, seq_len: int, batch_size: int,
               mesh=None, progress: bool = False) -> dict:
  """``{"nll", "perplexity", "tokens", "windows"}`` of token ids ``[N]`` (see the module doc).

  Full windows run ``batch_size`` at a time (the last batch padded with copies of
  its first window, whose scores are dropped); a shorter last window runs alone.
  """
  ids = np.asarray(ids, np.int32).reshape(-1)
  if seq_len < 2 or batch_size < 1:
    raise KfuseError(f"seq_len must be ≥ 2 and eval_batch_size ≥ 1, got {seq_len}, {batch_size}")
  if ids.size < 2:
    raise KfuseError(f"the text holds {ids.size} token(s); perplexity needs at least 2")
  full = ids.size // seq_len
  windows = ids[:full * seq_len].reshape(full, seq_len)
  total, count, start = 0.0, 0, time.time()
  for lo in range(0, full, batch_size):
    batch = windows[lo:lo + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - n, axis=0)])
    x = jax.device_put(batch, hf.batch_sharding(mesh, batch_size)) if mesh else batch
    total += float(np.sum(np.asarray(window_nll(model, x), np.float64)[:n]))
    count += n * (seq_len - 1)
    if progress:
      print(f"lm_eval: {min(lo + batch_size, full)}/{full} windows,"
            f" {time.time() - start:.1f} s", file=sys.stderr)
  tail = ids[full * seq_len:]
  if tail.size >= 2:
    total += float(np.asarray(window_nll(model, tail[None]), np.float64)[0])
    count += tail.size - 1
  nll = total / count
  return {"nll": nll, "perplexity": math.exp(nll), "tokens": int(count),
          "windows": int(full + (tail.size >= 2))}


def run(config: Any, workdir: Optional[str] = None) -> dict:
  """``configs/lm_eval.py``: load the model (and tokenizer), score the text, write results.json."""
  model_dir = get(config, "model_dir")
  text_file = get(config, "text_file")
  if not model_dir:
    raise KfuseError("config.model_dir: required (--config=configs/lm_eval.py:PATH)")
  if not text_file:
    raise KfuseError("config.text_file: required (--config.text_file=FILE)")
  workdir = check_workdir(workdir or get(config, "workdir"), bool(get(config, "overwrite")))
  mesh_cfg = dict(get(config, "mesh") or {})
  mesh = (hf.make_mesh(**{k: int(v) for k, v in mesh_cfg.items()})
          if any(int(v) > 1 for v in mesh_cfg.values()) else None)
  try:
    with open(text_file, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise KfuseError(f"config.text_file: cannot read {text_file}: {e}") from None
  model = hf.load(model_dir, mesh=mesh, dtype=get(config, "dtype") or None)
  tok = hf.load_tokenizer(get(config, "tokenizer") or model_dir)
  tok.check_model(model.config.vocab_size, os.path.join(model_dir, "config.json"))
  ids = tok.encode(text).ids
  max_tokens = int(get(config, "max_tokens", 0))
  if max_tokens > 0:
    ids = ids[:max_tokens]
  res = perplexity(model, ids, int(get(config, "seq_len")), int(get(config, "eval_batch_size")),
                   mesh=mesh, progress=bool(get(config, "progress")))
  res.update(model_dir=model_dir, text_file=text_file, family=model.config.family,
             dtype=str(next(iter(hf.to_hf_dict(model).values())).dtype),
             seq_len=int(get(config, "seq_len")))
  write_json(os.path.join(workdir, "results.json"), res)
  print(json.dumps(res))
  return res
