"""Tent step throughput: kfuse (jitted JAX) vs a straightforward PyTorch CPU implementation.

    python experiments/tta_bench/speed.py                # bs 200, both single-threaded on one core
    python experiments/tta_bench/speed.py --threads 0    # both with their default threading
    python experiments/tta_bench/speed.py --batch-size 64

Both sides run the same model with the same weights (the ResNet-style 1-D
BatchNorm CNN of ``configs/tta_bench.py``, copied from the Flax variables into
``torch.nn`` modules), the same batch and the same Tent step: BatchNorm on
batch statistics, ``loss = mean_i H(softmax(f(x_i)))``, one Adam (lr 1e-3)
step on the BatchNorm scale/shift only, pre-update logits returned. The
script first checks that both produce the same logits and the same updated
parameters after one step, then times ``--steps`` steps per round,
alternating JAX and PyTorch rounds, and reports the median throughput of
each (samples / s) and their ratio. By default both libraries run
single-threaded on the same pinned core (the robust comparison on a shared
machine); ``--threads 0`` leaves each library's own threading. PyTorch is
optional: without it only the JAX number is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch-size", type=int, default=200)
  ap.add_argument("--widths", default="32,64")
  ap.add_argument("--steps", type=int, default=50, help="steps per timed round")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--threads", type=int, default=1,
                  help="1 (default): JAX and PyTorch single-threaded, pinned to one core;"
                       " 0: each library's default threading on all cores")
  ap.add_argument("--json", default="", help="also write the measurements to this file")
  return ap.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:     # must precede the jax import
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pinning import pin_one_core  # noqa: E402  (experiments/pinning.py)
  pin_one_core()

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kfuse import adapt, models  # noqa: E402


def jax_tent(widths, batch_size, seed=0):
  model = models.get_model("cnn1d", num_classes=10, widths=widths)
  x = np.asarray(jax.random.normal(jax.random.key(seed), (batch_size, 40)), np.float32)
  variables = model.init(jax.random.key(seed + 1), x)
  tta = adapt.tent(model, optimizer=optax.adam(1e-3), apply_kwargs={"train": False})
  state = tta.init(variables, {"x": x}, jax.random.key(seed))
  return model, variables, tta, state, x


# ------------------------------------------------------------------ PyTorch twin


def torch_tent(variables, widths):
  """The same network in torch.nn, weights copied from the Flax variables."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  p = jax.device_get(variables["params"])
  t = lambda a: torch.tensor(np.asarray(a))

  def conv_weight(k):          # flax [k, in, out] -> torch [out, in, k]
    return t(np.transpose(np.asarray(k), (2, 1, 0)))

  def bn(bp):
    m = nn.BatchNorm1d(bp["scale"].shape[0], eps=1e-5, track_running_stats=False)  # batch stats
    m.weight.data = t(bp["scale"])
    m.bias.data = t(bp["bias"])
    return m

  class Conv(nn.Module):
    """Conv1d with Flax 'SAME' padding (asymmetric for stride 2)."""

    def __init__(self, kernel, stride):
      super().__init__()
      w = conv_weight(kernel)
      self.conv = nn.Conv1d(w.shape[1], w.shape[0], w.shape[2], stride=stride, bias=False)
      self.conv.weight.data = w
      self.k, self.s = w.shape[2], stride

    def forward(self, x):
      length = x.shape[-1]
      out = -(-length // self.s)
      pad = max((out - 1) * self.s + self.k - length, 0)
      return self.conv(F.pad(x, (pad // 2, pad - pad // 2)))

  class Block(nn.Module):
    def __init__(self, bp, stride):
      super().__init__()
      self.conv_0, self.norm_0 = Conv(bp["conv_0"]["kernel"], stride), bn(bp["norm_0"])
      self.conv_1, self.norm_1 = Conv(bp["conv_1"]["kernel"], 1), bn(bp["norm_1"])
      self.proj = None
      if "proj" in bp:
        self.proj, self.proj_norm = Conv(bp["proj"]["kernel"], stride), bn(bp["proj_norm"])

    def forward(self, x):
      y = F.relu(self.norm_0(self.conv_0(x)))
      y = self.norm_1(self.conv_1(y))
      if self.proj is not None:
        x = self.proj_norm(self.proj(x))
      return F.relu(x + y)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      b = p["backbone"]
      self.stem, self.stem_norm = Conv(b["stem"]["kernel"], 1), bn(b["stem_norm"])
      blocks = sorted((k for k in b if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
      self.blocks = nn.ModuleList([Block(b[k], 2 if i > 0 else 1) for i, k in enumerate(blocks)])
      self.head = nn.Linear(*np.asarray(p["head"]["kernel"]).shape)
      self.head.weight.data = t(np.asarray(p["head"]["kernel"]).T)
      self.head.bias.data = t(p["head"]["bias"])

    def forward(self, x):                      # x [B, L] -> [B, 1, L]
      x = F.relu(self.stem_norm(self.stem(x[:, None, :])))
      for blk in self.blocks:
        x = blk(x)
      return self.head(x.mean(-1))

  net = Net()
  net.train()
  net.requires_grad_(False)
  params = []
  for m in net.modules():
    if isinstance(m, nn.BatchNorm1d):
      m.requires_grad_(True)
      params += [m.weight, m.bias]
  opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)

  def step(x):
    logits = net(x)
    loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean(0)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return logits

  return net, step


# ------------------------------------------------------------------ main


def main(args):
  widths = tuple(int(w) for w in args.widths.split(","))
  model, variables, tta, state0, x = jax_tent(widths, args.batch_size)
  step = tta.step                               # jitted by kfuse.adapt
  batch = {"x": jnp.asarray(x)}
  key = jax.random.key(1)                       # Tent is deterministic; the protocol passes one anyway
  state, m0 = step(state0, batch, key)
  logits0 = m0["logits"]
  jax.block_until_ready(logits0)

  try:
    import torch
  except ImportError:
    torch = None
  out = {"batch_size": args.batch_size, "widths": list(widths), "steps_per_round": args.steps,
         "threads": "1 (pinned, single-threaded)" if args.threads == 1 else "library defaults",
         "rounds": args.rounds, "jax": jax.__version__, "platform": platform.platform(),
         "cpu_count": os.cpu_count()}
  if torch is not None:
    if args.threads == 1:
      torch.set_num_threads(1)
    out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    net, tstep = torch_tent(variables, widths)
    xt = torch.tensor(x)
    lt = tstep(xt).detach().numpy()
    np.testing.assert_allclose(lt, np.asarray(logits0), rtol=1e-4, atol=1e-4)
    s_j = np.asarray(state.variables["params"]["backbone"]["stem_norm"]["scale"])
    np.testing.assert_allclose(net.stem_norm.weight.detach().numpy(), s_j, rtol=1e-4, atol=1e-5)
    out["parity"] = "same pre-update logits and same updated stem_norm scale after one step"

  def time_jax(state):
    t = time.perf_counter()
    for _ in range(args.steps):
      state, m = step(state, batch, key)
    jax.block_until_ready(m["logits"])
    return time.perf_counter() - t, state

  def time_torch():
    t = time.perf_counter()
    for _ in range(args.steps):
      tstep(xt)
    return time.perf_counter() - t

  jt, tt = [], []
  for _ in range(args.rounds):
    dt, state = time_jax(state)
    jt.append(dt)
    if torch is not None:
      tt.append(time_torch())
  per = lambda ts: args.steps * args.batch_size / statistics.median(ts)
  out["jax_samples_per_s"] = per(jt)
  out["jax_ms_per_step"] = 1e3 * statistics.median(jt) / args.steps
  line = f"kfuse/JAX Tent step: {out['jax_ms_per_step']:.2f} ms ({out['jax_samples_per_s']:.0f} samples/s)"
  if torch is not None:
    out["torch_samples_per_s"] = per(tt)
    out["torch_ms_per_step"] = 1e3 * statistics.median(tt) / args.steps
    out["ratio"] = out["jax_samples_per_s"] / out["torch_samples_per_s"]
    line += (f" | PyTorch: {out['torch_ms_per_step']:.2f} ms ({out['torch_samples_per_s']:.0f} samples/s,"
             f" {out['torch_threads']} threads) | ratio JAX/PyTorch = {out['ratio']:.2f}x")
  out["jax_round_s"] = jt
  out["torch_round_s"] = tt
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main(ARGS)
