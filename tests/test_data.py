"""Tests for kfuse.data: offline sources, splits, batching and task suites."""

import os
import random

import jax
import numpy as np
import pytest

from kfuse.data import iterate, load, make_suite, pretrain_task, tasks
from kfuse.tree import KfuseError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("kfuse_cache"))


def test_mnist1d_generated_cached_and_deterministic(cache):
  np.random.seed(123)
  random.seed(7)
  before = (np.random.get_state()[1].copy(), random.getstate())
  ds = load("mnist1d", seed=0, cache=cache)
  # the generator seeds numpy/random globally; load must restore them
  assert np.array_equal(np.random.get_state()[1], before[0])
  assert random.getstate() == before[1]
  assert os.path.exists(os.path.join(cache, "mnist1d_seed42.npz"))
  assert not [f for f in os.listdir(cache) if f.startswith(".tmp-")]
  assert ds.shape == (40,) and ds.num_classes == 10
  assert ds.sizes() == {"train": 3600, "val": 400, "test": 1000}
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(ds.x_train.std(0), 1.0, atol=1e-3)
  again = load("mnist1d", seed=0, cache=cache)  # from the cache
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  np.testing.assert_array_equal(ds.y_val, again.y_val)


def test_val_split_depends_on_seed_only(cache):
  a = load("mnist1d", seed=0, cache=cache)
  b = load("mnist1d", seed=1, cache=cache)
  assert not np.array_equal(a.y_val, b.y_val)
  np.testing.assert_array_equal(a.y_test, b.y_test)  # fixed test split


def test_corrupt_cache_is_rebuilt(tmp_path):
  path = tmp_path / "mnist1d_seed42.npz"
  path.write_bytes(b"not an npz")
  ds = load("mnist1d", cache=str(tmp_path))
  assert ds.sizes()["test"] == 1000
  with np.load(path) as z:
    assert set(z.files) == {"x_train", "y_train", "x_test", "y_test"}


def test_digits():
  ds = load("digits", seed=0, val_fraction=0.1)
  assert ds.shape == (8, 8) and ds.num_classes == 10
  n = sum(ds.sizes().values())
  assert n == 1797
  assert set(np.unique(ds.y_test)) == set(range(10))


def test_unknown_dataset_lists_known_names():
  with pytest.raises(KfuseError, match="data.name.*digits.*mnist1d"):
    load("cifar")


def test_bad_val_fraction(cache):
  with pytest.raises(KfuseError, match="val_fraction"):
    load("mnist1d", val_fraction=1.5, cache=cache)


def test_iterate_is_a_pure_function_of_the_key():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10, dtype=np.int32)
  key = jax.random.key(0)
  a = [yb.tolist() for _, yb in iterate(key, x, y, 3, epochs=2)]
  b = [yb.tolist() for _, yb in iterate(key, x, y, 3, epochs=2)]
  c = [yb.tolist() for _, yb in iterate(jax.random.key(1), x, y, 3, epochs=2)]
  assert a == b and a != c
  assert len(a) == 6 and all(len(v) == 3 for v in a)  # remainder dropped
  assert len(set(sum(a[:3], []))) == 9  # no repeats within an epoch
  assert a[:3] != a[3:]  # reshuffled per epoch
  full = [yb.tolist() for _, yb in iterate(key, x, y, 4, drop_remainder=False)]
  assert sorted(sum(full, [])) == list(range(10))
  xb, yb = next(iterate(key, x, y, 5, shuffle=False))
  np.testing.assert_array_equal(xb[:, 0], yb)


def test_iterate_forever_and_errors():
  x, y = np.zeros((4, 2), np.float32), np.zeros((4,), np.int32)
  it = iterate(jax.random.key(0), x, y, 2, epochs=None)
  assert len([next(it) for _ in range(7)]) == 7
  with pytest.raises(KfuseError, match="batch_size"):
    next(iterate(jax.random.key(0), x, y, 5))
  with pytest.raises(KfuseError, match="rows"):
    next(iterate(jax.random.key(0), x, y[:3], 2))


