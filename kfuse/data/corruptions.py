"""Corrupted test sets (MNIST-1D-C, digits-C) and test-time adaptation streams.

The CIFAR-10-C recipe (Hendrycks & Dietterich, ICLR 2019) for 1-D signals and
8x8 images: 15 corruptions in four families, each at five severities,
generated offline and deterministically (NumPy generators seeded by
``(seed, corruption, severity)``), cached as ``.npz`` under ``$KFUSE_CACHE``.

=========  ==================================================================
family     corruptions (CIFAR-10-C analogue)
=========  ==================================================================
noise      ``gaussian_noise``, ``shot_noise`` (signal-dependent),
           ``impulse_noise`` (salt and pepper), ``speckle_noise``
           (multiplicative)
blur       ``defocus_blur`` (box), ``gaussian_blur`` (glass), ``motion_blur``
           (one-sided exponential smear)
geometric  ``zoom`` (time/space stretch), ``translate``, ``elastic``
           (smooth random warp)
digital    ``contrast``, ``brightness`` (offset), ``drift`` (low-frequency
           baseline wander, ~fog), ``pixelate``, ``quantize`` (~JPEG),
           ``occlusion`` (a blanked window / patch)
=========  ==================================================================

`CORRUPTIONS` holds the 15 benchmark corruptions in the continual order
(`ALL_CORRUPTIONS` adds ``occlusion``). Corruptions act on *globally*
standardized inputs (one mean and std over the clean training set, so spatial
structure is preserved); the result is then standardized per feature with the
clean training statistics, exactly as `kfuse.data.sources.load` does for the
clean data. Severity parameters are in those global units (see `SEVERITIES`).
Digits pixels are clipped to their raw range [0, 16] after corruption.

Streams (`make_stream`): the corrupted domains are concatenated into
``x [T, B, ...]``, ``y [T, B]`` with ``domain [T]`` ids and ``reset [T]``
flags. ``protocol='reset_per_shift'`` sets a reset at every domain start (the
Tent setting), ``'continual'`` only at the first batch (CoTTA / the benchmark's
continual setting; ``repeats`` cycles through the domains several times for a
long stream). ``label_order`` ``'dirichlet'`` draws a temporally correlated
label order (RoTTA's sampler, concentration ``gamma``) and ``'sorted'`` sorts
by class; ``batch_size=1`` gives single-sample streams. Batches never span
two domains; a domain's trailing partial batch is dropped (static shapes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from typing import Callable, Sequence

import numpy as np

from kfuse.data import sources
from kfuse.tree import KfuseError

__all__ = [
    "CORRUPTIONS", "ALL_CORRUPTIONS", "FAMILIES", "SEVERITIES", "corrupt", "Domain",
    "Stream", "CleanData", "clean_data", "corrupted_domains", "make_stream", "PROTOCOLS",
    "LABEL_ORDERS",
]

PROTOCOLS = ("reset_per_shift", "continual")
LABEL_ORDERS = ("iid", "dirichlet", "sorted")
_VERSION = 1  # bump when a corruption's definition changes (invalidates cached sets)

# Severity 1..5 parameters, in global-std units (lengths in samples / pixels, fractions of the
# size). Severity 5 was set so that a clean-trained BatchNorm CNN (the tta_bench source model)
# errs on roughly 40-55 % of MNIST-1D signals per corruption (calibrated on the source model
# only, never on an adaptation method); severities 1-4 interpolate towards milder values.
# The 2-D (digits) scalings below are not calibrated.
SEVERITIES: dict[str, tuple] = {
    "gaussian_noise": (0.2, 0.28, 0.36, 0.43, 0.5),     # σ
    "shot_noise": (0.2, 0.28, 0.36, 0.45, 0.55),        # σ·sqrt(|x|)
    "impulse_noise": (0.015, 0.03, 0.045, 0.06, 0.08),  # fraction of samples set to ±amp
    "speckle_noise": (0.15, 0.22, 0.29, 0.35, 0.42),    # x·(1 + σ ε)
    "defocus_blur": (1.5, 1.8, 2.1, 2.4, 2.8),          # anti-aliased box width (2-D: ×0.5)
    "gaussian_blur": (0.5, 0.65, 0.8, 0.9, 1.0),        # σ (2-D: ×0.4)
    "motion_blur": (0.75, 1.0, 1.25, 1.5, 1.75),        # decay length τ (2-D: ×0.4)
    "zoom": (0.3, 0.4, 0.5, 0.6, 0.75),                 # |log2 zoom| = U[0.5, 1]·s, random sign
    "translate": (0.2, 0.3, 0.4, 0.5, 0.6),             # shift = U[0.5, 1]·s·size, random sign
    "elastic": (2.0, 3.0, 4.0, 5.0, 6.5),               # displacement amplitude (2-D: ×0.25)
    "contrast": (0.75, 0.65, 0.57, 0.5, 0.45),          # c in m + c(x - m)
    "brightness": (0.5, 0.7, 0.9, 1.1, 1.3),            # offset b
    "drift": (1.0, 1.25, 1.5, 1.75, 2.0),               # amplitude of a random slow wave
    "pixelate": (1.2, 1.4, 1.6, 1.8, 2.0),              # cell size (2-D: 1 + (s - 1)/2)
    "quantize": (1.0, 1.25, 1.5, 1.75, 2.0),            # step Δ of Δ·round(x/Δ)
    "occlusion": (0.2, 0.25, 0.3, 0.35, 0.4),           # blanked fraction of the length / side
}

# continual order, mirroring CIFAR-10-C's (gaussian, shot, impulse, defocus, glass, motion,
# zoom, snow, frost, fog, brightness, contrast, elastic, pixelate, jpeg)
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur",
               "motion_blur", "zoom", "speckle_noise", "translate", "drift", "brightness",
               "contrast", "elastic", "pixelate", "quantize")
ALL_CORRUPTIONS = CORRUPTIONS + ("occlusion",)
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "gaussian_blur", "motion_blur"),
    "geometric": ("zoom", "translate", "elastic"),
    "digital": ("contrast", "brightness", "drift", "pixelate", "quantize", "occlusion"),
}


# ------------------------------------------------------------------ resampling helpers


def _spatial_axes(x: np.ndarray) -> tuple:
  return tuple(range(1, x.ndim))


def _resample(x: np.ndarray, coords: np.ndarray) -> np.ndarray:
  """Per-sample linear interpolation of ``x [n, *S]`` at ``coords [n, d, *S]`` (edge clamp)."""
  from scipy import ndimage
  out = np.empty_like(x)
  for i in range(len(x)):
    out[i] = ndimage.map_coordinates(x[i], coords[i], order=1, mode="nearest")
  return out


def _grid(shape: tuple) -> np.ndarray:
  return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.choice(np.array([-1.0, 1.0]), size=n)


# ------------------------------------------------------------------ corruptions
# Each takes (x [n, *S] in global units, severity parameter, rng) and returns a new array.


def _gaussian_noise(x, s, rng):
  return x + s * rng.standard_normal(x.shape)


def _shot_noise(x, s, rng):
  return x + s * np.sqrt(np.abs(x)) * rng.standard_normal(x.shape)


def _impulse_noise(x, s, rng):
  amp = np.quantile(np.abs(x), 0.99)
  hit = rng.random(x.shape) < s
  return np.where(hit, _signs(rng, x.size).reshape(x.shape) * amp, x)


def _speckle_noise(x, s, rng):
  return x * (1.0 + s * rng.standard_normal(x.shape))


def _box_kernel(width: float) -> np.ndarray:
  """Anti-aliased box of (fractional) ``width``: ``w_t = clip(width/2 + 1/2 - |t|, 0, 1)``, normalized."""
  r = int(np.ceil(width / 2 + 0.5))
  t = np.arange(-r, r + 1, dtype=np.float64)
  k = np.clip(width / 2 + 0.5 - np.abs(t), 0.0, 1.0)
  return k / k.sum()


def _defocus_blur(x, s, rng):
  from scipy import ndimage
  width = s if x.ndim == 2 else 0.5 * s
  k = _box_kernel(width)
  for axis in _spatial_axes(x):
    x = ndimage.convolve1d(x, k, axis=axis, mode="nearest")
  return x


def _gaussian_blur(x, s, rng):
  from scipy import ndimage
  sigma = s if x.ndim == 2 else 0.4 * s
  return ndimage.gaussian_filter(x, sigma=(0,) + (sigma,) * (x.ndim - 1), mode="nearest")


def _motion_blur(x, s, rng):
  """One-sided exponential smear ``y_t = Σ_j k_j x_{t-j}``, k_j ∝ exp(-j/τ), random direction."""
  from scipy import ndimage
  tau = s if x.ndim == 2 else 0.4 * s
  j = np.arange(int(np.ceil(3 * tau)) + 1, dtype=np.float64)
  k = np.exp(-j / tau)
  k /= k.sum()
  kernel = np.concatenate([np.zeros(len(k) - 1), k])          # causal, centred at index len-1
  fwd = ndimage.convolve1d(x, kernel[::-1], axis=-1, mode="nearest")
  bwd = ndimage.convolve1d(x, kernel, axis=-1, mode="nearest")
  left = _signs(rng, len(x)).reshape((-1,) + (1,) * (x.ndim - 1)) < 0
  return np.where(left, bwd, fwd)


def _zoom(x, s, rng):
  n, shape = len(x), x.shape[1:]
  z = 2.0 ** (_signs(rng, n) * rng.uniform(0.5, 1.0, n) * s)
  grid = _grid(shape)
  c = ((np.array(shape, np.float64) - 1) / 2).reshape((-1,) + (1,) * len(shape))
  coords = (grid[None] - c[None]) / z.reshape((n,) + (1,) * (len(shape) + 1)) + c[None]
  return _resample(x, coords)


def _translate(x, s, rng):
  n, shape = len(x), x.shape[1:]
  d = len(shape)
  shift = (_signs(rng, n * d) * rng.uniform(0.5, 1.0, n * d)).reshape(n, d) * s
  shift = shift * np.array(shape, np.float64)
  coords = _grid(shape)[None] - shift.reshape((n, d) + (1,) * d)
  return _resample(x, coords)


def _elastic(x, s, rng):
  from scipy import ndimage
  n, shape = len(x), x.shape[1:]
  d = len(shape)
  amp = s if d == 1 else 0.25 * s
  smooth = max(1.0, 0.1 * max(shape))
  field = rng.uniform(-1, 1, (n, d) + shape)
  field = ndimage.gaussian_filter(field, sigma=(0, 0) + (smooth,) * d, mode="reflect")
  field /= np.abs(field).reshape(n, -1).max(1).reshape((n,) + (1,) * (d + 1)) + 1e-12
  return _resample(x, _grid(shape)[None] + amp * field)


def _contrast(x, s, rng):
  axes = _spatial_axes(x)
  m = x.mean(axis=axes, keepdims=True)
  return m + s * (x - m)


def _brightness(x, s, rng):
  return x + s


def _drift(x, s, rng):
  """Add ``a·sin(2π f t / L + φ)`` along the last axis, f ~ U[0.3, 1], random φ (a slow wave)."""
  n, length = len(x), x.shape[-1]
  f = rng.uniform(0.3, 1.0, n)
  phi = rng.uniform(0, 2 * np.pi, n)
  t = np.arange(length, dtype=np.float64)
  wave = s * np.sin(2 * np.pi * f[:, None] * t[None] / length + phi[:, None])
  return x + wave.reshape((n,) + (1,) * (x.ndim - 2) + (length,))


def _pixelate(x, s, rng):
  """Average over cells of (fractional) size ``s`` (2-D: ``1 + (s-1)/2``), then nearest upsampling."""
  f = s if x.ndim == 2 else 1.0 + 0.5 * (s - 1.0)
  out = x
  for axis in _spatial_axes(x):
    size = x.shape[axis]
    cell = np.floor(np.arange(size) / f).astype(int)                  # cell of each position
    sums = np.zeros(x.shape[:axis] + (cell.max() + 1,) + x.shape[axis + 1:])
    np.add.at(sums, (slice(None),) * axis + (cell,), out)
    counts = np.bincount(cell).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    out = np.take(sums / counts, cell, axis=axis)
  return out


def _quantize(x, s, rng):
  return s * np.round(x / s)


def _occlusion(x, s, rng):
  n, shape = len(x), x.shape[1:]
  out = x.copy()
  sizes = [max(1, int(round(s * m))) for m in shape]
  starts = [rng.integers(0, m - w + 1, n) for m, w in zip(shape, sizes)]
  for i in range(n):
    sl = tuple(slice(st[i], st[i] + w) for st, w in zip(starts, sizes))
    out[(i,) + sl] = 0.0
  return out


_FNS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "speckle_noise": _speckle_noise,
    "defocus_blur": _defocus_blur, "gaussian_blur": _gaussian_blur, "motion_blur": _motion_blur,
    "zoom": _zoom, "translate": _translate, "elastic": _elastic,
    "contrast": _contrast, "brightness": _brightness, "drift": _drift,
    "pixelate": _pixelate, "quantize": _quantize, "occlusion": _occlusion,
}


def _seed(*parts) -> int:
  return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
  """Corruption ``name`` at ``severity`` (1..5) of ``x [n, L]`` or ``[n, H, W]`` (global units).

  Deterministic: the randomness is a NumPy generator seeded by
  ``(seed, name, severity)``. Returns float32; ``x`` is not modified.
  """
  if name not in _FNS:
    raise KfuseError(f"corruption: unknown corruption {name!r}; known: {', '.join(ALL_CORRUPTIONS)}")
  if int(severity) != severity or not 1 <= int(severity) <= 5:
    raise KfuseError(f"severity: must be an integer in 1..5, got {severity!r}")
  x = np.asarray(x)
  if x.ndim not in (2, 3):
    raise KfuseError(f"x: expected signals [n, L] or images [n, H, W], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise KfuseError("x: contains NaN or Inf")
  rng = np.random.default_rng(_seed("kfuse-corruption", seed, name, int(severity)))
  s = SEVERITIES[name][int(severity) - 1]
  return _FNS[name](x.astype(np.float64), s, rng).astype(np.float32)


# ------------------------------------------------------------------ corrupted data sets


_cached = sources._cached   # load the .npz, or build it and write it atomically


@dataclasses.dataclass(frozen=True)
class CleanData:
  """What corrupted sets are made from.

  Attributes:
    source: the clean `sources.Dataset` (per-feature standardized) the model is trained on.
    pool_x, pool_y: the raw (unstandardized) test pool that gets corrupted.
    mean, std: per-feature standardization of the training split (as `sources.standardize`).
    gmean, gstd: global (scalar) mean / std of the raw training split.
    clip: raw value range of the dataset (``None`` = unbounded, MNIST-1D).
  """
  source: sources.Dataset
  pool_x: np.ndarray
  pool_y: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  gmean: float
  gstd: float
  clip: tuple | None

  def standardize(self, raw: np.ndarray) -> np.ndarray:
    return ((raw - self.mean) / self.std).astype(np.float32)


def _fresh_mnist1d(n: int, seed: int, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
  """``n`` new MNIST-1D signals from the package's generator (seed ``seed``), cached."""
  path = os.path.join(sources.cache_dir(cache), f"mnist1d_pool_n{n}_seed{seed}.npz")

  def build():
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.seed = int(seed)
    args.num_samples = int(np.ceil(n / 10.0)) * 10 + 10
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
      d = make_dataset(args)
    finally:
      np.random.set_state(np_state)
      random.setstate(py_state)
    x = np.concatenate([d["x"], d["x_test"]])[:n].astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]])[:n].astype(np.int32)
    return {"x": x, "y": y}

  arrays = _cached(path, build)
  return arrays["x"], arrays["y"]


