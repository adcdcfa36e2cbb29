"""Native merges of Orbax checkpoints: layout from the names, output format, step dirs.

References are `kfuse.merge.merge` on the same tensors in memory and the same
merge run from safetensors, plus a float64 NumPy row-wise model_stock.
"""

import os

import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.merge.runner import input_layout, merge_checkpoints
from kfuse.tree import KfuseError, flatten

NAMES = {"model.layers.0.mlp.up_proj.weight": (12, 6), "model.layers.0.self_attn.q_proj.weight": (6, 6),
         "model.norm.weight": (6,)}


def _hf_tree(seed):
  r = np.random.default_rng(seed)
  return {k: (r.standard_normal(s) * (1 + np.arange(s[0])[(...,) + (None,) * (len(s) - 1)]))
          .astype(np.float32) for k, s in NAMES.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("hfnames")
  trees = [_hf_tree(i) for i in range(3)]
  for i, t in enumerate(trees):
    kio.save_orbax(str(root / f"o{i}"), t)
    kio.write_hf_dir(str(root / f"s{i}"), t)
  return root, trees


def _model_stock_rows64(base, experts):
  """model_stock per output row ([out, in] layout): t = N·cos/(1+(N−1)·cos)."""
  b = base.astype(np.float64)
  d = [e.astype(np.float64) - b for e in experts]
  n = len(d)
  if b.ndim < 2:
    d, b2 = [x[None] for x in d], b[None]
  else:
    b2 = b
  cos = np.mean([np.sum(d[i] * d[j], 1) / (np.linalg.norm(d[i], axis=1) * np.linalg.norm(d[j], axis=1))
                 for i in range(n) for j in range(i + 1, n)], axis=0)
  t = (n * cos / (1 + (n - 1) * cos))[:, None]
  out = t * (b2 + np.mean(d, 0)) + (1 - t) * b2
  return out.reshape(base.shape)


@pytest.mark.parametrize("method,params", [("model_stock", {"filter_wise": True}),
                                           ("nuslerp", {"nuslerp_row_wise": True,
                                                        "nuslerp_flatten": False,
                                                        "weight": [0.3, 0.7]})])
def test_orbax_with_hf_names_merges_like_safetensors(models, tmp_path, method, params):
  root, trees = models
  outs = {}
  for kind in ("o", "s"):
    out = str(tmp_path / kind)
    merge_checkpoints(method, [str(root / f"{kind}1"), str(root / f"{kind}2")], str(root / f"{kind}0"),
                      out, params=params, progress=False, output_format="safetensors")
    outs[kind] = kio.read_hf_dir(out)
  ref = merge.merge(method, trees[1:], trees[0], params=params)
  for k in NAMES:
    np.testing.assert_array_equal(outs["o"][k], outs["s"][k], err_msg=k)
    np.testing.assert_allclose(outs["o"][k], np.asarray(ref[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  if method == "model_stock":
    for k in NAMES:
      np.testing.assert_allclose(outs["o"][k], _model_stock_rows64(trees[0][k], [t[k] for t in trees[1:]]),
                                 rtol=1e-4, atol=1e-5, err_msg=k)


def test_layout_option_and_inference():
  assert input_layout(NAMES) == "torch"
  assert input_layout(["params/Dense_0/kernel"]) == "flax"
  assert input_layout(NAMES, "flax") == "flax"
  with pytest.raises(KfuseError, match="config.layout"):
    input_layout(NAMES, "rows")


def test_auto_output_format_follows_an_orbax_base(models, tmp_path):
  root, trees = models
  out = str(tmp_path / "out")
  r = merge_checkpoints("task_arithmetic", [str(root / "s1"), str(root / "s2")], str(root / "o0"),
                        out, progress=False)
  assert r["format"] == "orbax" and kio.is_orbax_checkpoint(out) and not kio.is_hf_dir(out)


def test_checkpoint_manager_root_uses_its_latest_step(models, tmp_path):
  import orbax.checkpoint as ocp
  root, trees = models
  mgr_dir = str(tmp_path / "run")
  with ocp.CheckpointManager(mgr_dir) as mgr:
    for step, t in ((100, trees[2]), (200, trees[1])):   # the latest step holds trees[1]
      mgr.save(step, args=ocp.args.StandardSave(t))
    mgr.wait_until_finished()
  out = str(tmp_path / "out")
  merge_checkpoints("linear", [mgr_dir, str(root / "o2")], None, out, progress=False,
                    params={"weight": [1.0, 1.0]}, output_format="safetensors")
  got = kio.read_hf_dir(out)
  for k in NAMES:
    np.testing.assert_allclose(got[k], (trees[1][k] + trees[2][k]) / 2, rtol=1e-6, err_msg=k)
  assert os.path.isdir(os.path.join(mgr_dir, "200"))
