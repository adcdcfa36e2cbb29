"""ESM (kfuse.merge.essential) against a float64 NumPy recomputation of the reference
implementation (kiddo127/ESM: PCA by SVD of the activation shift X ΔWᵀ itself, not via the
Gram), properties and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import merge
from kfuse import tree as T
from kfuse.merge import essential, informed
from kfuse.merge import statistics as ST
from kfuse.tree import KfuseError


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.tanh(nn.Dense(8, name="fc")(x))


class Net(nn.Module):
  """embed (6→8), layers_0 / layers_1 (8→8, one inter-layer group), out (8→5), an unused
  2-D ``kernel`` (no Gram: TSV-M) and an unused 2-D ``pos`` (not a weight: averaged)."""
  @nn.compact
  def __call__(self, x):
    self.param("kernel", nn.initializers.normal(1.0), (4, 8))
    self.param("pos", nn.initializers.normal(1.0), (4, 8))
    h = nn.tanh(nn.Dense(8, name="embed")(x))
    h = Block(name="layers_0")(h)
    h = Block(name="layers_1")(h)
    return nn.Dense(5, name="out")(h)


def _setup(t=2, n=32, scale=0.3, seed=0):
  net = Net()
  base = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6)))["params"]
  experts = [jax.tree.map(lambda a, i=i: a + scale * jax.random.normal(
      jax.random.fold_in(jax.random.PRNGKey(seed + 100), i * 997 + a.size), a.shape), base)
      for i in range(t)]
  xs = [np.random.default_rng(seed + i).normal(size=(n, 6)).astype(np.float32) for i in range(t)]
  stats = [ST.grams(net, {"params": e}, [{"x": x}]) for e, x in zip(experts, xs)]
  return net, base, experts, xs, stats


# ------------------------------------------------------------------ float64 reference


def _np_inputs(p, x):
  """Each Dense layer's input in a float64 NumPy forward pass of `Net`."""
  p = {k: np.asarray(v, np.float64) for k, v in T.flatten(p).items()}
  dense = lambda name, h: h @ p[f"{name}/kernel"] + p[f"{name}/bias"]
  ins = {}
  h = np.asarray(x, np.float64)
  ins["embed/kernel"] = h
  h = np.tanh(dense("embed", h))
  for l in ("layers_0", "layers_1"):
    ins[f"{l}/fc/kernel"] = h
    h = np.tanh(dense(f"{l}/fc", h))
  ins["out/kernel"] = h
  return ins


def _np_polar_mean(a):
  u, s, vt = np.linalg.svd(a, full_matrices=False)
  return u @ vt, s.mean()


def _np_esm_matrix(dws, xs, k, p=2.0, q=0.15):
  """esm_utils.esm_merge for one [out, in] key with ESD (essential_subspace_decomposition)."""
  us, vs, norms = [], [], []
  for dw, x in zip(dws, xs):
    d_o = x @ dw.T                                            # activation shift [n, out]
    _, s, vh = np.linalg.svd(d_o, full_matrices=False)
    evals, evecs = s ** 2 / (len(x) - 1), vh.T
    v = evecs.T @ dw
    nv = np.linalg.norm(v)
    norms.append(nv)
    v = v * nv ** p
    ek = evals[:k]
    sc = (ek / ek.mean()) ** q
    sc = sc / sc.mean()
    us.append(evecs[:, :k] * sc[None, :])
    vs.append(v[:k] * sc[:, None])
  ub, vb = np.concatenate(us, 1), np.concatenate(vs, 0)
  vb = vb / np.mean(norms) ** p
  col = np.linalg.norm(vb, axis=0)
  vb = vb * (col / col.mean())[None, :] ** p
  pu, mu = _np_polar_mean(ub)
  pv, mv = _np_polar_mean(vb)
  return 2 * (pu * mu) @ (pv * mv)


def _np_tsv(dws):
  t = len(dws)
  k = min(dws[0].shape) // t
  svds = [np.linalg.svd(d, full_matrices=False) for d in dws]
  ub = np.concatenate([u[:, :k] for u, _, _ in svds], 1)
  sb = np.concatenate([s[:k] for _, s, _ in svds])
  vb = np.concatenate([vt[:k] for _, _, vt in svds], 0)
  return (_np_polar_mean(ub)[0] * sb) @ _np_polar_mean(vb)[0]


