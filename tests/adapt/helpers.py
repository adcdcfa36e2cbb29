"""Tiny models and fake "models" for the kfuse.adapt tests (fast to compile)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyBN(nn.Module):
  """``head(relu(bn(dense(x))))``: one BatchNorm layer named ``bn``."""
  hidden: int = 6
  classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.hidden, name="dense")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.Dense(self.classes, name="head")(nn.relu(x))


class TinyLN(nn.Module):
  """A LayerNorm model (no BatchNorm, no batch_stats)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.LayerNorm(name="ln")(nn.Dense(6, name="dense")(x))
    return nn.Dense(3, name="head")(nn.relu(x))


class TinyMLP(nn.Module):
  """No normalization layer at all."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(6, name="dense")(x)))


def tiny_bn(seed=0, batch=8, dim=4, with_stats=True):
  model = TinyBN()
  x = jax.random.normal(jax.random.key(seed), (batch, dim))
  v = model.init(jax.random.key(seed + 1), x)
  if with_stats:  # non-trivial running statistics
    v = {**v, "batch_stats": {"bn": {"mean": jnp.linspace(-0.5, 0.5, 6),
                                     "var": jnp.linspace(0.5, 2.0, 6)}}}
  return model, v, x


def logits_model(classes=3):
  """A fake Flax-style apply: logits = x * scale + bias, params named like a norm layer.

  The inputs *are* the (pre-affine) logits, so entropies, filters and updates can be
  worked out by hand.
  """
  variables = {"params": {"ln": {"scale": jnp.ones((classes,)), "bias": jnp.zeros((classes,))}}}

  def apply(v, x, **kwargs):
    p = v["params"]["ln"]
    return x * p["scale"] + p["bias"]

  return apply, variables


def np_entropy(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return -(p * np.log(p)).sum(-1), p


KEY = jax.random.key(0)


def run_step(tta, state, x, key=KEY):
  """One protocol step of ``tta`` on ``{"x": x}``, as ``(state, logits, other metrics)``."""
  state, metrics = tta.step(state, {"x": x}, key)
  metrics = dict(metrics)
  return state, metrics.pop("logits"), metrics


def shifted_batches(n, size, dim, seed=1):
  """A shifted stream: each batch has its own offset and scale (a test-time shift)."""
  r = np.random.default_rng(seed)
  return [(r.normal(0, 1, (size, dim)) * r.uniform(0.7, 1.5) + r.normal(0, 0.5, dim))
          .astype(np.float32) for _ in range(n)]
