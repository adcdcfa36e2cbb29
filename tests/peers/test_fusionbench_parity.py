"""Parity with FusionBench 0.2.33's own functions on the same random matrices (PyTorch
[out, in] layout): TSV-M, Iso-C, Iso-CTS, WUDI, SVC, EMR (per-task models), TALL masks /
Consensus and MagMax, relative error <= 1e-4 (Frobenius norm of the difference over the
reference's). kfuse runs through `kfuse.merge.merge` on HF-style names (layout 'torch').
"""

import contextlib
import io

import jax
import numpy as np
import pytest

from .peer import require

torch = require("torch")
fb = require("fusion_bench")

from fusion_bench.method.emr_merging.utils import emr_merge  # noqa: E402
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: E402
from fusion_bench.method.magmax.magmax import _magmax_select  # noqa: E402
from fusion_bench.method.singular_value_calibration.utils import (  # noqa: E402
    subspace_consistency_spectral_calibration_accelerated as fb_svc)
from fusion_bench.method.tall_mask.utils import generate_task_masks  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (  # noqa: E402
    compute_and_sum_svd_mem_reduction as fb_tsvm)
from fusion_bench.method.wudi.wudi import wudi_merging  # noqa: E402

from kfuse import merge  # noqa: E402
from kfuse.merge import masks  # noqa: E402

TOL = 1e-4


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def models(shape=(24, 16), t=4, seed=0, scale=0.1, bias=True):
  """Base and T experts with HF names (a matrix and a bias), float32."""
  r = np.random.default_rng(seed)
  base = {"l.weight": r.standard_normal(shape).astype(np.float32)}
  if bias:
    base["l.bias"] = r.standard_normal(shape[0]).astype(np.float32)
  exps = [{k: v + scale * r.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
          for _ in range(t)]
  return base, exps


def tvs(base, exps):
  return [{k: torch.from_numpy(e[k] - base[k]) for k in base} for e in exps]


def quiet(fn, *a, **kw):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*a, **kw)


def kf(method, exps, base, **params):
  out = merge.merge(method, exps, base, params=params, layout="torch")
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("shape,t", [((24, 16), 4), ((16, 24), 3), ((20, 20), 8)])
def test_tsv_m(shape, t):
  base, exps = models(shape, t)
  ref = quiet(fb_tsvm, tvs(base, exps), accelerator="cpu")
  out = kf("tsv_m", exps, base)
  for k in base:
    assert rel(out[k] - base[k], ref[k].numpy()) <= TOL, k


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_iso_c_and_iso_cts(shape):
  base, exps = models(shape, 3)
  ref_c = quiet(iso_c, tvs(base, exps), accelerator="cpu")
  ref_cts = quiet(iso_cts, tvs(base, exps), 0.8, accelerator="cpu")
  out_c = kf("iso_c", exps, base)
  out_cts = kf("iso_cts", exps, base)
  for k in base:
    assert rel(out_c[k] - base[k], ref_c[k].numpy()) <= TOL, k
    assert rel(out_cts[k] - base[k], ref_cts[k].numpy()) <= TOL, k


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_wudi_300_adam_steps(shape):
  # task vectors of scale 1e-3: 300 Adam steps of lr 1e-5 move τ by a visible fraction
  base, exps = models(shape, 3, scale=1e-3)
  ref = quiet(wudi_merging, tvs(base, exps), accelerator="cpu", iter_num=300)
  out = kf("wudi", exps, base)
  start = sum(e["l.weight"] - base["l.weight"] for e in exps)
  moved = rel(ref["l.weight"].detach().numpy(), start)
  assert moved > 0.05   # the optimisation did change τ: the parity below is not the init's
  for k in base:
    got = out[k] - base[k]
    assert rel(got, ref[k].detach().numpy()) <= TOL, (k, rel(got, ref[k].detach().numpy()))


# Not after iso_c / iso_cts: their spectrum is flat (one repeated singular value), so the
# singular vectors SVC projects on are not unique and each library picks its own basis.
@pytest.mark.parametrize("inner,alpha", [("task_arithmetic_svc", 0.1), ("tsv_m_svc", 1.0),
                                         ("wudi_svc", 1.0)])
def test_svc_after_a_method(inner, alpha):
  base, exps = models((24, 16), 4)
  of = inner[:-4]
  lam = {"task_arithmetic": 0.3, "tsv_m": 1.0, "wudi": 1.0}[of]
  merged = kf(of, exps, base, **{"lambda": lam})
  ref = fb_svc(torch.from_numpy(base["l.weight"]), [torch.from_numpy(e["l.weight"]) for e in exps],
               torch.tensor(merged["l.weight"]), alpha=alpha, accelerator="cpu")
  out = kf(inner, exps, base)
  assert rel(out["l.weight"] - base["l.weight"], ref.numpy() - base["l.weight"]) <= TOL
  np.testing.assert_array_equal(out["l.bias"], merged["l.bias"])   # SVC touches matrices only


def test_emr_task_models():
  base, exps = models((16, 12), 4)
  uni, fmasks, resc = emr_merge(tvs(base, exps))
  out = kf("emr", exps, base)
  for k in base:
    assert rel(out[k] - base[k], uni[k].numpy()) <= TOL
  for i in range(4):
    mine = masks.emr_task_model(exps, base, i, layout="torch")
    for k in base:
      ref = float(resc[i]) * fmasks[k][i].numpy() * uni[k].numpy()
      assert rel(np.asarray(mine[k]) - base[k], ref) <= TOL, (i, k)


def test_tall_masks_and_consensus():
  base, exps = models((16, 12), 4)
  lam = 0.4
  tv = {k: torch.stack([torch.from_numpy(e[k] - base[k]) for e in exps]) for k in base}
  ft = {k: torch.stack([torch.from_numpy(e[k]) for e in exps]) for k in base}
  for k in base:
    mtl = tv[k].sum(0)
    m = quiet(generate_task_masks, tv[k], ft[k], torch.from_numpy(base[k]), tv=mtl,
              tall_mask_lambda=lam).numpy()
    for i in range(4):
      mine = masks.tall_task_model(exps, base, i, params={"tall_lambda": lam}, layout="torch")
      assert rel(np.asarray(mine[k]) - base[k], m[i] * mtl.numpy()) <= TOL
    cons = m.sum(0) >= 2
    out = kf("consensus_ta", exps, base, tall_lambda=lam)
    assert rel(out[k] - base[k], 0.3 * cons * mtl.numpy()) <= TOL


def test_magmax():
  base, exps = models((16, 12), 5)
  base["l.weight"][0, :4] = 0
  for e in exps:   # exact ties at a few entries: FusionBench keeps the later task
    e["l.weight"][0, :4] = np.float32([0.5, -0.5, 0.5, -0.5])
  exps[2]["l.weight"][0, :4] = np.float32([-0.5, 0.5, -0.5, 0.5])
  ref = _magmax_select(tvs(base, exps))
  out = kf("magmax", exps, base, **{"lambda": 1.0})
  for k in base:
    assert rel(out[k] - base[k], ref[k].numpy()) <= TOL
  np.testing.assert_array_equal(out["l.weight"][0, :4], ref["l.weight"][0, :4].numpy())
