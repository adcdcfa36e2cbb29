"""Twenty offline 16 x 16 image tasks from different sources, and a disjoint pretraining mixture.

The suite behind the literature-shaped merging benchmark (FusionBench's
8 / 14 / 20-task CLIP protocols, Tang et al. 2024; task arithmetic, Ilharco
et al. 2023). Every task is a ``16 x 16`` grayscale image problem (values
roughly in ``[0, 1]``, bright ink on a dark background) with at most ten
classes and its own label set, so one small ViT (patch 4: 16 tokens) with one
head per task serves them all. The sources differ in kind, not only in a
transformation of one dataset:

* glyphs rendered with PIL from the fonts bundled with matplotlib (letters,
  digits, symbols, font style, case, orientation; `kfuse.data.glyphs`);
* scikit-learn's handwritten digits, upsampled 8 -> 16;
* MNIST-1D signals (Greydanus 2020) drawn as 2-D line plots;
* procedural gratings and textures, geometric shapes (kind, count,
  position), symmetric patterns, 1/f^beta random fields;
* synthetic signals from distinct generative processes drawn as plots,
  elementary cellular automata space-time diagrams, Lissajous figures.

`TASK_NAMES` fixes the order; the 8 / 14 / 20-task protocols are its first
8 / 14 / 20 names (`PROTOCOLS`), the first eight spanning the source kinds.

Determinism and caching: a generated task's split ``s`` is drawn from
``np.random.default_rng([seed, crc32(name), s])`` (train 0, val 1, test 2),
so a task does not depend on which other tasks are loaded, and is cached as
``.npz`` under ``<kfuse cache>/image_tasks/`` (`kfuse.data.sources.cache_dir`).
sklearn digits keep `kfuse.data.sources`' fixed test split; MNIST-1D its
4,000 / 1,000 split (benchmark seed 42); both carve validation off training.

Pretraining (`pretrain_mixture`), the CLIP analogue: a broad mixture that
never contains a task's training data. Each generated task contributes fresh
draws from its generator under the separate stream ``PRETRAIN_STREAM``
labelled only with the *source* (which generator made the image, not the
task's classes), MNIST-1D contributes signals from a different generator seed
(`kfuse.data.sources.mnist1d_pool`), sklearn digits contribute nothing (a
finite set: every image belongs to a task split), and one held-out generator
(Greek letters, never a task) contributes its own 10 classes.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Callable, Sequence

import numpy as np

from kfuse.data import glyphs, sources
from kfuse.tree import KfuseError

__all__ = ["ImageTask", "TaskSpec", "SPECS", "TASK_NAMES", "PROTOCOLS", "SIZE", "DEFAULT_SIZES",
           "PRETRAIN_STREAM", "load_task", "load_tasks", "protocol", "pretrain_mixture",
           "pretrain_domains", "generate", "describe"]

SIZE = 16            # image side
SS = 2 * SIZE        # supersampled canvas side (average-pooled by 2)
DEFAULT_SIZES = (2000, 500, 1000)
PRETRAIN_STREAM = 7  # rng stream of pretraining draws (task splits use 0, 1, 2)
VERSION = 1          # bump when a generator changes (cache key)
MNIST1D_PRETRAIN_SEED = 1042


@dataclasses.dataclass(frozen=True)
class ImageTask(sources.Dataset):
  """One task: a `kfuse.data.sources.Dataset` of ``[n, 16, 16]`` images plus its description.

  Attributes:
    source: the kind of data source (``glyphs``, ``sklearn``, ``mnist1d``, ``procedural``, ...).
    class_names: one name per label.
    why: one line: why the task is in the suite.
    seed: the data seed it was generated with.
  """
  source: str = ""
  class_names: tuple = ()
  why: str = ""
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A generated task: ``make(rng, y) -> x [n, 16, 16]`` for balanced labels ``y``."""
  name: str
  source: str
  class_names: tuple
  why: str
  make: Callable[[np.random.Generator, np.ndarray], np.ndarray] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# ------------------------------------------------------------------ shared helpers


def _noise(rng: np.random.Generator, x: np.ndarray, max_std: float) -> np.ndarray:
  """Add per-image Gaussian pixel noise, std ~ U(0, max_std); clip to [0, 1]."""
  std = rng.uniform(0, max_std, (len(x), 1, 1)).astype(np.float32)
  return np.clip(x + std * rng.standard_normal(x.shape, dtype=np.float32), 0.0, 1.0)


