"""Tests for kfuse.io.safetensors_io and kfuse.io.atomic."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kfuse.io import (
    HFModel,
    HFWriter,
    atomic_output_dir,
    atomic_write_text,
    copy_aux_files,
    is_hf_dir,
    load_params,
    open_hf_dir,
    read_hf_dir,
    write_hf_dir,
    write_safetensors,
)
from kfuse.tree import KfuseError
from tests.peers.peer import require

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
      "model.layers.0.mlp.up_proj.weight": rng.standard_normal((8, 12)).astype(BF16),
      "model.layers.0.input_layernorm.weight": rng.standard_normal(8).astype(np.float16),
      "model.layers.0.attn.rotary.inv_freq": rng.standard_normal(4).astype(np.float32),
      "lm_head.weight": rng.standard_normal((16, 8)).astype(np.float32),
  }


def _same(a: dict, b: dict) -> None:
  assert list(a) == list(b) or set(a) == set(b)
  for k in a:
    assert np.asarray(b[k]).dtype == np.asarray(a[k]).dtype, k
    assert np.asarray(b[k]).shape == np.asarray(a[k]).shape, k
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)


def _sha(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _raw_file(path, header: dict, data: bytes, hlen: int | None = None) -> None:
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw) if hlen is None else hlen))
    f.write(raw)
    f.write(data)


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_single_file_round_trip(tmp_path, dtype):
  t = {k: v.astype(dtype) for k, v in _tensors().items()}
  t["step"] = np.arange(3, dtype=np.int64)
  t["mask"] = np.array([True, False])
  t["scalar"] = np.array(2.5, dtype)
  cfg = {"model_type": "llama", "hidden_size": 8}
  out = tmp_path / "m"
  files = write_hf_dir(out, t, config=cfg)
  assert sorted(os.path.basename(f) for f in files) == ["config.json", "model.safetensors"]
  with open_hf_dir(out) as m:
    assert isinstance(m, HFModel) and m.config == cfg
    assert m.metadata == {"format": "pt"}
    assert set(m.names) == set(t) and len(m) == len(t)
    for k, v in t.items():
      assert m.shape(k) == v.shape and m.dtype(k) == v.dtype and m.nbytes(k) == v.nbytes
      assert m.shard_of(k) == "model.safetensors" and k in m
    assert "nope" not in m
  _same(t, read_hf_dir(out))
  # the same file also opens directly
  _same(t, read_hf_dir(out / "model.safetensors"))


def test_names_are_header_order_by_offset(tmp_path):
  t = {f"w{i}": np.full((2,), i, np.float32) for i in (3, 1, 2, 0)}
  write_safetensors(tmp_path / "x.safetensors", t)
  assert open_hf_dir(tmp_path / "x.safetensors").names == ["w3", "w1", "w2", "w0"]
  assert open_hf_dir(tmp_path).names == ["w3", "w1", "w2", "w0"]


def test_sharded_round_trip_and_index(tmp_path):
  t = _tensors()
  out = tmp_path / "sharded"
  files = write_hf_dir(out, t, config={"a": 1}, max_shard_bytes=600)
  names = sorted(os.listdir(out))
  shards = [n for n in names if n.endswith(".safetensors")]
  assert len(shards) >= 3
  assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                    for k in range(1, len(shards) + 1)]
  assert "model.safetensors.index.json" in names and "config.json" in names
  assert not [n for n in names if n.startswith(".")]
  assert sorted(os.path.basename(f) for f in files) == names
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in t.values())
  assert list(index["weight_map"]) == list(t)
  with open_hf_dir(out) as m:
    assert m.names == list(t)  # index weight_map order
    for k in t:
      assert m.shard_of(k) == index["weight_map"][k]
    for s in m.shards:
      size = sum(m.nbytes(k) for k in m.names if m.shard_of(k) == s)
      assert size <= 600 or len([k for k in m.names if m.shard_of(k) == s]) == 1
  _same(t, read_hf_dir(out))


def test_writer_casts_floats_only_and_sets_torch_dtype(tmp_path):
  t = {"w": np.linspace(-1, 1, 10, dtype=np.float32), "ids": np.arange(4, dtype=np.int32),
       "j": jnp.ones((2, 2), jnp.float16)}
  write_hf_dir(tmp_path / "o", t, config={"torch_dtype": "float32"}, dtype="bfloat16")
  with open_hf_dir(tmp_path / "o") as m:
    assert m.dtype("w") == BF16 and m.dtype("j") == BF16 and m.dtype("ids") == np.int32
    assert m.config["torch_dtype"] == "bfloat16"
    np.testing.assert_array_equal(m.get("w"), t["w"].astype(BF16))
    np.testing.assert_allclose(m.get("w", dtype="float32"), t["w"], atol=1e-2)
    assert m.get("w", dtype=np.float32).dtype == np.float32


def test_writer_streams_shards_and_rejects_duplicates(tmp_path):
  out = tmp_path / "w"
  w = HFWriter(out, max_shard_bytes=64)
  w.add("a", np.zeros(16, np.float32))  # 64 bytes: fills the shard
  assert not [n for n in os.listdir(out) if "shard" in n]
  w.add("b", np.zeros(4, np.float32))  # would overflow: shard 1 is flushed
  assert len([n for n in os.listdir(out) if "shard" in n]) == 1
  with pytest.raises(KfuseError, match="duplicate tensor name 'a'"):
    w.add("a", np.zeros(1, np.float32))
  w.add("c", np.zeros(100, np.float32))  # bigger than a shard: gets its own
  files = w.finish(extra_files={"README.md": "# merged\n"})
  assert sorted(os.listdir(out)) == [
      "README.md", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
      "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
  assert len(files) == 5
  with pytest.raises(KfuseError):
    w.add("d", np.zeros(1))
  with pytest.raises(KfuseError, match="already holds weights"):
    HFWriter(out)


def test_writer_context_aborts_on_error(tmp_path):
  out = tmp_path / "w"
  with pytest.raises(RuntimeError):
    with HFWriter(out, max_shard_bytes=8) as w:
      w.add("a", np.zeros(4, np.float32))
      w.add("b", np.zeros(4, np.float32))
      raise RuntimeError("boom")
  assert os.listdir(out) == []


def test_get_returns_copies_and_never_touches_file(tmp_path):
  t = _tensors()
  write_hf_dir(tmp_path / "m", t)
  f = tmp_path / "m" / "model.safetensors"
  before = _sha(f)
  with open_hf_dir(tmp_path / "m") as m:
    k = "lm_head.weight"
    view = m.view(k)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
      view[0, 0] = 1.0
    a = m.get(k)
    assert a.flags.writeable and type(a) is np.ndarray
    a[...] = 0
    np.testing.assert_array_equal(m.get(k), t[k])
    b = m.get(k, dtype="bf16")
    b[...] = 0
  assert _sha(f) == before


def test_lazy_load_params_hf(tmp_path):
  t = _tensors()
  write_hf_dir(tmp_path / "m", t, max_shard_bytes=700)
  params, kind = load_params(tmp_path / "m")
  assert kind == "hf" and len(params) == len(t) and list(params) == list(t)
  np.testing.assert_array_equal(params["lm_head.weight"], t["lm_head.weight"])
  with pytest.raises(KeyError):
    params["missing"]
  assert is_hf_dir(tmp_path / "m") and not is_hf_dir(tmp_path)


# ----------------------------------------------------------------- interop


def test_official_numpy_loads_ours_and_we_load_theirs(tmp_path):
  st_np = importlib.import_module("safetensors.numpy")
  t = {k: v for k, v in _tensors().items() if v.dtype != BF16}
  t["i8"] = np.arange(-3, 3, dtype=np.int8)
  t["u8"] = np.arange(6, dtype=np.uint8)
  t["f64"] = np.ones((2, 2))
  t["b"] = np.array([True, False, True])
  t["i16"] = np.arange(5, dtype=np.int16)
  write_hf_dir(tmp_path / "ours", t)
  _same(t, st_np.load_file(str(tmp_path / "ours" / "model.safetensors")))
  st_np.save_file(t, str(tmp_path / "theirs.safetensors"), metadata={"format": "np"})
  _same(t, read_hf_dir(tmp_path / "theirs.safetensors"))


def test_official_torch_interop_with_bf16(tmp_path):
  torch = require("torch")
  st_torch = importlib.import_module("safetensors.torch")
  t = _tensors()
  t["ids"] = np.arange(7, dtype=np.int64)
  write_hf_dir(tmp_path / "ours", t, max_shard_bytes=700)
  loaded = {}
  for n in sorted(os.listdir(tmp_path / "ours")):
    if n.endswith(".safetensors"):
      loaded.update(st_torch.load_file(str(tmp_path / "ours" / n)))
  assert set(loaded) == set(t)
  k = "model.layers.0.mlp.up_proj.weight"
  assert loaded[k].dtype == torch.bfloat16
  np.testing.assert_array_equal(loaded[k].view(torch.int16).numpy(), t[k].view(np.int16))
  for name, v in t.items():
    np.testing.assert_array_equal(loaded[name].float().numpy(), v.astype(np.float32))
  # and the other way round
  tt = {"bf": torch.randn(3, 5).to(torch.bfloat16), "f": torch.randn(4),
        "h": torch.randn(2, 2).half(), "i": torch.arange(5, dtype=torch.int32)}
  st_torch.save_file(tt, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
  got = read_hf_dir(tmp_path / "t.safetensors")
  assert got["bf"].dtype == BF16
  np.testing.assert_array_equal(got["bf"].view(np.int16), tt["bf"].view(torch.int16).numpy())
  for name in ("f", "h", "i"):
    np.testing.assert_array_equal(got[name], tt[name].numpy())


# ----------------------------------------------------------------- corrupt files


def _valid_file(tmp_path) -> str:
  p = str(tmp_path / "v.safetensors")
  write_safetensors(p, {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)})
  return p


def test_truncated_file(tmp_path):
  p = _valid_file(tmp_path)
  with open(p, "r+b") as f:
    f.truncate(os.path.getsize(p) - 5)
  with pytest.raises(KfuseError, match=r"v\.safetensors.*tensor '.'.*truncated"):
    open_hf_dir(p)


def test_corrupted_header_json(tmp_path):
  p = _valid_file(tmp_path)
  with open(p, "r+b") as f:
    f.seek(8)
    f.write(b"{not json")
  with pytest.raises(KfuseError, match=r"v\.safetensors: invalid JSON header"):
    open_hf_dir(p)


def test_huge_header_length(tmp_path):
  p = _valid_file(tmp_path)
  with open(p, "r+b") as f:
    f.write(struct.pack("<Q", 1 << 60))
  with pytest.raises(KfuseError, match="header length .* exceeds file size"):
    open_hf_dir(p)


def test_tiny_file(tmp_path):
  p = tmp_path / "tiny.safetensors"
  p.write_bytes(b"abc")
  with pytest.raises(KfuseError, match="too small"):
    open_hf_dir(p)


@pytest.mark.parametrize("entry,data,msg", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlapping"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 8, "end beyond"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "invalid data_offsets"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "must have dtype"),
])
def test_bad_header_entries(tmp_path, entry, data, msg):
  p = tmp_path / "bad.safetensors"
  _raw_file(p, entry, b"\0" * data)
  with pytest.raises(KfuseError, match=msg) as ei:
    open_hf_dir(p)
  assert str(ei.value).startswith(f"{p}: ") and "'a'" in str(ei.value)
  assert "\n" not in str(ei.value)


# ----------------------------------------------------------------- directory errors


def test_missing_and_empty_directories(tmp_path):
  with pytest.raises(KfuseError, match="does not exist"):
    open_hf_dir(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(KfuseError, match="no model.safetensors"):
    open_hf_dir(tmp_path / "empty")


def test_index_errors(tmp_path):
  out = tmp_path / "s"
  write_hf_dir(out, _tensors(), max_shard_bytes=600)
  index_path = out / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  # a key the index maps to a shard that lacks it
  first = next(iter(index["weight_map"].values()))
  bad = dict(index, weight_map=dict(index["weight_map"], ghost=first))
  index_path.write_text(json.dumps(bad))
  with pytest.raises(KfuseError, match=f"key 'ghost' is mapped to '{first}'"):
    open_hf_dir(out)
  # a shard file that is gone
  index_path.write_text(json.dumps(index))
  last = sorted(set(index["weight_map"].values()))[-1]
  key = next(k for k, v in index["weight_map"].items() if v == last)
  os.remove(out / last)
  with pytest.raises(KfuseError, match=f"shard file '{last}' \\(holding '{key}'\\) not found"):
    open_hf_dir(out)
  index_path.write_text("{oops")
  with pytest.raises(KfuseError, match="invalid JSON"):
    open_hf_dir(out)


def test_unknown_key(tmp_path):
  write_hf_dir(tmp_path / "m", _tensors())
  with open_hf_dir(tmp_path / "m") as m:
    with pytest.raises(KfuseError, match="no tensor named 'lm_head.weigth'.*lm_head.weight"):
      m.get("lm_head.weigth")
    with pytest.raises(KfuseError):
      m.shape("x")


def test_bad_tensor_inputs(tmp_path):
  with pytest.raises(KfuseError, match="'o'.*cannot be stored"):
    write_hf_dir(tmp_path / "m", {"o": np.array(["x"], dtype=object)})
  with pytest.raises(KfuseError, match="__metadata__"):
    write_hf_dir(tmp_path / "m", {"__metadata__": np.zeros(1)})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------- atomic output


def test_existing_output_refused_and_overwrite(tmp_path):
  out = tmp_path / "m"
  write_hf_dir(out, {"a": np.ones(2, np.float32)})
  with pytest.raises(KfuseError, match=r"output directory .*m exists; pass overwrite=True"):
    write_hf_dir(out, {"a": np.zeros(2, np.float32)})
  np.testing.assert_array_equal(read_hf_dir(out)["a"], np.ones(2))
  write_hf_dir(out, {"b": np.zeros(3, np.float32)}, overwrite=True)
  assert list(read_hf_dir(out)) == ["b"]
  assert os.listdir(tmp_path) == ["m"]


def test_exception_leaves_no_output_and_no_temp(tmp_path):
  with pytest.raises(RuntimeError):
    with atomic_output_dir(tmp_path / "o") as d:
      (open(os.path.join(d, "x"), "w")).close()
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == []


def test_exception_during_overwrite_keeps_old(tmp_path):
  out = tmp_path / "o"
  write_hf_dir(out, {"a": np.ones(2, np.float32)})
  before = _sha(out / "model.safetensors")
  with pytest.raises(RuntimeError):
    with atomic_output_dir(out, overwrite=True) as d:
      assert os.path.basename(d).startswith(".o.tmp-")
      assert os.path.dirname(d) == str(tmp_path)
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == ["o"] and _sha(out / "model.safetensors") == before


def test_atomic_write_text(tmp_path):
  p = tmp_path / "c.json"
  atomic_write_text(p, "one")
  atomic_write_text(p, "two")
  assert p.read_text() == "two" and os.listdir(tmp_path) == ["c.json"]
  with pytest.raises(KfuseError):
    atomic_write_text(tmp_path / "no" / "x", "y")


def test_copy_aux_files(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  write_hf_dir(src, {"a": np.ones(2, np.float32)}, config={"src": True})
  for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "generation_config.json", "merges.txt", "vocab.txt"):
    (src / n).write_text(n)
  (src / "pytorch_model.bin").write_text("weights")
  dst.mkdir()
  (dst / "config.json").write_text('{"dst": true}')
  copied = copy_aux_files(src, dst)
  assert "config.json" not in copied and "model.safetensors" not in copied
  assert sorted(os.listdir(dst)) == sorted(
      ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
       "tokenizer.model", "generation_config.json", "merges.txt", "vocab.txt"])
  assert json.loads((dst / "config.json").read_text()) == {"dst": True}
  assert copy_aux_files(src, dst, overwrite=True).count("config.json") == 1
  assert json.loads((dst / "config.json").read_text()) == {"src": True}
