"""Offline image primitives: glyphs from matplotlib's bundled fonts, batched affine warps, plots.

Everything renders at a supersampled resolution and is average-pooled down,
so edges are anti-aliased the same way for every generator:

* `fonts` / `has_glyph`: the TrueType fonts that ship inside matplotlib
  (``mpl-data/fonts/ttf``: DejaVu Sans / Serif / Mono, STIX, Computer Modern),
  so every machine with matplotlib renders the same glyphs;
* `glyph_template`: one character of one font rendered once with PIL into a
  square float template (white on black), cached per process;
* `warp`: bilinear resampling of ``N`` templates under ``N`` similarity
  transforms (rotation, scale, shift) in one vectorised NumPy gather;
* `pool`: ``k x k`` average pooling (the anti-aliasing step);
* `plot_curves`: 1-D signals drawn as 2-D line plots (Gaussian stroke).

Coordinates are normalised: the canvas spans ``[-1, 1]`` on both axes, ``y``
pointing down (row index), angles in radians, counter-clockwise on screen.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from kfuse.tree import KfuseError

__all__ = ["font_dir", "fonts", "has_glyph", "glyph_template", "templates", "warp", "pool",
           "plot_curves", "TEMPLATE"]

TEMPLATE = 48  # template side in pixels


def font_dir() -> str:
  """matplotlib's bundled TrueType directory."""
  import matplotlib
  return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def fonts() -> tuple[str, ...]:
  """Names (file stems) of the bundled fonts, sorted."""
  return tuple(sorted(f[:-4] for f in os.listdir(font_dir()) if f.endswith(".ttf")))


def _font_path(font: str) -> str:
  path = os.path.join(font_dir(), font + ".ttf")
  if not os.path.exists(path):
    from kfuse.registry import suggest
    raise KfuseError(f"font: no bundled font {font!r} in {font_dir()}{suggest(font, fonts())}")
  return path


@functools.lru_cache(maxsize=None)
def has_glyph(font: str, char: str) -> bool:
  """Does ``font`` map ``char`` to a real glyph (not ``.notdef``)?"""
  from matplotlib.ft2font import FT2Font
  return FT2Font(_font_path(font)).get_char_index(ord(char)) != 0