def _grid(n: int, side: int = SS) -> tuple[np.ndarray, np.ndarray]:
  g = ((np.arange(side, dtype=np.float32) + 0.5) / side * 2 - 1)
  x, y = np.meshgrid(g, g)
  return np.broadcast_to(x, (n, side, side)), np.broadcast_to(y, (n, side, side))


def _col(v) -> np.ndarray:
  return np.asarray(v, np.float32)[:, None, None]


SANS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "cmss10")
SERIF = ("DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "STIXGeneral", "STIXGeneralItalic",
         "STIXGeneralBol", "cmr10", "cmti10")
MONO = ("DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "cmtt10")
UNICODE = SANS[:4] + SERIF[:6] + MONO[:3]    # the fonts with full Unicode coverage


def _glyph_images(rng: np.random.Generator, chars: Sequence[str], fonts: Sequence[str], *,
                  rot_deg: float = 12.0, scale=(0.6, 0.95), shift: float = 0.15,
                  noise: float = 0.12, centered: bool = True,
                  angle: np.ndarray | None = None) -> np.ndarray:
  """Render ``chars[i]`` in ``fonts[i]`` with a random similarity transform, pooled to 16 x 16."""
  pairs = sorted(set(zip(fonts, chars)))
  index = {p: i for i, p in enumerate(pairs)}
  bank = glyphs.templates(pairs, centered)
  src = bank[np.array([index[p] for p in zip(fonts, chars)])]
  n = len(chars)
  a = np.deg2rad(rng.uniform(-rot_deg, rot_deg, n))
  if angle is not None:
    a = a + angle
  s = rng.uniform(*scale, n)
  t = rng.uniform(-shift, shift, (n, 2))
  x = glyphs.pool(glyphs.warp(src, a.astype(np.float32), s.astype(np.float32), t, SS), 2)
  return _noise(rng, x, noise)


def _pick(rng: np.random.Generator, options: Sequence[str], n: int) -> list[str]:
  return [options[i] for i in rng.integers(0, len(options), n)]


# ------------------------------------------------------------------ glyph tasks


def _letters_sans(rng, y):
  chars = "ABCDEFGHJK"
  return _glyph_images(rng, [chars[c] for c in y], _pick(rng, SANS, len(y)))


def _letters_serif(rng, y):
  chars = "abdefghkmr"
  return _glyph_images(rng, [chars[c] for c in y], _pick(rng, SERIF, len(y)))


def _glyph_digits(rng, y):
  return _glyph_images(rng, [str(c) for c in y], _pick(rng, MONO + SERIF, len(y)), rot_deg=20)


SYMBOLS = "+=<>%&#@?$"


def _symbols(rng, y):
  return _glyph_images(rng, [SYMBOLS[c] for c in y], _pick(rng, UNICODE, len(y)))


STYLE_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Italic",
               "DejaVuSansMono", "cmtt10")


def _font_style(rng, y):
  chars = _pick(rng, "ABDEGHKMNRabdeghkmnr", len(y))
  return _glyph_images(rng, chars, [STYLE_FONTS[c] for c in y], rot_deg=4, scale=(0.85, 1.0),
                       shift=0.06, noise=0.05)


CASE_CHARS = "abdefghnqrt"


def _case(rng, y):
  base = _pick(rng, CASE_CHARS, len(y))
  chars = [c.upper() if k else c for c, k in zip(base, y)]
  return _glyph_images(rng, chars, _pick(rng, SANS + SERIF + MONO, len(y)), rot_deg=5,
                       scale=(0.9, 1.1), shift=0.08, centered=False)


ROT_CHARS = "ABCDEFGJKLPQRTUVY2345679bdefhjkmrty"


def _glyph_rotation(rng, y):
  chars = _pick(rng, ROT_CHARS, len(y))
  return _glyph_images(rng, chars, _pick(rng, SANS + SERIF, len(y)), rot_deg=10,
                       angle=np.asarray(y, np.float64) * np.pi / 2)


GREEK = "αβγδεζηθλξ"


def _greek(rng, y):
  return _glyph_images(rng, [GREEK[c] for c in y], _pick(rng, UNICODE, len(y)))


# ------------------------------------------------------------------ digits / MNIST-1D


def _upsample_digits(x8: np.ndarray) -> np.ndarray:
  """sklearn's 8 x 8 digits (0..16) -> 16 x 16 in [0, 1], bilinear."""
  n = len(x8)
  src = np.asarray(x8, np.float32).reshape(n, 8, 8) / 16.0
  z = np.zeros(n, np.float32)
  return glyphs.warp(src, z, z + 1.0, np.zeros((n, 2), np.float32), SIZE)


