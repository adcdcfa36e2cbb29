"""EMR, TALL masks / Consensus, MagMax and PCB against float64 NumPy re-derivations of the
papers' formulas; properties, bad input and the streaming engine."""

import numpy as np
import pytest

from kfuse import merge
from kfuse.merge import masks
from kfuse.tree import KfuseError

F64 = np.float64


def models(t=3, seed=0, scale=0.3):
  r = np.random.default_rng(seed)
  base = {"a.weight": r.standard_normal((7, 5)), "a.bias": r.standard_normal(7),
          "b.weight": r.standard_normal((3, 4, 2))}
  exps = [{k: v + scale * r.standard_normal(v.shape) for k, v in base.items()} for _ in range(t)]
  return base, exps


def tv_of(base, exps, k):
  return np.stack([e[k] - base[k] for e in exps])


def run(method, exps, base, **params):
  out = merge.merge(method, exps, base, params=params, layout="torch")
  return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- NumPy references


def np_emr(base, exps):
  uni, msk, num, den = {}, {}, 0.0, 0.0
  for k in base:
    tv = tv_of(base, exps, k)
    g = np.where(tv.sum(0) > 0, 1.0, -1.0)
    msk[k] = tv * g > 0
    uni[k] = g * np.max(np.abs(tv * msk[k]), axis=0)
    num = num + np.abs(tv).reshape(len(exps), -1).mean(1)
    den = den + np.abs(msk[k] * uni[k]).reshape(len(exps), -1).mean(1)
  return uni, msk, num / den


def np_tall(tv, lam):
  return np.abs(tv) > lam * np.abs(tv.sum(0) - tv)


def np_pcb(tv, ratio):
  t = tv.shape[0]
  x = tv.reshape(t, -1)
  d = x.shape[1]

  def clamp(y, lo_r, hi_r):
    s = np.sort(y, axis=1)
    return np.clip(y, s[:, [int(d * lo_r)]], s[:, [int(d * (1 - hi_r) - 1)]])

  def minmax(y):   # the reference divides 0/0 on a constant row; kfuse documents 1 there
    lo, hi = y.min(1, keepdims=True), y.max(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(hi > lo, (y - lo) / (hi - lo), 1.0)

  mag = clamp(np.abs(x), 1e-4, 1e-4)
  score = np.exp(t * minmax(mag) ** 2) * np.tanh(x * x.sum(0))
  scale = minmax(clamp(score, 1 - ratio, 0))
  out = (np.sign(x) * mag * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)
  return out.reshape(tv.shape[1:])


# ---------------------------------------------------------------- golden values


def test_emr_unified_and_task_models_match_numpy():
  base, exps = models(4)
  uni, msk, resc = np_emr(base, exps)
  out = run("emr", exps, base)
  for k in base:
    np.testing.assert_allclose(out[k], base[k] + uni[k], rtol=1e-12)
  for i in range(4):
    got = masks.emr_task_model(exps, base, i, layout="torch")
    for k in base:
      np.testing.assert_allclose(np.asarray(got[k]) - base[k], resc[i] * msk[k][i] * uni[k],
                                 rtol=1e-6, atol=1e-12, err_msg=f"{i} {k}")   # λ_i: float32


def test_tall_mask_and_consensus_match_numpy():
  base, exps = models(4)
  lam = 0.5
  for i in range(4):
    got = masks.tall_task_model(exps, base, i, params={"tall_lambda": lam}, layout="torch")
    for k in base:
      tv = tv_of(base, exps, k)
      np.testing.assert_allclose(np.asarray(got[k]), base[k] + np_tall(tv, lam)[i] * tv.sum(0),
                                 rtol=1e-12)
  ta = run("consensus_ta", exps, base, tall_lambda=lam, consensus_k=3)
  ties = run("ties", exps, base, density=0.2, normalize=False, **{"lambda": 0.3})
  cties = run("consensus_ties", exps, base, tall_lambda=lam)
  for k in base:
    tv = tv_of(base, exps, k)
    c3 = np_tall(tv, lam).sum(0) >= 3
    c2 = np_tall(tv, lam).sum(0) >= 2
    np.testing.assert_allclose(ta[k], base[k] + c3 * np.float32(0.3) * tv.sum(0), rtol=1e-12)
    np.testing.assert_array_equal(cties[k], np.where(c2, ties[k], base[k]))
    assert 0 < c2.mean() < 1


def test_magmax_matches_numpy():
  base, exps = models(5)
  out = run("magmax", exps, base)
  for k in base:
    tv = tv_of(base, exps, k)
    idx = np.argmax(np.abs(tv), axis=0)
    ref = np.take_along_axis(tv, idx[None], 0)[0]
    np.testing.assert_allclose(out[k], base[k] + 0.5 * ref, rtol=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_pcb_matches_numpy(ratio):
  base, exps = models(3)
  out = run("pcb", exps, base, pcb_ratio=ratio)
  for k in base:
    np.testing.assert_allclose(out[k], base[k] + np_pcb(tv_of(base, exps, k), ratio), rtol=1e-9,
                               atol=1e-12, err_msg=k)


def test_flax_dense_general_attention_matches_numpy():
  """The mask methods are per entry (PCB per tensor): on a Flax attention layer (3-D
  DenseGeneral kernels, 2-D [heads, head_dim] biases) they follow the same NumPy rules as on
  PyTorch tensors, whatever the rank."""
  from tests.merge.test_subspace import attention_models
  base, exps = attention_models(t=4, scale=0.3)
  kw = dict(layout="flax")
  uni, msk, _ = np_emr(base, exps)
  emr = merge.merge("emr", exps, base, **kw)
  cta = merge.merge("consensus_ta", exps, base, params={"tall_lambda": 0.5}, **kw)
  mag = merge.merge("magmax", exps, base, **kw)
  pcb = merge.merge("pcb", exps, base, **kw)
  tall = masks.tall_task_model(exps, base, 1, params={"tall_lambda": 0.5}, **kw)
  for k in base:
    tv = tv_of(base, exps, k)
    np.testing.assert_allclose(np.asarray(emr[k]), base[k] + uni[k], rtol=1e-12, err_msg=k)
    c2 = np_tall(tv, 0.5).sum(0) >= 2
    np.testing.assert_allclose(np.asarray(cta[k]), base[k] + c2 * np.float32(0.3) * tv.sum(0),
                               rtol=1e-12, err_msg=k)
    np.testing.assert_allclose(np.asarray(tall[k]), base[k] + np_tall(tv, 0.5)[1] * tv.sum(0),
                               rtol=1e-12, err_msg=k)
    top = np.take_along_axis(tv, np.argmax(np.abs(tv), axis=0)[None], 0)[0]
    np.testing.assert_allclose(np.asarray(mag[k]), base[k] + 0.5 * top, rtol=1e-12, err_msg=k)
    np.testing.assert_allclose(np.asarray(pcb[k]), base[k] + np_pcb(tv, 0.1), rtol=1e-9,
                               atol=1e-12, err_msg=k)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("method", ["emr", "magmax", "pcb", "consensus_ta"])
def test_permuting_the_tasks_changes_nothing(method):
  base, exps = models(4, seed=1)
  a, b = run(method, exps, base), run(method, exps[::-1], base)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12, err_msg=k)


def test_identical_task_vectors():
  """T copies of τ: MagMax and EMR's task models give back τ (θ_i), PCB gives the clipped τ."""
  base, exps = models(1)
  out = run("magmax", exps * 3, base, **{"lambda": 1.0})
  got = masks.emr_task_model(exps * 3, base, 2, layout="torch")
  for k in base:
    np.testing.assert_allclose(out[k], exps[0][k], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got[k]), exps[0][k], rtol=1e-6)
  out = run("pcb", exps * 3, base)
  for k in base:
    tv = tv_of(base, exps * 3, k)
    np.testing.assert_allclose(out[k], base[k] + np_pcb(tv, 0.1), rtol=1e-9)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_naming_the_tensor():
  base, exps = models(2)
  for name, params, msg in [
      ("emr_task", {"task": 2}, r"task=2 is not one of the 2 task models"),
      ("tall_mask", {"task": -1}, r"task=-1 is not one of the 2 task models"),
      ("pcb", {"pcb_ratio": 0.0}, r"pcb_ratio must be in \(0, 1\]"),
      ("magmax", {"lambda": float("inf")}, "'lambda' must be finite"),
      ("consensus_ta", {"tall_lambda": float("nan")}, "'tall_lambda' must be finite")]:
    with pytest.raises(KfuseError, match=msg) as e:
      run(name, exps, base, **params)
    assert str(e.value).split(":")[0] in base and "\n" not in str(e.value), str(e.value)


