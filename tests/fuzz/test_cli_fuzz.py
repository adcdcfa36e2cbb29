"""Real `python -m kfuse.main` runs over fuzzed inputs (native merges and mergekit YAML).

Each run costs a JAX import (seconds), so the fast suite runs three fixed-seed
examples and `-m slow` a larger budget. Properties: exit 0 with the float64
reference output, or a non-zero exit whose stderr is exactly one
``kfuse: error: ...`` line (never a traceback); inputs' bytes unchanged; after a
failure no output and no temporary sibling.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from tests.fuzz import test_merge_fuzz as native
from tests.fuzz import test_yaml_fuzz as ym
from tests.fuzz.helpers import FileState, fast, slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kfuse_main(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "kfuse.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def check_process(r: subprocess.CompletedProcess, state: FileState) -> bool:
  """Exit 0, or non-zero with one `kfuse: error:` stderr line; file properties. True if ok."""
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  failed = r.returncode != 0
  if failed:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kfuse: error: "), r.stderr[-3000:]
  state.check(failed)
  return not failed


@st.composite
def native_cli_cases(draw, mistakes=native.MISTAKES):
  """A native merge case with one weight for all models (a flag cannot carry a list)."""
  case = draw(native.merge_cases(mistakes=mistakes))
  n = len(case["params"]["weight"])
  case["params"]["weight"] = [draw(st.floats(0.25, 2.0, width=32))] * n
  return case


def check_native_cli(root: str, case) -> None:
  models, base, out, overwrite, must_fail = native.build(root, case)
  p = case["params"]
  args = [f"--config=configs/merge.py:{case['method']}", f"--config.models={','.join(models)}",
          f"--config.output_dir={out}", f"--config.overwrite={overwrite}",
          f"--config.seed={case['seed']}", "--config.progress=False",
          f"--config.params.weight={p['weight'][0]!r}", f"--config.params.normalize={p['normalize']}"]
  if base:
    args += [f"--config.base={base}", f"--config.params.lambda_={p['lambda']!r}"]
  state = FileState([x for x in models + ([base] if base else []) if os.path.exists(x)], out)
  ok = check_process(kfuse_main(*args), state)
  if must_fail:
    assert not ok, f"{case['mistake']} was accepted"
  if ok:
    native.assert_merge_output(out, case)


def check_yaml_cli(root: str, case, valid: bool) -> None:
  dirs = ym.write_inputs(root, case)
  cfg_path = ym.write_yaml(root, case["cfg"])
  out = os.path.join(root, "out")
  state = FileState(dirs + [cfg_path], out)
  ok = check_process(kfuse_main(f"--config=configs/mergekit.py:{cfg_path}",
                                f"--config.output_dir={out}", "--config.progress=False"), state)
  if valid:
    assert ok
    ym.assert_yaml_output(out, case)


@fast(1)
@given(case=native_cli_cases(mistakes=("none",)))
def test_cli_native_merge_succeeds_with_reference_output(tmp_path, case):
  check_native_cli(str(tmp_path / "w"), case)


@fast(1)
@given(case=native_cli_cases(mistakes=("truncated",)))
def test_cli_native_merge_of_truncated_shard_fails_in_one_line(tmp_path, case):
  check_native_cli(str(tmp_path / "w"), case)


@fast(1)
@given(case=ym.yaml_cases())
def test_cli_yaml_missing_model_fails_in_one_line(tmp_path, case):
  case["cfg"]["models"][-1]["model"] = "no_such_model"
  check_yaml_cli(str(tmp_path / "w"), case, valid=False)


@pytest.mark.slow
@slow(15)
@given(case=native_cli_cases())
def test_cli_native_merge_slow(tmp_path, case):
  check_native_cli(str(tmp_path / "w"), case)


@pytest.mark.slow
@slow(10)
@given(case=ym.yaml_cases())
def test_cli_yaml_valid_slow(tmp_path, case):
  check_yaml_cli(str(tmp_path / "w"), case, valid=True)


@pytest.mark.slow
@slow(15)
@given(case=ym.mutated_cases())
def test_cli_yaml_mutated_slow(tmp_path, case):
  check_yaml_cli(str(tmp_path / "w"), case, valid=False)