def _signals_to_plots(sig: np.ndarray, rng: np.random.Generator | None = None,
                      noise: float = 0.0) -> np.ndarray:
  """Min-max scale each signal to [-0.85, 0.85] and draw it as a 16 x 16 line plot."""
  lo, hi = sig.min(1, keepdims=True), sig.max(1, keepdims=True)
  y = (sig - lo) / np.maximum(hi - lo, 1e-6) * 1.7 - 0.85
  x = glyphs.pool(glyphs.plot_curves(y, SS, width=1.0), 2)
  return _noise(rng, x, noise) if rng is not None and noise else x


# ------------------------------------------------------------------ procedural: gratings, textures


def _grating(rng, n, theta, freq):
  gx, gy = _grid(n)
  phase = _col(rng.uniform(0, 2 * np.pi, n))
  u = gx * _col(np.cos(theta)) + gy * _col(np.sin(theta))
  contrast = _col(rng.uniform(0.3, 1.0, n))
  x = 0.5 + 0.5 * contrast * np.sin(np.pi * _col(freq) * u + phase)
  return _noise(rng, glyphs.pool(x.astype(np.float32), 2), 0.15)


def _grating_orientation(rng, y):
  theta = np.deg2rad(np.asarray(y) * 22.5 + rng.uniform(-5, 5, len(y)))
  return _grating(rng, len(y), theta, rng.uniform(1.5, 4.0, len(y)))


FREQS = (1.0, 1.6, 2.4, 3.4, 4.6, 6.0)   # cycles per image


def _grating_frequency(rng, y):
  f = np.asarray(FREQS)[y] * rng.uniform(0.95, 1.05, len(y))
  return _grating(rng, len(y), rng.uniform(0, np.pi, len(y)), f)


def _lowpass(rng, n, side, sigma):
  """White noise blurred by a Gaussian of ``sigma`` pixels (FFT), unit std per image."""
  w = rng.standard_normal((n, side, side))
  f = np.fft.fftfreq(side)
  fx, fy = np.meshgrid(f, f)
  kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
  z = np.real(np.fft.ifft2(np.fft.fft2(w) * kernel))
  z = z - z.mean((1, 2), keepdims=True)
  return (z / (z.std((1, 2), keepdims=True) + 1e-8)).astype(np.float32)


def _rotated(rng, n):
  gx, gy = _grid(n)
  a = _col(rng.uniform(0, np.pi, n))
  return gx * np.cos(a) + gy * np.sin(a), -gx * np.sin(a) + gy * np.cos(a)


def _segments(rng, n, m, length, width):
  """``m`` random line segments per image, drawn on the supersampled canvas."""
  gx, gy = _grid(n)
  out = np.zeros((n, SS, SS), np.float32)
  for _ in range(m):
    c = rng.uniform(-0.9, 0.9, (n, 2))
    a = rng.uniform(0, np.pi, n)
    d = np.stack([np.cos(a), np.sin(a)], 1) * length / 2
    p0, p1 = c - d, c + d
    vx, vy = _col(p1[:, 0] - p0[:, 0]), _col(p1[:, 1] - p0[:, 1])
    wx, wy = gx - _col(p0[:, 0]), gy - _col(p0[:, 1])
    t = np.clip((wx * vx + wy * vy) / (vx * vx + vy * vy), 0, 1)
    dist = np.hypot(wx - t * vx, wy - t * vy)
    out = np.maximum(out, (dist < width).astype(np.float32))
  return out


TEXTURES = ("white_noise", "blobs", "checkerboard", "dots", "plaid", "rings", "bricks", "sticks")


