"""Non-finite results and down-casts that overflow: refused with one line naming the
tensor (and the method / count / dtype), unless the user opts in explicitly.

Before: `linear` with weights summing to 0 wrote an all-NaN model with exit 0, and a
bf16 1e6 written as float16 (YAML ``out_dtype`` or the native ``dtype``) became inf.
"""

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.merge import TensorInfo, get_method, resolve_values
from kfuse.merge.engine import DictSource, Stats, TensorTask, execute
from kfuse.tree import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F16_MAX = 65504.0


def cli(*args):
  return subprocess.run([sys.executable, "-m", "kfuse.main", *args, "--config.progress=False"],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO))


def linear_plan(tensors, weights):
  m = get_method("linear")
  srcs = [DictSource(t, f"m{i}") for i, t in enumerate(tensors)]
  tasks = []
  for k, v in tensors[0].items():
    info = TensorInfo(k, np.shape(v), np.float32, None, 0, "torch")
    tasks.append(TensorTask(k, m, None, [(i, k) for i in range(len(tensors))],
                            resolve_values(m, {"weight": weights}, info, len(tensors)), info))
  return tasks, srcs


TWO = [{"w": np.full((4, 3), 1.0, np.float32), "s": np.array(1.0, np.float32)},
       {"w": np.full((4, 3), 2.0, np.float32), "s": np.array(2.0, np.float32)}]


# ------------------------------------------------------------------ non-finite results


def test_api_refuses_nonfinite_result():
  with pytest.raises(KfuseError, match=r"'s': method 'linear' gave 1 NaN/Inf .*allow_nonfinite"):
    merge.merge("linear", TWO, params={"weight": [1.0, -1.0]})
  out = merge.merge("linear", TWO, params={"weight": [1.0, -1.0]}, allow_nonfinite=True)
  # (1·θ_1 − 1·θ_2) / (1 − 1) = −1 / 0
  assert np.all(np.asarray(out["w"]) == -np.inf)


