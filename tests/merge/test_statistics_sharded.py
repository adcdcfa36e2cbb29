"""Grams and Fishers collected over a mesh of 8 emulated CPU devices equal the single-device
ones and a float64 NumPy recomputation (Grams / Fishers are sums over examples).

XLA_FLAGS must be set before JAX starts, so the check runs a script in a subprocess (the
pattern of tests/merge/test_sharding.py).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np, jax
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P
    from kfuse import shard
    from kfuse.merge import statistics as S
    from kfuse.models.mlp import make_mlp
    from tests.merge.test_statistics import _batches, _gelu, _linear_fisher
    assert len(jax.devices()) == 8, jax.devices()
    mesh = shard.make_mesh(8)
    out = {}
    # the placement: 8 examples split one per device; 4 (not divisible by 8) replicated
    x8 = S._place(np.ones((8, 3), np.float32), mesh)
    x4 = S._place(np.ones((4, 3), np.float32), mesh)
    out["split"] = [x8.sharding.spec == P(shard.AXIS), len(x8.addressable_shards),
                    x8.addressable_shards[0].data.shape[0], x4.sharding.is_fully_replicated]
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))
    # Grams of an MLP: batches 8, 8 (split) and 4 (replicated)
    model = make_mlp(3, hidden=(6, 5))
    x = np.asarray(jax.random.normal(jax.random.key(0), (20, 2, 2)), np.float32)
    v = model.init(jax.random.key(1), x[:1])
    one = S.grams(model, v, _batches(x, 8))
    sh = S.grams(model, v, _batches(x, 8), mesh=mesh)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    h0 = x.reshape(20, -1).astype(np.float64)
    h1 = _gelu(h0 @ p["backbone"]["layers_0"]["kernel"] + p["backbone"]["layers_0"]["bias"])
    h2 = _gelu(h1 @ p["backbone"]["layers_1"]["kernel"] + p["backbone"]["layers_1"]["bias"])
    want = {"backbone/layers_0/kernel": h0, "backbone/layers_1/kernel": h1, "head/kernel": h2}
    out["gram_keys"] = sorted(sh.gram) == sorted(want) == sorted(one.gram)
    out["gram_tokens"] = [sh.tokens[k] for k in sorted(want)] + [sh.examples]
    out["gram_sharded_vs_one"] = max(rel(sh.gram[k], np.asarray(one.gram[k], np.float64))
                                     for k in want)
    out["gram_sharded_vs_f64"] = max(rel(sh.gram[k], h.T @ h / 20) for k, h in want.items())
    # Fisher of a Dense layer (closed form), both modes
    m = nn.Dense(4)
    xf = np.asarray(jax.random.normal(jax.random.key(2), (20, 5)), np.float32)
    params = jax.tree.map(lambda a: a * 3, m.init(jax.random.key(3), xf)["params"])
    fn = lambda q, xb: m.apply({"params": q}, xb)
    for mode in ("per_example", "batch"):
      one = S.fisher(fn, params, _batches(xf, 8), mode=mode)
      sh = S.fisher(fn, params, _batches(xf, 8), mode=mode, mesh=mesh)
      fw, fb = _linear_fisher(xf, np.asarray(params["kernel"], np.float64),
                              np.asarray(params["bias"], np.float64), mode, 8)
      out[f"fisher_{mode}_examples"] = sh.examples
      out[f"fisher_{mode}_sharded_vs_one"] = max(
          rel(sh.fisher[k], np.asarray(one.fisher[k], np.float64)) for k in ("kernel", "bias"))
      out[f"fisher_{mode}_sharded_vs_f64"] = max(rel(sh.fisher["kernel"], fw),
                                                 rel(sh.fisher["bias"], fb))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_grams_and_fisher_equal_single_device_and_float64():
  """Tolerances (max |error| / max |reference|): sharded vs one device 1e-5 (float32 sums
  in another order); vs float64 NumPy 2e-5 (Grams, as tests/merge/test_statistics.py) and
  1e-4 (Fishers)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                     timeout=600, cwd=REPO)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["split"] == [True, 8, 1, True]
  assert r["gram_keys"] and r["gram_tokens"] == [20, 20, 20, 20]
  assert r["gram_sharded_vs_one"] <= 1e-5 and r["gram_sharded_vs_f64"] <= 2e-5, r
  for mode in ("per_example", "batch"):
    assert r[f"fisher_{mode}_examples"] == 20
    assert r[f"fisher_{mode}_sharded_vs_one"] <= 1e-5, r
    assert r[f"fisher_{mode}_sharded_vs_f64"] <= 1e-4, r
