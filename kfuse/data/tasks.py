"""Multi-task suites for model-merging benchmarks.

Design
------
The suites mimic the CLIP ViT 8-task setting of FusionBench / Task Arithmetic
at toy scale: every task is solved by *one shared backbone* plus a *private
linear head*, experts are fine-tuned from one pretrained backbone, and only
the backbones are merged. For merging to be an interesting problem the tasks
must pull the shared backbone in *different, conflicting* directions, so each
task is the base dataset seen through

1. a fixed **input transformation** that the pretrained features do not
   cover: time reversal / mirroring, sign flip, circular shift, a fixed random
   permutation of the features, shuffled blocks, a fixed random orthogonal
   mixing, first differences, masking half of the features, additive noise,
   transposition / rotation / vertical flip for images. Most are bijections,
   so each task stays solvable, but they move the discriminative directions
   of the input to different places, and the first layers of the experts
   move apart (weight interference when averaged);
2. a fixed **relabelling**: a random permutation of the classes, so heads are
   not interchangeable between tasks.

Pretraining (`pretrain_task`) uses untransformed inputs with the original
labels: the base training split, or (``num_samples > 0``, the benchmark's
default) a larger pool of extra signals from the MNIST-1D generator -- the
analogue of CLIP's large generic pretraining corpus. The pretrained backbone
plus a task's linear-probe head is the weak "zero-shot" baseline, each expert
is strong on its own task only, and a merged backbone has to reconcile the
experts' conflicting first-layer edits.

All randomness (validation split, permutations, rotations, noise) is drawn
from NumPy generators seeded by ``(seed, transform)``; a task's definition
does not depend on which other tasks are in the suite. After the transform,
each task is re-standardised with its own train-split statistics.

Suites: ``mnist1d`` (signals of length 40) and ``digits`` (8x8 images); each
lists ten transforms in a fixed order and ``make_suite(name, n, seed)`` takes
the first ``n``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from kfuse.data import sources
from kfuse.tree import KfuseError

__all__ = [
    "Task",
    "SUITES",
    "TRANSFORMS",
    "make_suite",
    "pretrain_task",
    "suite_names",
]

NOISE_STD = 0.5


@dataclasses.dataclass(frozen=True)
class Task(sources.Dataset):
  """One task of a suite: a `Dataset` plus how it was derived.

  Attributes:
    transform: name of the input transformation (see `TRANSFORMS`).
    label_map: ``label_map[c]`` is the task label of base class ``c``.
    description: one line for reports.
  """
  transform: str = "identity"
  label_map: tuple = ()
  description: str = ""


# ------------------------------------------------------------------ transforms
#
# A transform factory takes (input shape, numpy Generator for the task's fixed
# randomness) and returns fn(x [n, *shape], split_rng) -> x'. ``split_rng`` is
# a Generator private to (task, split), for per-example randomness (noise).

Fn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _flat(fn):
  """Lift a function of [n, d] arrays to [n, *shape] arrays."""
  def g(x, rng):
    return fn(x.reshape(len(x), -1), rng).reshape(x.shape)
  return g


def _identity(shape, rng):
  return lambda x, r: x


def _reverse(shape, rng):
  return lambda x, r: x[..., ::-1]


def _flip_ud(shape, rng):
  _need_image("flip_ud", shape)
  return lambda x, r: x[..., ::-1, :]


def _transpose(shape, rng):
  _need_image("transpose", shape)
  return lambda x, r: np.swapaxes(x, -1, -2)


def _rot90(shape, rng):
  _need_image("rot90", shape)
  return lambda x, r: np.rot90(x, k=1, axes=(-2, -1))


def _negate(shape, rng):
  return lambda x, r: -x


def _shift(shape, rng):
  s = shape[-1] // 2
  return lambda x, r: np.roll(x, s, axis=-1)


def _permute(shape, rng):
  perm = rng.permutation(int(np.prod(shape)))
  return _flat(lambda x, r: x[:, perm])


def _blocks(shape, rng, num_blocks: int = 4):
  d = int(np.prod(shape))
  edges = np.linspace(0, d, num_blocks + 1).astype(int)
  order = np.roll(np.arange(num_blocks), 1 + rng.integers(num_blocks - 1))  # a derangement
  idx = np.concatenate([np.arange(edges[b], edges[b + 1]) for b in order])
  return _flat(lambda x, r: x[:, idx])


def _mix(shape, rng):
  d = int(np.prod(shape))
  q, rr = np.linalg.qr(rng.standard_normal((d, d)))
  q = (q * np.sign(np.diag(rr))).astype(np.float32)
  return _flat(lambda x, r: x @ q)


def _derivative(shape, rng):
  return lambda x, r: x - np.roll(x, 1, axis=-1)


def _mask(shape, rng):
  d = int(np.prod(shape))
  keep = np.zeros(d, np.float32)
  keep[rng.permutation(d)[: d // 2]] = 1.0
  return _flat(lambda x, r: x * keep)


def _noise(shape, rng):
  return lambda x, r: x + NOISE_STD * r.standard_normal(x.shape).astype(np.float32)


def _need_image(name, shape):
  if len(shape) != 2:
    raise KfuseError(f"data.tasks: transform {name!r} needs 2-D image inputs, got shape {shape}")


TRANSFORMS: dict[str, tuple[Callable[..., Fn], str]] = {
    "identity": (_identity, "unchanged inputs"),
    "reverse": (_reverse, "inputs reversed along the last axis (time reversal / mirror)"),
    "flip_ud": (_flip_ud, "image flipped upside down"),
    "transpose": (_transpose, "image transposed"),
    "rot90": (_rot90, "image rotated by 90 degrees"),
    "negate": (_negate, "sign-flipped inputs"),
    "shift": (_shift, "circular shift by half the last axis"),
    "permute": (_permute, "fixed random permutation of the features"),
    "blocks": (_blocks, "four feature blocks in a fixed shuffled order"),
    "mix": (_mix, "fixed random orthogonal mixing of the features"),
    "derivative": (_derivative, "first difference along the last axis"),
    "mask": (_mask, "a fixed random half of the features zeroed"),
    "noise": (_noise, f"additive Gaussian noise (std {NOISE_STD})"),
}

SUITES: dict[str, tuple[str, tuple[str, ...]]] = {
    # suite name: (base dataset, transforms in suite order)
    "mnist1d": ("mnist1d", ("reverse", "shift", "permute", "mix", "negate",
                            "derivative", "blocks", "noise", "mask", "identity")),
    "digits": ("digits", ("reverse", "flip_ud", "transpose", "negate", "permute",
                          "rot90", "blocks", "mix", "noise", "identity")),
}


def suite_names() -> list[str]:
  return sorted(SUITES)


# ------------------------------------------------------------------ builders


def _restandardize(x_train, *xs, eps=1e-6):
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std = np.where(std < eps, 1.0, std)
  return [((x - mean) / std).astype(np.float32) for x in (x_train,) + xs]


def _transform_id(name: str) -> int:
  return sorted(TRANSFORMS).index(name)


def _make_task(base: sources.Dataset, transform: str, seed: int, relabel: bool) -> Task:
  tid = _transform_id(transform)
  factory, desc = TRANSFORMS[transform]
  fn = factory(base.shape, np.random.default_rng([seed, tid, 0]))
  xs = [fn(x, np.random.default_rng([seed, tid, 1, s]))
        for s, x in enumerate((base.x_train, base.x_val, base.x_test))]
  x_tr, x_va, x_te = _restandardize(*xs)
  if relabel:
    label_map = np.random.default_rng([seed, tid, 2]).permutation(base.num_classes)
  else:
    label_map = np.arange(base.num_classes)
  lm = label_map.astype(np.int32)
  return Task(
      name=transform, x_train=np.ascontiguousarray(x_tr), y_train=lm[base.y_train],
      x_val=np.ascontiguousarray(x_va), y_val=lm[base.y_val],
      x_test=np.ascontiguousarray(x_te), y_test=lm[base.y_test],
      num_classes=base.num_classes, shape=base.shape, transform=transform,
      label_map=tuple(int(c) for c in lm), description=desc + (", classes permuted" if relabel else ""))


def _base(name: str, seed: int, val_fraction: float, cache: str | None) -> sources.Dataset:
  if name not in SUITES:
    raise KfuseError(f"data.name: unknown suite {name!r}; known: {', '.join(suite_names())}")
  return sources.load(SUITES[name][0], seed=seed, val_fraction=val_fraction, cache=cache)


def make_suite(name: str, num_tasks: int | None = None, seed: int = 0, *,
               tasks: Sequence[str] | None = None, val_fraction: float = 0.1,
               relabel: bool = True, cache: str | None = None) -> list[Task]:
  """Build the first ``num_tasks`` tasks of suite ``name`` (or the named ``tasks``).

  Args:
    name: a suite in `SUITES` (``mnist1d`` or ``digits``).
    num_tasks: how many tasks, taken in suite order; None with ``tasks``.
    seed: seeds the validation split and every task's fixed randomness.
    tasks: explicit transform names (overrides the suite order).
    val_fraction: fraction of the training pool held out for validation.
    relabel: permute each task's class labels.
    cache: array cache directory for generated datasets.

  Returns:
    A list of `Task`, all with the same input shape and split sizes.
  """
  base = _base(name, seed, val_fraction, cache)
  available = SUITES[name][1]
  if tasks:
    names = list(tasks)
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown:
      raise KfuseError(f"data.tasks: unknown transform {unknown[0]!r}; known: {', '.join(sorted(TRANSFORMS))}")
    if len(set(names)) != len(names):
      raise KfuseError(f"data.tasks: duplicate transform in {names}")
    if num_tasks and num_tasks != len(names):
      raise KfuseError(f"data.num_tasks: {num_tasks} does not match {len(names)} names in data.tasks")
  else:
    if num_tasks is None or not 1 <= num_tasks <= len(available):
      raise KfuseError(f"data.num_tasks: suite {name!r} has 1..{len(available)} tasks, got {num_tasks}")
    names = list(available[:num_tasks])
  return [_make_task(base, t, seed, relabel) for t in names]


POOL_SEED_OFFSET = 1000  # pretraining pools use generator seed 1000 + seed (never 42)


def pretrain_task(name: str, seed: int = 0, *, val_fraction: float = 0.1,
                  cache: str | None = None, num_samples: int = 0) -> Task:
  """The pretraining problem of suite ``name``: untransformed inputs, original labels.

  By default it is the suite's base training split. ``num_samples > 0``
  (``mnist1d`` only) pretrains instead on that many *extra* signals from the
  MNIST-1D generator (seed ``1000 + seed``, disjoint from the tasks' data),
  standardised with the base split's statistics -- the analogue of a large,
  generic pretraining corpus. The test split is always the base test split.
  """
  task = _make_task(_base(name, seed, val_fraction, cache), "identity", seed, relabel=False)
  if not num_samples:
    return task
  if SUITES[name][0] != "mnist1d":
    raise KfuseError(f"data.pretrain_samples: only the mnist1d suite has a generator, not {name!r}")
  raw, _ = sources.load_raw("mnist1d", cache=cache)
  x_pool, y_pool = sources.mnist1d_pool(num_samples, POOL_SEED_OFFSET + seed, cache=cache)
  x_base, _, _, _ = sources.split(raw["x_train"], raw["y_train"], val_fraction, seed)
  mean, std = x_base.mean(axis=0), x_base.std(axis=0)
  std = np.where(std < 1e-6, 1.0, std)
  x_pool = ((x_pool - mean) / std).astype(np.float32)
  x_tr, y_tr, x_va, y_va = sources.split(x_pool, y_pool.astype(np.int32), val_fraction, seed)
  return dataclasses.replace(task, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va,
                             description=f"{num_samples} extra generated signals, unchanged")
