"""Teacher-forward variants behind the speed discussion of the kd_bench README.

    python experiments/kd_bench/teacher_conv.py

The kd_bench MNIST-1D teacher (cnn1d 16/32, BatchNorm eval, random weights, non-trivial BN
statistics) on a batch of 128, single-threaded and pinned to one core, three ways: the Flax
module (lax.conv), an im2col + einsum formulation, and lax.conv with the frozen BatchNorm folded
into the convolution weights. Prints max abs logit differences, then CPU ms per forward (5 rounds
of 300 calls).
"""
import os
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.sched_setaffinity(0, {0})
import sys, time
sys.path.insert(0, "/work/main")
import jax, jax.numpy as jnp, numpy as np
from kfuse import models
t = models.get_model("cnn1d", num_classes=10, widths=(16, 32))
x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 40)), jnp.float32)
v = t.init(jax.random.key(0), x)
rng = np.random.default_rng(0)
v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"])}
f1 = jax.jit(lambda v, x: t.apply(v, x, train=False))

def conv(x, k, stride):   # x [B, L, C], k [K, C, O]; SAME padding like XLA
  K = k.shape[0]; L = x.shape[1]; out = -(-L // stride)
  total = max((out - 1) * stride + K - L, 0)
  xp = jnp.pad(x, ((0, 0), (total // 2, total - total // 2), (0, 0)))
  cols = jnp.stack([xp[:, i:i + (out - 1) * stride + 1:stride] for i in range(K)], axis=2)  # B, out, K, C
  return jnp.einsum("bokc,kcd->bod", cols, k)

def bn(x, p, s):
  return (x - s["mean"]) * jax.lax.rsqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]

def block(x, p, s, stride):
  y = jax.nn.relu(bn(conv(x, p["conv_0"]["kernel"], stride), p["norm_0"], s["norm_0"]))
  y = bn(conv(y, p["conv_1"]["kernel"], 1), p["norm_1"], s["norm_1"])
  if "proj" in p:
    x = bn(conv(x, p["proj"]["kernel"], stride), p["proj_norm"], s["proj_norm"])
  return jax.nn.relu(x + y)

def manual(v, x):
  p, s = v["params"]["backbone"], v["batch_stats"]["backbone"]
  h = jax.nn.relu(bn(conv(x[..., None], p["stem"]["kernel"], 1), p["stem_norm"], s["stem_norm"]))
  h = block(h, p["layers_0"], s["layers_0"], 1)
  h = block(h, p["layers_1"], s["layers_1"], 2)
  hd = v["params"]["head"]
  return h.mean(1) @ hd["kernel"] + hd["bias"]
f2 = jax.jit(manual)

def lconv(x, k, stride):
  return jax.lax.conv_general_dilated(x, k, (stride,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))

def fold(k, p, s):   # BN(conv(x, k)) = conv(x, k * g) + (b - mean * g), g = scale / sqrt(var + eps)
  g = p["scale"] * jax.lax.rsqrt(s["var"] + 1e-5)
  return k * g, p["bias"] - s["mean"] * g

def fblock(x, p, s, stride):
  k, b = fold(p["conv_0"]["kernel"], p["norm_0"], s["norm_0"])
  y = jax.nn.relu(lconv(x, k, stride) + b)
  k, b = fold(p["conv_1"]["kernel"], p["norm_1"], s["norm_1"])
  y = lconv(y, k, 1) + b
  if "proj" in p:
    k, b = fold(p["proj"]["kernel"], p["proj_norm"], s["proj_norm"])
    x = lconv(x, k, stride) + b
  return jax.nn.relu(x + y)

def folded(v, x):
  p, s = v["params"]["backbone"], v["batch_stats"]["backbone"]
  k, b = fold(p["stem"]["kernel"], p["stem_norm"], s["stem_norm"])
  h = jax.nn.relu(lconv(x[..., None], k, 1) + b)
  h = fblock(h, p["layers_0"], s["layers_0"], 1)
  h = fblock(h, p["layers_1"], s["layers_1"], 2)
  hd = v["params"]["head"]
  return h.mean(1) @ hd["kernel"] + hd["bias"]
f3 = jax.jit(folded)
print("max diff folded", float(jnp.abs(f1(v, x) - f3(v, x)).max()))
print("max diff", float(jnp.abs(f1(v, x) - f2(v, x)).max()))
def rate(f, n=300):
  z = f(v, x); z.block_until_ready()
  c = time.process_time()
  for _ in range(n): z = f(v, x)
  z.block_until_ready()
  return 1000 * (time.process_time() - c) / n
for r in range(5):
  print("CPU ms per teacher forward (batch 128): flax/lax.conv %.3f   im2col+einsum %.3f   lax.conv with BatchNorm folded into the weights %.3f" % (rate(f1), rate(f2), rate(f3)))
