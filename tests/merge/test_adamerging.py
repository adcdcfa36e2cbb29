"""AdaMerging: frozen λ = task arithmetic, gradients vs finite differences (float64),
Adam's first step in closed form, the step protocol and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import merge
from kfuse.merge import adamerging as A
from kfuse.tree import KfuseError


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc1")(jnp.tanh(nn.Dense(6, name="fc0")(x)))


NET = _Net()


def _models(n=3, dtype=np.float32, seed=0):
  base = NET.init(jax.random.key(seed), jnp.ones((1, 4)))["params"]
  r = np.random.default_rng(seed)
  base = jax.tree.map(lambda a: np.asarray(a, dtype), base)
  experts = [jax.tree.map(lambda a: (a + 0.5 * r.normal(size=a.shape)).astype(dtype), base)
             for _ in range(n)]
  return base, experts


def apply_fn(p, x):
  return NET.apply({"params": p}, x)


def test_frozen_lambdas_are_task_arithmetic():
  base, experts = _models()
  for gran in ("task", "layer"):
    state = A.adamerging(apply_fn, granularity=gran).init(base, experts)
    got = A.merged(state)
    for path in ("fc0/kernel", "fc1/bias"):
      m, leaf = path.split("/")
      b = np.asarray(base[m][leaf], np.float64)
      want = b + 0.3 * sum(np.asarray(e[m][leaf], np.float64) - b for e in experts)
      np.testing.assert_allclose(got[m][leaf], want, rtol=1e-5, atol=1e-6)
  ta = merge.merge("task_arithmetic", experts, base, params={"lambda": 0.3})
  for a, b in zip(jax.tree.leaves(ta), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tasks,vmap_tasks", [(None, False), (2, False), (2, True)])
def test_gradient_matches_central_differences_float64(tasks, vmap_tasks):
  with jax.enable_x64(True):
    base, experts = _models(dtype=np.float64)
    taus = jax.tree.map(lambda *e: jnp.stack([x - e[0] for x in e[1:]]), base, *experts)
    x = np.random.default_rng(1).normal(size=(2, 5, 4) if tasks else (5, 4))
    fn = (lambda p, xb, t: apply_fn(p, xb) * (1.0 + t)) if tasks else apply_fn
    obj = jax.jit(A.objective_fn(fn, tasks, vmap_tasks=vmap_tasks))
    lam = jnp.asarray(np.random.default_rng(2).uniform(0, 0.6, size=(3, 4)))
    g = np.asarray(jax.grad(obj)(lam, base, taus, x))
    fd = np.zeros_like(g)
    h = 1e-6
    for idx in np.ndindex(*g.shape):
      e = np.zeros(g.shape)
      e[idx] = h
      fd[idx] = (float(obj(lam + e, base, taus, x)) - float(obj(lam - e, base, taus, x))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # task-wise λ_i is every tensor's λ_{i,p} tied: its gradient is the sum over tensors
    gt = np.asarray(jax.grad(obj)(jnp.full((3,), 0.3), base, taus, x))
    gl = np.asarray(jax.grad(obj)(jnp.full((3, 4), 0.3), base, taus, x))
    np.testing.assert_allclose(gt, gl.sum(1), rtol=1e-10)


def test_one_step_is_adams_first_step():
  """Adam's first update is −lr·g/(|g| + ε) = −lr·sign(g) for |g| ≫ ε (lr 1e-3)."""
  base, experts = _models()
  x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
  learner = A.adamerging(apply_fn)
  state = learner.init(base, experts, {"x": x})
  taus = state.task_vectors
  g = np.asarray(jax.grad(A.objective_fn(apply_fn))(state.lambdas, state.base, taus, x))
  new, metrics = learner.step(state, {"x": x}, jax.random.key(0))
  assert np.all(np.abs(g) > 1e-5)
  np.testing.assert_allclose(new.lambdas, 0.3 - 1e-3 * np.sign(g), rtol=0, atol=1e-6)
  assert int(new.count) == 1 and np.isfinite(float(metrics["loss"]))
  z = np.asarray(apply_fn(A.merged(state), x), np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(metrics["loss"], np.mean(-np.sum(p * np.log(p + 1e-8), -1)), rtol=1e-5)


def test_vmap_tasks_loss_is_the_float64_sum_of_task_entropies():
  """vmap_tasks=True: t is traced (indexes stacked heads); the step's loss is Σ_t of the
  float64 NumPy entropies, and its λ follow the per-task loop's."""
  base, experts = _models(2)
  scale = jnp.asarray([1.0, 2.5])
  fn = lambda p, xb, t: apply_fn(p, xb) * scale[t]
  x = np.random.default_rng(4).normal(size=(2, 5, 4)).astype(np.float32)
  runs = {}
  for vm in (False, True):
    learner = A.adamerging(fn, tasks=2, vmap_tasks=vm)
    state = learner.init(base, experts, {"x": x})
    _, m = learner.step(state, {"x": x})
    runs[vm] = (learner.step(state, {"x": x})[0].lambdas, float(m["loss"]))
  want = 0.0
  for t in range(2):
    z = np.asarray(apply_fn(A.merged(state), x[t]), np.float64) * float(scale[t])
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want += np.mean(-np.sum(p * np.log(p + 1e-8), -1))
  np.testing.assert_allclose(runs[True][1], want, rtol=1e-5)
  np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=0, atol=1e-7)


def test_per_task_batches_and_optimizer_config():
  base, experts = _models(2)
  learner = A.adamerging(lambda p, x, t: apply_fn(p, x), granularity="task", tasks=2,
                         optimizer={"name": "sgd", "learning_rate": 0.1})
  x = np.ones((2, 3, 4), np.float32)
  state = learner.init(base, experts, {"x": x})
  assert state.lambdas.shape == (2,)
  state, _ = learner.step(state, {"x": x}, None)
  with pytest.raises(KfuseError, match=r"'x' must be \[T=2, B, \.\.\.\]"):
    learner.step(state, {"x": x[0]}, None)


def test_bad_configuration():
  with pytest.raises(KfuseError, match="did you mean 'layer'"):
    A.adamerging(apply_fn, granularity="layers")
  base, experts = _models(2)
  with pytest.raises(KfuseError, match="missing key"):
    A.adamerging(apply_fn).init(base, [experts[0], {"fc0": experts[1]["fc0"]}])


def test_step_keeps_base_and_task_vectors_without_copying():
  """θ_0 and τ are frozen inputs: returning them from the jitted step copied them each step."""
  base, experts = _models(2)
  learner = A.adamerging(apply_fn)
  state = learner.init(base, experts)
  new, _ = learner.step(state, {"x": np.ones((2, 4), np.float32)}, None)
  assert all(a is b for a, b in zip(jax.tree.leaves(new.task_vectors), jax.tree.leaves(state.task_vectors)))
  assert all(a is b for a, b in zip(jax.tree.leaves(new.base), jax.tree.leaves(state.base)))
