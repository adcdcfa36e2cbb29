"""The 15 CIFAR-10-C corruptions for small grayscale images, in NumPy.

Hendrycks & Dietterich, *Benchmarking neural network robustness to common corruptions and
perturbations*, ICLR 2019 (hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``).
`IMAGE_CORRUPTIONS` lists them in CIFAR-10-C's order (the continual stream's order):

=========  ============================================================================
family     corruption (severity parameters: CIFAR-10-C's, `IMAGE_SEVERITIES`)
=========  ============================================================================
noise      ``gaussian_noise`` x + N(0, c²); ``shot_noise`` Poisson(c·x)/c;
           ``impulse_noise`` salt and pepper on a fraction c of the pixels
blur       ``defocus_blur`` disk of radius c₀ then a 3x3 Gaussian of σ = c₁;
           ``glass_blur`` Gaussian σ, local pixel swaps of ±δ, Gaussian σ again;
           ``motion_blur`` one-sided Gaussian smear (ImageMagick's motion blur: radius,
           σ, angle U[-45°, 45°]); ``zoom_blur`` mean of the image and its centre zooms
weather    ``snow`` (motion-blurred snow layer, ImageMagick angle U[-135°, -45°]);
           ``frost`` c₀·x + c₁·frost texture; ``fog`` plasma fractal, rescaled
digital    ``brightness`` V + c in HSV; ``contrast`` (x - mean)·c + mean;
           ``elastic_transform`` random affine then a smoothed displacement field;
           ``pixelate`` BOX down- and upsampling (PIL's) by c; ``jpeg_compression`` quality c
=========  ============================================================================

Images are ``[n, H, W]`` floats in [0, 1] (grayscale: one channel). Outputs are clipped to
[0, 1] as in the reference. Differences from the reference, all forced by the setting:

* **Size.** The reference is written for 32x32. Every length is multiplied by ``r = H / 32``
  (``H = max(H, W)``): the disk radius and alias σ of defocus blur, the Gaussian σ of glass
  blur, the radius and σ of motion blur and of the snow layer's blur. Pixel swaps of glass blur
  stay ±1 pixel (at least one pixel must move). Elastic uses ``IMSIZE = H`` (its parameters are
  already fractions of the size), pixelate ``int(H·c)``, fog a fractal of the image's size
  (rounded up to a power of two). Noise, brightness, contrast, zoom factors and JPEG quality
  do not depend on the size.
* **Grayscale.** HSV brightness of a gray pixel is its value, so ``brightness`` is
  ``clip(x + c, 0, 1)``; snow's ``gray(x)·1.5 + 0.5`` uses ``x`` itself.
* **No OpenCV, scikit-image or Wand.** The defocus disk is anti-aliased (pixel coverage, 8x8
  supersampling) so a radius below one pixel still blurs; the motion kernels use fractional
  (bilinearly splatted) offsets, where ImageMagick rounds them to whole pixels; the snow layer
  is not quantized to 8 bits before blurring.
* **Frost** blends with photographs of frost that ship with the reference; offline, a
  procedural ice texture (a rough plasma fractal plus short bright crystal streaks, mean
  ≈ 0.5, like the photographs' crops) stands in for them.

Determinism: a NumPy generator seeded by ``(seed, corruption, severity)``; each image draws
its own parameters (angles, fields, masks) from it in order.
"""

from __future__ import annotations

import io
import math

import numpy as np

from kfuse.data.corruptions import _seed
from kfuse.registry import suggest
from kfuse.tree import KfuseError

__all__ = ["IMAGE_CORRUPTIONS", "IMAGE_FAMILIES", "IMAGE_SEVERITIES", "corrupt_images",
           "defocus_kernel", "motion_kernel", "plasma_fractal", "box_resize_matrix"]

IMAGE_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                     "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
                     "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
IMAGE_FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}

# make_cifar_c.py's tables (severity 1..5). Lengths are in 32x32 pixels (scaled by H/32).
IMAGE_SEVERITIES: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                          # σ
    "shot_noise": (500, 250, 100, 75, 50),                                     # photons
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                           # amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias σ
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # σ, δ, it.
    "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),          # radius, σ
    "zoom_blur": tuple(tuple(np.arange(1, z, 0.01)) for z in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),  # loc, scale, zoom, threshold, radius, σ, blend
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),      # image, frost
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),             # amount, decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                                 # ΔV
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                                   # c
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),  # α, σ, affine (× IMSIZE)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                                 # size factor
    "jpeg_compression": (80, 65, 58, 50, 40),                                  # quality
}
_VERSION = 1  # bump when a definition changes (part of the seed, so cached sets change too)


