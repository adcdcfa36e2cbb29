"""Tests for kfuse.io.orbax_io (the sharded restore runs in a subprocess with 8 CPU devices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kfuse.io import (
    is_hf_dir,
    is_orbax_checkpoint,
    load_params,
    orbax_metadata,
    restore_orbax,
    save_orbax,
    write_hf_dir,
)
from kfuse.tree import KfuseError, flatten

BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree():
  rng = np.random.default_rng(0)
  return {"params": {
      "Dense_0": {"kernel": rng.standard_normal((8, 4)).astype(np.float32),
                  "bias": jnp.zeros((4,), jnp.bfloat16)},
      "embed": {"embedding": rng.standard_normal((16, 8)).astype(BF16)},
      "step": np.arange(3, dtype=np.int32),
  }}


def _assert_tree_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert list(fa) == list(fb)
  for k in fa:
    assert np.asarray(fb[k]).dtype == np.asarray(fa[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fb[k]), np.asarray(fa[k]), err_msg=k)


def test_round_trip_to_host_numpy(tmp_path):
  t = _tree()
  ck = tmp_path / "ck"
  assert save_orbax(ck, t) == str(ck)
  assert os.listdir(tmp_path) == ["ck"]  # no orbax / kfuse temp dirs left behind
  assert is_orbax_checkpoint(ck) and not is_hf_dir(ck)
  assert os.path.exists(ck / "commit_success.txt")
  r = restore_orbax(ck)
  assert all(type(v) is np.ndarray for v in flatten(r).values())
  _assert_tree_equal(t, r)
  meta = flatten(orbax_metadata(ck))
  assert meta["params/embed/embedding"].shape == (16, 8)


def test_restore_against_target_casts_and_places(tmp_path):
  t = _tree()
  save_orbax(tmp_path / "ck", t)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), t)
  r = restore_orbax(tmp_path / "ck", target)
  for k, v in flatten(r).items():
    assert isinstance(v, jax.Array) and v.dtype == jnp.float32, k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(t)[k]).astype(np.float32))
  concrete = jax.tree.map(jnp.asarray, t)
  _assert_tree_equal(t, restore_orbax(tmp_path / "ck", concrete))


def test_target_mismatch(tmp_path):
  t = _tree()
  save_orbax(tmp_path / "ck", t)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), t)
  wrong_shape = jax.tree.map(lambda x: x, abstract)
  wrong_shape["params"]["Dense_0"]["kernel"] = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  with pytest.raises(KfuseError, match=r"'params/Dense_0/kernel' has shape \(8, 4\)"):
    restore_orbax(tmp_path / "ck", wrong_shape)
  missing = jax.tree.map(lambda x: x, abstract)
  del missing["params"]["step"]
  with pytest.raises(KfuseError, match="saved key 'params/step' is missing from the target"):
    restore_orbax(tmp_path / "ck", missing)
  extra = jax.tree.map(lambda x: x, abstract)
  extra["params"]["new"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(KfuseError, match="target key 'params/new' is not in the checkpoint"):
    restore_orbax(tmp_path / "ck", extra)


def test_existing_refused_and_overwrite_is_atomic(tmp_path, monkeypatch):
  ck = tmp_path / "ck"
  save_orbax(ck, {"a": np.ones(3, np.float32)})
  with pytest.raises(KfuseError, match="output directory .*ck exists; pass overwrite=True"):
    save_orbax(ck, {"a": np.zeros(3, np.float32)})
  save_orbax(ck, {"b": np.full(2, 7, np.int32)}, overwrite=True)
  _assert_tree_equal({"b": np.full(2, 7, np.int32)}, restore_orbax(ck))
  assert os.listdir(tmp_path) == ["ck"]
  # a save that fails mid-way leaves the old checkpoint intact and no temp dirs
  import orbax.checkpoint as ocp

  def boom(self, directory, *a, **k):
    os.makedirs(os.fspath(directory) + ".orbax-checkpoint-tmp")
    raise OSError("disk full")

  monkeypatch.setattr(ocp.AsyncCheckpointer, "save", boom)
  with pytest.raises(KfuseError, match="cannot save orbax checkpoint .*disk full"):
    save_orbax(ck, {"c": np.zeros(1, np.float32)}, overwrite=True)
  assert os.listdir(tmp_path) == ["ck"]
  _assert_tree_equal({"b": np.full(2, 7, np.int32)}, restore_orbax(ck))


def test_zero_size_refused(tmp_path):
  with pytest.raises(KfuseError, match="'x/e' has zero-size shape"):
    save_orbax(tmp_path / "ck", {"x": {"e": np.zeros((0, 3), np.float32)}})
  assert os.listdir(tmp_path) == []


def test_missing_or_foreign_paths(tmp_path):
  with pytest.raises(KfuseError, match="orbax checkpoint .*nope does not exist"):
    restore_orbax(tmp_path / "nope")
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "x.txt").write_text("x")
  with pytest.raises(KfuseError, match="plain is not an orbax checkpoint"):
    restore_orbax(tmp_path / "plain")
  assert not is_orbax_checkpoint(tmp_path / "plain")
  assert not is_orbax_checkpoint(tmp_path / "nope")
  with pytest.raises(KfuseError, match="neither a HF safetensors model nor an orbax"):
    load_params(tmp_path / "plain")
  with pytest.raises(KfuseError, match="does not exist"):
    load_params(tmp_path / "nope")


def test_load_params_dispatch(tmp_path):
  t = _tree()
  save_orbax(tmp_path / "ck", t)
  flat, kind = load_params(tmp_path / "ck")
  assert kind == "orbax" and set(flat) == set(flatten(t))
  np.testing.assert_array_equal(flat["params/Dense_0/kernel"], t["params"]["Dense_0"]["kernel"])
  write_hf_dir(tmp_path / "hf", {"w": np.ones(2, np.float32)})
  flat, kind = load_params(tmp_path / "hf")
  assert kind == "hf" and list(flat) == ["w"]
  flat, kind = load_params(tmp_path / "hf" / "model.safetensors")
  assert kind == "hf"


def test_checkpoint_manager_step_dir(tmp_path):
  """A CheckpointManager step directory (single item subdir) is accepted too."""
  ck = tmp_path / "run" / "10"
  save_orbax(ck / "default", {"a": np.arange(4, dtype=np.float32)})
  assert is_orbax_checkpoint(ck)
  _assert_tree_equal({"a": np.arange(4, dtype=np.float32)}, restore_orbax(ck))


_SHARDED = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kfuse.io import save_orbax, restore_orbax
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("x",))
    row, rep = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    b = np.arange(8, dtype=np.float32)
    tree = {"w": jax.device_put(w, row), "b": b}
    save_orbax(CK, tree)
    target = {"w": jax.ShapeDtypeStruct((64, 3), jnp.bfloat16, sharding=row),
              "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=row)}
    r = restore_orbax(CK, target)
    assert r["w"].sharding == row and r["b"].sharding == row, (r["w"].sharding, r["b"].sharding)
    assert r["w"].dtype == jnp.bfloat16
    assert len(r["w"].addressable_shards) == 8 and r["w"].addressable_shards[0].data.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(r["w"]), w.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(r["b"]), b)
    r2 = restore_orbax(CK, {"w": jax.ShapeDtypeStruct((64, 3), jnp.float32, sharding=rep),
                            "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rep)})
    assert r2["w"].sharding == rep
    np.testing.assert_array_equal(np.asarray(r2["w"]), w)
    host = restore_orbax(CK)
    assert type(host["w"]) is np.ndarray
    np.testing.assert_array_equal(host["w"], w)
    print("SHARDED-OK")
""")


def test_sharded_restore_subprocess(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  code = f"CK = {str(tmp_path / 'ck')!r}\n" + _SHARDED
  res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and "SHARDED-OK" in res.stdout, res.stderr[-3000:]
