"""Parity with FusionBench 0.2.33's `merging_with_fisher_weights` and
`merging_with_regmean_weights` on the same arrays and statistics (<= 1e-5 relative).

FusionBench works on PyTorch ``[out, in]`` Linear weights keyed ``<module>.weight``
with Grams keyed ``<module>``; kfuse on Flax ``[in, out]`` kernels keyed
``<module>/kernel``. The same numbers go to both in their own layout.
"""

import numpy as np
import pytest

from tests.peers.peer import require

torch = require("torch")
require("fusion_bench")
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights  # noqa: E402
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights  # noqa: E402

from kfuse import merge  # noqa: E402
from kfuse.merge import informed  # noqa: E402
from kfuse.merge.statistics import Statistics  # noqa: E402

SHAPES = {"fc1": (6, 5), "fc2": (3, 6)}   # torch [out, in]


def _experts(n, seed):
  rng = np.random.default_rng(seed)
  return [{m: {"weight": rng.normal(size=s).astype(np.float32),
               "bias": rng.normal(size=s[0]).astype(np.float32)} for m, s in SHAPES.items()}
          | {"norm": {"scale": rng.normal(size=4).astype(np.float32)}} for _ in range(n)]


def _flax(e):
  out = {m: {"kernel": e[m]["weight"].T.copy(), "bias": e[m]["bias"]} for m in SHAPES}
  out["norm"] = dict(e["norm"])
  return out


def _torch_params(experts):
  names = {f"{m}.{p}": (m, p) for m in list(SHAPES) + ["norm"] for p in experts[0][m]}
  return {k: [torch.tensor(e[m][p]) for e in experts] for k, (m, p) in names.items()}


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("n,normalize", [(2, True), (3, True), (3, False)])
def test_fisher_parity(n, normalize):
  experts = _experts(n, n)
  rng = np.random.default_rng(10 + n)
  fishers = [{k: (rng.random(size=v.shape) ** 3 * 10 ** rng.uniform(-2, 2)).astype(np.float32)
              for k, v in {f"{m}.{p}": e[m][p] for m in e for p in e[m]}.items()}
             for e in experts]
  scale = [1.0, 0.5, 2.0][:n]
  want = merging_with_fisher_weights(
      _torch_params(experts), [{k: torch.tensor(v) for k, v in f.items()} for f in fishers],
      torch.tensor(scale), normalize_fisher_weight=normalize, minimal_fisher_weight=1e-6)
  stats = [Statistics(fisher={k.replace(".", "/").replace("weight", "kernel"):
                              (v.T if k.endswith("weight") else v) for k, v in f.items()},
                      examples=32) for f in fishers]
  got = merge.merge(informed.with_statistics("fisher", stats), [_flax(e) for e in experts],
                    params={"weight": scale, "normalize": normalize})
  for k, w in want.items():
    m, p = k.split(".")
    g = got[m]["kernel"].T if p == "weight" else got[m][p]
    assert _rel(g, w.numpy()) <= 1e-5, k


@pytest.mark.parametrize("n,ratio", [(2, 0.95), (3, 0.6), (3, 1.0)])
def test_regmean_parity(n, ratio):
  experts = _experts(n, n)
  rng = np.random.default_rng(20 + n)
  grams = []
  for _ in range(n):
    g = {}
    for m, (out, d) in SHAPES.items():
      x = rng.normal(size=(40, d)) * rng.uniform(0.5, 2, size=d)
      g[m] = (x.T @ x / 40).astype(np.float32)
    grams.append(g)
  want = merging_with_regmean_weights(
      _torch_params(experts), [{k: torch.tensor(v) for k, v in g.items()} for g in grams],
      reduce_non_diagonal_ratio=ratio, weight_transpose=True)
  stats = [Statistics(gram={f"{m}/kernel": v for m, v in g.items()},
                      tokens={f"{m}/kernel": 40 for m in g}, examples=40) for g in grams]
  got = merge.merge(informed.with_statistics("regmean", stats), [_flax(e) for e in experts],
                    params={"alpha": ratio})
  for k, w in want.items():
    m, p = k.split(".")
    g = got[m]["kernel"].T if p == "weight" else got[m][p]
    assert _rel(g, w.numpy()) <= 1e-5, (k, _rel(g, w.numpy()))


def test_regmean_parity_torch_layout():
  """HF-style dotted names ([out, in] weights) are transposed like FusionBench's."""
  experts = _experts(2, 7)
  rng = np.random.default_rng(3)
  grams = [{m: (lambda x: (x.T @ x / 30).astype(np.float32))(rng.normal(size=(30, d)))
            for m, (_, d) in SHAPES.items()} for _ in range(2)]
  want = merging_with_regmean_weights(
      _torch_params(experts), [{k: torch.tensor(v) for k, v in g.items()} for g in grams],
      reduce_non_diagonal_ratio=0.95)
  flat = [{f"{m}.{p}": e[m][p] for m in e for p in e[m]} for e in experts]
  stats = [Statistics(gram={f"{m}.weight": v for m, v in g.items()},
                      tokens={f"{m}.weight": 30 for m in g}, examples=30) for g in grams]
  got = merge.merge(informed.with_statistics("regmean", stats), flat)
  for k, w in want.items():
    assert _rel(got[k], w.numpy()) <= 1e-5, k