def _ndimage():
  from scipy import ndimage
  return ndimage


def _scale(x: np.ndarray) -> float:
  """``r = H / 32``: lengths of the 32x32 reference in pixels of this image."""
  return max(x.shape[1:]) / 32.0


# ------------------------------------------------------------------ kernels and helpers


def _gaussian_3x3(sigma: float) -> np.ndarray:
  """OpenCV's ``GaussianBlur`` kernel for ksize 3: ``g_i ∝ exp(-i²/(2σ²))``, i ∈ {-1, 0, 1}."""
  g = np.exp(-np.arange(-1, 2) ** 2 / (2.0 * max(sigma, 1e-12) ** 2))
  g /= g.sum()
  return np.outer(g, g)


def defocus_kernel(radius: float, alias_sigma: float, supersample: int = 8) -> np.ndarray:
  """Disk of ``radius`` (pixel coverage, anti-aliased) blurred by a 3x3 Gaussian of σ; sums to 1."""
  half = int(math.ceil(radius)) + 1
  s = supersample
  t = (np.arange((2 * half + 1) * s) + 0.5) / s - half - 0.5       # sub-pixel centres
  yy, xx = np.meshgrid(t, t, indexing="ij")
  inside = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float64)
  disk = inside.reshape(2 * half + 1, s, 2 * half + 1, s).mean((1, 3))
  disk[half, half] = max(disk[half, half], 1e-12)                    # radius 0: a delta
  disk /= disk.sum()
  k = _ndimage().convolve(np.pad(disk, 1), _gaussian_3x3(alias_sigma), mode="constant")
  return k / k.sum()


def motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
  """ImageMagick's motion blur (one-sided): taps ``i = 0 .. 2⌈radius⌉`` along the angle θ.

  Weights ``w_i ∝ exp(-i²/(2σ²))``, normalized; tap ``i`` sits ``i`` pixels from the centre
  along the angle (x = cos θ, y = sin θ) and is splatted bilinearly onto the grid. The kernel
  is used as a correlation, so pixel (y, x) averages the pixels behind it along the line.
  """
  width = 2 * int(math.ceil(radius)) + 1
  i = np.arange(width, dtype=np.float64)
  w = np.exp(-i ** 2 / (2.0 * sigma ** 2))
  w /= w.sum()
  keep = w > 1e-8 * w[0]
  i, w = i[keep], w[keep] / w[keep].sum()
  a = math.radians(angle_deg)
  dy, dx = i * math.sin(a), i * math.cos(a)
  half = int(math.ceil(i.max())) + 1
  k = np.zeros((2 * half + 1, 2 * half + 1))
  for oy, ox, wi in zip(dy, dx, w):
    y0, x0 = math.floor(oy), math.floor(ox)
    fy, fx = oy - y0, ox - x0
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
      for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
        k[half + yy, half + xx] += wi * wy * wx
  return k


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
  """The reference's diamond-square fractal on ``[mapsize, mapsize]`` (a power of two) in [0, 1].

  Kept as written there, including the noise amplitude ``wibble · U[-wibble, wibble]``.
  """
  if mapsize & (mapsize - 1):
    raise KfuseError(f"mapsize: must be a power of two, got {mapsize}")
  m = np.zeros((mapsize, mapsize))
  step, wibble = mapsize, 100.0

  def wibbled(a):
    return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

  while step >= 2:
    h = step // 2
    corners = m[0:mapsize:step, 0:mapsize:step]
    sq = corners + np.roll(corners, -1, axis=0)
    sq = sq + np.roll(sq, -1, axis=1)
    m[h:mapsize:step, h:mapsize:step] = wibbled(sq)
    dr = m[h:mapsize:step, h:mapsize:step]
    ul = m[0:mapsize:step, 0:mapsize:step]
    m[0:mapsize:step, h:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=0) + ul
                                                + np.roll(ul, -1, axis=1))
    m[h:mapsize:step, 0:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul
                                                + np.roll(ul, -1, axis=0))
    step //= 2
    wibble /= wibbledecay
  m -= m.min()
  return m / max(m.max(), 1e-12)


