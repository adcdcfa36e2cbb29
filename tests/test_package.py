"""The public surface: lazy submodules and a version that matches the package metadata."""

import re
import subprocess
import sys
from pathlib import Path

import kfuse

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_pyproject():
  text = (ROOT / "pyproject.toml").read_text()
  assert kfuse.__version__ == re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def test_import_is_lazy_and_submodules_resolve():
  code = ("import sys, kfuse; assert 'jax' not in sys.modules, 'jax imported eagerly'; "
          "m = kfuse.merge; assert 'ties' in m.names(); assert kfuse.io.is_hf_dir; "
          "assert kfuse.distill and kfuse.adapt and kfuse.registry.Registry")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr


def test_unknown_attribute_is_an_attribute_error():
  try:
    kfuse.no_such_module
  except AttributeError as e:
    assert "no_such_module" in str(e)
  else:
    raise AssertionError("expected AttributeError")
