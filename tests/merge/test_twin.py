"""Twin-Merging: one-hot routing = θ* + that task's compressed delta (float64 NumPy SVD),
full rank + one-hot = the expert, per-input composition with vmap, the router, bad input."""

import jax
import numpy as np
import pytest

from kfuse.merge import twin as W
from kfuse.tree import KfuseError
from tests.merge.tiny_net import apply_fn, models


def _trunc(m, k):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


def test_one_hot_is_shared_plus_that_tasks_compressed_delta_float64():
  with jax.enable_x64(True):
    base, experts = models(dtype=np.float64)
    shared = W.shared_expert(base, experts)
    for p in ("fc1", "qkv"):                                    # θ* = θ_0 + 0.29 Σ τ_i
      want = base[p]["kernel"] + 0.29 * sum(e[p]["kernel"] - base[p]["kernel"] for e in experts)
      np.testing.assert_allclose(shared[p]["kernel"], want, rtol=1e-6)   # λ is a float32 hp
    tw = W.twin(shared, experts, rank_ratio=0.5)
    for i, e in enumerate(experts):
      got = W.compose(tw, np.eye(3)[i])
      d = e["fc1"]["kernel"] - shared["fc1"]["kernel"]                      # [6, 3], r = 3 -> k = 1
      np.testing.assert_allclose(got["fc1"]["kernel"], shared["fc1"]["kernel"] + _trunc(d, 1),
                                 rtol=1e-10, atol=1e-12)
      q = (e["qkv"]["kernel"] - shared["qkv"]["kernel"]).reshape(4, 6)     # r = 4 -> k = 2
      np.testing.assert_allclose(np.asarray(got["qkv"]["kernel"]).reshape(4, 6),
                                 shared["qkv"]["kernel"].reshape(4, 6) + _trunc(q, 2),
                                 rtol=1e-10, atol=1e-12)
      for p in ("fc1", "qkv"):                                  # biases: the whole delta
        np.testing.assert_allclose(got[p]["bias"], e[p]["bias"], rtol=1e-12)


def test_full_rank_one_hot_is_the_expert_and_per_input_vmap_float64():
  with jax.enable_x64(True):
    base, experts = models(dtype=np.float64)
    tw = W.twin(W.shared_expert(base, experts, "ties", {"density": 0.5}), experts, rank_ratio=1.0)
    x = np.random.default_rng(1).normal(size=(5, 4))
    for i, e in enumerate(experts):
      for a, b in zip(jax.tree.leaves(W.compose(tw, np.eye(3)[i])), jax.tree.leaves(e)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    w = np.random.default_rng(2).dirichlet(np.ones(3), size=5)
    w[0] = np.eye(3)[1]
    got = np.asarray(W.twin_apply(apply_fn, tw, w, x))
    for b in range(5):
      theta = jax.tree.map(lambda s, *d: s + sum(w[b, i] * (d[i] - s) for i in range(3)),
                           tw.shared, *experts)
      np.testing.assert_allclose(got[b], np.asarray(apply_fn(theta, x[b:b + 1]))[0], rtol=1e-10)
    np.testing.assert_allclose(got[0], np.asarray(apply_fn(experts[1], x[:1]))[0], rtol=1e-10)


def test_router_learns_separable_task_ids():
  r = np.random.default_rng(0)
  centers = 4.0 * np.eye(3, 5)
  y = np.repeat(np.arange(3), 40)
  f = centers[y] + r.normal(size=(120, 5))
  router = W.train_router(f, y, 3, hidden=16, epochs=100, learning_rate=1e-2, batch_size=32)
  w = np.asarray(W.route(router, f))
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
  assert np.mean(w.argmax(1) == y) > 0.95


def test_bad_input_one_line():
  base, experts = models(2, np.float64)
  f, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
  with pytest.raises(KfuseError, match=r"task ids \[2\] are not tasks of the pool \(0\.\.1"):
    W.train_router(f, np.array([0, 1, 2, 1]), 2)
  with pytest.raises(KfuseError, match=r"no labelled example of task\(s\) \[1\]"):
    W.train_router(f, np.zeros(4, int), 2)
  with pytest.raises(KfuseError, match="4 integers"):
    W.train_router(f, y.astype(float), 2)
  with pytest.raises(KfuseError, match="NaN"):
    W.train_router(np.full((4, 3), np.nan), y, 2)
  with pytest.raises(KfuseError, match=r"rank_ratio must be in \[0, 1\]"):
    W.twin(base, experts, rank_ratio=2.0)
  with pytest.raises(KfuseError, match="no experts"):
    W.twin(base, [])
  tw = W.twin(base, experts)
  with pytest.raises(KfuseError, match=r"weights must be \[B=5, N=2\]"):
    W.twin_apply(apply_fn, tw, np.ones((5, 3)), np.ones((5, 4)))
