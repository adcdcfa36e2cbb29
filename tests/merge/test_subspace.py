"""TSV-M, Iso-C, Iso-CTS, WUDI and SVC against float64 NumPy re-derivations of the papers'
formulas, their properties (identical tasks, task permutations, rank-1 recovery, layouts),
bad input, and the streaming engine (Orbax and safetensors checkpoints)."""

import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.merge import subspace
from kfuse.tree import KfuseError

F64 = np.float64


def models(shape=(10, 6), t=3, seed=0, scale=0.3, dtype=F64):
  r = np.random.default_rng(seed)
  base = {"w.weight": r.standard_normal(shape).astype(dtype),
          "w.bias": r.standard_normal(shape[0]).astype(dtype)}
  exps = [{k: (v + scale * r.standard_normal(v.shape)).astype(dtype) for k, v in base.items()}
          for _ in range(t)]
  return base, exps


def tv_of(base, exps, k="w.weight"):
  return np.stack([e[k] - base[k] for e in exps]).astype(F64)


def run(method, exps, base, layout="torch", **params):
  out = merge.merge(method, exps, base, params=params, layout=layout)
  return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- NumPy float64 references


def np_polar(a):
  p, _, qt = np.linalg.svd(a, full_matrices=False)
  return p @ qt


def np_tsv_m(tv):
  t, m, n = tv.shape
  k = min(m, n) // t
  us, ss, vs = [], [], []
  for x in tv:
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k])
  return np_polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ np_polar(np.vstack(vs))


def np_iso_c(tv):
  u, s, vt = np.linalg.svd(tv.sum(0), full_matrices=False)
  return s.mean() * u @ vt


def np_iso_cts_components(tv, f=0.8):
  """Iso-CTS (Marczak et al., ICML 2025) in float64 NumPy, as components (U⊥ [m, r], σ̄,
  V⊥ᵀ [r, n]) whose columns are [task blocks…, common block]."""
  t, m, n = tv.shape
  r = min(m, n)
  kc = r - round((r - int(r * f)) / t) * t
  kt = (r - kc) // t
  u, s, vt = np.linalg.svd(tv.sum(0), full_matrices=False)
  uc = u[:, :kc]
  us, ss, vs = [], [], []
  for x in tv:
    a, b, c = np.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
    us.append(a[:, :kt]), ss.append(b[:kt]), vs.append(c[:kt])
  return (np_polar(np.hstack(us + [uc])), np.concatenate(ss + [s[:kc]]).mean(),
          np_polar(np.vstack(vs + [vt[:kc]])))


def np_iso_cts(tv, f=0.8):
  u, s, vt = np_iso_cts_components(tv, f)
  return s * u @ vt


