"""The cache / shard writers of data.sources, fusion.align and fusion.representations are atomic.

Each writes through `kfuse.io.atomic.atomic_write_file`; a writer that dies midway (after
writing part of the file) must leave the previous file byte-for-byte intact, or no file at
all, and no temporary behind.
"""

import os

import numpy as np
import pytest

from kfuse.data import sources
from kfuse.fusion import align, representations


class Killed(Exception):
  pass


def _dies_midway(f, *args, **kwargs):
  """A serializer that writes some bytes, then is interrupted."""
  f.write(b"PK\x03\x04 partial")
  raise Killed("interrupted")


CALL_SITES = {
    # name: (file name, write(path, array), the numpy function it serializes with)
    "sources.npz": ("a.npz", lambda p, a: sources._save_npz_atomic(p, {"x": a}), "savez"),
    "align.npy": ("m.npy", lambda p, a: align._save_npy_atomic(p, a), "save"),
    "representations.shard": ("shard-00000.npz",
                              lambda p, a: representations._atomic(p, lambda f: np.savez(f, x=a)),
                              "savez"),
}


def _load(path):
  if path.endswith(".npz"):
    with np.load(path) as z:
      return z["x"]
  return np.load(path)


@pytest.mark.parametrize("site", sorted(CALL_SITES))
def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, site):
  name, write, np_fn = CALL_SITES[site]
  path = str(tmp_path / "cache" / name)
  old = np.arange(6, dtype=np.int32)
  write(path, old)                                  # creates the parent directory too
  before = open(path, "rb").read()
  monkeypatch.setattr(np, np_fn, _dies_midway)
  with pytest.raises(Killed):
    write(path, np.zeros(1000, np.int32))
  monkeypatch.undo()
  assert open(path, "rb").read() == before
  np.testing.assert_array_equal(_load(path), old)
  assert os.listdir(tmp_path / "cache") == [name]


@pytest.mark.parametrize("site", sorted(CALL_SITES))
def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch, site):
  name, write, np_fn = CALL_SITES[site]
  monkeypatch.setattr(np, np_fn, _dies_midway)
  with pytest.raises(Killed):
    write(str(tmp_path / "cache" / name), np.ones(3, np.float32))
  assert os.listdir(tmp_path / "cache") == []


def test_interrupted_manifest_write_keeps_the_old_manifest(tmp_path):
  path = str(tmp_path / "reps" / representations.MANIFEST)
  representations._atomic(path, lambda f: f.write(b'{"complete": false}'))
  with pytest.raises(Killed):
    representations._atomic(path, lambda f: _dies_midway(f))
  assert open(path, "rb").read() == b'{"complete": false}'
  assert os.listdir(tmp_path / "reps") == [representations.MANIFEST]