@functools.lru_cache(maxsize=None)
def glyph_template(font: str, char: str, centered: bool = True, size: int = TEMPLATE) -> np.ndarray:
  """``char`` in ``font`` as a ``[size, size]`` float32 template in ``[0, 1]``.

  ``centered``: the ink's bounding box is centred and its longer side scaled
  to 80 % of the template (shape only). Otherwise the glyph is drawn at a
  fixed font size on a fixed baseline (``anchor='ms'`` at 75 % height), so
  relative size and vertical position survive (the case task needs them).
  """
  from PIL import Image, ImageDraw, ImageFont

  if not has_glyph(font, char):
    raise KfuseError(f"font: {font!r} has no glyph for {char!r}")
  big = 4 * size
  font_obj = ImageFont.truetype(_font_path(font), size=int(big * 0.55))
  img = Image.new("L", (big, big), 0)
  ImageDraw.Draw(img).text((big // 2, int(big * 0.75)), char, fill=255, font=font_obj, anchor="ms")
  a = np.asarray(img, np.float32) / 255.0
  if centered:
    rows, cols = np.nonzero(a > 0.05)
    if rows.size == 0:
      raise KfuseError(f"font: {font!r} renders {char!r} blank")
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(r1 - r0, c1 - c0)
    crop = np.zeros((side, side), np.float32)
    ro, co = (side - (r1 - r0)) // 2, (side - (c1 - c0)) // 2
    crop[ro:ro + r1 - r0, co:co + c1 - c0] = a[r0:r1, c0:c1]
    pad = int(round(side / 0.8)) - side
    canvas = np.zeros((side + pad, side + pad), np.float32)
    canvas[pad // 2:pad // 2 + side, pad // 2:pad // 2 + side] = crop
    a = canvas
  out = Image.fromarray((a * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
  return np.asarray(out, np.float32) / 255.0


def templates(pairs: list[tuple[str, str]], centered: bool = True) -> np.ndarray:
  """Stack of `glyph_template` for ``[(font, char), ...]``: ``[len(pairs), T, T]``."""
  return np.stack([glyph_template(f, c, centered) for f, c in pairs])


def warp(src: np.ndarray, angle: np.ndarray, scale: np.ndarray, shift: np.ndarray,
         out: int) -> np.ndarray:
  """Resample ``src[i]`` under the similarity ``u = shift + scale * R(angle) v``, bilinearly.

  ``src``: ``[N, T, T]`` templates (or ``[K, T, T]`` plus per-sample indices
  already applied); ``angle``, ``scale``: ``[N]``; ``shift``: ``[N, 2]`` as
  ``(x, y)``. Output canvas ``[N, out, out]``; pixel ``u`` reads template
  point ``v = R(-angle) (u - shift) / scale`` (zero outside the template).
  """
  n, t = src.shape[0], src.shape[-1]
  g = (np.arange(out, dtype=np.float32) + 0.5) / out * 2.0 - 1.0
  ux, uy = np.meshgrid(g, g)                                          # [out, out]
  ux = ux[None] - shift[:, 0, None, None]
  uy = uy[None] - shift[:, 1, None, None]
  c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  inv = 1.0 / scale[:, None, None]
  # screen y points down, so a counter-clockwise screen rotation is R(-angle) in (x, y)
  vx = (c * ux - s * uy) * inv
  vy = (s * ux + c * uy) * inv
  px = (vx + 1.0) * 0.5 * t - 0.5
  py = (vy + 1.0) * 0.5 * t - 0.5
  x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
  fx, fy = (px - x0).astype(np.float32), (py - y0).astype(np.float32)
  flat = src.reshape(n, -1)
  rows = np.arange(n)[:, None, None]

  def tap(yy, xx):
    ok = (xx >= 0) & (xx < t) & (yy >= 0) & (yy < t)
    idx = np.clip(yy, 0, t - 1) * t + np.clip(xx, 0, t - 1)
    return np.where(ok, flat[rows, idx], 0.0)

  res = (tap(y0, x0) * (1 - fx) * (1 - fy) + tap(y0, x0 + 1) * fx * (1 - fy)
         + tap(y0 + 1, x0) * (1 - fx) * fy + tap(y0 + 1, x0 + 1) * fx * fy)
  return res.astype(np.float32)


def pool(x: np.ndarray, k: int) -> np.ndarray:
  """``k x k`` average pooling of ``[N, H, W]`` (H, W divisible by ``k``)."""
  n, h, w = x.shape
  return x.reshape(n, h // k, k, w // k, k).mean(axis=(2, 4)).astype(np.float32)


def plot_curves(y: np.ndarray, out: int, width: float = 1.0) -> np.ndarray:
  """Draw signals ``y [N, L]`` (values in ``[-1, 1]``, up = +1) as ``[N, out, out]`` line plots.

  The signal is linearly resampled to ``out`` columns; each column lights the
  rows near the curve with a Gaussian stroke of ``width`` pixels, covering
  the segment to the next sample so steep edges stay connected.
  """
  n, length = y.shape
  xs = np.linspace(0, length - 1, out)
  cols = np.stack([np.interp(xs, np.arange(length), row) for row in y])        # [N, out]
  rows = (1.0 - np.clip(cols, -1, 1)) * 0.5 * (out - 1)                         # row coordinate
  nxt = np.concatenate([rows[:, 1:], rows[:, -1:]], axis=1)
  lo, hi = np.minimum(rows, nxt), np.maximum(rows, nxt)
  r = np.arange(out, dtype=np.float32)[None, :, None]                          # [1, out(rows), 1]
  d = np.maximum(np.maximum(lo[:, None, :] - r, r - hi[:, None, :]), 0.0)      # distance to segment
  return np.exp(-0.5 * (d / width) ** 2).astype(np.float32)