def np_wudi_adam(tv, steps=300, lr=1e-5, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch's Adam on the WUDI loss, gradient by hand, float64."""
  tau = tv.sum(0)
  m = np.zeros_like(tau)
  v = np.zeros_like(tau)
  for i in range(1, steps + 1):
    g = sum(2 * (tau - x) @ x.T @ x / np.sum(x * x) for x in tv)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    tau = tau - lr * (m / (1 - b1 ** i)) / (np.sqrt(v / (1 - b2 ** i)) + eps)
  return tau


def np_wudi_loss(tau, tv):
  return sum(np.sum(((tau - x) @ x.T) ** 2) / np.sum(x * x) for x in tv)


def np_svc(delta, tv, alpha):
  alpha = float(np.float32(alpha))   # hyper-parameters travel as float32
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  gam = []
  for r in range(len(s)):
    am = u[:, r] @ delta
    coefs = [max(alpha, (am @ (u[:, r] @ x)) / max((u[:, r] @ x) @ (u[:, r] @ x), 1e-12))
             for x in tv]
    gam.append(len(tv) / sum(coefs))
  return u @ np.diag(np.array(gam) * s) @ vt


# ---------------------------------------------------------------- golden values


@pytest.mark.parametrize("shape,t", [((10, 6), 3), ((6, 10), 2), ((8, 8), 4)])
def test_tsv_m_iso_c_iso_cts_match_numpy(shape, t):
  base, exps = models(shape, t)
  tv = tv_of(base, exps)
  for name, ref in (("tsv_m", np_tsv_m), ("iso_c", np_iso_c), ("iso_cts", np_iso_cts)):
    out = run(name, exps, base, **{"lambda": 0.75})   # (hyper-parameters travel as float32)
    np.testing.assert_allclose(out["w.weight"], base["w.weight"] + 0.75 * ref(tv), rtol=1e-9,
                               atol=1e-12, err_msg=name)
    np.testing.assert_allclose(out["w.bias"], base["w.bias"] + 0.75 * tv_of(base, exps, "w.bias")
                               .mean(0), rtol=1e-12, err_msg=name)   # 1-D: averaged


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])    # both gradient forms (Gram / per task)
def test_wudi_adam_matches_numpy_adam(shape):
  base, exps = models(shape, 3, scale=1e-3)
  tv = tv_of(base, exps)
  out = run("wudi", exps, base, steps=300)
  ref = np_wudi_adam(tv)
  assert np.linalg.norm(ref - tv.sum(0)) > 0.05 * np.linalg.norm(ref)   # it moved
  np.testing.assert_allclose(out["w.weight"] - base["w.weight"], ref, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 12), (12, 4)])  # T·out < in, and a full-rank Gram