def clean_data(name: str = "mnist1d", *, pool: str = "test", pool_size: int = 10_000,
               pool_seed: int = 1, seed: int = 0, val_fraction: float = 0.1,
               cache: str | None = None) -> CleanData:
  """The clean source data set and the raw test pool to corrupt.

  Args:
    name: ``mnist1d`` or ``digits``.
    pool: ``test`` (the data set's test split) or ``fresh`` (MNIST-1D only:
      ``pool_size`` new signals from the generator with seed ``pool_seed``, disjoint
      from the training data, like CIFAR-10-C's 10,000 test images).
    seed, val_fraction, cache: as `kfuse.data.sources.load`.
  """
  raw = sources.load(name, seed=seed, val_fraction=val_fraction, normalize=False, cache=cache)
  std = raw.x_train.std(axis=0)
  std = np.where(std < 1e-6, 1.0, std)
  ds = sources.standardize(raw)
  if pool == "test":
    px, py = raw.x_test, raw.y_test
  elif pool == "fresh":
    if name != "mnist1d":
      raise KfuseError(f"data.pool: 'fresh' needs the mnist1d generator, not {name!r}")
    if pool_seed == sources.MNIST1D_SEED:
      raise KfuseError(f"data.pool_seed: {pool_seed} is the training data's seed; pick another")
    px, py = _fresh_mnist1d(int(pool_size), int(pool_seed), cache)
  else:
    raise KfuseError(f"data.pool: expected 'test' or 'fresh', got {pool!r}")
  clip = (0.0, 16.0) if name == "digits" else None
  return CleanData(ds, px, py, raw.x_train.mean(axis=0), std, float(raw.x_train.mean()),
                   float(raw.x_train.std()), clip)


