"""Integer, bool and float64 tensors (WORKSPACE.md, "Method-author conventions").

Integer / bool tensors are copied when every model agrees and refused (one line)
when they differ: they are never averaged, so never truncated. float64 tensors are
computed in float64 (a scoped `jax.enable_x64`). Before: a JAX TypeError for bool
tensors under TIES, a message naming a deleted temporary directory for int64, and
float64 silently computed in float32 (API: int64 leaves averaged and truncated).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.tree import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIG = 2 ** 40 + 1   # not representable in int32 / float32

A64 = np.array([1.0, 1.0 + 2 ** -40, -3.0])   # float32 cannot hold 1 + 2^-40
B64 = np.array([2.0, 1.0, 1e-300])            # nor 1e-300


def models(tmp_path, ids_b=None):
  r = np.random.default_rng(0)
  w = r.standard_normal((4, 3)).astype(np.float32)
  base = {"w": w, "mask": np.array([True, False, True]), "ids": np.array([BIG, -2, 3]),
          "d": np.zeros(3)}
  exps = [dict(base, w=w + 0.1 * (i + 1), d=d) for i, d in enumerate((A64, B64))]
  if ids_b is not None:
    exps[1]["ids"] = ids_b
  dirs = []
  for i, t in enumerate([base] + exps):
    kio.write_hf_dir(str(tmp_path / f"m{i}"), t)
    dirs.append(str(tmp_path / f"m{i}"))
  return dirs, base, exps


def cli(tmp_path, dirs, method="ties"):
  return subprocess.run(
      [sys.executable, "-m", "kfuse.main", f"--config=configs/merge.py:{method}",
       f"--config.models={dirs[1]},{dirs[2]}", f"--config.base={dirs[0]}",
       f"--config.output_dir={tmp_path}/out", "--config.params.density=1.0",
       "--config.progress=False"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))


def test_cli_copies_agreeing_integer_and_bool_computes_float64(tmp_path):
  dirs, base, _ = models(tmp_path)
  r = cli(tmp_path, dirs)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "kfuse: note: 2 integer/bool tensor(s) copied unchanged" in r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["copied"] == 2
  got = kio.read_hf_dir(str(tmp_path / "out"))
  assert got["ids"].dtype == np.int64 and got["ids"][0] == BIG
  np.testing.assert_array_equal(got["ids"], base["ids"])
  assert got["mask"].dtype == np.bool_
  np.testing.assert_array_equal(got["mask"], base["mask"])
  # TIES, density 1, λ = 1, base 0: per entry the elected sign's mass mean, in float64
  d = np.stack([A64, B64])
  sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
  agree = np.sign(d) == sign
  ref = (d * agree).sum(0) / np.maximum(agree.sum(0), 1)
  assert got["d"].dtype == np.float64
  np.testing.assert_allclose(got["d"], ref, rtol=1e-15, atol=0)
  assert got["d"][1] == 1.0 + 2.0 ** -41   # (1 + (1 + 2^-40)) / 2: not rounded through float32


def test_cli_refuses_disagreeing_integers(tmp_path):
  dirs, _, _ = models(tmp_path, ids_b=np.array([BIG, -2, 4]))
  r = cli(tmp_path, dirs)
  assert r.returncode != 0
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("kfuse: error: 'ids': int64 tensor differs between"), err
  assert "(1 entries)" in err and "m2" in err and ".tmp" not in err
  assert not (tmp_path / "out").exists()


def test_api_integer_leaves_are_copied_not_truncated():
  base = {"w": np.ones(3, np.float32), "ids": np.array([BIG, 2]), "m": np.array([True, False])}
  exps = [dict(base, w=np.full(3, 2.0, np.float32)), dict(base, w=np.full(3, 4.0, np.float32))]
  out = merge.merge("task_arithmetic", exps, base, params={"lambda": 0.5})
  assert np.asarray(out["ids"]).dtype == np.int64 and int(out["ids"][0]) == BIG
  np.testing.assert_array_equal(out["m"], base["m"])
  np.testing.assert_allclose(out["w"], 1.0 + 0.5 * (1.0 + 3.0))
  bad = [exps[0], dict(exps[1], ids=np.array([BIG, 3]))]
  with pytest.raises(KfuseError, match=r"'ids': int64 leaf differs between base and expert\[1\]"):
    merge.merge("task_arithmetic", bad, base, params={"lambda": 0.5})
  with pytest.raises(KfuseError, match=r"'ids': int32 leaf differs between expert\[0\]"):
    merge.merge("linear", [{"ids": np.array([1, 2], np.int32)}, {"ids": np.array([1, 3], np.int32)}])


def test_api_float64_leaves_in_float64():
  out = merge.merge("linear", [{"d": A64}, {"d": B64}], params={"weight": [1.0, 3.0]})
  assert np.asarray(out["d"]).dtype == np.float64
  np.testing.assert_allclose(out["d"], (A64 + 3.0 * B64) / 4.0, rtol=1e-15, atol=0)


SHARDED = """
import sys
import numpy as np, jax
from kfuse import shard, merge
from kfuse.merge import TensorInfo, get_method, resolve_values
from kfuse.merge.engine import DictSource, TensorTask, execute
assert len(jax.devices()) == 8
r = np.random.default_rng(0)
base = {"d": r.standard_normal((16, 3)), "i": np.arange(16).reshape(8, 2) + 2 ** 40,
        "b": np.arange(16).reshape(8, 2) % 3 == 0, "s": np.array(1.0),
        "f": r.standard_normal((16, 4)).astype(np.float32)}
exps = [dict(base, d=base["d"] + 0.1 * (k + 1), s=np.array(1.5 + k / 2), f=base["f"] * (k + 2))
        for k in range(2)]
srcs = [DictSource(base, "b")] + [DictSource(e, f"e{i}") for i, e in enumerate(exps)]
m = get_method("ties")
tasks = []
for k, v in base.items():
  info = TensorInfo(k, v.shape, v.dtype, None, 0, "torch")
  tasks.append(TensorTask(k, m, (0, k), [(1, k), (2, k)],
                          resolve_values(m, {"density": 0.5}, info, 2), info))
out = {}
execute(tasks, srcs, out.__setitem__, progress=False, mesh=shard.make_mesh(8))
ref = merge.merge("ties", exps, base, params={"density": 0.5}, layout="torch")
bad = [k for k in base if out[k].dtype != base[k].dtype or not np.array_equal(out[k], ref[k])]
print("BAD", bad)
"""


def test_sharded_engine_integer_bool_float64():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip().splitlines()[-1] == "BAD []"
