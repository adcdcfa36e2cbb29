"""RoTTA's category-balanced sampling with timeliness and uncertainty (CSTU) memory bank.

Yuan et al., *Robust test-time adaptation in dynamic scenarios*, CVPR 2023
(BIT-DA/RoTTA ``core/utils/memory.py``). A fixed array of ``capacity`` slots
(static shapes; an empty slot has ``valid = False``). Each item carries its
input, pseudo-label ``ŷ``, uncertainty ``u`` (prediction entropy) and age ``a``.
Its heuristic score (higher = first to go) is

    s(a, u) = λ_t · 1 / (1 + exp(-a / K)) + λ_u · u / ln C,      K = capacity.

Adding ``(x, ŷ, u)`` with score ``s_new = s(0, u)``:

* if class ŷ holds fewer than ``K / C`` items: store it in a free slot when the bank
  is not full, otherwise the highest-scoring item of the *majority* classes (those
  with the most items) is replaced if its score exceeds ``s_new``;
* otherwise the highest-scoring item of class ŷ itself is replaced if its score
  exceeds ``s_new``;
* then every stored item ages by one (so a new item has age 1).

Ties between equal scores go to the highest slot index (the reference walks
class lists in order; ties have probability zero for continuous uncertainties).
The training weight of an item is the timeliness ``exp(-a/K) / (1 + exp(-a/K))``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Memory", "init_memory", "heuristic_score", "add", "add_batch", "timeliness"]


class Memory(NamedTuple):
  """CSTU bank: ``x [K, ...]``, ``label [K]``, ``uncertainty [K]``, ``age [K]``, ``valid [K]``."""
  x: jax.Array
  label: jax.Array
  uncertainty: jax.Array
  age: jax.Array
  valid: jax.Array


def init_memory(capacity: int, x_shape: tuple, dtype=jnp.float32) -> Memory:
  """An empty bank of ``capacity`` slots for inputs of shape ``x_shape`` (one sample)."""
  k = int(capacity)
  return Memory(jnp.zeros((k,) + tuple(x_shape), dtype), jnp.zeros((k,), jnp.int32),
                jnp.zeros((k,), jnp.float32), jnp.zeros((k,), jnp.float32),
                jnp.zeros((k,), bool))


def heuristic_score(age: jax.Array, uncertainty: jax.Array, capacity: int, num_classes: int,
                    lambda_t: float = 1.0, lambda_u: float = 1.0) -> jax.Array:
  """``λ_t / (1 + exp(-age / K)) + λ_u · u / ln C``."""
  return (lambda_t * jax.nn.sigmoid(age / capacity)
          + lambda_u * uncertainty / jnp.log(float(num_classes)))


def timeliness(age: jax.Array, capacity: int) -> jax.Array:
  """``exp(-A) / (1 + exp(-A))`` with ``A = age / K`` (the loss weight of an item)."""
  return jax.nn.sigmoid(-age / capacity)


def add(mem: Memory, x: jax.Array, label: jax.Array, uncertainty: jax.Array, *, num_classes: int,
        lambda_t: float = 1.0, lambda_u: float = 1.0) -> Memory:
  """Offer one sample to the bank (see the module docstring); pure, static shapes."""
  k = mem.valid.shape[0]
  per_class = k / num_classes
  onehot = jax.nn.one_hot(mem.label, num_classes, dtype=jnp.int32) * mem.valid[:, None]
  counts = onehot.sum(0)                                    # [C]
  occupancy = mem.valid.sum()
  score = heuristic_score(mem.age, mem.uncertainty, k, num_classes, lambda_t, lambda_u)
  new_score = heuristic_score(jnp.zeros(()), uncertainty, k, num_classes, lambda_t, lambda_u)
  under_quota = counts[label] < per_class
  majority = counts == counts.max()
  candidates = jnp.where(under_quota, mem.valid & majority[mem.label],
                         mem.valid & (mem.label == label))
  masked = jnp.where(candidates, score, -jnp.inf)
  victim = k - 1 - jnp.argmax(masked[::-1])                 # last slot among equal maxima
  replace = candidates.any() & (masked[victim] > new_score)
  free_slot = jnp.argmin(mem.valid)                         # first empty slot
  store_free = under_quota & (occupancy < k)
  do_add = store_free | replace
  slot = jnp.where(store_free, free_slot, victim)
  put = lambda arr, v: jnp.where(do_add, arr.at[slot].set(v), arr)
  mem = Memory(put(mem.x, x.astype(mem.x.dtype)), put(mem.label, label.astype(jnp.int32)),
               put(mem.uncertainty, uncertainty.astype(jnp.float32)),
               put(mem.age, jnp.zeros((), jnp.float32)), put(mem.valid, True))
  return mem._replace(age=mem.age + mem.valid.astype(jnp.float32))


def add_batch(mem: Memory, xs: jax.Array, labels: jax.Array, uncertainties: jax.Array, *,
              num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> Memory:
  """`add` every row of ``xs`` in order."""
  def body(m, inp):
    x, y, u = inp
    return add(m, x, y, u, num_classes=num_classes, lambda_t=lambda_t, lambda_u=lambda_u), None
  mem, _ = jax.lax.scan(body, mem, (xs, labels, uncertainties))
  return mem