@dataclasses.dataclass(frozen=True)
class Domain:
  """One corrupted test set: ``x`` (model-ready, standardized), ``y``, and what made it."""
  name: str
  severity: int
  x: np.ndarray
  y: np.ndarray


def corrupted_domains(data: CleanData, corruptions: Sequence[str] = CORRUPTIONS,
                      severities: Sequence[int] = (5,), *, seed: int = 0, cache: str | None = None,
                      include_clean: bool = False) -> list[Domain]:
  """Model-ready corrupted copies of ``data.pool_x``, one `Domain` per (corruption, severity).

  Each set is cached as ``.npz`` (keyed by the data, pool, corruption, severity and
  ``seed``), so a benchmark run generates it once, offline.
  """
  out = []
  if include_clean:
    out.append(Domain("clean", 0, data.standardize(data.pool_x), data.pool_y))
  fp = hashlib.sha256(np.ascontiguousarray(data.pool_x).tobytes()).hexdigest()[:12]
  for sev in severities:
    for name in corruptions:
      if name not in _FNS:
        raise KfuseError(f"corruptions: unknown corruption {name!r}; known: {', '.join(ALL_CORRUPTIONS)}")
      tag = hashlib.sha256(f"{_VERSION}/{fp}/{SEVERITIES[name][int(sev) - 1]!r}/{data.clip}"
                           .encode()).hexdigest()[:12]
      path = os.path.join(sources.cache_dir(cache), "corruptions",
                          f"{data.source.name}_{name}_s{int(sev)}_seed{seed}_{tag}.npz")

      def build(name=name, sev=sev):
        g = (data.pool_x - data.gmean) / data.gstd
        raw = corrupt(g, name, sev, seed) * data.gstd + data.gmean
        if data.clip is not None:
          raw = np.clip(raw, *data.clip)
        return {"x": data.standardize(raw)}

      arrays = _cached(path, build)
      out.append(Domain(name, int(sev), arrays["x"], data.pool_y))
  return out


