"""The 20-task image suite: shapes, labels, determinism, balance, disjoint pretraining, label semantics."""

import hashlib

import numpy as np
import pytest

from kfuse.data import image_tasks as it
from kfuse.tree import KfuseError

SIZES = (60, 30, 40)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("image_task_cache"))


@pytest.fixture(scope="module")
def suite(cache):
  return {n: it.load_task(n, sizes=SIZES, cache=cache) for n in it.TASK_NAMES}


def _hashes(x):
  q = np.round(np.asarray(x) * 255).astype(np.uint8)
  return {hashlib.sha256(row.tobytes()).hexdigest() for row in q}


def test_twenty_tasks_and_protocols():
  assert len(it.TASK_NAMES) == 20 and len(set(it.TASK_NAMES)) == 20
  assert it.PROTOCOLS[8] == it.TASK_NAMES[:8] and len(it.PROTOCOLS[14]) == 14
  assert len({it.SPECS[n].source for n in it.PROTOCOLS[8]}) >= 7   # the 8-task set spans the kinds
  assert all(2 <= it.SPECS[n].num_classes <= 10 and it.SPECS[n].why for n in it.TASK_NAMES)
  with pytest.raises(KfuseError, match=r"unknown image task 'shapez' \(did you mean 'shapes'\?\)"):
    it.load_task("shapez")
  with pytest.raises(KfuseError, match="data.num_tasks"):
    it.protocol(21)
  with pytest.raises(KfuseError, match="data.sizes"):
    it.load_task("shapes", sizes=(10, 0, 5))


def test_shapes_ranges_and_balance(suite):
  for name, ds in suite.items():
    k = ds.num_classes
    for split in ("train", "val", "test"):
      x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
      assert x.shape == (len(y), 16, 16) and x.dtype == np.float32, (name, split)
      assert y.dtype == np.int32 and y.min() >= 0 and y.max() < k, (name, split)
      assert np.isfinite(x).all() and x.min() >= -1e-6 and x.max() <= 1 + 1e-6, (name, split)
      counts = np.bincount(y, minlength=k)
      if it.SPECS[name].make is not None:   # generated: exactly balanced
        assert counts.max() - counts.min() <= 1, (name, split, counts)
        assert len(y) == SIZES[("train", "val", "test").index(split)]
      else:                                 # sklearn digits / MNIST-1D: every class well present
        assert counts.min() >= 0.5 * len(y) / k, (name, split, counts)
    assert x.std() > 0.05, name  # not blank


def test_deterministic_across_calls_and_caches(tmp_path):
  for name in ("letters_sans", "texture", "cellular_automata", "sk_digits", "mnist1d_plot"):
    a = it.load_task(name, sizes=(20, 10, 10), cache=str(tmp_path / "a"))
    b = it.load_task(name, sizes=(20, 10, 10), cache=str(tmp_path / "b"))   # regenerated
    c = it.load_task(name, sizes=(20, 10, 10), cache=str(tmp_path / "a"))   # from the cache
    for split in ("x_train", "y_train", "x_val", "x_test", "y_test"):
      np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
      np.testing.assert_array_equal(getattr(a, split), getattr(c, split))
  x0, _ = it.generate(it.SPECS["shapes"], 20, 0, 0)
  x1, _ = it.generate(it.SPECS["shapes"], 20, 1, 0)
  assert not np.array_equal(x0, x1)


def test_splits_and_pretraining_are_disjoint(suite, cache):
  pre = it.pretrain_mixture(per_domain=40, cache=cache)
  assert pre.num_classes == len(it.pretrain_domains()) == 29
  assert np.bincount(np.concatenate([pre.y_train, pre.y_val])).min() > 0
  pre_h = _hashes(np.concatenate([pre.x_train, pre.x_val]))
  assert len(pre_h) == len(pre.y_train) + len(pre.y_val)
  for name, ds in suite.items():
    task_h = _hashes(np.concatenate([ds.x_train, ds.x_val, ds.x_test]))
    assert not pre_h & task_h, name
    assert not _hashes(ds.x_train) & _hashes(ds.x_test), name


def test_pretraining_mnist1d_uses_another_generator_seed(cache):
  # the mixture's MNIST-1D signals are not the benchmark's (seed 42) signals
  from kfuse.data import sources
  raw, _ = sources.load_raw("mnist1d", cache=cache)
  sig, _ = sources.mnist1d_pool(40, it.MNIST1D_PRETRAIN_SEED, cache=cache)
  bench = {hashlib.sha256(np.round(r, 4).tobytes()).hexdigest() for r in
           np.concatenate([raw["x_train"], raw["x_test"]])}
  assert not bench & {hashlib.sha256(np.round(r, 4).tobytes()).hexdigest() for r in sig}


def test_cellular_automata_follow_their_rule():
  """Each row is the previous row under the class's elementary CA rule (cells 1..14 see both neighbours)."""
  x, y = it.generate(it.SPECS["cellular_automata"], 80, 3, 0)
  for img, c in zip(x.astype(int), y):
    rule = it.RULES[c]
    for t in range(15):
      l, m, r = img[t, :-2], img[t, 1:-1], img[t, 2:]
      want = (rule >> (4 * l + 2 * m + r)) & 1
      np.testing.assert_array_equal(img[t + 1, 1:-1], want)


def test_grating_orientation_labels_match_the_spectrum():
  """The 2-D FFT peak's angle (independent of the generator) is the class's orientation, +-10 deg."""
  x, y = it.generate(it.SPECS["grating_orientation"], 64, 5, 0)
  f = np.fft.fftfreq(128)
  fx, fy = np.meshgrid(f, f)
  for img, c in zip(x, y):
    p = np.abs(np.fft.fft2(img - img.mean(), s=(128, 128))) ** 2   # zero-padded: fine angles
    i = np.argmax(p)
    ang = np.rad2deg(np.arctan2(fy.flat[i], fx.flat[i])) % 180
    diff = abs((ang - 22.5 * c + 90) % 180 - 90)
    assert diff <= 10, (c, ang)


def test_symmetry_labels():
  x, y = it.generate(it.SPECS["symmetry"], 80, 2, 0)
  ops = {1: lambda a: a[:, ::-1], 2: lambda a: a[::-1], 3: lambda a: a[::-1, ::-1]}
  for img, c in zip(x, y):
    errs = {k: np.abs(img - op(img)).mean() for k, op in ops.items()}
    if c == 0:
      assert min(errs.values()) > 0.1
    else:
      assert errs[c] == min(errs.values()) and errs[c] < 0.1


def test_describe_lists_every_task():
  table = it.describe()
  assert all(f"`{n}`" in table for n in it.TASK_NAMES)


def test_pretraining_can_hold_out_whole_sources(cache):
  held = ["letters_sans", "texture"]
  doms = it.pretrain_domains(held)
  assert len(doms) == 27 and "source:texture" not in doms and "source:shapes" in doms
  pre = it.pretrain_mixture(per_domain=20, cache=cache, exclude=held)
  assert pre.num_classes == 27
  full = it.pretrain_mixture(per_domain=20, cache=cache)
  # the held-out sources' draws are exactly the ones missing from the mixture
  drop = set()
  for n in held:
    x, _ = it.generate(it.SPECS[n], 20, 0, it.PRETRAIN_STREAM)
    drop |= _hashes(x)
  all_full = _hashes(np.concatenate([full.x_train, full.x_val]))
  assert _hashes(np.concatenate([pre.x_train, pre.x_val])) == all_full - drop
  with pytest.raises(KfuseError, match="unknown image task 'textures'"):
    it.pretrain_domains(["textures"])
