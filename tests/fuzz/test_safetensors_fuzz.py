"""Fuzzing the safetensors reader: headers, truncations, HF directories with
missing / extra / renamed shards, tensors of every dtype and rank 0-3.

Reference for a successful read: the bytes the test itself put in the file
(round trips), or the file's bytes sliced at the offsets of its JSON header as
the test decodes it (corrupted files).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kfuse.io import open_hf_dir, write_safetensors
from tests.fuzz.helpers import (ST_DTYPES, fast, json_values, outcome, raw_tensor, slow, snapshot,
                                tally, tensor_names, write_model)

models = st.dictionaries(tensor_names, raw_tensor(), min_size=1, max_size=4)


def _read_all(path: str) -> dict[str, np.ndarray]:
  with open_hf_dir(path) as m:
    return {n: m.get(n) for n in m.names}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------- round trip


def _check_round_trip(tmp_path, tensors):
  p = str(tmp_path / "m.safetensors")
  if os.path.exists(p):
    os.remove(p)
  write_safetensors(p, tensors)
  got = _read_all(p)
  assert set(got) == set(tensors)
  for n, a in tensors.items():
    assert _same(got[n], a), n


@fast(25)
@given(tensors=models)
def test_round_trip_every_dtype_and_rank(tmp_path, tensors):
  _check_round_trip(tmp_path, tensors)


@pytest.mark.slow
@slow(500)
@given(tensors=models)
def test_round_trip_every_dtype_and_rank_slow(tmp_path, tensors):
  _check_round_trip(tmp_path, tensors)


# ----------------------------------------------------------------- corrupted files


def _file_bytes(tensors) -> bytes:
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "x.safetensors")
    write_safetensors(p, tensors)
    with open(p, "rb") as f:
      return f.read()


@st.composite
def corrupted(draw) -> bytes:
  """A valid file, then one corruption: truncation, header length, header bytes,
  a whole replaced header, or one replaced field of one entry."""
  data = _file_bytes(draw(models))
  (n,) = struct.unpack("<Q", data[:8])
  how = draw(st.sampled_from(["truncate", "length", "bytes", "header", "field", "extend",
                              "raw"]))
  if how == "raw":   # any bytes as the header, hostile-but-valid JSON included
    raw = draw(st.binary(max_size=64) | st.sampled_from(
        [b"[" * 5000 + b"]" * 5000, b"9" * 5000, b'{"a": ' * 2000 + b"1" + b"}" * 2000]))
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
  if how == "truncate":
    return data[:draw(st.integers(0, len(data) - 1))]
  if how == "length":
    return struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, n + 16))) + data[8:]
  if how == "bytes":
    out = bytearray(data)
    for i, b in draw(st.lists(st.tuples(st.integers(0, 8 + n - 1), st.integers(0, 255)),
                              min_size=1, max_size=4)):
      out[i] = b
    return bytes(out)
  if how == "extend":
    return data + draw(st.binary(min_size=1, max_size=16))
  header = json.loads(data[8:8 + n])
  if how == "header":
    header = draw(json_values())
  else:
    name = draw(st.sampled_from(sorted(header)))
    if isinstance(header[name], dict):
      field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
      header[name][field] = draw(json_values(4) | st.sampled_from(list(ST_DTYPES)))
    else:
      header[name] = draw(json_values(4))
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _check_corrupted(tmp_path, data):
  p = str(tmp_path / "c.safetensors")
  with open(p, "wb") as f:
    f.write(data)
  before = snapshot(p)
  kind, got = outcome(lambda: _read_all(p))
  tally(kind)
  assert snapshot(p) == before
  if kind == "ok":   # every tensor is exactly the bytes its header entry points at
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    assert set(got) == set(header)
    for name, a in got.items():
      e = header[name]
      b, end = e["data_offsets"]
      assert a.dtype == ST_DTYPES[e["dtype"]] and list(a.shape) == e["shape"]
      assert a.tobytes() == data[8 + n + b:8 + n + end]


@fast(100)
@given(data=corrupted())
def test_corrupted_file_reads_exactly_or_fails_in_one_line(tmp_path, data):
  _check_corrupted(tmp_path, data)


@pytest.mark.slow
@slow(3000)
@given(data=corrupted())
def test_corrupted_file_reads_exactly_or_fails_in_one_line_slow(tmp_path, data):
  _check_corrupted(tmp_path, data)


# ----------------------------------------------------------------- HF directories

MUTATIONS = ("none", "delete_shard", "rename_shard", "extra_shard_new", "extra_shard_dup",
             "drop_index", "drop_index_entry", "index_entry_missing_file", "truncate_shard",
             "index_json", "config_json", "empty_dir", "unindexed_dup")


@st.composite
def hf_dirs(draw, how):
  names = draw(st.lists(st.sampled_from(["a", "b.weight", "model.layers.0.w",
                                         "model.layers.1.w", "lm_head.weight", "é"]),
                        min_size=1, max_size=5, unique=True))
  tensors = {n: draw(raw_tensor()) for n in names}
  n_shards = draw(st.integers(1, min(3, len(names))))
  return tensors, n_shards, how, draw(st.randoms(use_true_random=False))


def _shards(d):
  return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def _mutate(d, how, rnd, extra):
  """Apply one user mistake to model dir ``d``; return (tensors added, must it fail)."""
  idx = os.path.join(d, "model.safetensors.index.json")
  sharded = os.path.exists(idx)
  shard = rnd.choice(_shards(d))
  if how == "delete_shard":
    os.remove(os.path.join(d, shard))
    return {}, sharded
  if how == "rename_shard":
    os.rename(os.path.join(d, shard), os.path.join(d, "renamed-" + shard))
    return {}, sharded
  if how in ("extra_shard_new", "extra_shard_dup", "unindexed_dup"):
    if how == "unindexed_dup":   # a plain folder of shards: every file is read
      if sharded:
        os.remove(idx)
      else:
        os.rename(os.path.join(d, shard), os.path.join(d, "model-00001-of-00001.safetensors"))
    with open_hf_dir(d) as m:
      name = "zz.extra" if how == "extra_shard_new" else rnd.choice(m.names)
    write_safetensors(os.path.join(d, "zz-extra.safetensors"), {name: extra})
    # Indexed or single-file dirs never read an unlisted file; a plain folder
    # of shards must refuse a tensor present twice.
    return {name: extra}, how == "unindexed_dup"
  if how == "drop_index" and sharded:
    os.remove(idx)
    return {}, False
  if how == "drop_index_entry" and sharded:
    with open(idx) as f:
      index = json.load(f)
    index["weight_map"].pop(rnd.choice(sorted(index["weight_map"])))
    with open(idx, "w") as f:
      json.dump(index, f)
    return {}, False
  if how == "index_entry_missing_file" and sharded:
    with open(idx) as f:
      index = json.load(f)
    index["weight_map"]["ghost"] = "model-99999-of-99999.safetensors"
    with open(idx, "w") as f:
      json.dump(index, f)
    return {}, True
  if how == "truncate_shard":
    p = os.path.join(d, shard)
    size = os.path.getsize(p)
    cut = rnd.randrange(0, size)
    with open(p, "r+b") as f:
      f.truncate(cut)
    return {}, False   # cutting only a zero-size tensor's (absent) data may still read
  if how == "index_json" and sharded:
    with open(idx, "w") as f:
      f.write(rnd.choice(["", "{", "[]", '{"weight_map": []}', '{"weight_map": {"a": 1}}',
                          "[" * 5000 + "]" * 5000, '{"weight_map": {"a": "../x.safetensors"}}']))
    return {}, True
  if how == "config_json":
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(rnd.choice(["", "nul", "[1]", '"x"', "1" * 5000, '{"a": ' * 3000 + "1" + "}" * 3000]))
    return {}, True
  if how == "empty_dir":
    for f in os.listdir(d):
      os.remove(os.path.join(d, f))
    return {}, True
  return {}, False


def _check_hf_dir(tmp_path, case):
  tensors, n_shards, how, rnd = case
  d = str(tmp_path / "model")
  shutil.rmtree(d, ignore_errors=True)
  write_model(d, tensors, n_shards, config={"architectures": ["X"]})
  extra = np.arange(3, dtype=np.float32)
  added, must_fail = _mutate(d, how, rnd, extra)
  before = snapshot(d)
  kind, got = outcome(lambda: _read_all(d))
  tally(f"{how}: {kind}")
  assert snapshot(d) == before
  if how == "none":
    assert kind == "ok"
  if must_fail:
    assert kind == "error", (how, sorted(got))
  if kind == "ok":   # whatever is read is exactly what was written under that name
    for name, a in got.items():
      ref = tensors[name] if name in tensors and name not in added else added.get(name)
      if name in tensors and name in added:   # duplicate: either copy, but one of them
        assert _same(a, tensors[name]) or _same(a, added[name]), name
      else:
        assert ref is not None and _same(a, ref), name


@pytest.mark.parametrize("how", MUTATIONS)
def test_hf_dir_mutations_read_exactly_or_fail_in_one_line(tmp_path, how):
  fast(6)(given(case=hf_dirs(how))(lambda case: _check_hf_dir(tmp_path, case)))()


@pytest.mark.slow
@slow(1500)
@given(case=st.sampled_from(MUTATIONS).flatmap(hf_dirs))
def test_hf_dir_mutations_read_exactly_or_fail_in_one_line_slow(tmp_path, case):
  _check_hf_dir(tmp_path, case)


# ----------------------------------------------------------------- regressions (bugs found)


def _with_header(path, raw: bytes, data: bytes = b"\0" * 4) -> str:
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data)
  return str(path)


@pytest.mark.parametrize("raw,match", [
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON header: maximum recursion depth"),
    (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
     "invalid JSON header: Exceeds the limit"),
], ids=["deep_nesting", "huge_int"])
def test_header_json_deep_or_huge_int_is_one_line_error(tmp_path, raw, match):
  """json.loads raises RecursionError / a plain ValueError on these; they escaped as tracebacks."""
  p = _with_header(tmp_path / "x.safetensors", raw)
  kind, msg = outcome(lambda: open_hf_dir(p))
  assert kind == "error" and match in msg and "x.safetensors" in msg


@pytest.mark.parametrize("fname,text,match", [
    ("model.safetensors.index.json", "[" * 100_000, "invalid JSON in safetensors index"),
    ("model.safetensors.index.json", '{"weight_map": {"a": ' + "1" * 5000 + "}}",
     "invalid JSON in safetensors index"),
    ("config.json", "[" * 100_000, "invalid JSON in model config"),
    ("config.json", "[1, 2]", "model config must be a JSON object, got list"),
    ("config.json", '"llama"', "model config must be a JSON object, got str"),
], ids=["index_deep", "index_huge_int", "config_deep", "config_list", "config_str"])
def test_index_and_config_json_errors_are_one_line(tmp_path, fname, text, match):
  d = tmp_path / "m"
  write_model(str(d), {"a": np.ones(2, np.float32), "b": np.zeros(3, np.float16)}, n_shards=2)
  (d / fname).write_text(text)
  kind, msg = outcome(lambda: open_hf_dir(str(d)))
  assert kind == "error" and match in msg and fname in msg, msg