def _texture(rng, y):
  n = len(y)
  x = np.zeros((n, SS, SS), np.float32)
  for k in range(len(TEXTURES)):
    idx = np.nonzero(y == k)[0]
    m = len(idx)
    if not m:
      continue
    u, v = _rotated(rng, m)
    f = _col(rng.uniform(2.0, 4.0, m)) * np.pi
    if k == 0:
      t = np.repeat(np.repeat(rng.uniform(0, 1, (m, SIZE, SIZE)), 2, 1), 2, 2)
    elif k == 1:
      t = (_lowpass(rng, m, SS, rng.uniform(1.5, 3.0)) > 0.3).astype(np.float32)
    elif k == 2:
      t = (np.sin(f * u) * np.sin(f * v) > 0).astype(np.float32)
    elif k == 3:
      t = ((np.cos(f * u) * np.cos(f * v)) > 0.6).astype(np.float32)
    elif k == 4:
      a2 = _col(rng.uniform(np.pi / 3, np.pi / 2, m))
      t = 0.5 + 0.25 * (np.sin(f * u) + np.sin(f * (u * np.cos(a2) + v * np.sin(a2))))
    elif k == 5:
      cx, cy = _col(rng.uniform(-0.5, 0.5, m)), _col(rng.uniform(-0.5, 0.5, m))
      gx, gy = _grid(m)
      t = 0.5 + 0.5 * np.sin(f * np.hypot(gx - cx, gy - cy) * 1.5 + _col(rng.uniform(0, 6.3, m)))
    elif k == 6:
      h = _col(rng.uniform(0.3, 0.5, m))
      row = np.floor((v + 2) / h)
      shift = (row % 2) * h
      t = ((np.mod(v + 2, h) < 0.1) | (np.mod(u + 2 + shift, 2 * h) < 0.1)).astype(np.float32)
    else:
      t = _segments(rng, m, 8, 0.6, 0.07)
    x[idx] = t
  return _noise(rng, glyphs.pool(x, 2), 0.1)


def _spectral_slope(rng, y):
  betas = np.asarray(SLOPES)[y]
  n = len(y)
  w = np.fft.fft2(rng.standard_normal((n, SIZE, SIZE)))
  f = np.fft.fftfreq(SIZE)
  fx, fy = np.meshgrid(f, f)
  r = np.maximum(np.hypot(fx, fy), 1.0 / SIZE)
  z = np.real(np.fft.ifft2(w * r[None] ** (-betas[:, None, None] / 2)))
  z = (z - z.mean((1, 2), keepdims=True)) / (z.std((1, 2), keepdims=True) + 1e-8)
  return np.clip(0.5 + 0.2 * z, 0, 1).astype(np.float32)


SLOPES = (0.0, 0.8, 1.6, 2.4, 3.2)


def _symmetry(rng, y):
  n = len(y)
  z = _lowpass(rng, n, SIZE, rng.uniform(0.8, 1.5))
  x = 1.0 / (1.0 + np.exp(-3.0 * z))
  h = SIZE // 2
  for k, fn in ((1, lambda a: np.concatenate([a[:, :, :h], a[:, :, :h][:, :, ::-1]], 2)),
                (2, lambda a: np.concatenate([a[:, :h], a[:, :h][:, ::-1]], 1)),
                (3, lambda a: np.concatenate([a[:, :h], a[:, :h][:, ::-1, ::-1]], 1))):
    idx = y == k
    x[idx] = fn(x[idx])
  return _noise(rng, x.astype(np.float32), 0.08)


# ------------------------------------------------------------------ shapes


SHAPES = ("disk", "square", "triangle", "hexagon", "star", "cross", "ring", "crescent")


def _shape_masks(rng, kinds, cx, cy, radius):
  """Filled shapes of ``kinds`` at centres ``(cx, cy)``, size ``radius``, random rotation."""
  n = len(kinds)
  gx, gy = _grid(n)
  dx, dy = gx - _col(cx), gy - _col(cy)
  phi = _col(rng.uniform(0, 2 * np.pi, n))
  r = np.hypot(dx, dy)
  th = np.arctan2(dy, dx) - phi
  R = _col(radius)
  u, v = dx * np.cos(phi) + dy * np.sin(phi), -dx * np.sin(phi) + dy * np.cos(phi)

  def polygon(k):
    sector = 2 * np.pi / k
    return r <= R * np.cos(np.pi / k) / np.cos(np.mod(th, sector) - np.pi / k)

  masks = {
      0: lambda: r <= R,
      1: lambda: polygon(4),
      2: lambda: polygon(3),
      3: lambda: polygon(6),
      4: lambda: r <= R * (0.55 + 0.45 * np.cos(5 * th)),
      5: lambda: ((np.abs(u) < R * 0.3) & (np.abs(v) < R)) | ((np.abs(v) < R * 0.3) & (np.abs(u) < R)),
      6: lambda: (r <= R) & (r >= R * 0.6),
      7: lambda: (r <= R) & (np.hypot(u - R * 0.5, v) > R * 0.8),
  }
  out = np.zeros((n, SS, SS), np.float32)
  for k, fn in masks.items():
    idx = np.asarray(kinds) == k
    if idx.any():
      out[idx] = fn()[idx]
  return out