def test_wudi_closed_form_is_the_minimiser(shape):
  base, exps = models(shape, 2)
  tv = tv_of(base, exps)
  tau = run("wudi", exps, base, solver="closed_form")["w.weight"] - base["w.weight"]
  # normal equations τ A = B, solved independently by least squares
  a = sum(x.T @ x / np.sum(x * x) for x in tv)
  b = sum(x @ x.T @ x / np.sum(x * x) for x in tv)
  ref = np.linalg.lstsq(a.T, b.T, rcond=None)[0].T
  np.testing.assert_allclose(np_wudi_loss(tau, tv), np_wudi_loss(ref, tv), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(tau @ a, b, rtol=1e-7, atol=1e-9)
  adam = run("wudi", exps, base, steps=300)["w.weight"] - base["w.weight"]
  assert np_wudi_loss(tau, tv) <= np_wudi_loss(adam, tv)


@pytest.mark.parametrize("method,of,alpha,lam", [("task_arithmetic_svc", "task_arithmetic", 0.1, 0.3),
                                                 ("tsv_m_svc", "tsv_m", 1.0, 1.0)])
def test_svc_matches_numpy(method, of, alpha, lam):
  base, exps = models((10, 7), 3)
  merged = run(of, exps, base, **{"lambda": lam})
  out = run(method, exps, base)
  ref = np_svc(merged["w.weight"] - base["w.weight"], tv_of(base, exps), alpha)
  np.testing.assert_allclose(out["w.weight"], base["w.weight"] + ref, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(out["w.bias"], merged["w.bias"])


def test_with_svc_composes_with_any_base_method():
  m = subspace.with_svc("ties", "my_ties_svc", alpha=0.3, defaults={"density": 0.5})
  base, exps = models((10, 7), 3)
  merged = run("ties", exps, base, density=0.5)
  out = merge.merge(m, exps, base, layout="torch")
  ref = np_svc(merged["w.weight"] - base["w.weight"], tv_of(base, exps), 0.3)
  np.testing.assert_allclose(np.asarray(out["w.weight"]), base["w.weight"] + ref, rtol=1e-9)
  with pytest.raises(KfuseError, match="does not take a base"):
    subspace.with_svc("linear")


# ---------------------------------------------------------------- properties


SYM = ["tsv_m", "iso_c", "iso_cts", "wudi", "task_arithmetic_svc", "tsv_m_svc", "wudi_svc"]


@pytest.mark.parametrize("method", SYM)
def test_permuting_the_tasks_changes_nothing(method):
  base, exps = models((9, 7), 3, seed=1)
  a = run(method, exps, base, **({"steps": 20} if "wudi" in method else {}))
  b = run(method, exps[::-1], base, **({"steps": 20} if "wudi" in method else {}))
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("method", ["iso_cts", "wudi", "task_arithmetic_svc", "tsv_m"])
def test_flax_layout_equals_torch_transposed(method):
  """The asymmetric formulas (WUDI contracts the input axis, Iso-CTS and SVC project on the
  output side) see the same [out, in] matrix whichever way it is stored."""
  base, exps = models((14, 10), 3, seed=2, scale=1e-2)   # Iso-CTS: k_c = 7, one per task
  ft = lambda d: {"w/kernel": d["w.weight"].T}
  kw = {"steps": 50} if method == "wudi" else {}
  a = run(method, exps, base, layout="torch", **kw)["w.weight"]
  b = run(method, [ft(e) for e in exps], ft(base), layout="flax", **kw)["w/kernel"]
  np.testing.assert_allclose(b.T, a, rtol=1e-9, atol=1e-12)
  if method in ("iso_cts", "wudi"):   # and the layout matters: the untransposed rule differs
    c = run(method, [ft(e) for e in exps], ft(base), layout="torch", **kw)["w/kernel"]
    assert not np.allclose(c.T, a, rtol=1e-6)


def test_identical_task_vectors():
  """T copies of τ: Iso-C gives mean(S(Tτ))·UVᵀ = T·mean(S(τ))·UVᵀ; WUDI's minimiser is τ."""
  base, exps = models((8, 6), 1)
  tau = exps[0]["w.weight"] - base["w.weight"]
  u, s, vt = np.linalg.svd(tau, full_matrices=False)
  out = run("iso_c", exps * 4, base)["w.weight"] - base["w.weight"]
  np.testing.assert_allclose(out, 4 * s.mean() * u @ vt, rtol=1e-9)
  out = run("wudi", exps * 4, base, solver="closed_form")["w.weight"] - base["w.weight"]
  np.testing.assert_allclose(out, tau, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("t", [5, 8])
def test_tsv_m_recovers_orthogonal_rank1_task_vectors(t):
  """τ_i = σ_i u_i v_iᵀ with orthonormal {u_i}, {v_i}, r = 8, k = ⌊r/T⌋ = 1: Δ = Σ τ_i exactly.
  (With k > 1 the extra kept triplets of a rank-1 τ_i have σ = 0 but arbitrary vectors, which
  enter the polar factors: exactness needs T·k ≤ r with k equal to the tasks' rank.)"""
  r = np.random.default_rng(3)
  uq = np.linalg.qr(r.standard_normal((8, 8)))[0]
  vq = np.linalg.qr(r.standard_normal((8, 8)))[0]
  sig = r.uniform(0.5, 2.0, t)
  base = {"w.weight": r.standard_normal((8, 8))}
  tvs = [sig[i] * np.outer(uq[:, i], vq[:, i]) for i in range(t)]
  exps = [{"w.weight": base["w.weight"] + x} for x in tvs]
  out = run("tsv_m", exps, base)["w.weight"] - base["w.weight"]
  np.testing.assert_allclose(out, sum(tvs), rtol=1e-9, atol=1e-12)


def test_one_d_only_models_are_averaged():
  r = np.random.default_rng(4)
  base = {"norm": r.standard_normal(7), "scale": np.float64(1.0)}
  exps = [{"norm": base["norm"] + r.standard_normal(7), "scale": np.float64(1.5 + i)}
          for i in range(3)]
  for name in ("tsv_m", "iso_c", "iso_cts", "wudi", "tsv_m_svc"):
    out = run(name, exps, base, **{"lambda": 0.5})
    np.testing.assert_allclose(out["norm"], base["norm"] + 0.5 * np.mean(
        [e["norm"] - base["norm"] for e in exps], 0), rtol=1e-12)
    np.testing.assert_allclose(out["scale"], 1.0 + 0.5 * 1.5)


@pytest.mark.parametrize("method", SYM)
def test_all_zero_and_rank_deficient_task_vectors_stay_finite(method):
  base, exps = models((8, 6), 3)
  exps[0] = dict(base)                                     # all-zero task vector
  exps[1]["w.weight"] = base["w.weight"] + np.outer(np.arange(8.0), np.ones(6)) * 1e-2  # rank 1
  out = run(method, exps, base, **({"steps": 10} if "wudi" in method else {}))
  assert all(np.isfinite(v).all() for v in out.values())


# ---------------------------------------------------------------- Flax DenseGeneral attention


D_IN, HEADS, HEAD_DIM = 8, 2, 4   # one attention layer as flax MultiHeadDotProductAttention stores it


def attention_models(t=3, seed=5, scale=0.05):
  """A Flax attention layer: 3-D DenseGeneral kernels, 2-D [heads, head_dim] biases, a Dense
  kernel, a LayerNorm scale, a ViT-style free parameter; base + T experts (float64)."""
  r = np.random.default_rng(seed)
  shapes = {f"params/attn/{p}/kernel": (D_IN, HEADS, HEAD_DIM) for p in ("query", "key", "value")}
  shapes.update({f"params/attn/{p}/bias": (HEADS, HEAD_DIM) for p in ("query", "key", "value")})
  shapes.update({"params/attn/out/kernel": (HEADS, HEAD_DIM, D_IN), "params/attn/out/bias": (D_IN,),
                 "params/mlp/kernel": (D_IN, 12), "params/norm/scale": (D_IN,),
                 "params/pos_embed": (1, 3, D_IN)})
  base = {k: r.standard_normal(v) for k, v in shapes.items()}
  exps = [{k: v + scale * r.standard_normal(v.shape) for k, v in base.items()} for _ in range(t)]
  return base, exps


def torch_matrix(x, path):
  """The PyTorch [out, in] matrix of a Flax kernel: query/key/value [in, H, D] -> [H·D, in];
  out [H, D, out] -> [out, H·D]; Dense [in, out] -> [out, in] (what nn.Linear and CLIP's
  attention store)."""
  k = 2 if "/out/" in path else 1
  return x.reshape(int(np.prod(x.shape[:k])), -1).T


KERNELS = ["params/attn/query/kernel", "params/attn/key/kernel", "params/attn/value/kernel",
           "params/attn/out/kernel", "params/mlp/kernel"]


def _np_reference(method, base, exps, lam=0.75):
  """θ per tensor from float64 NumPy: kernels as [out, in] matrices through the method's
  formula, every other tensor θ_b + λ·mean τ_i."""
  out = {}
  for k, b in base.items():
    tv = np.stack([e[k] - b for e in exps])
    if k not in KERNELS:   # task arithmetic (under SVC) sums; the subspace methods average
      out[k] = b + lam * (tv.sum(0) if method == "task_arithmetic_svc" else tv.mean(0))
      continue
    mats = np.stack([torch_matrix(x, k) for x in tv])
    if method == "task_arithmetic_svc":
      d = np_svc(lam * mats.sum(0), mats, 0.1)
    elif method == "tsv_m_svc":
      d = np_svc(lam * np_tsv_m(mats), mats, 1.0)
    elif method == "wudi_svc":
      d = np_svc(lam * np_wudi_adam(mats, steps=50), mats, 1.0)
    else:
      d = lam * {"tsv_m": np_tsv_m, "iso_c": np_iso_c, "iso_cts": np_iso_cts,
                 "wudi": lambda m: np_wudi_adam(m, steps=50)}[method](mats)
    out[k] = b + d.T.reshape(b.shape)
  return out


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "wudi", "task_arithmetic_svc",
                                    "tsv_m_svc", "wudi_svc"])
def test_dense_general_attention_is_one_matrix_and_its_biases_are_averaged(method):
  """Flax DenseGeneral attention (the merge benchmark's ViT): each 3-D kernel merges as the
  [out, in] matrix PyTorch stores for the layer, the 2-D [heads, head_dim] biases (1-D in
  PyTorch) and every non-kernel are averaged. (Before: tsv_m stopped on the [2, 4] biases with
  'rank < T', the others merged the biases as matrices and averaged the kernels.)"""
  base, exps = attention_models()
  kw = {"steps": 50} if "wudi" in method else {}
  out = run(method, exps, base, layout="flax", **{"lambda": 0.75}, **kw)
  ref = _np_reference(method, base, exps)
  for k in base:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-8, atol=1e-11, err_msg=f"{method} {k}")