def test_suite_shapes_labels_and_independence(cache):
  suite = make_suite("mnist1d", 4, seed=0, cache=cache)
  assert [t.name for t in suite] == list(tasks.SUITES["mnist1d"][1][:4])
  for t in suite:
    assert t.x_train.shape == (3600, 40) and t.x_test.shape == (1000, 40)
    assert sorted(t.label_map) == list(range(10))
    np.testing.assert_allclose(t.x_train.mean(0), 0.0, atol=1e-4)
  # tasks see different inputs and labellings of the same examples
  assert not np.allclose(suite[0].x_train, suite[1].x_train)
  assert len({t.label_map for t in suite}) == 4
  # a task does not depend on which other tasks are in the suite
  bigger = make_suite("mnist1d", 6, seed=0, cache=cache)
  np.testing.assert_array_equal(bigger[2].x_val, suite[2].x_val)
  np.testing.assert_array_equal(bigger[2].y_val, suite[2].y_val)
  other = make_suite("mnist1d", tasks=["permute"], seed=1, cache=cache)[0]
  assert other.label_map != suite[2].label_map


def test_transforms_are_the_documented_maps(cache):
  base = pretrain_task("mnist1d", cache=cache)
  rev, = make_suite("mnist1d", tasks=["reverse"], relabel=False, cache=cache)
  np.testing.assert_allclose(rev.x_train, base.x_train[:, ::-1], atol=1e-5)
  np.testing.assert_array_equal(rev.y_train, base.y_train)
  neg, = make_suite("mnist1d", tasks=["negate"], cache=cache)
  np.testing.assert_allclose(neg.x_test, -base.x_test, atol=1e-5)
  lm = np.asarray(neg.label_map)
  np.testing.assert_array_equal(neg.y_test, lm[base.y_test])


def test_digits_suite_all_tasks():
  suite = make_suite("digits", 10, seed=0)
  assert len(suite) == 10 and all(t.shape == (8, 8) for t in suite)
  tr = [t for t in suite if t.name == "transpose"][0]
  base = pretrain_task("digits")
  np.testing.assert_allclose(tr.x_val, np.swapaxes(base.x_val, 1, 2), atol=1e-5)


def test_suite_errors(cache):
  with pytest.raises(KfuseError, match="data.name"):
    make_suite("imagenet", 2)
  with pytest.raises(KfuseError, match="data.num_tasks"):
    make_suite("mnist1d", 11, cache=cache)
  with pytest.raises(KfuseError, match="data.tasks.*unknown transform"):
    make_suite("mnist1d", tasks=["rotate3d"], cache=cache)
  with pytest.raises(KfuseError, match="data.tasks.*2-D"):
    make_suite("mnist1d", tasks=["transpose"], cache=cache)
  with pytest.raises(KfuseError, match="data.num_tasks"):
    make_suite("mnist1d", 3, tasks=["reverse"], cache=cache)


def test_val_fraction_zero_is_the_papers_split(cache):
  ds = load("mnist1d", val_fraction=0.0, cache=cache)
  assert ds.sizes() == {"train": 4000, "val": 0, "test": 1000}
  assert ds.x_val.shape == (0, 40)
  with pytest.raises(KfuseError, match="data.val_fraction: expected a number"):
    load("mnist1d", val_fraction="0.1", cache=cache)


def test_pretrain_pool_is_extra_generated_data(cache):
  base = pretrain_task("mnist1d", cache=cache)
  pool = pretrain_task("mnist1d", num_samples=200, cache=cache)
  assert pool.sizes() == {"train": 180, "val": 20, "test": 1000}
  assert os.path.exists(os.path.join(cache, "mnist1d_n200_seed1000.npz"))
  np.testing.assert_array_equal(pool.x_test, base.x_test)  # same test split, same scaling
  # new signals, not a subset of the benchmark's training data
  assert not any(np.allclose(pool.x_train[0], x, atol=1e-4) for x in base.x_train)
  again = pretrain_task("mnist1d", num_samples=200, cache=cache)
  np.testing.assert_array_equal(pool.x_train, again.x_train)
  with pytest.raises(KfuseError, match="data.pretrain_samples"):
    pretrain_task("digits", num_samples=200)
  with pytest.raises(KfuseError, match="data.pretrain_samples"):
    pretrain_task("mnist1d", num_samples=5, cache=cache)
