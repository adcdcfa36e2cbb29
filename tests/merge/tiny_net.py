"""A tiny Flax network and random experts around it, shared by the learned-merge tests
(AdaRank, Twin-Merging): a 3-D DenseGeneral kernel [4, 2, 3] then a Dense [6, 3]."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 3), name="qkv")(x)                  # 3-D kernel [4, 2, 3]
    h = jnp.tanh(h.reshape(h.shape[:-2] + (6,)))
    return nn.Dense(3, name="fc1")(h)


NET = _Net()


def models(n=3, dtype=np.float32, seed=0):
  """``(base, experts)``: the initial parameters + N(0, 0.1²), and ``n`` experts = base + N(0, 0.5²)."""
  base = NET.init(jax.random.key(seed), jnp.ones((1, 4)))["params"]
  r = np.random.default_rng(seed)
  base = jax.tree.map(lambda a: np.asarray(a, dtype) + 0.1 * r.normal(size=a.shape).astype(dtype), base)
  experts = [jax.tree.map(lambda a: (a + 0.5 * r.normal(size=a.shape)).astype(dtype), base)
             for _ in range(n)]
  return base, experts


def apply_fn(p, x):
  return NET.apply({"params": p}, x)
