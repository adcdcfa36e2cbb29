"""KD step throughput: kfuse (JAX, jit) versus a straightforward PyTorch CPU implementation.

    python experiments/kd_bench/speed.py                 # batch 128, both single-threaded, one core
    python experiments/kd_bench/speed.py --threads 0     # each library's default threading
    python experiments/kd_bench/speed.py --batch 32

Same teacher (the kd_bench MNIST-1D ResNet-style cnn1d, widths (16, 32), BatchNorm in eval
mode), same student (MLP 40-256-256-10, tanh-GELU), same batches, same loss (Hinton KD, T = 4,
ce_weight 0.1, kd_weight 0.9) and same optimizer (AdamW lr 2e-3, wd 1e-4, global-norm clip
1.0). The PyTorch models receive the JAX weights; before timing the script checks that both
sides give the same teacher and student logits and, after one training step from the same
weights on the same batch, the same loss and the same updated student weights. PyTorch runs
eagerly (``torch.no_grad`` teacher forward, ``zero_grad`` / ``backward`` /
``clip_grad_norm_`` / ``step``); kfuse runs one ``jax.jit``-compiled
`kfuse.distill.make_step` (teacher forward, student forward/backward and the optax update
in one XLA program, state donated). Rounds alternate (JAX, PyTorch, JAX, ...) so that load
from other processes hits both; the medians of each side are compared, both in wall-clock
steps/s and in steps per CPU-second of the process (``time.process_time``, all threads):
on a shared machine the CPU-time rate is the load-independent measure of work per step.

``--threads 1`` (default, the robust comparison on a shared machine): both libraries
single-threaded and pinned to the same core (XLA_FLAGS set before jax is imported,
``torch.set_num_threads(1)``). ``--threads 0``: each library's default threading on all
cores. Also reported: where the JAX step's time goes (teacher forward alone, student
forward+backward+update alone, an empty jitted call with the same arguments = dispatch).
Writes ``speed_threads<N>.json`` next to this file (``--out`` to change) and appends a
one-line summary of the run to ``speed_runs.jsonl`` beside it.
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
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=100, help="steps per timed round")
  ap.add_argument("--rounds", type=int, default=21)
  ap.add_argument("--threads", type=int, default=1, choices=(0, 1),
                  help="1 (default): JAX and PyTorch single-threaded, pinned to one core;"
                       " 0: each library's default threading")
  ap.add_argument("--out", default="")
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

from kfuse import distill, models  # noqa: E402
from kfuse.data import load  # noqa: E402
from kfuse.distill import objectives as O  # noqa: E402

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


# ------------------------------------------------------------------ parity and timing


def parity(torch, teacher, student, tv, sv, step, batches, x_check) -> dict:
  """Max abs differences: logits of both models, and loss + student weights after one step."""
  t_teacher, t_student = torch_models(tv, sv)
  with torch.no_grad():
    err_t = float(np.abs(t_teacher(torch.tensor(x_check)).numpy()
                         - np.asarray(teacher.apply(tv, x_check, train=False))).max())
    err_s = float(np.abs(t_student(torch.tensor(x_check)).numpy()
                         - np.asarray(student.apply(sv, x_check))).max())
  x, y = batches[0]
  state = step.init(sv, x[:2])
  state, m = step(state, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, jax.random.key(0))
  loss_t = float(torch_step_fn(t_teacher, t_student)(
      torch.tensor(x), torch.tensor(y, dtype=torch.long)).detach())
  p = jax.device_get(state.params)
  pairs = list(zip(list(t_student.layers) + [t_student.head],
                   [p["backbone"]["layers_0"], p["backbone"]["layers_1"], p["head"]]))
  err_w = max(max(float(np.abs(lin.weight.detach().numpy().T - np.asarray(q["kernel"])).max()),
                  float(np.abs(lin.bias.detach().numpy() - np.asarray(q["bias"])).max()))
              for lin, q in pairs)
  out = {"teacher_logits": err_t, "student_logits": err_s,
         "loss_after_one_step": abs(loss_t - float(m["loss"])),
         "student_weights_after_one_step": err_w}
  bad = {k: v for k, v in out.items() if not v < 1e-3}
  if bad:
    raise SystemExit(f"parity check failed (max abs differences): {bad}")
  return out


def _rate(fn, n: int) -> tuple[float, float]:
  """(steps per wall-clock second, steps per CPU second of this process, all its threads)."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn(n)
  return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def main(args):
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None and args.threads == 1:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

  ds, teacher, student, tv, sv, step, state, batches = jax_setup(args.batch)
  key = jax.random.key(0)
  jb = [{"x": jnp.asarray(x), "y": jnp.asarray(y)} for x, y in batches]
  holder = {"state": state}

  def jax_kd(n):
    st = holder["state"]
    for i in range(n):
      st, m = step(st, jb[i % len(jb)], key)
    jax.block_until_ready(m["loss"])
    holder["state"] = st

  # breakdown of the JAX step: teacher forward alone, student step alone, dispatch alone
  t_fwd = jax.jit(lambda v, x: teacher.apply(v, x, train=False))
  s_step = distill.make_step(student, O.supervised(), optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=WD)))
  s_holder = {"state": s_step.init(sv, batches[0][0][:2])}
  empty = jax.jit(lambda st, t, b, k: st.step + 1)

  def jax_teacher(n):
    for i in range(n):
      z = t_fwd(tv, jb[i % len(jb)]["x"])
    jax.block_until_ready(z)

  def jax_student(n):
    st = s_holder["state"]
    for i in range(n):
      st, m = s_step(st, jb[i % len(jb)], key)
    jax.block_until_ready(m["loss"])
    s_holder["state"] = st

  def jax_dispatch(n):
    for i in range(n):
      z = empty(holder["state"], step.teacher_variables, jb[i % len(jb)], key)
    jax.block_until_ready(z)

  timers = {"jax": jax_kd, "jax_teacher_forward": jax_teacher,
            "jax_student_step": jax_student, "jax_dispatch": jax_dispatch}
  out = {"batch": args.batch, "threads": args.threads,
         "mode": "single-threaded, pinned to one core" if args.threads == 1
         else "library default threading"}
  if torch is not None:
    out["max_abs_diff"] = parity(torch, teacher, student, tv, sv, step, batches, ds.x_test[:64])
    t_teacher, t_student = torch_models(tv, sv)
    t_step = torch_step_fn(t_teacher, t_student)
    tb = [(torch.tensor(x), torch.tensor(y, dtype=torch.long)) for x, y in batches]

    def torch_kd(n):
      for i in range(n):
        loss = t_step(*tb[i % len(tb)])
      float(loss.detach())

    def torch_teacher(n):
      with torch.no_grad():
        for i in range(n):
          z = t_teacher(tb[i % len(tb)][0])
      float(z[0, 0])

    timers.update(torch=torch_kd, torch_teacher_forward=torch_teacher)
  for fn in timers.values():    # compile + warm up
    fn(10)

  def flops(jitted, *a):
    try:
      cost = jitted.lower(*a).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost.get("flops", float("nan")))
    except Exception:   # cost analysis is best effort
      return float("nan")

  out["xla_flops_per_step"] = {
      "jax": flops(step.jitted, holder["state"], step.teacher_variables, jb[0], key),
      "jax_teacher_forward": flops(t_fwd, tv, jb[0]["x"]),
      "jax_student_step": flops(s_step.jitted, s_holder["state"], s_step.teacher_variables,
                                jb[0], key)}
  rates = {k: [] for k in timers}
  cpu_rates = {k: [] for k in timers}
  for _ in range(args.rounds):   # alternate: every round times each variant once
    for k, fn in timers.items():
      wall, cpu = _rate(fn, args.steps)
      rates[k].append(wall)
      cpu_rates[k].append(cpu)
  med = {k: statistics.median(v) for k, v in rates.items()}
  cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}
  out["steps_per_s"] = {k: {"median": med[k], "all": v} for k, v in rates.items()}
  out["steps_per_cpu_s"] = {k: {"median": cmed[k], "all": v} for k, v in cpu_rates.items()}
  out["ms_per_step_median"] = {k: 1000.0 / v for k, v in med.items()}
  out["cpu_ms_per_step_median"] = {k: 1000.0 / v for k, v in cmed.items()}
  out["jax_compilations_of_the_kd_step"] = step.jitted._cache_size()
  out["jax_gflops_per_cpu_s"] = {k: v * cmed[k] / 1e9 for k, v in out["xla_flops_per_step"].items()}
  if torch is not None:
    out["ratio_median"] = med["jax"] / med["torch"]
    out["ratio_per_round"] = [a / b for a, b in zip(rates["jax"], rates["torch"])]
    out["cpu_time_ratio_median"] = cmed["jax"] / cmed["torch"]
  out.update({
      "steps_per_round": args.steps, "rounds": args.rounds,
      "versions": {"jax": jax.__version__, "python": platform.python_version(),
                   "torch": torch.__version__ if torch is not None else None},
      "cpu_count": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  })
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  f"speed_threads{args.threads}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  summary = {k: out[k] for k in ("date", "batch", "threads", "load_average_1min_at_end")}
  summary.update({f"{u}_{k}": round(v, 1) for u, m in (("steps_per_s", med), ("steps_per_cpu_s", cmed))
                  for k, v in m.items()})
  if torch is not None:
    summary.update(ratio_median=round(out["ratio_median"], 3),
                   cpu_time_ratio_median=round(out["cpu_time_ratio_median"], 3))
  with open(os.path.join(os.path.dirname(path), "speed_runs.jsonl"), "a") as f:
    f.write(json.dumps(summary) + "\n")
  for label, m, ms in (("wall", med, out["ms_per_step_median"]),
                       ("CPU", cmed, out["cpu_ms_per_step_median"])):
    line = (f"[{label}] batch {args.batch}, {out['mode']}: kfuse {m['jax']:.0f} steps/s"
            f" ({ms['jax']:.2f} ms: teacher fwd {ms['jax_teacher_forward']:.2f}, student step"
            f" {ms['jax_student_step']:.2f}, dispatch {ms['jax_dispatch']:.3f})")
    if torch is not None:
      line += (f"; PyTorch {m['torch']:.0f} steps/s ({ms['torch']:.2f} ms: teacher fwd"
               f" {ms['torch_teacher_forward']:.2f}); ratio {m['jax'] / m['torch']:.2f}x")
    print(line)
  print(f"XLA flops/step {out['xla_flops_per_step']}; GFLOP per CPU-second"
        f" {out['jax_gflops_per_cpu_s']}; KD step compiled {out['jax_compilations_of_the_kd_step']}x")
  if torch is not None:
    r = out["ratio_per_round"]
    print(f"wall ratio per round {min(r):.2f}-{max(r):.2f}x; parity {out['max_abs_diff']}")
  print(f"load average {out['load_average_1min_at_end']:.1f}; wrote {path}")


if __name__ == "__main__":
  main(ARGS)
