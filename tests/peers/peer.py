"""Importing a peer library for parity tests: skip only where the `peers` extra is absent."""

import importlib
import importlib.util

import pytest

PEERS = ("torch", "mergekit")


def require(name: str):
  """Import ``name``; a missing module skips the test module when the `peers` extra is not
  installed, and fails it when torch and mergekit are (CI installs them)."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    if all(importlib.util.find_spec(m) is not None for m in PEERS):
      pytest.fail(f"{name} cannot be imported although the peers extra is installed: {e}",
                  pytrace=False)
    pytest.skip(f"{name} not installed (pip install -e '.[peers]')", allow_module_level=True)