def test_matrix_view_by_role():
  info = lambda path, shape, layout="flax": merge.core.TensorInfo(path, shape, np.float32,
                                                                  layout=layout)
  mv = subspace.matrix_view
  assert mv(info("a/query/kernel", (8, 2, 4))) == (1, True)
  assert mv(info("a/out/kernel", (2, 4, 8))) == (2, True)
  assert mv(info("a/Dense_0/kernel", (8, 5))) == (1, True)
  assert mv(info("wte/embedding", (50, 8))) == (1, False)
  for path, shape in [("a/query/bias", (2, 4)), ("patch_embed/kernel", (4, 4, 3, 8)),
                      ("conv1d/kernel", (3, 4, 8)), ("pos_embed", (1, 5, 8)), ("norm/scale", (8,)),
                      ("cls_token", (2, 8))]:
    assert mv(info(path, shape)) is None, path
  assert mv(info("model.layers.0.mlp.up_proj.weight", (16, 8), "torch")) == (1, False)
  assert mv(info("model.norm.weight", (8,), "torch")) is None
  assert subspace.matrix_shape((2, 4, 8), (2, True)) == (8, 8)
  assert subspace.matrix_shape((8, 12), (1, True)) == (12, 8)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_naming_the_tensor():
  base, exps = models((4, 6), 5)
  with pytest.raises(KfuseError, match=r"w\.weight.*rank r <= 4 < T = 5") as e:
    run("tsv_m", exps, base)
  assert "\n" not in str(e.value)
  base, exps = models((8, 6), 2)
  for name, params, msg in [
      ("tsv_m", {"lambda": float("nan")}, "'lambda' must be finite"),
      ("wudi", {"lr": float("inf")}, "'lr' must be finite"),
      ("wudi", {"solver": "lbfgs"}, "solver must be 'adam' or 'closed_form'"),
      ("iso_cts", {"common_space_fraction": 1.5}, r"common_space_fraction must be in \(0, 1\]"),
      ("task_arithmetic_svc", {"svc_alpha": float("nan")}, "'svc_alpha' must be finite")]:
    with pytest.raises(KfuseError, match=msg) as e:
      run(name, exps, base, **params)
    assert str(e.value).startswith("w.") and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------- engine


