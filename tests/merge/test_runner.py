"""Native checkpoint merges (configs/merge.py): Orbax and safetensors, CLI and errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.merge.runner import merge_checkpoints
from kfuse.tree import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def params(seed, shift=0.0):
  r = np.random.default_rng(seed)
  return {"params": {"Dense_0": {"kernel": jnp.asarray(r.normal(size=(5, 4)) + shift, jnp.float32),
                                 "bias": jnp.asarray(r.normal(size=4), jnp.float32)},
                     "layers_0": {"kernel": jnp.asarray(r.normal(size=(4, 4)), jnp.float32)}}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ck")
  trees = [params(i) for i in range(3)]
  for i, t in enumerate(trees):
    kio.save_orbax(str(root / f"m{i}"), t)
  return root, trees


def test_orbax_merge_equals_in_memory_merge(ckpts, tmp_path):
  root, trees = ckpts
  out = tmp_path / "ties"
  merge_checkpoints("ties", [str(root / "m1"), str(root / "m2")], str(root / "m0"), str(out),
                    params={"density": 0.5}, progress=False)
  got = kio.restore_orbax(str(out))
  ref = merge.merge("ties", trees[1:], trees[0], params={"density": 0.5})
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(got) == jax.tree.structure(ref)


def test_cli_native_merge_to_safetensors(ckpts, tmp_path):
  root, trees = ckpts
  out = tmp_path / "ta"
  r = subprocess.run([sys.executable, "-m", "kfuse.main", "--config=configs/merge.py:task_arithmetic",
                      f"--config.models={root}/m1,{root}/m2", f"--config.base={root}/m0",
                      f"--config.output_dir={out}", "--config.output_format=safetensors",
                      "--config.params.lambda_=0.5", "--config.progress=False"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  got = kio.read_hf_dir(str(out))
  ref = merge.merge("task_arithmetic", trees[1:], trees[0], params={"lambda": 0.5})
  np.testing.assert_allclose(got["params/Dense_0/kernel"], ref["params"]["Dense_0"]["kernel"],
                             rtol=1e-6)


def test_native_errors(ckpts, tmp_path):
  root, _ = ckpts
  with pytest.raises(KfuseError, match="requires a base"):
    merge_checkpoints("ties", [str(root / "m1")], None, str(tmp_path / "o"))
  with pytest.raises(KfuseError, match="does not exist"):
    merge_checkpoints("linear", [str(tmp_path / "nope")], None, str(tmp_path / "o"))
  kio.save_orbax(str(tmp_path / "other"), {"params": {"x": jnp.ones(3)}})
  with pytest.raises(KfuseError, match="key"):
    merge_checkpoints("linear", [str(root / "m1"), str(tmp_path / "other")], None,
                      str(tmp_path / "o"))
  with pytest.raises(KfuseError, match="unknown parameter 'densty'"):
    merge_checkpoints("ties", [str(root / "m1")], str(root / "m0"), str(tmp_path / "o"),
                      params={"densty": 0.3})
  assert not (tmp_path / "o").exists()


def test_layout_flax_equals_torch_transposed():
  """Row-wise rules mean the same input axis in both layouts."""
  r = np.random.default_rng(0)
  b = r.normal(size=(6, 4)).astype(np.float32)          # torch [out, in]
  ex = [b + r.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
  for method, p in [("model_stock", {"filter_wise": True}),
                    ("arcee_fusion", {})]:
    exs = ex[:1] if method == "arcee_fusion" else ex
    t = merge.merge(method, [{"w": e} for e in exs], {"w": b}, params=p, layout="torch",
                    key=jax.random.key(0))["w"]
    f = merge.merge(method, [{"w": e.T} for e in exs], {"w": b.T}, params=p, layout="flax",
                    key=jax.random.key(0))["w"]
    np.testing.assert_allclose(np.asarray(t), np.asarray(f).T, rtol=1e-5, atol=1e-6)
  for row_wise in (False, True):
    p = {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise, "weight": [1.0, 2.0]}
    t = merge.merge("nuslerp", [{"w": e} for e in ex[:2]], {"w": b}, params=p, layout="torch")["w"]
    f = merge.merge("nuslerp", [{"w": e.T} for e in ex[:2]], {"w": b.T}, params=p, layout="flax")["w"]
    np.testing.assert_allclose(np.asarray(t), np.asarray(f).T, rtol=1e-5, atol=1e-6)


def test_greedy_soup_adds_only_helpful_models():
  target = np.array([1.0, 1.0])
  models = [{"w": jnp.array([1.2, 0.8])}, {"w": jnp.array([0.8, 1.2])}, {"w": jnp.array([5.0, -3.0])}]
  score = lambda m: -float(np.sum((np.asarray(m["w"]) - target) ** 2))
  soup, chosen, best = merge.greedy_soup(models, score)
  assert sorted(chosen) == [0, 1]
  np.testing.assert_allclose(soup["w"], [1.0, 1.0], rtol=1e-6)
  assert best == pytest.approx(0.0, abs=1e-10)


def test_config_file_of_ones_own_sets_per_model_lists(ckpts, tmp_path):
  """configs/merge.py's documented route for per-model values: a config file that sets
  `config.params.weight = [...]` (fields accept any literal, not only the default's type)."""
  import importlib.util
  from kfuse.merge.runner import run_native
  root, trees = ckpts
  spec = importlib.util.spec_from_file_location("merge_cfg", os.path.join(REPO, "configs/merge.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("linear")
  c.models = f"{root}/m1,{root}/m2"
  c.params.weight = [1.0, 0.5]
  c.output_dir = str(tmp_path / "lin")
  c.output_format = "safetensors"
  c.progress = False
  run_native(c)
  got = kio.read_hf_dir(str(tmp_path / "lin"))
  a, b = (np.asarray(t["params"]["Dense_0"]["kernel"], np.float64) for t in trees[1:])
  np.testing.assert_allclose(got["params/Dense_0/kernel"], (a + 0.5 * b) / 1.5, rtol=1e-6)
