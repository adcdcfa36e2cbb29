"""The split of the safetensors module: format / HF directory / config.json / writers share one
header writer, and the package has no cross-module private imports."""

import importlib
import ast
import glob
import os

import numpy as np
import pytest

from kfuse.io import hf_writers, safetensors_format as fmt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors():
  r = np.random.default_rng(0)
  return {"a.weight": r.standard_normal((3, 5)).astype(np.float32),
          "b.bias": r.standard_normal(7).astype(np.float16),   # (the reference reader has no bf16)
          "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
          "d.flag": np.array([True, False]),
          "e.scale": np.float64(2.5)}


def test_both_writers_produce_the_same_bytes_and_the_reference_reader_agrees(tmp_path):
  """`write_safetensors` (one file) and `PlannedHFWriter` (pwrite at planned offsets) share
  `header_bytes` / `layout_order`: same bytes, read back by the safetensors library."""
  st_np = importlib.import_module("safetensors.numpy")
  t = _tensors()
  fmt.write_safetensors(tmp_path / "one.safetensors", t)
  specs = [(k, np.shape(v), np.asarray(v).dtype) for k, v in t.items()]
  with hf_writers.PlannedHFWriter(tmp_path / "planned", specs) as w:
    for k in reversed(list(t)):          # any order
      w.add(k, t[k])
    w.finish()
  one = (tmp_path / "one.safetensors").read_bytes()
  assert (tmp_path / "planned" / "model.safetensors").read_bytes() == one
  back = st_np.load(one)
  for k, v in t.items():
    assert back[k].dtype == np.asarray(v).dtype and np.array_equal(back[k], v), k
  # header: 8-byte little-endian length, JSON padded to a multiple of 8, aligned data
  n = int.from_bytes(one[:8], "little")
  assert n % 8 == 0
  h = fmt.read_safetensors_header(tmp_path / "one.safetensors")
  assert all(e.begin % np.dtype(e.dtype).itemsize == 0 for e in h.tensors.values())


def test_header_bytes_offsets():
  head, offsets = fmt.header_bytes([("x", np.float32, (2, 3)), ("y", np.int8, (5,))])
  assert offsets == [0, 24]
  assert head[8:].decode().rstrip().endswith('"y":{"dtype":"I8","shape":[5],"data_offsets":[24,29]}}')


def test_no_module_imports_another_modules_private_names():
  """`from kfuse.x import _y` couples modules to internals; the public name is the contract.
  No exceptions."""
  found = set()
  for path in glob.glob(os.path.join(REPO, "kfuse", "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, REPO)
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kfuse"):
        # modules of one package (kfuse/merge/engine/*) share their internals
        if os.path.dirname(rel).replace(os.sep, ".") == (node.module or "").rpartition(".")[0]:
          continue
        found |= {(rel, a.name) for a in node.names if a.name.startswith("_")}
  assert not found, sorted(found)


def test_one_class_per_name_across_the_package():
  """Two public classes with one name (two `TensorInfo`s) read as one thing; io's is
  `TensorEntry`."""
  where = {}
  for path in glob.glob(os.path.join(REPO, "kfuse", "**", "*.py"), recursive=True):
    for node in ast.parse(open(path).read()).body:
      if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
        where.setdefault(node.name, []).append(os.path.relpath(path, REPO))
  dup = {k: v for k, v in where.items() if len(v) > 1}
  assert not dup, dup


def test_no_citations_of_documents_outside_the_repository():
  """Code, configs, experiments and tests cite papers / reference implementations, never an
  internal note (the spec sections of a document outside the repository)."""
  this = os.path.relpath(__file__, REPO)
  found = set()
  for top in ("kfuse", "configs", "experiments", "tests"):
    for path in glob.glob(os.path.join(REPO, top, "**", "*"), recursive=True):
      rel = os.path.relpath(path, REPO)
      if not path.endswith((".py", ".md")) or rel in (this, "tests/merge/test_methods.py"):
        continue
      if "SPEC " + "\u00a7" in open(path, encoding="utf-8").read():
        found.add(rel)
  assert not found, sorted(found)