def _flax_tree(seed):
  r = np.random.default_rng(seed)
  return {"params": {"Dense_0": {"kernel": r.standard_normal((12, 8)).astype(np.float32),
                                 "bias": r.standard_normal(8).astype(np.float32)},
                     "Dense_1": {"kernel": r.standard_normal((8, 5)).astype(np.float32)}}}


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_native_streaming_engine_equals_merge(tmp_path, fmt):
  """`merge_checkpoints` (the configs/merge.py path, whole tensors per matrix) gives the
  in-memory `merge` result for every subspace method, with Flax kernels."""
  from kfuse.merge.runner import merge_checkpoints
  trees = [_flax_tree(0)] + [
      {"params": {l: {k: v + 0.1 * np.random.default_rng(i).standard_normal(v.shape)
                      .astype(np.float32) for k, v in d.items()} for l, d in
                  _flax_tree(0)["params"].items()}} for i in (1, 2, 3)]
  paths = []
  for i, t in enumerate(trees):
    p = tmp_path / f"m{i}"
    if fmt == "orbax":
      kio.save_orbax(str(p), t)
    else:
      from kfuse import tree as T
      p.mkdir()
      kio.write_safetensors(str(p / "model.safetensors"), T.flatten(t))
    paths.append(str(p))
  for name, params in [("tsv_m", {}), ("iso_cts", {}), ("wudi", {"steps": 30}),
                       ("task_arithmetic_svc", {})]:
    out = tmp_path / f"out_{name}"
    merge_checkpoints(name, paths[1:], paths[0], str(out), params=params, progress=False,
                      layout="flax")
    got = kio.restore_orbax(str(out)) if fmt == "orbax" else kio.read_hf_dir(str(out))
    ref = merge.merge(name, trees[1:], trees[0], params=params, layout="flax")
    from kfuse import tree as T
    gflat = got if fmt == "safetensors" else T.flatten(got)
    for k, v in T.flatten(ref).items():
      np.testing.assert_allclose(np.asarray(gflat[k]), np.asarray(v), rtol=2e-5, atol=1e-6,
                                 err_msg=f"{name} {k}")