def _np_esm(base, experts, xs, lam=1.0, p=2.0):
  b = {k: np.asarray(v, np.float64) for k, v in T.flatten(base).items()}
  es = [{k: np.asarray(v, np.float64) for k, v in T.flatten(e).items()} for e in experts]
  ins = [_np_inputs(e, x) for e, x in zip(experts, xs)]
  t = len(es)
  delta = {}
  for key in b:
    taus = [e[key] - b[key] for e in es]
    if key in ins[0]:   # Flax kernel [in, out] -> [out, in]
      out = b[key].shape[1]
      d = _np_esm_matrix([tau.T for tau in taus], [i[key] for i in ins], out // t).T
    elif key == "kernel":
      d = _np_tsv([tau.T for tau in taus]).T
    else:
      d = np.mean(taus, axis=0)
    delta[key] = d
  group = ["layers_0/fc/kernel", "layers_1/fc/kernel"]      # the one multi-member group
  mean = np.mean([np.linalg.norm(delta[k]) for k in group])
  for k in group:
    delta[k] = delta[k] * (np.linalg.norm(delta[k]) / mean) ** p
  return {k: b[k] + lam * delta[k] for k in b}


def _close(out, ref, rtol=2e-4):
  out = T.flatten(out)
  assert set(out) == set(ref)
  for k in ref:
    got = np.asarray(out[k], np.float64)
    err = np.max(np.abs(got - ref[k])) / max(np.max(np.abs(ref[k])), 1e-12)
    assert err < rtol, (k, err)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("t,lam", [(2, 1.0), (3, 0.7)])
def test_esm_matches_float64_reference(t, lam):
  _, base, experts, xs, stats = _setup(t=t)
  out = merge.merge(informed.with_statistics("esm", stats), experts, base,
                    params={"lambda": lam})
  _close(out, _np_esm(base, experts, xs, lam=lam))


def test_esm_saved_statistics_round_trip(tmp_path):
  _, base, experts, xs, stats = _setup()
  paths = [ST.save(tmp_path / f"s{i}", s) for i, s in enumerate(stats)]
  out = merge.merge(informed.with_statistics("esm", paths), experts, base)
  _close(out, _np_esm(base, experts, xs))


def test_esd_only_one_expert_full_rank_is_that_expert():
  _, base, experts, _, stats = _setup(t=1)
  out = merge.merge(informed.with_statistics("esm", stats), experts, base,
                    params={"polarize": False, "rank": "full"})
  for k, v in T.flatten(out).items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(T.flatten(experts[0])[k]), atol=2e-5)


def test_esd_only_projection_matches_numpy():
  """polarize=False: Σ_i U_k U_kᵀ ΔW_i, U from the SVD of the activation shift."""
  _, base, experts, xs, stats = _setup(t=2)
  out = T.flatten(merge.merge(informed.with_statistics("esm", stats), experts, base,
                              params={"polarize": False}))
  ins = [_np_inputs(e, x) for e, x in zip(experts, xs)]
  key = "layers_0/fc/kernel"
  b = np.asarray(T.flatten(base)[key], np.float64)
  ref = b.copy()
  for e, i in zip(experts, ins):
    dw = (np.asarray(T.flatten(e)[key], np.float64) - b).T
    _, _, vh = np.linalg.svd(i[key] @ dw.T, full_matrices=False)
    uk = vh[:4].T
    ref += (uk @ uk.T @ dw).T
  np.testing.assert_allclose(np.asarray(out[key]), ref, atol=2e-5)


def test_esm_invariant_to_gram_scale():
  """The essential subspace and the normalised eigenvalue weights depend on G only up to scale."""
  _, base, experts, _, stats = _setup()
  scaled = [ST.Statistics(gram={k: 7.5 * np.asarray(v) for k, v in s.gram.items()},
                          tokens=s.tokens, examples=s.examples) for s in stats]
  a = T.flatten(merge.merge(informed.with_statistics("esm", stats), experts, base))
  b = T.flatten(merge.merge(informed.with_statistics("esm", scaled), experts, base))
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-5)


