"""0-d, one-element and 1-D tensors through the API, the streaming engine and the
sharded engine (8 emulated CPU devices, in a subprocess).

Real checkpoints hold 0-d tensors (e.g. a logit scale). The engine used to read
an expert into ``stack[j]`` -- for a 0-d slot a numpy scalar copy, so the stacked
buffer kept its zero pages -- and the sharded reader returned shape (1,) blocks
for 0-d tensors (``Expected shard shape ()``).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.merge import TensorInfo, get_method, names, resolve_values
from kfuse.merge.engine import DictSource, TensorTask, execute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARAMS = {"ties": {"density": 0.3}, "breadcrumbs": {"density": 0.5, "gamma": 0.05},
          "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
          "della": {"density": 0.5, "epsilon": 0.1},
          "della_linear": {"density": 0.5, "epsilon": 0.1},
          "slerp": {"t": 0.3}, "nearswap": {"t": 1e-2}, "sce": {"select_topk": 1.0},
          "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05}, "ram": {"epsilon": 1e-3},
          "ramplus_tl": {"epsilon": 1e-3}}

# ties_paper / emr_task need whole-model statistics: the engine refuses them (test_runner.py);
# data-informed methods need statistics (tests/merge/test_informed.py).
API_METHODS = [m for m in names() if not get_method(m).data]
ENGINE_METHODS = [m for m in API_METHODS if get_method(m).tree_stats is None]


def inputs():
  """Base 1.0 and experts 1.5, 2.0 as 0-d and (1,) tensors, plus a 1-D and a 2-D tensor."""
  r = np.random.default_rng(0)
  base = {"scale": np.array(1.0, np.float32), "one": np.array([1.0], np.float32),
          "vec": r.standard_normal(24).astype(np.float32),
          "mat": r.standard_normal((16, 3)).astype(np.float32)}
  exps = [{"scale": np.array(v, np.float32), "one": np.array([v], np.float32),
           "vec": base["vec"] + r.standard_normal(24).astype(np.float32) * 0.1,
           "mat": base["mat"] + r.standard_normal((16, 3)).astype(np.float32) * 0.1}
          for v in (1.5, 2.0)]
  return base, exps


def roles(name, base, exps):
  """(base the engine's task names or None, expert dicts) as `merge_checkpoints` arranges them."""
  m = get_method(name)
  n = 2 if m.max_models is None or m.max_models >= 2 else m.max_models
  exps = exps[:n]
  if m.base == "include":
    return None, [base] + exps
  return (base if m.base in ("required", "optional") else None), exps


def api_result(name, base, exps):
  b, ex = roles(name, base, exps)
  out = merge.merge(name, ex, b, params=PARAMS.get(name, {}), key=jax.random.key(0),
                    layout="torch")
  return {k: np.asarray(v) for k, v in out.items()}


def engine_result(name, base, exps, **kw):
  b, ex = roles(name, base, exps)
  m = get_method(name)
  srcs = ([DictSource(b, "base")] if b is not None else []) + [
      DictSource(e, f"e{i}") for i, e in enumerate(ex)]
  off = 1 if b is not None else 0
  tasks = []
  for k, v in base.items():
    info = TensorInfo(k, v.shape, np.float32, None, 0, "torch")
    vals = resolve_values(m, PARAMS.get(name, {}), info, len(ex))
    tasks.append(TensorTask(k, m, (0, k) if b is not None else None,
                            [(i + off, k) for i in range(len(ex))], vals, info))
  out = {}
  execute(tasks, srcs, out.__setitem__, key=jax.random.key(0), progress=False, **kw)
  return out


def assert_same(got, ref, name):
  for k in ref:
    assert got[k].shape == ref[k].shape, (name, k, got[k].shape)
    np.testing.assert_allclose(got[k], ref[k], rtol=2e-6, atol=1e-7, err_msg=f"{name} {k}")


# Closed forms on the scalars (base 1.0, experts 1.5 and 2.0; float64 arithmetic).
_TV = np.array([0.5, 1.0])
CLOSED = {
    # θ_b + Σ τ_i / N
    "linear": 1.75, "model_stock": 1.75,       # one offset direction: cos θ = 1, t = 1
    "karcher": (1.0 + 1.5 + 2.0) / 3,          # base included; equal directions: mean norm
    "multislerp": 1.0 + 0.5 * (0.5 + 1.0),     # equal directions: θ_b + Σ w_i ‖τ_i‖
    "slerp": 0.7 * 1.0 + 0.3 * 1.5,            # parallel: lerp
    # SCE, everything selected: ω_i ∝ τ_i², θ_b + Σ ω_i τ_i / Σ ω_i
    "sce": 1.0 + float(np.sum(_TV ** 2 * _TV) / np.sum(_TV ** 2)),
    # one entry: softmax = 1, KL = 0, importance 0 ≥ median + 1.5 IQR = 0: keep θ_1
    "arcee_fusion": 1.5,
    "nuslerp": 1.75,                           # colinear: (1−t)θ_1 + tθ_2, t = 1/2
}


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_api_scalar_closed_form(name):
  base, exps = inputs()
  got = api_result(name, base, exps)
  np.testing.assert_allclose(got["scale"], CLOSED[name], rtol=1e-6)
  assert got["scale"].shape == ()
  np.testing.assert_allclose(got["one"], [CLOSED[name]], rtol=1e-6)


ZERO_SIZE = {"e0": (0,), "e03": (0, 3), "e30": (3, 0)}


def zero_size_inputs():
  """Base and two experts whose tensors have a 0 in the shape."""
  base = {k: np.zeros(sh, np.float32) for k, sh in ZERO_SIZE.items()}
  return base, [dict(base), dict(base)]


def assert_zero_size(got, name):
  for k, sh in ZERO_SIZE.items():
    assert got[k].shape == sh and got[k].dtype == np.float32, (name, k, got[k].shape)


@pytest.mark.parametrize("name", API_METHODS)
def test_zero_size_tensors_merge_to_zero_size(name):
  """The merge of a zero-size tensor is a zero-size tensor of its shape, through the
  API and the engine (``shard.tensor_sum`` reshaped to (0, -1); Arcee Fusion took
  a max over nothing)."""
  base, exps = zero_size_inputs()
  assert_zero_size(api_result(name, base, exps), name)
  if name in ENGINE_METHODS:
    assert_zero_size(engine_result(name, base, exps), name)
    assert_zero_size(engine_result(name, base, exps, chunk=0), name)


def test_cli_zero_size_tensors(tmp_path):
  """Native (model_stock: `shard.tensor_sum`) and YAML (arcee_fusion) merges of
  checkpoints holding zero-size tensors write them with their shape and dtype."""
  dirs = []
  for i in range(3):
    t = {k: np.zeros(sh, np.float16 if k == "e0" else np.float32) for k, sh in ZERO_SIZE.items()}
    t["norm"] = np.full(3, float(i), np.float32)
    kio.write_hf_dir(str(tmp_path / f"m{i}"), t)
    dirs.append(str(tmp_path / f"m{i}"))
  yml = tmp_path / "a.yml"
  yml.write_text(f"merge_method: arcee_fusion\nbase_model: {dirs[0]}\nmodels:\n"
                 f"  - model: {dirs[1]}\n")
  runs = {"native": ["--config=configs/merge.py:model_stock",
                     f"--config.models={dirs[1]},{dirs[2]}", f"--config.base={dirs[0]}"],
          "yaml": [f"--config=configs/mergekit.py:{yml}"]}
  for name, args in runs.items():
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "kfuse.main", *args, f"--config.output_dir={out}",
                        "--config.progress=False"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    got = kio.read_hf_dir(str(out))
    for k, sh in ZERO_SIZE.items():
      want = np.float16 if k == "e0" else np.float32
      assert got[k].shape == sh and got[k].dtype == want, (name, k, got[k].shape, got[k].dtype)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_scalar_is_a_one_entry_row(name):
  """DELLA on a scalar keeps δ with probability density − ε (a one-entry row's
  normalised rank is 0), like a (1,) tensor; the L1 rescale restores a kept δ."""
  base = {"s": np.array(1.0, np.float32)}
  kept = []
  for seed in range(200):
    out = merge.merge(name, [{"s": np.array(2.0, np.float32)}], base,
                      params={"density": 0.5, "epsilon": 0.3}, key=jax.random.key(seed))
    v = float(out["s"])
    assert out["s"].shape == ()
    assert v in (1.0, 2.0), v
    kept.append(v > 1.5)
  assert 0.1 < np.mean(kept) < 0.3   # p = 0.2; 200 draws: σ ≈ 0.03


def test_della_one_dim_ranks_along_the_row():
  """1-D tensors are one row (mergekit unsqueezes them): the largest |δ| is kept
  with probability d + ε, the smallest with d − ε (was d − ε everywhere)."""
  n = 8
  base = {"v": np.zeros(n, np.float32)}
  exp = {"v": np.arange(1, n + 1, dtype=np.float32)}
  kept = np.zeros(n)
  draws = 300
  for seed in range(draws):
    out = merge.merge("della_linear", [exp], base, params={"density": 0.5, "epsilon": 0.4},
                      key=jax.random.key(seed))
    kept += np.asarray(out["v"]) != 0
  p = kept / draws
  assert p[-1] > 0.8 and p[0] < 0.2, p   # 0.9 and 0.1


@pytest.mark.parametrize("name", ["model_stock", "karcher", "multislerp", "sce", "slerp",
                                  "della", "arcee_fusion", "linear", "ties"])
def test_engine_scalars_equal_api(name):
  base, exps = inputs()
  ref = api_result(name, base, exps)
  assert_same(engine_result(name, base, exps), ref, name)
  assert_same(engine_result(name, base, exps, chunk=0), ref, name)


def test_cli_safetensors_scalars(tmp_path):
  """The HF reader's positional reads into a 0-d slot (model_stock wrote 0.0)."""
  base, exps = inputs()
  dirs = []
  for i, t in enumerate([base] + exps):
    d = tmp_path / f"m{i}"
    kio.write_hf_dir(str(d), t)
    dirs.append(str(d))
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "kfuse.main", "--config=configs/merge.py:model_stock",
                      f"--config.models={dirs[1]},{dirs[2]}", f"--config.base={dirs[0]}",
                      f"--config.output_dir={out}", "--config.progress=False"],
                     cwd=REPO, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 0, r.stderr[-2000:]
  got = kio.read_hf_dir(str(out))
  assert got["scale"].shape == ()
  np.testing.assert_allclose(got["scale"], 1.75, rtol=1e-6)
  assert_same(got, api_result("model_stock", base, exps), "model_stock")


@pytest.mark.slow
def test_engine_every_method_equals_api():
  base, exps = inputs()
  for name in ENGINE_METHODS:
    ref = api_result(name, base, exps)
    assert_same(engine_result(name, base, exps), ref, name)
    assert_same(engine_result(name, base, exps, chunk=0), ref, name)


SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from kfuse import shard
    sys.path.insert(0, sys.argv[2])
    from tests.merge import test_scalars as T
    assert len(jax.devices()) == 8, jax.devices()
    mesh = shard.make_mesh(8)
    base, exps = T.inputs()
    bad = {}
    for name in json.loads(sys.argv[1]):
      ref = T.api_result(name, base, exps)
      try:
        T.assert_same(T.engine_result(name, base, exps, mesh=mesh), ref, name)
      except Exception as e:  # noqa: BLE001
        bad[name] = str(e).splitlines()[0][:300]
    print(json.dumps(bad))
""")


def run_sharded(methods):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(methods), REPO],
                     capture_output=True, text=True, env=env, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_sharded_scalars_equal_api():
  assert run_sharded(["model_stock", "slerp", "ties"]) == {}


@pytest.mark.slow
def test_sharded_every_method_equals_api():
  assert run_sharded(ENGINE_METHODS) == {}