def _shapes(rng, y):
  n = len(y)
  x = _shape_masks(rng, y, rng.uniform(-0.2, 0.2, n), rng.uniform(-0.2, 0.2, n),
                   rng.uniform(0.45, 0.8, n))
  return _noise(rng, glyphs.pool(x * _col(rng.uniform(0.6, 1.0, n)), 2), 0.12)


def _shape_count(rng, y):
  n = len(y)
  out = np.zeros((n, SS, SS), np.float32)
  cells = np.argsort(rng.random((n, 16)), axis=1)   # a random order of the 4 x 4 cells
  kind = rng.integers(0, 2, n)                       # disks or squares, one kind per image
  for j in range(int(np.max(y)) + 1):
    on = y >= j
    cell = cells[:, j]
    cx = -0.75 + 0.5 * (cell % 4) + rng.uniform(-0.08, 0.08, n)
    cy = -0.75 + 0.5 * (cell // 4) + rng.uniform(-0.08, 0.08, n)
    m = _shape_masks(rng, kind, cx, cy, rng.uniform(0.11, 0.17, n))
    out = np.maximum(out, m * on[:, None, None])
  return _noise(rng, glyphs.pool(out, 2), 0.1)


def _shape_position(rng, y):
  n = len(y)
  cx = -2 / 3 + 2 / 3 * (np.asarray(y) % 3) + rng.uniform(-0.1, 0.1, n)
  cy = -2 / 3 + 2 / 3 * (np.asarray(y) // 3) + rng.uniform(-0.1, 0.1, n)
  x = _shape_masks(rng, rng.integers(0, len(SHAPES), n), cx, cy, rng.uniform(0.18, 0.28, n))
  return _noise(rng, glyphs.pool(x, 2), 0.12)


# ------------------------------------------------------------------ synthetic signals / dynamics


PROCESSES = ("white_noise", "random_walk", "ar1", "sine", "square", "sawtooth", "chirp", "spikes")


def _signal_process(rng, y):
  n, length = len(y), 64
  t = np.linspace(0, 1, length)[None]
  f = rng.uniform(1.5, 4.0, (n, 1))
  ph = rng.uniform(0, 2 * np.pi, (n, 1))
  e = rng.standard_normal((n, length))
  sig = np.zeros((n, length))
  sig[y == 0] = e[y == 0]
  sig[y == 1] = np.cumsum(e[y == 1], 1)
  ar = np.zeros((n, length))
  phi = rng.uniform(0.5, 0.75, (n,))
  for i in range(1, length):
    ar[:, i] = phi * ar[:, i - 1] + e[:, i]
  sig[y == 2] = ar[y == 2]
  sig[y == 3] = np.sin(2 * np.pi * f * t + ph)[y == 3]
  sig[y == 4] = np.sign(np.sin(2 * np.pi * f * t + ph))[y == 4]
  sig[y == 5] = np.mod(f * t + ph / (2 * np.pi), 1.0)[y == 5]
  f1 = rng.uniform(6.0, 10.0, (n, 1))
  sig[y == 6] = np.sin(2 * np.pi * (0.5 * t + (f1 - 0.5) * t ** 2 / 2) + ph)[y == 6]
  spikes = (rng.random((n, length)) < 0.06) * rng.uniform(0.5, 1.0, (n, length))
  sig[y == 7] = spikes[y == 7]
  sig = sig + 0.05 * rng.standard_normal((n, length)) * (sig.std(1, keepdims=True) + 1e-3)
  return _signals_to_plots(sig, rng, 0.05)


RULES = (30, 90, 110, 184, 54, 150, 22, 60)


def _cellular_automata(rng, y):
  """Elementary CA space-time diagrams (Wolfram 1983): 32-cell ring, 16 rows x the first 16 cells."""
  n, width = len(y), 32
  table = (np.asarray(RULES)[y][:, None] >> np.arange(8)[None]) & 1           # [n, 8]
  state = (rng.random((n, width)) < rng.uniform(0.3, 0.7, (n, 1))).astype(np.int64)
  burn = rng.integers(0, 4, n)
  rows = []
  for step in range(SIZE + 3):
    idx = 4 * np.roll(state, 1, 1) + 2 * state + np.roll(state, -1, 1)
    rows.append(state)
    state = np.take_along_axis(table, idx, 1)
  hist = np.stack(rows, 1)                                                     # [n, 19, 32]
  out = np.stack([hist[i, burn[i]:burn[i] + SIZE, :SIZE] for i in range(n)])
  return out.astype(np.float32)


RATIOS = ((1, 1), (1, 2), (1, 3), (2, 3), (3, 4), (2, 5))


def _lissajous(rng, y):
  n, m = len(y), 600
  ab = np.asarray(RATIOS)[y]
  t = np.linspace(0, 2 * np.pi, m)[None]
  d = rng.uniform(0, np.pi, (n, 1))
  ax, ay = rng.uniform(0.55, 0.9, (n, 1)), rng.uniform(0.55, 0.9, (n, 1))
  px = ax * np.sin(ab[:, :1] * t + d)
  py = ay * np.sin(ab[:, 1:] * t)
  swap = rng.random(n) < 0.5                        # a:b and b:a are the same class
  px[swap], py[swap] = py[swap].copy(), px[swap].copy()
  col = np.clip(((px + 1) / 2 * SS).astype(np.int64), 0, SS - 1)
  row = np.clip(((py + 1) / 2 * SS).astype(np.int64), 0, SS - 1)
  flat = (np.arange(n)[:, None] * SS * SS + row * SS + col).ravel()
  img = (np.bincount(flat, minlength=n * SS * SS) > 0).reshape(n, SS, SS).astype(np.float32)
  return _noise(rng, glyphs.pool(img, 2), 0.1)


# ------------------------------------------------------------------ the suite

SPECS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("sk_digits", "sklearn", tuple("0123456789"),
             "real handwriting (sklearn digits, upsampled): the one natural-image source", None),
    TaskSpec("letters_sans", "glyphs", tuple("ABCDEFGHJK"),
             "uppercase letters in sans fonts: shape recognition under pose and noise", _letters_sans),
    TaskSpec("grating_orientation", "procedural", tuple(f"{int(22.5 * k)}deg" for k in range(8)),
             "oriented sinusoids: a pure low-level orientation cue no glyph task needs",
             _grating_orientation),
    TaskSpec("shapes", "shapes", SHAPES,
             "filled geometric shapes: global contour, rotation-invariant", _shapes),
    TaskSpec("texture", "procedural", TEXTURES,
             "stationary textures: statistics over the whole image, not an object", _texture),
    TaskSpec("signal_process", "signals", PROCESSES,
             "time series from distinct generative processes drawn as plots", _signal_process),
    TaskSpec("cellular_automata", "dynamics", tuple(f"rule{r}" for r in RULES),
             "elementary CA space-time diagrams: local rule, binary, no noise", _cellular_automata),
    TaskSpec("mnist1d_plot", "mnist1d", tuple("0123456789"),
             "MNIST-1D signals drawn as line plots: a hard, real benchmark in a new modality", None),
    TaskSpec("symbols", "glyphs", tuple(SYMBOLS),
             "punctuation and math symbols: glyphs with no letter shapes", _symbols),
    TaskSpec("glyph_digits", "glyphs", tuple("0123456789"),
             "typeset digits: same labels as sk_digits, different source (label-set reuse)",
             _glyph_digits),
    TaskSpec("shape_count", "shapes", tuple(str(k) for k in range(1, 7)),
             "counting 1-6 blobs: a global, numerosity cue", _shape_count),
    TaskSpec("grating_frequency", "procedural", tuple(f"{f}cyc" for f in FREQS),
             "spatial frequency at random orientation: conflicts with grating_orientation's invariances",
             _grating_frequency),
    TaskSpec("font_style", "glyphs", STYLE_FONTS,
             "which font drew a random letter: fine stroke detail, invariant to the letter",
             _font_style),
    TaskSpec("lissajous", "dynamics", tuple(f"{a}:{b}" for a, b in RATIOS),
             "Lissajous figures by frequency ratio: thin closed curves", _lissajous),
    TaskSpec("letters_serif", "glyphs", tuple("abdefghkmr"),
             "lowercase letters in serif fonts: a second letter task with other classes and fonts",
             _letters_serif),
    TaskSpec("case", "glyphs", ("lower", "upper"),
             "upper vs lower case of the same letters: size and baseline, binary", _case),
    TaskSpec("glyph_rotation", "glyphs", ("0deg", "90deg", "180deg", "270deg"),
             "orientation of a glyph: must not be rotation-invariant, unlike shapes", _glyph_rotation),
    TaskSpec("shape_position", "shapes", tuple(f"cell{k}" for k in range(9)),
             "where a shape is (3 x 3 grid): position, invariant to the shape", _shape_position),
    TaskSpec("symmetry", "procedural", ("none", "mirror_lr", "mirror_ud", "rot180"),
             "symmetry type of a random pattern: long-range pixel correlations", _symmetry),
    TaskSpec("spectral_slope", "procedural", tuple(f"beta{b}" for b in SLOPES),
             "1/f^beta random fields: the power-spectrum slope, a second-order statistic",
             _spectral_slope),
]}
TASK_NAMES: tuple[str, ...] = tuple(SPECS)
PROTOCOLS: dict[int, tuple[str, ...]] = {k: TASK_NAMES[:k] for k in (8, 14, 20)}

