"""tests/conftest.py releases each module's compiled programs (CI runs the suite in one process)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc only")

_COMPILE = """
import jax, jax.numpy as jnp

def maps():
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)

KEEP = []

def test_compile_many():
  x = jnp.ones((4,))
  before = maps()
  for i in range(150):
    f = jax.jit(lambda a, i=i: jnp.sin(a) * i + jnp.cos(a * (i + 1)))
    f(x).block_until_ready()
    KEEP.append(f)            # alive, as a module-level cache would keep them
  with open({out!r}, "w") as fh:
    fh.write(f"{{before}} {{maps()}}")
"""

_AFTER = """
from test_a import maps

def test_after():
  with open({out!r}, "w") as fh:
    fh.write(str(maps()))
"""


def test_a_module_s_executables_are_released_when_it_ends(tmp_path):
  shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_a.py").write_text(textwrap.dedent(_COMPILE.format(out=str(tmp_path / "a"))))
  (tmp_path / "test_b.py").write_text(textwrap.dedent(_AFTER.format(out=str(tmp_path / "b"))))
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                      "test_a.py", "test_b.py"], cwd=tmp_path, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  before, peak = map(int, (tmp_path / "a").read_text().split())
  after = int((tmp_path / "b").read_text())
  assert peak - before > 300          # each executable holds mappings while cached
  assert after - before < 0.2 * (peak - before), (before, peak, after)
