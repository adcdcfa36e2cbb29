"""Expert Merging (kfuse.merge.expert_merging): the objective against a float64 NumPy
recomputation, its gradient against central finite differences, the chunk split against
torch.chunk (the reference's), the step protocol, and one-line bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import tree as T
from kfuse.merge import expert_merging as EM
from kfuse.tree import KfuseError


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5, name="fc")(x))
    return nn.Dense(3, name="out")(h), h


def _setup(t=2, seed=0):
  net = Net()
  base = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))["params"]
  experts = [jax.tree.map(lambda a, i=i: a + 0.5 * jax.random.normal(
      jax.random.fold_in(jax.random.PRNGKey(seed + 7), i * 31 + a.size), a.shape), base)
      for i in range(t)]
  x = np.random.default_rng(seed).normal(size=(t, 6, 4)).astype(np.float32)
  apply_fn = lambda p, xb, i: net.apply({"params": p}, xb)
  return net, base, experts, x, apply_fn


def _np_forward(p, x):
  h = np.tanh(x @ p["fc/kernel"] + p["fc/bias"])
  return h @ p["out/kernel"] + p["out/bias"], h


def _np_objective(w, base, experts, x, chunks, temp=1.0, beta=0.1, rho=0.1, init=0.1):
  """L(w) in float64 NumPy; chunks split like torch.chunk."""
  b = {k: np.asarray(v, np.float64) for k, v in T.flatten(base).items()}
  es = [{k: np.asarray(v, np.float64) for k, v in T.flatten(e).items()} for e in experts]
  alpha = 1 / (1 + np.exp(-np.asarray(w, np.float64)))
  merged, o = {}, 0
  for k in b:                                   # T.flatten order == jax leaves order here
    kk = chunks.get(k, 1)
    n = b[k].size
    size = -(-n // kk)
    idx = np.arange(n) // size + o
    d = sum(alpha[i, idx] * (es[i][k] - b[k]).ravel() for i in range(len(es)))
    merged[k] = b[k] + d.reshape(b[k].shape)
    o += kk
  total = 0.0
  for t in range(len(es)):
    ze, he = _np_forward(es[t], x[t].astype(np.float64))
    zm, hm = _np_forward(merged, x[t].astype(np.float64))
    sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    p = sm(ze / temp)
    logq = np.log(sm(zm / temp))
    ce = -np.mean(np.sum(p * logq, -1)) * temp ** 2
    total += ce + beta * np.mean((hm - he) ** 2)
  return total / len(es) + rho * np.sum(np.abs(alpha - init)) / o


CHUNKS = {"fc/kernel": 3, "out/kernel": 4}


def test_chunk_split_matches_torch_chunk():
  from tests.peers.peer import require
  torch = require("torch")
  for n, k in [(10, 4), (5, 4), (20, 3), (7, 7), (6, 1)]:
    parts = torch.chunk(torch.arange(n), k)
    want = np.concatenate([np.full(len(p), j) for j, p in enumerate(parts)])
    np.testing.assert_array_equal(EM._chunk_index(n, k), want)


def test_objective_matches_float64_numpy():
  _, base, experts, x, apply_fn = _setup()
  lay = EM.layout(base, CHUNKS)
  w = np.random.default_rng(3).normal(size=(2, lay.size)).astype(np.float32)
  taus = jax.tree.map(lambda b, *e: jnp.stack([v - b for v in e]), base, *experts)
  got = float(EM.objective_fn(apply_fn, lay, 2)(jnp.asarray(w), base, taus, jnp.asarray(x)))
  want = _np_objective(w, base, experts, x, CHUNKS)
  assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)


def test_gradient_matches_finite_differences():
  _, base, experts, x, apply_fn = _setup()
  with jax.enable_x64(True):
    b64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), base)
    e64 = [jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), e) for e in experts]
    lay = EM.layout(b64, CHUNKS)
    taus = jax.tree.map(lambda b, *e: jnp.stack([v - b for v in e]), b64, *e64)
    obj = jax.jit(EM.objective_fn(apply_fn, lay, 2))
    x64 = jnp.asarray(x, jnp.float64)
    w = jnp.asarray(np.random.default_rng(4).normal(size=(2, lay.size)))
    assert obj(w, b64, taus, x64).dtype == jnp.float64
    g = np.asarray(jax.grad(obj)(w, b64, taus, x64))
    eps = 1e-6
    for i in range(2):
      for j in range(lay.size):
        e = np.zeros(w.shape)
        e[i, j] = eps
        fd = (float(obj(w + e, b64, taus, x64)) - float(obj(w - e, b64, taus, x64))) / (2 * eps)
        assert abs(fd - g[i, j]) <= 1e-6 + 1e-5 * abs(fd), (i, j, fd, g[i, j])


def test_init_is_task_arithmetic_at_alpha0_and_steps_align_to_the_expert():
  _, base, experts, x, apply_fn = _setup(t=1)
  learner = EM.expert_merging(apply_fn, tasks=1, learning_rate=0.05, reg_weight=0.0)
  st = learner.init(base, experts, {"x": x[:1]})
  m0 = T.flatten(EM.merged(st))
  for k, b in T.flatten(base).items():
    want = np.asarray(b) + 0.1 * (np.asarray(T.flatten(experts[0])[k]) - np.asarray(b))
    np.testing.assert_allclose(np.asarray(m0[k]), want, rtol=1e-6, atol=1e-6)
  losses = []
  for _ in range(60):
    st, m = learner.step(st, {"x": x[:1]})
    losses.append(float(m["loss"]))
  # the soft-target CE is H(p_expert) + KL(p_expert ‖ p_merged): only the KL part can vanish
  assert losses[-1] < losses[0]
  assert float(jnp.min(jax.nn.sigmoid(st.w))) > 0.5   # one task: α → 1 (the expert itself)


def test_bad_input_is_one_line():
  _, base, experts, x, apply_fn = _setup()
  learner = EM.expert_merging(apply_fn, tasks=2)
  with pytest.raises(KfuseError, match=r"\[T=2, B, \.\.\.\]"):
    learner.init(base, experts, {"x": x[0]})
  with pytest.raises(KfuseError, match="2 experts for tasks=3"):
    EM.expert_merging(apply_fn, tasks=3).init(base, experts)
  with pytest.raises(KfuseError, match="did you mean 'fc/kernel'"):
    EM.expert_merging(apply_fn, tasks=2, chunks={"fc/kernal": 2}).init(base, experts)
  with pytest.raises(KfuseError, match="init"):
    EM.expert_merging(apply_fn, tasks=2, init=1.0)
  st = learner.init(base, experts)
  with pytest.raises(KfuseError, match="coefficients per expert"):
    EM.merged(st, chunks=CHUNKS)