def test_layer_group():
  assert essential.layer_group("backbone/layers_3/mlp/fc_in/kernel") == \
      "backbone/layers_#/mlp/fc_in/kernel"
  assert essential.layer_group("model.layers.12.mlp.up_proj.weight") == \
      "model.layers.#.mlp.up_proj.weight"
  assert essential.layer_group("backbone/patch_embed/kernel") == "backbone/patch_embed/kernel"


def _one_line(exc):
  msg = str(exc.value)
  assert "\n" not in msg
  return msg


def test_too_few_samples_is_one_line():
  _, base, experts, _, _ = _setup(t=2)
  net = Net()
  few = [ST.grams(net, {"params": e}, [{"x": np.ones((3, 6), np.float32)}]) for e in experts]
  with pytest.raises(KfuseError) as e:
    merge.merge(informed.with_statistics("esm", few), experts, base)
  msg = _one_line(e)
  assert "too few samples" in msg and "statistics[0]" in msg and "k = 4" in msg


def test_statistics_of_another_model_is_one_line():
  _, base, experts, xs, stats = _setup(t=2)

  class Other(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="out")(nn.Dense(3, name="embed")(x))

  o = Other()
  ov = o.init(jax.random.PRNGKey(1), jnp.zeros((1, 6)))
  other = [ST.grams(o, ov, [{"x": x}]) for x in xs]
  with pytest.raises(KfuseError) as e:
    merge.merge(informed.with_statistics("esm", other), experts, base)
  assert "different model" in _one_line(e)


def test_nan_gram_and_unbound_are_one_line():
  _, base, experts, _, stats = _setup(t=2)
  g = dict(stats[1].gram)
  g["out/kernel"] = np.full_like(np.asarray(g["out/kernel"]), np.nan)
  bad = [stats[0], ST.Statistics(gram=g, tokens=stats[1].tokens, examples=stats[1].examples)]
  with pytest.raises(KfuseError) as e:
    merge.merge(informed.with_statistics("esm", bad), experts, base)
  assert "NaN" in _one_line(e) and "out/kernel" in str(e.value)
  with pytest.raises(KfuseError) as e:
    merge.merge("esm", experts, base)
  assert "with_statistics" in _one_line(e)
  with pytest.raises(KfuseError) as e:
    merge.merge(informed.with_statistics("esm", stats), experts, base, params={"rank": "ful"})
  assert "did you mean 'full'" in _one_line(e)


def test_dense_general_kernel_is_flattened_along_its_gram():
  """A DenseGeneral kernel [in, heads, head_dim] is the [in, heads·head_dim] matrix its Gram
  contracts; its 2-D bias [heads, head_dim] is averaged (not a weight)."""

  class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 3), name="q")(x)

  net = Proj()
  base = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 4)))["params"]
  experts = [jax.tree.map(lambda a, i=i: a + 0.3 * jax.random.normal(
      jax.random.fold_in(jax.random.PRNGKey(9), i * 13 + a.size), a.shape), base) for i in range(2)]
  xs = [np.random.default_rng(20 + i).normal(size=(8, 5, 4)).astype(np.float32) for i in range(2)]
  stats = [ST.grams(net, {"params": e}, [{"x": x}]) for e, x in zip(experts, xs)]
  out = T.flatten(merge.merge(informed.with_statistics("esm", stats), experts, base))
  b = {k: np.asarray(v, np.float64) for k, v in T.flatten(base).items()}
  taus = [{k: np.asarray(v, np.float64) - b[k] for k, v in T.flatten(e).items()} for e in experts]
  dws = [tau["q/kernel"].reshape(4, 6).T for tau in taus]
  want = b["q/kernel"] + _np_esm_matrix(dws, [x.reshape(-1, 4).astype(np.float64) for x in xs],
                                        6 // 2).T.reshape(4, 2, 3)
  err = np.max(np.abs(np.asarray(out["q/kernel"]) - want)) / np.max(np.abs(want))
  assert err < 2e-4, err
  np.testing.assert_allclose(np.asarray(out["q/bias"]),
                             b["q/bias"] + (taus[0]["q/bias"] + taus[1]["q/bias"]) / 2, atol=1e-6)