GREEK_SPEC = TaskSpec("greek", "glyphs", tuple(GREEK),
                      "held-out generator, pretraining only: Greek letters", _greek)


def protocol(num_tasks: int) -> tuple[str, ...]:
  """The first ``num_tasks`` task names (8, 14 or 20 for the papers' protocols; any 1..20)."""
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= len(TASK_NAMES):
    raise KfuseError(f"data.num_tasks: expected an int in [1, {len(TASK_NAMES)}], got {num_tasks!r}")
  return TASK_NAMES[:num_tasks]


def _spec(name: str) -> TaskSpec:
  if name not in SPECS:
    from kfuse.registry import suggest
    raise KfuseError(f"data.tasks: unknown image task {name!r}{suggest(name, TASK_NAMES)};"
                     f" known: {', '.join(TASK_NAMES)}")
  return SPECS[name]


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  return rng.permutation(np.arange(n) % k).astype(np.int32)


def generate(spec: TaskSpec, n: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
  """``n`` balanced draws ``(x [n, 16, 16] float32, y [n] int32)`` of a generated task's stream."""
  rng = np.random.default_rng([int(seed), zlib.crc32(spec.name.encode()), int(stream)])
  y = _balanced(rng, n, spec.num_classes)
  x = spec.make(rng, y)
  if x.shape != (n, SIZE, SIZE):
    raise AssertionError(f"{spec.name}: generator returned {x.shape}")
  return np.ascontiguousarray(x, np.float32), y


def _check_sizes(sizes) -> tuple[int, int, int]:
  if (not isinstance(sizes, (tuple, list)) or len(sizes) != 3
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes)):
    raise KfuseError(f"data.sizes: expected (train, val, test) positive ints, got {sizes!r}")
  return tuple(int(s) for s in sizes)


