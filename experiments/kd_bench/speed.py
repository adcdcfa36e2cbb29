"""KD step throughput: kfuse (JAX, jit) versus a straightforward PyTorch CPU implementation.

    python experiments/kd_bench/speed.py                 # batch 128, the kd_bench setting
    python experiments/kd_bench/speed.py --batch 32 --steps 300

Same teacher (the kd_bench MNIST-1D ResNet-style cnn1d, widths (16, 32), BatchNorm in eval
mode), same student (MLP 40-256-256-10, tanh-GELU), same batch, same loss (Hinton KD, T = 4,
ce_weight 0.1, kd_weight 0.9) and same optimizer (AdamW lr 2e-3, wd 1e-4, global-norm clip
1.0). The PyTorch models receive the JAX weights, and their logits are checked against the
JAX ones before timing, so both sides compute the same functions. PyTorch runs eagerly
(``torch.no_grad`` teacher forward, ``zero_grad`` / ``backward`` / ``clip_grad_norm_`` /
``step``); kfuse runs one ``jax.jit``-compiled `kfuse.distill.make_step`. Repeats are
interleaved (JAX, torch, JAX, torch, ...) so that load from other processes hits both; the
median steps/s of each side are compared. PyTorch is timed with one intra-op thread and with
its default thread count, and the faster setting is the reference (on a shared 2-core machine
the default OpenMP threads can be several times slower than one thread). Writes
``speed.json`` next to this file (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse import distill, models
from kfuse.data import load
from kfuse.distill import objectives as O

T, CE_W, KD_W, LR, WD = 4.0, 0.1, 0.9, 2e-3, 1e-4


def jax_setup(batch: int):
  ds = load("mnist1d")
  teacher = models.get_model("cnn1d", num_classes=10, widths=(16, 32))
  student = models.get_model("mlp", num_classes=10, hidden=(256, 256))
  x0 = ds.x_train[:2]
  tv = teacher.init(jax.random.key(0), x0)
  # non-trivial BatchNorm statistics so that eval mode really normalises
  rng = np.random.default_rng(0)
  tv = {"params": tv["params"], "batch_stats": jax.tree.map(
      lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), tv["batch_stats"])}
  sv = student.init(jax.random.key(1), x0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=WD))
  step = distill.make_step(student, O.hinton(T, CE_W, KD_W), tx, [distill.Teacher(teacher, tv)])
  state = step.init(sv, x0)
  idx = rng.integers(0, len(ds.y_train), (64, batch))
  batches = [(np.asarray(ds.x_train[i]), np.asarray(ds.y_train[i])) for i in idx]
  return ds, teacher, student, tv, sv, step, state, batches


# ------------------------------------------------------------------ PyTorch twins


def torch_models(tv, sv):
  import torch
  import torch.nn.functional as F
  from torch import nn

  def conv_w(k):   # flax [k, in, out] -> torch [out, in, k]
    return torch.tensor(np.asarray(k)).permute(2, 1, 0).contiguous()

  class BN(nn.BatchNorm1d):
    def load(self, p, s):
      with torch.no_grad():
        self.weight.copy_(torch.tensor(np.asarray(p["scale"])))
        self.bias.copy_(torch.tensor(np.asarray(p["bias"])))
        self.running_mean.copy_(torch.tensor(np.asarray(s["mean"])))
        self.running_var.copy_(torch.tensor(np.asarray(s["var"])))
      return self

  def same_pad(x, k, stride):   # XLA 'SAME': extra padding on the right
    length = x.shape[-1]
    out = -(-length // stride)
    total = max((out - 1) * stride + k - length, 0)
    return F.pad(x, (total // 2, total - total // 2))

  class Conv(nn.Conv1d):
    def forward(self, x):
      return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))

  class Block(nn.Module):
    def __init__(self, p, s, cin, cout, stride):
      super().__init__()
      self.conv_0 = Conv(cin, cout, 5, stride, bias=False)
      self.conv_1 = Conv(cout, cout, 5, 1, bias=False)
      self.norm_0 = BN(cout, eps=1e-5).load(p["norm_0"], s["norm_0"])
      self.norm_1 = BN(cout, eps=1e-5).load(p["norm_1"], s["norm_1"])
      with torch.no_grad():
        self.conv_0.weight.copy_(conv_w(p["conv_0"]["kernel"]))
        self.conv_1.weight.copy_(conv_w(p["conv_1"]["kernel"]))
      self.proj = None
      if "proj" in p:
        self.proj = Conv(cin, cout, 1, stride, bias=False)
        self.proj_norm = BN(cout, eps=1e-5).load(p["proj_norm"], s["proj_norm"])
        with torch.no_grad():
          self.proj.weight.copy_(conv_w(p["proj"]["kernel"]))

    def forward(self, x):
      y = F.relu(self.norm_0(self.conv_0(x)))
      y = self.norm_1(self.conv_1(y))
      if self.proj is not None:
        x = self.proj_norm(self.proj(x))
      return F.relu(x + y)

  class Teacher(nn.Module):
    def __init__(self, v):
      super().__init__()
      p, s = v["params"]["backbone"], v["batch_stats"]["backbone"]
      self.stem = Conv(1, 16, 5, 1, bias=False)
      with torch.no_grad():
        self.stem.weight.copy_(conv_w(p["stem"]["kernel"]))
      self.stem_norm = BN(16, eps=1e-5).load(p["stem_norm"], s["stem_norm"])
      self.layers_0 = Block(p["layers_0"], s["layers_0"], 16, 16, 1)
      self.layers_1 = Block(p["layers_1"], s["layers_1"], 16, 32, 2)
      h = v["params"]["head"]
      self.head = nn.Linear(32, 10)
      with torch.no_grad():
        self.head.weight.copy_(torch.tensor(np.asarray(h["kernel"])).T)
        self.head.bias.copy_(torch.tensor(np.asarray(h["bias"])))

    def forward(self, x):
      x = F.relu(self.stem_norm(self.stem(x[:, None, :])))
      x = self.layers_1(self.layers_0(x))
      return self.head(x.mean(-1))

  class Student(nn.Module):
    def __init__(self, v):
      super().__init__()
      p = v["params"]
      self.layers = nn.ModuleList([nn.Linear(40, 256), nn.Linear(256, 256)])
      self.head = nn.Linear(256, 10)
      with torch.no_grad():
        for lin, q in zip(list(self.layers) + [self.head],
                          [p["backbone"]["layers_0"], p["backbone"]["layers_1"], p["head"]]):
          lin.weight.copy_(torch.tensor(np.asarray(q["kernel"])).T)
          lin.bias.copy_(torch.tensor(np.asarray(q["bias"])))

    def forward(self, x):
      for lin in self.layers:
        x = F.gelu(lin(x), approximate="tanh")
      return self.head(x)

  return Teacher(tv).eval(), Student(sv).train()


def torch_step_fn(teacher, student):
  import torch
  import torch.nn.functional as F

  opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)

  def step(x, y):
    with torch.no_grad():
      zt = teacher(x)
    zs = student(x)
    kd = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                  reduction="batchmean")
    loss = CE_W * F.cross_entropy(zs, y) + KD_W * T * T * kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    return loss

  return step


# ------------------------------------------------------------------ timing


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=200, help="steps per timed repeat")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "speed.json"))
  args = ap.parse_args()
  import torch

  ds, teacher, student, tv, sv, step, state, batches = jax_setup(args.batch)
  t_teacher, t_student = torch_models(tv, sv)
  xb = ds.x_test[:64]
  with torch.no_grad():
    err_t = float(np.abs(t_teacher(torch.tensor(xb)).numpy()
                         - np.asarray(teacher.apply(tv, xb, train=False))).max())
    err_s = float(np.abs(t_student(torch.tensor(xb)).numpy()
                         - np.asarray(student.apply(sv, xb))).max())
  assert err_t < 1e-3 and err_s < 1e-3, (err_t, err_s)
  tb = [(torch.tensor(x), torch.tensor(y, dtype=torch.long)) for x, y in batches]
  key = jax.random.key(0)
  default_threads = torch.get_num_threads()
  settings = sorted({1, default_threads})
  tsteps = {}
  for nt in settings:   # fresh twins per setting: same starting weights
    tsteps[nt] = torch_step_fn(*torch_models(tv, sv))

  def run_jax(state, n):
    t0 = time.perf_counter()
    for i in range(n):
      x, y = batches[i % len(batches)]
      state, m = step(state, {"x": x, "labels": y}, key)
    jax.block_until_ready(m["loss"])
    return state, n / (time.perf_counter() - t0)

  def run_torch(nt, n):
    torch.set_num_threads(nt)
    t0 = time.perf_counter()
    for i in range(n):
      loss = tsteps[nt](*tb[i % len(tb)])
    float(loss.detach())
    return n / (time.perf_counter() - t0)

  state, _ = run_jax(state, 20)     # compile + warm up
  for nt in settings:
    run_torch(nt, 20)
  jax_sps, torch_sps = [], {nt: [] for nt in settings}
  for _ in range(args.repeats):
    state, s = run_jax(state, args.steps)
    jax_sps.append(s)
    for nt in settings:
      torch_sps[nt].append(run_torch(nt, args.steps))
  torch.set_num_threads(default_threads)
  med = {nt: statistics.median(v) for nt, v in torch_sps.items()}
  best = max(med, key=med.get)
  ratios = [a / b for a, b in zip(jax_sps, torch_sps[best])]
  out = {
      "batch": args.batch, "steps_per_repeat": args.steps, "repeats": args.repeats,
      "jax_steps_per_s": {"median": statistics.median(jax_sps), "all": jax_sps},
      "torch_steps_per_s": {str(nt): {"median": med[nt], "all": torch_sps[nt]} for nt in settings},
      "torch_reference_threads": best,
      "ratio_median": statistics.median(jax_sps) / med[best],
      "ratio_per_repeat": ratios,
      "max_abs_logit_diff": {"teacher": err_t, "student": err_s},
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "python": platform.python_version()},
      "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
  }
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  others = ", ".join(f"{nt} thread(s) {med[nt]:.0f}" for nt in settings)
  print(f"batch {args.batch}: kfuse {out['jax_steps_per_s']['median']:.0f} steps/s, PyTorch"
        f" {others} steps/s; ratio vs the faster PyTorch {out['ratio_median']:.2f}x"
        f" (per repeat {min(ratios):.2f}-{max(ratios):.2f}x), load {out['load_average_1min']:.1f}")


if __name__ == "__main__":
  main()
