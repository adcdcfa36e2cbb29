"""Fisher merging, RegMean and RegMean++: float64 NumPy references, properties, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import merge
from kfuse.merge import informed
from kfuse.merge import statistics as S
from kfuse.merge.statistics import Statistics
from kfuse.tree import KfuseError

D_IN, D_H, D_OUT = 5, 4, 3


def _experts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"l0": {"kernel": rng.normal(size=(D_IN, D_H)).astype(np.float32),
                  "bias": rng.normal(size=D_H).astype(np.float32)},
           "l1": {"kernel": rng.normal(size=(D_H, D_OUT)).astype(np.float32),
                  "bias": rng.normal(size=D_OUT).astype(np.float32)}} for _ in range(n)]


def _gram(x):
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return x.T @ x / len(x)


def _regmean_np(ws, gs, alpha):
  gs = [g * alpha + np.diag(np.diag(g)) * (1 - alpha) for g in gs]
  return np.linalg.solve(sum(gs), sum(g @ np.asarray(w, np.float64) for g, w in zip(gs, ws)))


def _gram_stats(experts, seed=1, rows=20):
  rng = np.random.default_rng(seed)
  out = []
  for _ in experts:
    g = {"l0/kernel": _gram(rng.normal(size=(rows, D_IN))),
         "l1/kernel": _gram(rng.normal(size=(rows, D_H)) + 1)}
    out.append(Statistics(gram={k: v.astype(np.float32) for k, v in g.items()},
                          tokens={k: rows for k in g}, examples=rows))
  return out


def test_regmean_matches_float64_closed_form():
  experts, stats = _experts(3), None
  stats = _gram_stats(experts)
  got = merge.merge(informed.with_statistics("regmean", stats), experts)
  for layer in ("l0", "l1"):
    want = _regmean_np([e[layer]["kernel"] for e in experts],
                       [np.asarray(s.gram[f"{layer}/kernel"], np.float64) for s in stats], 0.95)
    np.testing.assert_allclose(got[layer]["kernel"], want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got[layer]["bias"], np.mean([e[layer]["bias"] for e in experts], 0),
                               rtol=1e-6)


def test_fisher_matches_float64_closed_form():
  experts = _experts(2)
  rng = np.random.default_rng(5)
  fis = [{f"{l}/{p}": rng.random(size=e[l][p].shape) for l in e for p in e[l]} for e in experts]
  got = merge.merge(informed.with_statistics(
      "fisher", [Statistics(fisher={k: v.astype(np.float32) for k, v in f.items()}, examples=8)
                 for f in fis]), experts)
  norms = np.array([np.sqrt(sum(np.sum(v ** 2) for v in f.values())) for f in fis])
  c = (1 / (norms + 1e-6)) / np.sum(1 / (norms + 1e-6))
  for l in ("l0", "l1"):
    for p in ("kernel", "bias"):
      f = [fi[f"{l}/{p}"] + 1e-6 for fi in fis]
      want = sum(ci * fi * e[l][p] for ci, fi, e in zip(c, f, experts)) / sum(ci * fi for ci, fi in zip(c, f))
      np.testing.assert_allclose(got[l][p], want, rtol=2e-5, atol=1e-6)


def test_identical_experts_give_that_expert():
  e = _experts(1)[0]
  stats = _gram_stats([e, e, e])
  fis = [Statistics(fisher={f"{l}/{p}": np.full(e[l][p].shape, v, np.float32)
                            for l in e for p in e[l]}, examples=4) for v in (0.1, 1.0, 3.0)]
  for m in (informed.with_statistics("regmean", stats), informed.with_statistics("fisher", fis)):
    got = merge.merge(m, [e, e, e])
    for l in e:
      for p in e[l]:
        np.testing.assert_allclose(got[l][p], e[l][p], rtol=1e-5, atol=1e-6)


def test_regmean_of_one_model_is_that_model():
  e = _experts(1)[0]
  got = merge.merge(informed.with_statistics("regmean", _gram_stats([e])), [e])
  for l in e:
    for p in e[l]:
      np.testing.assert_allclose(got[l][p], e[l][p], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- RegMean++


class _Lin(nn.Module):
  width: int
  act: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.width, name="d")(x)
    return nn.relu(y) if self.act else y


def test_regmean_plusplus_matches_float64_reference():
  """Stage 1's Grams on the raw inputs; stage 2's on relu(X W1* + b1*) of the MERGED stage 1."""
  rng = np.random.default_rng(0)
  experts = [{"l0": {"d": {"kernel": rng.normal(size=(D_IN, D_H)).astype(np.float32),
                           "bias": rng.normal(size=D_H).astype(np.float32)}},
              "l1": {"d": {"kernel": rng.normal(size=(D_H, D_OUT)).astype(np.float32),
                           "bias": rng.normal(size=D_OUT).astype(np.float32)}}} for _ in range(2)]
  xs = [rng.normal(size=(12, D_IN)).astype(np.float32) + i for i in range(2)]
  stages = [("l0", lambda p, h: _Lin(D_H).apply({"params": p}, h)),
            ("l1", lambda p, h: _Lin(D_OUT, act=False).apply({"params": p}, h))]
  got = informed.regmean_plusplus(stages, experts, [[x[:6], x[6:]] for x in xs], alpha=0.9)
  k0 = _regmean_np([e["l0"]["d"]["kernel"] for e in experts], [_gram(x) for x in xs], 0.9)
  b0 = np.mean([e["l0"]["d"]["bias"] for e in experts], 0)
  hs = [np.maximum(x.astype(np.float64) @ k0 + b0, 0) for x in xs]
  k1 = _regmean_np([e["l1"]["d"]["kernel"] for e in experts], [_gram(h) for h in hs], 0.9)
  np.testing.assert_allclose(got["l0"]["d"]["kernel"], k0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["l1"]["d"]["kernel"], k1, rtol=1e-4, atol=1e-5)
  # plain RegMean takes stage 2's Grams on each expert's OWN stage-1 outputs: different
  h_own = [np.maximum(x @ e["l0"]["d"]["kernel"] + e["l0"]["d"]["bias"], 0) for x, e in zip(xs, experts)]
  k1_plain = _regmean_np([e["l1"]["d"]["kernel"] for e in experts], [_gram(h) for h in h_own], 0.9)
  assert np.max(np.abs(k1_plain - k1)) > 1e-3


def test_regmean_plusplus_identical_experts():
  rng = np.random.default_rng(1)
  e = {"l0": {"d": {"kernel": rng.normal(size=(D_IN, D_H)).astype(np.float32),
                    "bias": rng.normal(size=D_H).astype(np.float32)}},
       "extra": {"s": np.ones(2, np.float32)}}
  stages = [("l0", lambda p, h: _Lin(D_H).apply({"params": p}, h))]
  got = informed.regmean_plusplus(stages, [e, e], [[rng.normal(size=(9, D_IN))]] * 2)
  np.testing.assert_allclose(got["l0"]["d"]["kernel"], e["l0"]["d"]["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got["extra"]["s"], e["extra"]["s"])


# ----------------------------------------------------------------- bad input


def test_unbound_methods_say_what_they_need():
  e = _experts(2)
  for name in ("fisher", "regmean", "regmean_plusplus"):
    assert merge.get_method(name).data
    with pytest.raises(KfuseError, match=f"method '{name}' needs whole-model statistics from data"):
      merge.merge(name, e)


def test_statistics_of_a_different_model():
  e = _experts(2)
  st = _gram_stats(e)
  wrong_path = [Statistics(gram={"l9/kernel": s.gram["l0/kernel"]}, tokens={"l9/kernel": 20})
                for s in st]
  with pytest.raises(KfuseError, match="'l9/kernel' matches no parameter"):
    merge.merge(informed.with_statistics("regmean", wrong_path), e)
  wrong_shape = [Statistics(gram={"l1/kernel": s.gram["l0/kernel"]}, tokens={"l1/kernel": 20})
                 for s in st]
  with pytest.raises(KfuseError, match=r"Gram of 'l1/kernel' is \(5, 5\), the kernel \(4, 3\)"):
    merge.merge(informed.with_statistics("regmean", wrong_shape), e)
  with pytest.raises(KfuseError, match="1 statistics for 2 models"):
    merge.merge(informed.with_statistics("regmean", st[:1]), e)
  fis = [Statistics(fisher={"l0/kernel": np.ones((D_IN, D_H), np.float32)})] * 2
  with pytest.raises(KfuseError, match="no Fisher for parameter 'l0/bias'"):
    merge.merge(informed.with_statistics("fisher", fis), e)


def test_too_few_samples_needs_shrink_or_ridge():
  e = _experts(2)
  rng = np.random.default_rng(0)
  st = [Statistics(gram={"l0/kernel": _gram(rng.normal(size=(2, D_IN))).astype(np.float32)},
                   tokens={"l0/kernel": 2}, examples=2) for _ in e]
  with pytest.raises(KfuseError, match=r"from 2 input rows < d_in=5: rank-deficient.*alpha < 1"):
    merge.merge(informed.with_statistics("regmean", st), e, params={"alpha": 1.0})
  got = merge.merge(informed.with_statistics("regmean", st), e, params={"alpha": 1.0, "ridge": 0.1})
  assert np.all(np.isfinite(got["l0"]["kernel"]))
  merge.merge(informed.with_statistics("regmean", st), e)   # alpha 0.95: full rank, finite


def test_dead_input_needs_ridge():
  e = _experts(2)
  g = np.eye(D_IN, dtype=np.float32)
  g[2, 2] = 0
  st = [Statistics(gram={"l0/kernel": g}, tokens={"l0/kernel": 50})] * 2
  with pytest.raises(KfuseError, match="input 2 of 'l0/kernel' is zero .* pass ridge > 0"):
    merge.merge(informed.with_statistics("regmean", st), e)


def test_nan_in_statistics_is_one_line(tmp_path):
  e = _experts(2)
  st = _gram_stats(e)
  g = np.array(st[1].gram["l1/kernel"])
  g[0, 1] = np.nan
  st[1] = Statistics(gram={**st[1].gram, "l1/kernel": g}, tokens=st[1].tokens, examples=20)
  S.save(tmp_path / "s1", st[1])
  with pytest.raises(KfuseError, match=r"statistics\[1\]: the Gram of 'l1/kernel' holds 1 NaN"):
    merge.merge(informed.with_statistics("regmean", [st[0], str(tmp_path / "s1")]), e)


def test_with_statistics_refuses_a_data_free_method_and_a_bare_statistics():
  with pytest.raises(KfuseError, match="uses no data statistics"):
    informed.with_statistics("ties", [])
  with pytest.raises(KfuseError, match="one statistics per expert"):
    informed.with_statistics("regmean", Statistics())


def test_checkpoint_merge_refuses_data_methods(tmp_path):
  """The streaming engine merges one tensor at a time: it cannot take statistics."""
  from kfuse.io.orbax_io import save_orbax
  from kfuse.merge.runner import merge_checkpoints
  paths = []
  for i, e in enumerate(_experts(2)):
    paths.append(save_orbax(str(tmp_path / f"e{i}"), e))
  with pytest.raises(KfuseError, match="method 'regmean' needs whole-model statistics"):
    merge_checkpoints("regmean", paths, None, str(tmp_path / "out"), progress=False)


@pytest.mark.slow
def test_collected_statistics_merge_backbones_end_to_end(tmp_path):
  """statistics.collect on two real classifiers -> saved -> under('backbone') -> regmean and
  fisher over the backbones: the collected keys are the merge tree's paths."""
  from kfuse.models.mlp import make_mlp
  model = make_mlp(3, hidden=(6,))
  rng = np.random.default_rng(0)
  vs = [model.init(jax.random.key(i), jnp.ones((1, 4))) for i in range(2)]
  data = [[{"x": rng.normal(size=(8, 4)).astype(np.float32) + i}] for i in range(2)]
  paths = []
  for i, (v, d) in enumerate(zip(vs, data)):
    paths.append(S.save(tmp_path / f"s{i}", S.collect(model, v, d)))
  stats = [S.load(p).under("backbone") for p in paths]
  backbones = [v["params"]["backbone"] for v in vs]
  got = merge.merge(informed.with_statistics("regmean", stats), backbones)
  xs = [np.asarray(d[0]["x"], np.float64) for d in data]
  want = _regmean_np([b["layers_0"]["kernel"] for b in backbones], [_gram(x) for x in xs], 0.95)
  np.testing.assert_allclose(got["layers_0"]["kernel"], want, rtol=1e-4, atol=1e-5)
  got_f = merge.merge(informed.with_statistics("fisher", stats), backbones)
  assert jax.tree.structure(got_f) == jax.tree.structure(backbones[0])