def _build(spec: TaskSpec, seed: int, sizes: tuple[int, int, int], cache: str | None) -> dict:
  if spec.name == "sk_digits":
    raw, _ = sources.load_raw("digits", cache=cache)
    x_tr, y_tr, x_va, y_va = sources.split(raw["x_train"], raw["y_train"], 0.2, seed)
    return {"x_train": _upsample_digits(x_tr), "y_train": y_tr, "x_val": _upsample_digits(x_va),
            "y_val": y_va, "x_test": _upsample_digits(raw["x_test"]), "y_test": raw["y_test"]}
  if spec.name == "mnist1d_plot":
    raw, _ = sources.load_raw("mnist1d", cache=cache)
    x_tr, y_tr, x_va, y_va = sources.split(raw["x_train"], raw["y_train"], 0.1, seed)
    return {"x_train": _signals_to_plots(x_tr), "y_train": y_tr, "x_val": _signals_to_plots(x_va),
            "y_val": y_va, "x_test": _signals_to_plots(raw["x_test"]), "y_test": raw["y_test"]}
  out = {}
  for stream, (split, n) in enumerate(zip(("train", "val", "test"), sizes)):
    out[f"x_{split}"], out[f"y_{split}"] = generate(spec, n, seed, stream)
  return out


def load_task(name: str, *, seed: int = 0, sizes: Sequence[int] = DEFAULT_SIZES,
              cache: str | None = None) -> ImageTask:
  """Task ``name`` (see `TASK_NAMES`) with train / val / test splits, cached as ``.npz``.

  ``sizes`` = (train, val, test) for generated tasks; sklearn digits and
  MNIST-1D keep their fixed sizes (their val split depends on ``seed``).
  """
  spec = _spec(name)
  sizes = _check_sizes(sizes)
  tag = "fixed" if spec.make is None else "-".join(map(str, sizes))
  path = os.path.join(sources.cache_dir(cache), "image_tasks",
                      f"{name}_seed{int(seed)}_{tag}_v{VERSION}.npz")
  a = sources._cached(path, lambda: _build(spec, int(seed), sizes, cache))
  return ImageTask(name=name, x_train=a["x_train"], y_train=a["y_train"].astype(np.int32),
                   x_val=a["x_val"], y_val=a["y_val"].astype(np.int32), x_test=a["x_test"],
                   y_test=a["y_test"].astype(np.int32), num_classes=spec.num_classes,
                   shape=(SIZE, SIZE), source=spec.source, class_names=spec.class_names,
                   why=spec.why, seed=int(seed))