def box_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` weights of PIL's BOX resampling along one axis (``Image.resize``).

  Output pixel j is centred at ``c_j = (j + 1/2)·s`` of the input, ``s = n_in / n_out``; it
  averages, with equal weights, the input pixels i of the window PIL scans whose centre
  satisfies ``-1/2 < (i + 1/2 - c_j) / max(s, 1) <= 1/2`` (downsampling: the pixels under the
  output cell; upsampling: the nearest one). Rows sum to 1.
  """
  scale = n_in / n_out
  support = 0.5 * max(scale, 1.0)
  w = np.zeros((n_out, n_in))
  for j in range(n_out):
    center = (j + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    i = np.arange(lo, hi)
    t = (i + 0.5 - center) / max(scale, 1.0)
    w[j, i] = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
  return w / w.sum(1, keepdims=True)


def _clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
  """The reference's ``clipped_zoom`` on ``[n, H, W]``: zoom the central crop by ``z``, trim."""
  h, w = x.shape[1:]
  ch, cw = int(math.ceil(h / z)), int(math.ceil(w / z))
  top, left = (h - ch) // 2, (w - cw) // 2
  out = _ndimage().zoom(x[:, top:top + ch, left:left + cw], (1, z, z), order=1)
  th, tw = (out.shape[1] - h) // 2, (out.shape[2] - w) // 2
  return out[:, th:th + h, tw:tw + w]


def _correlate_each(x: np.ndarray, kernels, mode: str) -> np.ndarray:
  nd = _ndimage()
  return np.stack([nd.correlate(xi, k, mode=mode) for xi, k in zip(x, kernels)])


# ------------------------------------------------------------------ the corruptions
# Each takes (x [n, H, W] in [0, 1] float64, the severity's parameters, rng); clipped after.


def _gaussian_noise(x, c, rng):
  return x + rng.normal(size=x.shape, scale=c)


def _shot_noise(x, c, rng):
  return rng.poisson(x * c) / c


def _impulse_noise(x, c, rng):
  flipped = rng.random(x.shape) < c
  salted = rng.random(x.shape) < 0.5
  return np.where(flipped, salted.astype(np.float64), x)


def _defocus_blur(x, c, rng):
  r = _scale(x)
  k = defocus_kernel(c[0] * r, c[1] * r)
  return _ndimage().correlate(x, k[None], mode="mirror")            # cv2 BORDER_REFLECT_101


def _glass_blur(x, c, rng):
  nd = _ndimage()
  sigma, delta, iterations = c[0] * _scale(x), int(c[1]), int(c[2])
  blur = lambda a: nd.gaussian_filter(a, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)
  x = blur(x)
  n, h, w = x.shape
  idx = np.arange(n)
  for _ in range(iterations):                    # the reference's swap loop, every image at once
    for i in range(h - delta, delta, -1):
      for j in range(w - delta, delta, -1):
        d = rng.integers(-delta, delta, size=(n, 2))               # randint: high excluded
        i2, j2 = i + d[:, 1], j + d[:, 0]
        a, b = x[idx, i, j].copy(), x[idx, i2, j2].copy()
        x[idx, i, j], x[idx, i2, j2] = b, a
  return blur(x)


def _motion_blur(x, c, rng):
  r = _scale(x)
  angles = rng.uniform(-45, 45, len(x))
  return _correlate_each(x, [motion_kernel(c[0] * r, c[1] * r, a) for a in angles], "nearest")


def _zoom_blur(x, c, rng):
  out = np.zeros_like(x)
  for z in c:
    out += _clipped_zoom(x, float(z))
  return (x + out) / (len(c) + 1)


def _snow(x, c, rng):
  r = _scale(x)
  layer = rng.normal(size=x.shape, loc=c[0], scale=c[1])
  layer = _clipped_zoom(layer, c[2])
  layer[layer < c[3]] = 0
  layer = np.clip(layer, 0, 1)
  angles = rng.uniform(-135, -45, len(x))
  layer = _correlate_each(layer, [motion_kernel(c[4] * r, c[5] * r, a) for a in angles], "nearest")
  x = c[6] * x + (1 - c[6]) * np.maximum(x, x * 1.5 + 0.5)
  return x + layer + np.rot90(layer, k=2, axes=(1, 2))


def _frost_texture(shape, rng):
  """Procedural stand-in for the reference's frost photographs, in [0, 1] with mean ≈ 0.5."""
  h, w = shape
  size = 1 << max(1, int(math.ceil(math.log2(max(h, w)))))
  base = plasma_fractal(size, 1.5, rng)[:h, :w]                    # rough, high-frequency ice
  sparse = (rng.random((h, w)) < 0.06).astype(np.float64)
  streaks = motion_kernel(max(h, w) / 8, max(h, w) / 16, rng.uniform(0, 360))
  crystals = np.clip(_ndimage().correlate(sparse, streaks, mode="wrap") * 4, 0, 1)
  tex = 0.6 * base + 0.4 * crystals
  return np.clip(tex - tex.mean() + 0.5, 0, 1)


def _frost(x, c, rng):
  frost = np.stack([_frost_texture(x.shape[1:], rng) for _ in range(len(x))])
  return c[0] * x + c[1] * frost


def _fog(x, c, rng):
  h, w = x.shape[1:]
  size = 1 << max(1, int(math.ceil(math.log2(max(h, w)))))
  max_val = x.max(axis=(1, 2), keepdims=True)
  fog = np.stack([plasma_fractal(size, c[1], rng)[:h, :w] for _ in range(len(x))])
  return (x + c[0] * fog) * max_val / (max_val + c[0])


def _brightness(x, c, rng):
  return x + c


def _contrast(x, c, rng):
  m = x.mean(axis=(1, 2), keepdims=True)
  return (x - m) * c + m


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """``[2, 3]`` matrix A with ``A @ [p, 1] = q`` for three (x, y) point pairs (cv2's
  ``getAffineTransform``)."""
  a = np.concatenate([src, np.ones((3, 1))], axis=1)
  return np.linalg.solve(a, dst).T


def _elastic_transform(x, c, rng):
  nd = _ndimage()
  n, h, w = x.shape
  size = max(h, w)
  alpha, sigma, affine = c[0] * size, c[1] * size, c[2] * size
  center = np.array([w, h], np.float64) // 2                        # (x, y), as cv2
  sq = min(h, w) // 3
  pts1 = np.array([center + sq, [center[0] + sq, center[1] - sq], center - sq])
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  out = np.empty_like(x)
  for i in range(n):
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape)
    m = _affine_from_points(pts1, pts2)                              # source -> destination
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]               # warpAffine samples inverse
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    img = nd.map_coordinates(x[i], [sy, sx], order=1, mode="mirror")  # BORDER_REFLECT_101
    dx = nd.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = nd.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    out[i] = nd.map_coordinates(img, [yy + dy, xx + dx], order=1, mode="reflect")
  return out


def _pixelate(x, c, rng):
  h, w = x.shape[1:]
  sh, sw = max(1, int(h * c)), max(1, int(w * c))
  down_h, down_w = box_resize_matrix(h, sh), box_resize_matrix(w, sw)
  up_h, up_w = box_resize_matrix(sh, h), box_resize_matrix(sw, w)
  small = np.einsum("ah,nhw,bw->nab", down_h, x, down_w)
  return np.einsum("ha,nab,wb->nhw", up_h, small, up_w)


def _jpeg_compression(x, c, rng):
  from PIL import Image
  out = np.empty_like(x)
  for i, img in enumerate(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)):
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, "JPEG", quality=int(c))
    out[i] = np.asarray(Image.open(buf), np.float64) / 255.0
  return out


_FNS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog,
    "brightness": _brightness, "contrast": _contrast, "elastic_transform": _elastic_transform,
    "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}


def corrupt_images(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
  """CIFAR-10-C corruption ``name`` at ``severity`` (1..5) of grayscale images ``x [n, H, W]``.

  ``x`` holds values in [0, 1]; returns a new float32 array in [0, 1] (``x`` is not modified).
  Deterministic: the randomness comes from a NumPy generator seeded by
  ``(seed, name, severity)``.

  Raises:
    KfuseError: an unknown corruption or severity, a wrong shape, values outside [0, 1].
  """
  if name not in _FNS:
    raise KfuseError(f"corruption: unknown image corruption {name!r}{suggest(name, _FNS)};"
                     f" known: {', '.join(IMAGE_CORRUPTIONS)}")
  if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
    raise KfuseError(f"severity: must be an integer in 1..5, got {severity!r}")
  x = np.asarray(x)
  if x.ndim != 3 or min(x.shape[1:], default=0) < 4:
    raise KfuseError(f"x: expected grayscale images [n, H, W] with H, W >= 4, got shape {x.shape}")
  xf = x.astype(np.float64)
  if not np.all(np.isfinite(xf)) or xf.min(initial=0.0) < 0.0 or xf.max(initial=0.0) > 1.0:
    raise KfuseError("x: image values must be finite and in [0, 1]")
  rng = np.random.default_rng(_seed("kfuse-image-corruption", _VERSION, seed, name, int(severity)))
  out = _FNS[name](xf.copy(), IMAGE_SEVERITIES[name][int(severity) - 1], rng)
  return np.clip(out, 0.0, 1.0).astype(np.float32)
