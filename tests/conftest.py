"""Hygiene shared by every test module: compiled programs are released module by module."""

import gc
import sys

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Free the XLA executables a test module compiled once the module is done.

  Every XLA:CPU executable keeps about three memory mappings for its code while it is
  cached. The whole suite in one process (`python -m pytest -q`, as CI runs it) compiled
  enough programs to pass Linux's ``vm.max_map_count`` (65,530); LLVM's next mapping then
  failed inside a compile and the process died with SIGSEGV. `jax.clear_caches` drops
  those executables (measured: 300 compiled functions, 1,401 mappings -> 507).
  """
  yield
  if "jax" in sys.modules:   # JAX-free modules stay JAX-free
    sys.modules["jax"].clear_caches()
    gc.collect()