def load_tasks(names: Sequence[str] | int, **kwargs) -> list[ImageTask]:
  """`load_task` for each of ``names`` (or the first ``names`` tasks when an int)."""
  names = protocol(names) if isinstance(names, int) else tuple(names)
  return [load_task(n, **kwargs) for n in names]


def _check_exclude(exclude: Sequence[str]) -> tuple[str, ...]:
  for n in exclude:
    _spec(n)
  return tuple(n for n in TASK_NAMES if n in set(exclude))


def pretrain_domains(exclude: Sequence[str] = ()) -> tuple[str, ...]:
  """The pretraining mixture's label names: one per source domain, then the held-out Greek letters.

  ``exclude``: task names whose generators the mixture leaves out entirely
  (held-out sources: the pretrained model never sees their kind of image).
  """
  exclude = set(_check_exclude(exclude)) | {"sk_digits"}
  doms = tuple(f"source:{n}" for n in TASK_NAMES if n not in exclude)
  return doms + tuple(f"greek:{c}" for c in GREEK)


def pretrain_mixture(*, seed: int = 0, per_domain: int = 1000, cache: str | None = None,
                     exclude: Sequence[str] = ()) -> sources.Dataset:
  """The broad pretraining set (the CLIP analogue), disjoint from every task's data.

  Labels (`pretrain_domains`): for each task but sklearn digits, which
  source produced the image (``per_domain`` fresh draws from stream
  `PRETRAIN_STREAM`; MNIST-1D from generator seed `MNIST1D_PRETRAIN_SEED`);
  then Greek letters (held-out generator, ``2 * per_domain`` images over its
  10 classes). ``exclude`` drops those tasks' generators from the mixture
  (see `pretrain_domains`). A 10 % validation split is carved off.
  """
  exclude = _check_exclude(exclude)
  if isinstance(per_domain, bool) or not isinstance(per_domain, int) or per_domain < 10:
    raise KfuseError(f"pretrain.per_domain: expected an int >= 10, got {per_domain!r}")
  path = os.path.join(sources.cache_dir(cache), "image_tasks",
                      f"pretrain_seed{int(seed)}_n{per_domain}_v{VERSION}"
                      + (f"_ex{zlib.crc32(','.join(exclude).encode()):08x}" if exclude else "")
                      + ".npz")

  def build():
    xs, ys = [], []
    label = 0
    for name in TASK_NAMES:
      if name == "sk_digits" or name in exclude:
        continue
      if name == "mnist1d_plot":
        sig, _ = sources.mnist1d_pool(max(per_domain, 10), MNIST1D_PRETRAIN_SEED + int(seed),
                                      cache=cache)
        x = _signals_to_plots(sig[:per_domain])
      else:
        x, _ = generate(SPECS[name], per_domain, seed, PRETRAIN_STREAM)
      xs.append(x)
      ys.append(np.full(len(x), label, np.int32))
      label += 1
    xg, yg = generate(GREEK_SPEC, 2 * per_domain, seed, PRETRAIN_STREAM)
    xs.append(xg)
    ys.append(yg + label)
    return {"x": np.concatenate(xs), "y": np.concatenate(ys)}

  a = sources._cached(path, build)
  x_tr, y_tr, x_va, y_va = sources.split(a["x"], a["y"], 0.1, seed)
  return sources.Dataset(name="pretrain_mixture", x_train=x_tr, y_train=y_tr, x_val=x_va,
                         y_val=y_va, x_test=x_va[:0], y_test=y_va[:0],
                         num_classes=len(pretrain_domains(exclude)), shape=(SIZE, SIZE))


def describe(names: Sequence[str] = TASK_NAMES) -> str:
  """A Markdown table: task, source, classes, why it is here."""
  lines = ["| # | task | source | classes | why it is here |", "|---|---|---|---|---|"]
  for i, n in enumerate(names, 1):
    s = _spec(n)
    lines.append(f"| {i} | `{n}` | {s.source} | {s.num_classes} | {s.why} |")
  return "\n".join(lines)