def test_all_zero_task_vector():
  base, exps = models(3)
  exps[1] = dict(base)
  for name in ("emr", "magmax", "pcb", "consensus_ta", "tall_mask"):
    assert all(np.isfinite(v).all() for v in run(name, exps, base).values()), name
  got = masks.emr_task_model(exps, base, 1, layout="torch")
  for k in base:   # nothing of τ_1 agrees with γ: task 1's model is the base
    np.testing.assert_array_equal(np.asarray(got[k]), base[k])


# ---------------------------------------------------------------- engine


def test_streaming_engine_equals_merge(tmp_path):
  """`merge_checkpoints` on safetensors (the native configs/merge.py path) gives `merge`'s
  result; emr_task (whole-model rescalers) is refused there with one line."""
  from kfuse import io as kio
  from kfuse.merge.runner import merge_checkpoints
  base, exps = models(3)
  b32 = {k: v.astype(np.float32) for k, v in base.items()}
  e32 = [{k: v.astype(np.float32) for k, v in e.items()} for e in exps]
  paths = []
  for i, t in enumerate([b32] + e32):
    (tmp_path / f"m{i}").mkdir()
    kio.write_safetensors(str(tmp_path / f"m{i}" / "model.safetensors"), t)
    paths.append(str(tmp_path / f"m{i}"))
  for name in ("emr", "tall_mask", "consensus_ta", "magmax", "pcb"):
    out = tmp_path / f"o_{name}"
    merge_checkpoints(name, paths[1:], paths[0], str(out), progress=False)
    got = kio.read_hf_dir(str(out))
    ref = merge.merge(name, e32, b32, layout="torch")
    for k in base:
      np.testing.assert_allclose(got[k], np.asarray(ref[k]), rtol=1e-6, atol=1e-7,
                                 err_msg=f"{name} {k}")
  with pytest.raises(KfuseError, match="emr_task"):
    merge_checkpoints("emr_task", paths[1:], paths[0], str(tmp_path / "o"), progress=False)
