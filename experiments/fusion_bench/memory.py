"""Peak memory of one fusion training step: sparse top-K targets vs dense [B, L, |V|] targets.

    PYTHONPATH=. python experiments/fusion_bench/memory.py [--batch 4] [--seq 256]

Both steps: a zoo GPT student (dim 64, depth 1), 3 sources, K = 10, AdamW, loss
0.9·CLM + 0.1·AvgCE fusion. Sparse: `kfuse.fusion.losses.objective` (the student's log-softmax
gathered at the K ids). Dense: FuseLLM's collator layout, a float32 target [S, B, L, |V|] per
batch (softmax of the top-K scattered into the vocabulary) and CE = −Σ_v target·log q. The
numbers are XLA's compiled memory analysis (arguments + outputs + temporaries, aliased
buffers counted once) of the jitted step on CPU; nothing is executed.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse.distill import losses as DL
from kfuse.fusion import losses as F
from kfuse.models import get_model

S, K = 3, 10


def step_memory(vocab: int, batch: int, seq: int, dense: bool) -> dict:
  model = get_model("gpt", vocab_size=vocab, max_len=seq, dim=64, depth=1, num_heads=4)
  x = jnp.zeros((batch, seq), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  tx = optax.adamw(1e-3)
  opt = jax.eval_shape(tx.init, params)
  w = jnp.ones((S, batch))

  def loss(p, xb, yb, tgt):
    z = model.apply({"params": p}, xb)
    clm = DL.cross_entropy(z, yb)
    if dense:
      logq = jax.nn.log_softmax(z, -1)
      ws = jax.nn.softmax(jnp.exp(-w), 0)
      target = jnp.einsum("sb,sblv->blv", ws, tgt)
      fuse = jnp.mean(-jnp.sum(target * logq, -1))
    else:
      fuse = F.fusion_loss(z, tgt[0], tgt[1], w, "avg_ce")
    return 0.9 * clm + 0.1 * fuse

  def step(p, o, xb, yb, tgt):
    g = jax.grad(loss)(p, xb, yb, tgt)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  if dense:
    tgt = jax.ShapeDtypeStruct((S, batch, seq, vocab), jnp.float32)
  else:
    tgt = (jax.ShapeDtypeStruct((S, batch, seq, K), jnp.int32),
           jax.ShapeDtypeStruct((S, batch, seq, K), jnp.float32))
  xs = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  c = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, xs, xs, tgt).compile()
  m = c.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {"args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": peak,
          "logits": batch * seq * vocab * 4}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  args = ap.parse_args()
  mib = 2 ** 20
  print(f"B={args.batch} L={args.seq} S={S} K={K}; MiB (student logits [B, L, V] float32 for scale)")
  print("| V | logits | sparse peak | dense peak | dense / sparse |\n|---:|---:|---:|---:|---:|")
  for v in (32_000, 100_000):
    sp = step_memory(v, args.batch, args.seq, False)
    de = step_memory(v, args.batch, args.seq, True)
    print(f"| {v:,} | {sp['logits'] / mib:.0f} | {sp['peak'] / mib:.0f} | {de['peak'] / mib:.0f}"
          f" | {de['peak'] / sp['peak']:.2f} |")


if __name__ == "__main__":
  main()