# ------------------------------------------------------------------ streams


@dataclasses.dataclass(frozen=True)
class Stream:
  """A test stream of equally sized batches.

  Attributes:
    x: inputs ``[T, B, ...]``; y: labels ``[T, B]`` (for scoring only).
    domain: ``[T]`` index into ``names`` of each batch's domain.
    reset: ``[T]`` bool, reset the adapted model before this batch.
    names: domain labels ``'<corruption>@<severity>'`` (repeated domains are listed once per visit).
  """
  x: np.ndarray
  y: np.ndarray
  domain: np.ndarray
  reset: np.ndarray
  names: tuple

  @property
  def num_batches(self) -> int:
    return int(self.x.shape[0])


def _order(y: np.ndarray, label_order: str, gamma: float, batch_size: int,
           rng: np.random.Generator) -> np.ndarray:
  n = len(y)
  if label_order == "iid":
    return rng.permutation(n)
  if label_order == "sorted":
    return np.argsort(y, kind="stable")
  # dirichlet: split each class over T time slots with proportions ~ Dir(gamma)
  slots = max(1, n // batch_size)
  bins: list[list[np.ndarray]] = [[] for _ in range(slots)]
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    p = rng.dirichlet(np.full(slots, float(gamma)))
    cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
    for t, part in enumerate(np.split(idx, cuts)):
      bins[t].append(part)
  return np.concatenate([rng.permutation(np.concatenate(b)) for b in bins if b])


def make_stream(domains: Sequence[Domain], batch_size: int, *, protocol: str = "continual",
                repeats: int = 1, label_order: str = "iid", gamma: float = 0.1,
                seed: int = 0) -> Stream:
  """Concatenate ``domains`` (``repeats`` times) into a `Stream` of ``batch_size`` batches.

  Args:
    domains: the `Domain`s in stream order.
    batch_size: samples per batch (1 = single-sample stream).
    protocol: ``reset_per_shift`` (reset at every domain start) or ``continual``
      (reset only before the first batch).
    repeats: passes over the domain list (a long continual stream).
    label_order: ``iid`` shuffle, ``dirichlet`` (temporally correlated labels,
      concentration ``gamma``; smaller = more correlated) or ``sorted`` by class.
    seed: seeds the orders (each visit of a domain gets its own order).
  """
  if protocol not in PROTOCOLS:
    raise KfuseError(f"protocol: unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
  if label_order not in LABEL_ORDERS:
    raise KfuseError(f"label_order: unknown order {label_order!r}; known: {', '.join(LABEL_ORDERS)}")
  if not domains:
    raise KfuseError("domains: need at least one domain")
  if int(repeats) < 1:
    raise KfuseError(f"repeats: must be >= 1, got {repeats}")
  if label_order == "dirichlet" and gamma <= 0:
    raise KfuseError(f"gamma: must be > 0, got {gamma}")
  b = int(batch_size)
  xs, ys, dom, rst, names = [], [], [], [], []
  for r in range(int(repeats)):
    for i, d in enumerate(domains):
      if b < 1 or b > len(d.y):
        raise KfuseError(f"batch_size: must be in [1, {len(d.y)}] for domain {d.name!r}, got {batch_size}")
      rng = np.random.default_rng(_seed("kfuse-stream", seed, r, i, d.name, d.severity))
      order = _order(d.y, label_order, gamma, b, rng)
      t = len(order) // b
      order = order[:t * b]
      xs.append(d.x[order].reshape((t, b) + d.x.shape[1:]))
      ys.append(d.y[order].reshape(t, b))
      dom.append(np.full(t, len(names), np.int32))
      first = (r == 0 and i == 0) or protocol == "reset_per_shift"
      rst.append(np.arange(t) == 0 if first else np.zeros(t, bool))
      names.append(f"{d.name}@{d.severity}")
  return Stream(np.concatenate(xs), np.concatenate(ys), np.concatenate(dom),
                np.concatenate(rst), tuple(names))