# SVD / matrix-product methods: a sharded run sums in another order, so they match the unsharded
# run within float32 ulps, not bit for bit (the other methods: bit for bit, tests/merge/test_sharding.py).
SHARDED_WITHIN_ULPS = ("tsv_m", "iso_c", "iso_cts", "wudi", "task_arithmetic_svc", "ties_svc",
                       "tsv_m_svc", "wudi_svc")


@pytest.mark.slow
def test_sharded_equals_unsharded():
  """On the 8-device emulated mesh vs unsharded, whole-tensor and chunked (the script of
  tests/merge/test_sharding.py): the mask methods bit for bit; the SVD / matrix-product
  methods within a few float32 ulps (max |Δ| / max |x| measured 9e-8): a sharded SVD or
  matmul sums in another order, so the maths does not allow bit equality there."""
  import json
  import os
  import re
  import subprocess
  import sys

  from tests.merge.test_sharding import REPO, SCRIPT, run_script
  assert run_script(["emr", "tall_mask", "consensus_ta", "consensus_ties", "magmax", "pcb"]) == {}
  script = re.sub(
      r"( *)if not all\(np\.array_equal\(outs\[0\]\[k\], o\[k\]\) for o in outs\[1:\]\):\n"
      r" *bad\[name\] = k",
      lambda m: (f"{m.group(1)}d = max(float(np.abs(outs[0][k] - o[k]).max() / max(np.abs("
                 f"outs[0][k]).max(), 1e-30)) for o in outs[1:])\n"
                 f"{m.group(1)}bad[name] = max(bad.get(name, 0.0), d)"), SCRIPT)
  assert script != SCRIPT
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  svd = SHARDED_WITHIN_ULPS
  p = subprocess.run([sys.executable, "-c", script, json.dumps(svd)], capture_output=True,
                     text=True, env=env, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  rel = json.loads(p.stdout.strip().splitlines()[-1])
  assert set(rel) == set(svd) and max(rel.values()) < 1e-6, rel


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "tsv_m_svc"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_are_decomposed_in_float32(method, dtype):
  """LAPACK has no float16 / bfloat16 SVD: half-precision tensors are decomposed in float32 and
  cast back (this crashed before). Reference: float64 NumPy on the same (half-rounded) inputs."""
  import ml_dtypes
  dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
  base, exps = models((10, 6), 3, seed=4)
  base = {k: v.astype(dt) for k, v in base.items()}
  exps = [{k: v.astype(dt) for k, v in e.items()} for e in exps]
  out = run(method, exps, base, **{"lambda": 0.8})
  assert out["w.weight"].dtype == dt
  b = base["w.weight"].astype(F64)
  tv = np.stack([e["w.weight"].astype(F64) - b for e in exps])
  delta = 0.8 * (np_iso_c(tv) if method == "iso_c" else np_tsv_m(tv))
  if method == "tsv_m_svc":   # SVC (α = 1.0 for TSV-M) on the λ-scaled TSV-M delta
    delta = np_svc(delta, tv, 1.0)
  tol = 3e-2 if dtype == "bfloat16" else 3e-3     # the output's own rounding
  np.testing.assert_allclose(out["w.weight"].astype(F64), b + delta, rtol=tol, atol=tol)
