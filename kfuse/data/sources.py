"""Offline classification datasets, deterministic splits and a batch iterator.

Nothing here touches the network:

* ``mnist1d``: the MNIST-1D benchmark (Greydanus, 2020) regenerated locally
  with the `mnist1d` package's procedural generator
  (``mnist1d.data.make_dataset`` with its default arguments and a fixed seed;
  its download path is never used). 5,000 signals of length 40, 10 classes,
  with the package's own 4,000 / 1,000 train / test split. The generated
  arrays are cached as ``.npz`` under ``$KFUSE_CACHE`` (default
  ``~/.cache/kfuse``), written atomically.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images,
  64 features, 10 classes); the test split is carved out deterministically.

`load` returns a `Dataset` with train / val / test arrays (float32 inputs,
int32 labels), features standardised with train-split statistics.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Callable, Iterator

import jax
import numpy as np

from kfuse.io.atomic import atomic_write_file
from kfuse.tree import KfuseError

__all__ = [
    "Dataset",
    "KNOWN_DATASETS",
    "cache_dir",
    "load",
    "load_raw",
    "mnist1d_pool",
    "split",
    "standardize",
    "iterate",
    "num_batches",
]

MNIST1D_SEED = 42  # the generator's documented default seed


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train / val / test arrays of one classification problem.

  Attributes:
    name: dataset (or task) name.
    x_train, y_train, x_val, y_val, x_test, y_test: inputs ``[n, *shape]``
      (float32) and integer labels ``[n]`` (int32).
    num_classes: number of classes.
    shape: per-example input shape, e.g. ``(40,)`` or ``(8, 8)``.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  shape: tuple

  def sizes(self) -> dict[str, int]:
    return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


# ------------------------------------------------------------------ cache


def cache_dir(path: str | None = None) -> str:
  """The array cache: ``path``, else ``$KFUSE_CACHE``, else ``~/.cache/kfuse``."""
  path = path or os.environ.get("KFUSE_CACHE") or os.path.join("~", ".cache", "kfuse")
  return os.path.abspath(os.path.expanduser(path))


def _save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Write ``arrays`` to ``path`` as ``.npz``, atomically (`kfuse.io.atomic.atomic_write_file`)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_file(path, lambda f: np.savez(f, **arrays))


def _cached(path: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError):
      pass  # unreadable cache entry: rebuild it below
  arrays = build()
  _save_npz_atomic(path, arrays)
  return arrays


# ------------------------------------------------------------------ raw sources


def _generate_mnist1d(num_samples: int | None = None, seed: int = MNIST1D_SEED) -> dict[str, np.ndarray]:
  """Run the MNIST-1D generator (default args, fixed seed), restoring global RNGs.

  ``num_samples`` overrides the generator's 5,000 (split 80 / 20 as usual).
  """
  try:
    from mnist1d.data import get_dataset_args, make_dataset
  except ImportError as e:  # pragma: no cover - dependency missing
    raise KfuseError("data.name: 'mnist1d' needs the `mnist1d` package (pip install mnist1d)") from e
  args = get_dataset_args()
  args.seed = int(seed)
  if num_samples:
    args.num_samples = int(num_samples)
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    d = make_dataset(args)  # the generator seeds numpy / random globally
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {
      "x_train": np.asarray(d["x"], np.float32),
      "y_train": np.asarray(d["y"], np.int32),
      "x_test": np.asarray(d["x_test"], np.float32),
      "y_test": np.asarray(d["y_test"], np.int32),
  }


def _mnist1d(cache: str | None) -> dict[str, np.ndarray]:
  path = os.path.join(cache_dir(cache), f"mnist1d_seed{MNIST1D_SEED}.npz")
  return _cached(path, _generate_mnist1d)


def mnist1d_pool(num_samples: int, seed: int, *, cache: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``num_samples`` extra raw MNIST-1D signals ``(x, y)`` from the same generator.

  Default generator arguments except ``num_samples`` and ``seed`` (use a seed
  other than the benchmark's 42 for data disjoint from it); cached like the
  benchmark split. Used as a larger pretraining pool.
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
    raise KfuseError(f"data.pretrain_samples: expected an int >= 10, got {num_samples!r}")
  if int(seed) == MNIST1D_SEED:
    raise KfuseError(f"data.seed: the pool seed must differ from the benchmark's {MNIST1D_SEED}")
  path = os.path.join(cache_dir(cache), f"mnist1d_n{num_samples}_seed{int(seed)}.npz")
  arrays = _cached(path, lambda: _generate_mnist1d(num_samples, seed))
  x = np.concatenate([arrays["x_train"], arrays["x_test"]])
  y = np.concatenate([arrays["y_train"], arrays["y_test"]])
  return x, y


def _digits(cache: str | None) -> dict[str, np.ndarray]:
  """sklearn digits with a fixed stratified-by-shuffle 80 / 20 train / test split."""
  del cache  # bundled with scikit-learn, nothing to cache
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - dependency missing
    raise KfuseError("data.name: 'digits' needs scikit-learn (pip install scikit-learn)") from e
  d = load_digits()
  x = np.asarray(d.data, np.float32).reshape(-1, 8, 8)
  y = np.asarray(d.target, np.int32)
  order = np.random.default_rng(1797).permutation(len(y))
  n_test = len(y) // 5
  test, train = order[:n_test], order[n_test:]
  return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


_SOURCES: dict[str, tuple[Callable[[str | None], dict], int]] = {
    "mnist1d": (_mnist1d, 10),
    "digits": (_digits, 10),
}
KNOWN_DATASETS = tuple(sorted(_SOURCES))


def load_raw(name: str, *, cache: str | None = None) -> tuple[dict[str, np.ndarray], int]:
  """``({'x_train','y_train','x_test','y_test'}, num_classes)`` before any processing."""
  if name not in _SOURCES:
    raise KfuseError(f"data.name: unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
  fn, num_classes = _SOURCES[name]
  return fn(cache), num_classes


# ------------------------------------------------------------------ processing


def split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
  """Deterministically carve a validation split off ``(x, y)``.

  Returns ``(x_train, y_train, x_val, y_val)``; the split depends only on
  ``seed`` and the array length. ``val_fraction=0`` keeps every example for
  training (empty validation arrays).
  """
  if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
    raise KfuseError(f"data.val_fraction: expected a number, got {type(val_fraction).__name__}"
                     f" {val_fraction!r}")
  if not 0.0 <= val_fraction < 1.0:
    raise KfuseError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
  n = len(y)
  n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
  order = np.random.default_rng(seed).permutation(n)
  val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
  return x[train], y[train], x[val], y[val]


def standardize(ds: Dataset, eps: float = 1e-6) -> Dataset:
  """Per-feature zero mean / unit variance using train-split statistics only.

  Constant features (e.g. the always-blank corner pixels of ``digits``) are
  only centred.
  """
  mean = ds.x_train.mean(axis=0)
  std = ds.x_train.std(axis=0)
  std = np.where(std < eps, 1.0, std)
  f = lambda x: ((x - mean) / std).astype(np.float32)
  return dataclasses.replace(ds, x_train=f(ds.x_train), x_val=f(ds.x_val), x_test=f(ds.x_test))


def load(name: str, *, seed: int = 0, val_fraction: float = 0.1,
         normalize: bool = True, cache: str | None = None) -> Dataset:
  """Load dataset ``name`` with a deterministic train / val / test split.

  Args:
    name: one of `KNOWN_DATASETS`.
    seed: seeds the train / val split (the test split is fixed per dataset).
    val_fraction: fraction of the training pool held out for validation (0:
      none, e.g. MNIST-1D's original 4,000 / 1,000 train / test protocol).
    normalize: standardise features with train-split statistics.
    cache: array cache directory (default: see `cache_dir`).
  """
  raw, num_classes = load_raw(name, cache=cache)
  x_tr, y_tr, x_va, y_va = split(raw["x_train"], raw["y_train"], val_fraction, seed)
  ds = Dataset(name=name, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va,
               x_test=raw["x_test"], y_test=raw["y_test"], num_classes=num_classes,
               shape=tuple(raw["x_train"].shape[1:]))
  return standardize(ds) if normalize else ds


# ------------------------------------------------------------------ batching


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Batches per epoch."""
  return n // batch_size if drop_remainder else -(-n // batch_size)


def iterate(key: jax.Array, x: np.ndarray, y: np.ndarray, batch_size: int,
            epochs: int | None = 1, *, shuffle: bool = True,
            drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield ``(x_batch, y_batch)`` host arrays for ``epochs`` epochs.

  Epoch ``e`` is shuffled with ``fold_in(key, e)``, so the stream is a pure
  function of ``key``. ``epochs=None`` iterates forever. With
  ``drop_remainder`` every batch has exactly ``batch_size`` rows (one jit
  compilation for the whole run).
  """
  n = len(y)
  if len(x) != n:
    raise KfuseError(f"iterate: x has {len(x)} rows but y has {n}")
  if batch_size <= 0 or (drop_remainder and batch_size > n):
    raise KfuseError(f"batch_size: must be in [1, {n}] for {n} examples, got {batch_size}")
  epoch = 0
  while epochs is None or epoch < epochs:
    if shuffle:
      order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    else:
      order = np.arange(n)
    for b in range(num_batches(n, batch_size, drop_remainder)):
      idx = order[b * batch_size:(b + 1) * batch_size]
      yield x[idx], y[idx]
    epoch += 1
