"""Training step of a Llama-shaped causal LM: kfuse (JAX, Flax NNX through the step protocol) vs
transformers (PyTorch), on the same CPU.

    python experiments/perf/train_bench.py                       # ~134M params, batch 2 x 256, 3 pairs
    python experiments/perf/train_bench.py --hidden=64 --layers=2 --heads=4 --kv_heads=4 --vocab=512 --seq=32 --reps=1

Builds a random Llama with transformers (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000,
untied: 134M parameters, as experiments/perf/hf_bench.py), ``save_pretrained`` under --root and
loads that directory in both frameworks (float32). One step = forward over the batch, next-token
cross-entropy (mean over the B x T positions), backward, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8,
weight decay 0.01) on every parameter:

* kfuse: ``graphdef, state = nnx.split(hf.load(dir))``, ``distill.make_step(graphdef,
  objectives.get("supervised"), optax.adamw(...))``, ``state, metrics = step(state, {"x", "y"},
  key)`` (jitted, state donated): the NNX model through `kfuse.nnx`'s edge, the same step every
  pillar uses;
* transformers: ``model.train()``, ``F.cross_entropy(model(x).logits, y)``, ``backward``,
  ``torch.optim.AdamW.step``, ``zero_grad(set_to_none=True)``.

Both start from the same weights on the same batches: the script checks the two losses of the
warm-up step and of the first timed step (after one update) agree. Then it alternates one kfuse step
and one transformers step ``--reps`` times (kfuse's warm-up step compiles, timed separately) and
reports wall and process CPU seconds per step, medians and ratios. Appends one JSON row to
experiments/perf/train_bench.jsonl.
"""

from __future__ import annotations

import os
import time

import numpy as np

import llama_common   # experiments/perf/llama_common.py: arguments, the random Llama, the row


def main() -> None:
  a = llama_common.parse_args(batch=2, seq=256, root="/tmp/kfuse_train_bench",
                              out="train_bench.jsonl")

  import jax
  import optax
  import torch
  import transformers
  from flax import nnx

  from kfuse import distill
  from kfuse.models import hf

  path = llama_common.llama_dir(a)
  tm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
  n_params = sum(p.numel() for p in tm.parameters())
  lr, b1, b2, eps, wd = 1e-4, 0.9, 0.999, 1e-8, 0.01
  topt = torch.optim.AdamW(tm.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)

  graphdef, state0 = nnx.split(hf.load(path))
  step = distill.make_step(graphdef, distill.objectives.get("supervised"),
                           optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
  kstate = step.init(state0, np.zeros((a.batch, a.seq), np.int32))
  del state0

  rng = np.random.RandomState(0)
  batches = [rng.randint(0, a.vocab, (a.batch, a.seq + 1)).astype(np.int32)
             for _ in range(a.reps + 1)]
  key = jax.random.key(0)

  def run_kfuse(ids):
    nonlocal kstate
    kstate, m = step(kstate, {"x": ids[:, :-1], "y": ids[:, 1:]}, key)
    return float(m["loss"])                     # waits for the step

  def run_torch(ids):
    t = torch.tensor(ids, dtype=torch.long)
    logits = tm(t[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             t[:, 1:].reshape(-1))
    loss.backward()
    topt.step()
    topt.zero_grad(set_to_none=True)
    return loss.item()

  def timed(fn, ids):
    w, c = time.perf_counter(), time.process_time()
    loss = fn(ids)
    return time.perf_counter() - w, time.process_time() - c, loss

  k_first = timed(run_kfuse, batches[0])        # warm-up: trace + compile + run
  t_first = timed(run_torch, batches[0])
  kw, kc, tw, tc, kl, tl = [], [], [], [], [k_first[2]], [t_first[2]]
  for ids in batches[1:]:
    w, c, loss = timed(run_kfuse, ids)
    kw.append(w), kc.append(c), kl.append(loss)
    w, c, loss = timed(run_torch, ids)
    tw.append(w), tc.append(c), tl.append(loss)
  row = dict(
      date=time.strftime("%Y-%m-%d"), what="train_step", params=n_params, **llama_common.shape(a),
      optimizer="adamw", kfuse_wall_s=kw, kfuse_cpu_s=kc, transformers_wall_s=tw,
      transformers_cpu_s=tc, kfuse_median_wall_s=float(np.median(kw)),
      transformers_median_wall_s=float(np.median(tw)),
      kfuse_median_cpu_s=float(np.median(kc)), transformers_median_cpu_s=float(np.median(tc)),
      ratio_wall_transformers_over_kfuse=float(np.median(tw) / np.median(kw)),
      ratio_cpu_transformers_over_kfuse=float(np.median(tc) / np.median(kc)),
      kfuse_first_step_wall_s=k_first[0], transformers_first_step_wall_s=t_first[0],
      kfuse_losses=kl, transformers_losses=tl,
      max_rel_loss_diff=float(max(abs(x - y) / abs(y) for x, y in zip(kl, tl))),
      load_avg_1m_end=os.getloadavg()[0], **llama_common.environment(tm))
  llama_common.append_row(row, a.out)


if __name__ == "__main__":
  main()