@pytest.mark.parametrize("name", ["multislerp", "nuslerp"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("with_base", [False, True])
def test_api_half_precision_slerps_of_zero_and_orthogonal_tensors(name, dtype, with_base):
  """Zeros slerp to zeros, and e_1, e_2 (equal weights) to (e_1 + e_2)/√2, in float16
  and bfloat16. Before: the norm epsilon (1e-7 / 1e-8) underflowed to 0 in float16,
  so zero tensors gave 0/0 = NaN (refused as a non-finite result)."""
  base = {"w": np.zeros((2, 2), dtype)} if with_base else None
  zero = [{"w": np.zeros((2, 2), dtype)}] * 2
  out = np.asarray(merge.merge(name, zero, base, params={"weight": [1.0, 1.0]})["w"])
  assert out.dtype == dtype
  np.testing.assert_array_equal(out.astype(np.float64), np.zeros((2, 2)))
  ortho = [{"w": np.array([[1, 0], [1, 0]], dtype)}, {"w": np.array([[0, 1], [0, 1]], dtype)}]
  out = np.asarray(merge.merge(name, ortho, base, params={"weight": [1.0, 1.0]})["w"])
  # nuslerp of whole tensors: t = 1/2, θ = π/2 → (x_1 + x_2)·sin(π/4)/sin(π/2);
  # multislerp: mean direction (x_1 + x_2)/‖x_1 + x_2‖, no tangent, scale Σ w_i‖x_i‖ = √2.
  want = np.full((2, 2), np.sqrt(0.5))
  np.testing.assert_allclose(out.astype(np.float64), want, rtol=float(np.finfo(dtype).eps))


@pytest.mark.parametrize("chunk", [None, 0])
def test_engine_refuses_nonfinite_result(chunk):
  tasks, srcs = linear_plan(TWO, [1.0, -1.0])
  with pytest.raises(KfuseError, match=r"'w': method 'linear' gave 12 NaN/Inf"):
    execute(tasks, srcs, lambda n, a: None, progress=False, chunk=chunk)
  out, st = {}, Stats()
  execute(tasks, srcs, out.__setitem__, progress=False, chunk=chunk, allow_nonfinite=True,
          stats=st)
  assert np.all(out["w"] == -np.inf) and out["s"] == -np.inf
  assert st.nonfinite == {"w": 12, "s": 1}


def test_cli_native_refuses_zero_weight_sum(tmp_path):
  for i, t in enumerate(TWO):
    kio.write_hf_dir(str(tmp_path / f"m{i}"), t)
  args = ["--config=configs/merge.py:linear", f"--config.models={tmp_path}/m0,{tmp_path}/m1",
          "--config.params.weight=0.0"]
  r = cli(*args, f"--config.output_dir={tmp_path}/out")
  assert r.returncode != 0
  assert "kfuse: error:" in r.stderr and "method 'linear' gave" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "out").exists()
  r = cli(*args, f"--config.output_dir={tmp_path}/out", "--config.allow_nonfinite=True")
  assert r.returncode == 0, r.stderr[-2000:]
  assert np.all(np.isnan(kio.read_hf_dir(str(tmp_path / "out"))["w"]))   # 0 / 0


def test_cli_yaml_refuses_zero_weight_sum(tmp_path):
  for i, t in enumerate(TWO):
    kio.write_hf_dir(str(tmp_path / f"m{i}"), t)
  yml = tmp_path / "m.yml"
  yml.write_text(textwrap.dedent(f"""
      merge_method: linear
      models:
        - model: {tmp_path / 'm0'}
          parameters: {{weight: 1.0}}
        - model: {tmp_path / 'm1'}
          parameters: {{weight: -1.0}}
      """))
  r = cli(f"--config=configs/mergekit.py:{yml}", f"--config.output_dir={tmp_path}/out")
  assert r.returncode != 0
  assert "method 'linear' gave" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
  assert not (tmp_path / "out").exists()
  r = cli(f"--config=configs/mergekit.py:{yml}", f"--config.output_dir={tmp_path}/out",
          "--config.allow_nonfinite=True")
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["nonfinite"] == {"s": 1, "w": 12}
  assert np.all(kio.read_hf_dir(str(tmp_path / "out"))["w"] == -np.inf)   # (1 − 2) / 0


# ------------------------------------------------------------------ overflowing casts


BIG = {"w": np.array([[1e6, -1e6, 1.0]], ml_dtypes.bfloat16), "s": np.array(3.0, ml_dtypes.bfloat16)}


def write_yaml(tmp_path, extra=""):
  for i in range(2):
    kio.write_hf_dir(str(tmp_path / f"m{i}"), BIG)
  yml = tmp_path / "m.yml"
  yml.write_text(textwrap.dedent(f"""
      merge_method: linear
      out_dtype: float16
      models:
        - model: {tmp_path / 'm0'}
          parameters: {{weight: 1.0}}
        - model: {tmp_path / 'm1'}
          parameters: {{weight: 1.0}}
      """))
  return yml


def test_cli_yaml_out_dtype_overflow_refused_or_clamped(tmp_path):
  yml = write_yaml(tmp_path)
  r = cli(f"--config=configs/mergekit.py:{yml}", f"--config.output_dir={tmp_path}/out")
  assert r.returncode != 0
  assert "'w': 2 results out of the range of float16" in r.stderr, r.stderr[-2000:]
  r = cli(f"--config=configs/mergekit.py:{yml}", f"--config.output_dir={tmp_path}/out",
          "--config.overflow=clamp")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["clamped"] == {"w": 2}
  got = kio.read_hf_dir(str(tmp_path / "out"))
  assert got["w"].dtype == np.float16
  np.testing.assert_array_equal(got["w"], np.array([[F16_MAX, -F16_MAX, 1.0]], np.float16))
  assert got["s"] == 3.0


def test_cli_native_dtype_overflow_refused(tmp_path):
  for i in range(2):
    kio.write_hf_dir(str(tmp_path / f"m{i}"), BIG)
  r = cli("--config=configs/merge.py:linear", f"--config.models={tmp_path}/m0,{tmp_path}/m1",
          f"--config.output_dir={tmp_path}/out", "--config.dtype=float16")
  assert r.returncode != 0
  assert "'w': 4 input values out of the range of float16" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("chunk", [None, 0])
def test_engine_counts_overflow_per_tensor(chunk):
  tasks, srcs = linear_plan([BIG, BIG], [1.0, 1.0])
  with pytest.raises(KfuseError, match=r"'w': 2 results out of the range of float16"):
    execute(tasks, srcs, lambda n, a: None, progress=False, chunk=chunk, out_dtype=np.float16)
  out, st = {}, Stats()
  execute(tasks, srcs, out.__setitem__, progress=False, chunk=chunk, out_dtype=np.float16,
          overflow="clamp", stats=st)
  np.testing.assert_array_equal(out["w"], np.array([[F16_MAX, -F16_MAX, 1.0]], np.float16))
  assert st.clamped == {"w": 2}


def test_engine_unknown_overflow_mode():
  tasks, srcs = linear_plan(TWO, [1.0, 1.0])
  with pytest.raises(KfuseError, match=r"unknown mode 'clmap'.*did you mean 'clamp'"):
    execute(tasks, srcs, lambda n, a: None, progress=False, overflow="clmap")


def test_writer_refuses_overflowing_cast(tmp_path):
  with pytest.raises(KfuseError, match=r"tensor 'w': 2 values out of the range of float16"):
    kio.write_hf_dir(str(tmp_path / "o"), BIG, dtype=np.float16)
  assert not (tmp_path / "o").exists()
