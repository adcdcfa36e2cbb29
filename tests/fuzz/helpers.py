"""Shared pieces of the fuzz harness: strategies for what users hand kfuse and the
properties every run must keep.

The properties (issue 10): a run either succeeds with a correct output or fails
with a one-line `KfuseError` (never another exception, i.e. never a traceback);
the inputs' bytes never change; after a failure no complete-looking output is
left (the output path is absent, or unchanged if it existed, and no temporary
sibling ``.{name}.tmp-*`` remains).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, Phase, event, settings, strategies as st
from hypothesis.control import currently_in_test_context

from kfuse.io import write_safetensors
from kfuse.tree import KfuseError

# Every dtype the safetensors format names, as kfuse reads it.
ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype(np.bool_),
}
# Floating dtypes whose merges are compared with a float64 reference.
MERGE_FLOATS = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
             HealthCheck.data_too_large, HealthCheck.filter_too_much]


def fast(n: int, shrink: bool = True):
  """Fixed-seed slice for the fast suite: ``n`` examples, same ones every run.

  ``shrink=False`` for strict-xfail tests of known bugs: the first failing
  example is enough and shrinking it only costs time.
  """
  phases = None if shrink else [Phase.explicit, Phase.generate]
  return settings(derandomize=True, max_examples=n, deadline=None, database=None,
                  suppress_health_check=_SUPPRESS, **({"phases": phases} if phases else {}))


def slow(n: int):
  """Larger random budget for ``-m slow`` runs."""
  return settings(max_examples=n, deadline=None, database=None, suppress_health_check=_SUPPRESS)


def tally(label: str) -> None:
  """Count an outcome in Hypothesis' statistics (no-op outside a Hypothesis test)."""
  if currently_in_test_context():
    event(label)


# ----------------------------------------------------------------- strategies

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)   # rank 0..3
nonempty_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)  # rank 1..3, no 0


@st.composite
def raw_tensor(draw, dtypes=tuple(ST_DTYPES)) -> np.ndarray:
  """Any bytes at all in any dtype and rank 0-3 (NaN, inf, subnormals included)."""
  dt = ST_DTYPES[draw(st.sampled_from(dtypes))]
  shape = draw(shapes)
  n = int(np.prod(shape, dtype=np.int64))
  data = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
  return np.frombuffer(data, np.uint8).view(dt).reshape(shape).copy()


tensor_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                       min_size=1, max_size=12).filter(lambda s: s != "__metadata__")


def small_values(shape, elements=st.floats(-4, 4, allow_nan=False, width=32)):
  """float64 arrays of moderate values (no overflow in any float output dtype)."""
  n = int(np.prod(shape, dtype=np.int64))
  return st.lists(elements, min_size=n, max_size=n).map(
      lambda v: np.asarray(v, np.float64).reshape(shape))


def json_values(max_leaves: int = 8):
  """Arbitrary JSON documents (what a corrupted header / index / config may hold)."""
  scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
  return st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=max_leaves)


# ----------------------------------------------------------------- model dirs


def write_model(directory: str, tensors: dict[str, np.ndarray], n_shards: int = 1,
                config: Any = None) -> None:
  """Write ``tensors`` as a HF directory: ``model.safetensors`` or ``n_shards`` shards + index.

  Built from `write_safetensors` (one file) and a hand-written index, so the
  layout is the test's choice, independent of the library's directory writer.
  """
  os.makedirs(directory, exist_ok=True)
  names = list(tensors)
  if n_shards <= 1:
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
  else:
    wm = {}
    for k in range(n_shards):
      fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
      part = {n: tensors[n] for n in names[k::n_shards]}
      write_safetensors(os.path.join(directory, fname), part)
      wm.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": wm}, f)
  if config is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(config, f)


# ----------------------------------------------------------------- properties


def snapshot(*roots: str) -> dict[str, str]:
  """sha256 of every file under each root (a file root is hashed itself)."""
  out = {}
  for root in roots:
    paths = [root] if os.path.isfile(root) else [
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    for p in paths:
      with open(p, "rb") as f:
        out[p] = hashlib.sha256(f.read()).hexdigest()
  return out


def temp_siblings(out: str) -> list[str]:
  """Temporary siblings of output path ``out`` (``.{name}.*`` in its parent)."""
  parent, name = os.path.split(os.path.abspath(out))
  return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
  """Run ``fn``: ``("ok", result)`` or ``("error", message)`` for a one-line KfuseError.

  Any other exception propagates, failing the test with its traceback.
  """
  try:
    return "ok", fn()
  except KfuseError as e:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, f"error is not one line: {msg!r}"
    assert "Traceback" not in msg, msg
    return "error", msg


class FileState:
  """The inputs' and the output's bytes before a run, to check the file properties after it."""

  def __init__(self, inputs: list[str], out: str):
    self.inputs, self.out = list(inputs), out
    self.before = snapshot(*self.inputs)
    self.existed = os.path.lexists(out)
    self.out_before = snapshot(out) if self.existed else None

  def check(self, failed: bool) -> None:
    """Inputs unchanged; no temporary sibling; after a failure the output is absent
    (or unchanged if it existed)."""
    assert snapshot(*self.inputs) == self.before, "an input file changed"
    left = temp_siblings(self.out)
    assert left == [], f"temporary output left: {left}"
    if failed and self.existed:
      assert snapshot(self.out) == self.out_before, "a failed run changed the existing output"
    elif failed:
      assert not os.path.lexists(self.out), f"a failed run left {self.out}"


def run_checked(fn: Callable[[], Any], inputs: list[str], out: str) -> tuple[str, Any]:
  """`outcome` plus the `FileState` properties."""
  state = FileState(inputs, out)
  kind, val = outcome(fn)
  state.check(failed=kind == "error")
  return kind, val
