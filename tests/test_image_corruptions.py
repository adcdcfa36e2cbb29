"""The CIFAR-10-C image corruptions (kfuse.data.image_corruptions) against independent checks:
severity tables (noise statistics), closed forms (brightness, contrast), kernel properties
(sums, symmetry, one-sidedness, disk area), PIL's BOX resampling and JPEG codec."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from kfuse.data import image_corruptions as ic
from kfuse.tree import KfuseError

SEV = ic.IMAGE_SEVERITIES


def images(n=8, size=16, seed=0):
  """Glyph-like images in [0, 1]: a bright blob on a dark background plus texture."""
  r = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  cy, cx = r.uniform(0.3, 0.7, (2, n, 1, 1))
  blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
  return np.clip(0.8 * blob + 0.1 * r.random((n, size, size)), 0, 1).astype(np.float32)


def const(value, n=200, size=16):
  return np.full((n, size, size), value, np.float32)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_std_matches_the_table(severity):
  y = ic.corrupt_images(const(0.5), "gaussian_noise", severity)
  c = SEV["gaussian_noise"][severity - 1]
  assert abs((y - 0.5).std() - c) < 0.02 * c          # 51,200 draws: std error ~0.3 %
  assert abs((y - 0.5).mean()) < 3 * c / math.sqrt(y.size)


@pytest.mark.parametrize("severity", [1, 5])
def test_shot_noise_is_poisson_over_the_photon_count(severity):
  p, c = 0.4, SEV["shot_noise"][severity - 1]
  y = ic.corrupt_images(const(p), "shot_noise", severity).astype(np.float64)
  assert abs(y.mean() - p) < 4 * math.sqrt(p / c / y.size)
  assert abs(y.var() - p / c) < 0.03 * p / c           # Var[Poisson(pc)/c] = p/c
  assert np.allclose(y * c, np.round(y * c), atol=1e-3)  # multiples of 1/c


def test_impulse_noise_flips_the_table_fraction_to_salt_or_pepper():
  for severity in (1, 5):
    y = ic.corrupt_images(const(0.5), "impulse_noise", severity)
    c = SEV["impulse_noise"][severity - 1]
    hit = y != 0.5
    assert set(np.unique(y[hit])) <= {0.0, 1.0}
    assert abs(hit.mean() - c) < 4 * math.sqrt(c * (1 - c) / y.size)
    assert abs((y[hit] == 1.0).mean() - 0.5) < 0.05


@pytest.mark.parametrize("severity", range(1, 6))
def test_brightness_is_an_additive_shift_clipped(severity):
  x = images()
  c = SEV["brightness"][severity - 1]
  np.testing.assert_allclose(ic.corrupt_images(x, "brightness", severity),
                             np.clip(x.astype(np.float64) + c, 0, 1), atol=1e-6)


@pytest.mark.parametrize("severity", range(1, 6))
def test_contrast_scales_around_each_image_mean(severity):
  x = images().astype(np.float64)
  c = SEV["contrast"][severity - 1]
  m = x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(ic.corrupt_images(x, "contrast", severity),
                             np.clip((x - m) * c + m, 0, 1), atol=1e-6)


def test_defocus_kernel_sums_to_one_is_symmetric_and_covers_the_disk():
  for radius, alias in SEV["defocus_blur"]:
    for r in (0.5, 1.0):
      k = ic.defocus_kernel(radius * r, alias * r)
      assert abs(k.sum() - 1) < 1e-12 and (k >= 0).all()
      np.testing.assert_allclose(k, k[::-1], atol=1e-15)
      np.testing.assert_allclose(k, k.T, atol=1e-15)
  # A large disk with no alias blur: the centre holds 1/(π r²) of the mass.
  k = ic.defocus_kernel(4.0, 1e-6)
  assert abs(k[k.shape[0] // 2, k.shape[1] // 2] * math.pi * 16 - 1) < 0.02
  assert abs((k > 0).sum() - math.pi * 16) < 2 * math.pi * 4 + 4   # support ≈ the disk


@pytest.mark.parametrize("angle", [-45.0, 0.0, 30.0, 90.0])
def test_motion_kernel_is_one_sided_along_the_angle(angle):
  radius, sigma = 5.0, 1.5
  k = ic.motion_kernel(radius, sigma, angle)
  assert abs(k.sum() - 1) < 1e-12 and (k >= 0).all()
  half = k.shape[0] // 2
  yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
  # Independent first moment: Σ_i w_i·i along the direction, w_i ∝ exp(-i²/(2σ²)).
  i = np.arange(2 * math.ceil(radius) + 1)
  w = np.exp(-i ** 2 / (2 * sigma ** 2))
  d = (w * i).sum() / w.sum()
  a = math.radians(angle)
  np.testing.assert_allclose([(k * yy).sum(), (k * xx).sum()], [d * math.sin(a), d * math.cos(a)],
                             atol=1e-6)
  assert k[(yy * math.sin(a) + xx * math.cos(a)) < -1.0].sum() == 0   # nothing behind


def test_pixelate_matches_pil_box_resampling():
  x = images(n=3, size=16)
  for severity, c in enumerate(SEV["pixelate"], start=1):
    m = int(16 * c)
    ref = []
    for img in x:
      small = Image.fromarray(img, "F").resize((m, m), Image.BOX)
      ref.append(np.asarray(small.resize((16, 16), Image.BOX)))
    np.testing.assert_allclose(ic.corrupt_images(x, "pixelate", severity), np.stack(ref),
                               atol=1e-6)


def test_box_resize_rows_sum_to_one():
  for n_in, n_out in ((16, 10), (10, 16), (32, 20), (7, 7)):
    np.testing.assert_allclose(ic.box_resize_matrix(n_in, n_out).sum(1), 1.0)
  np.testing.assert_allclose(ic.box_resize_matrix(7, 7), np.eye(7))


def test_jpeg_is_pils_codec_at_the_table_quality():
  x = images(n=4)
  err = []
  for severity, q in enumerate(SEV["jpeg_compression"], start=1):
    y = ic.corrupt_images(x, "jpeg_compression", severity)
    for img, out in zip(x, y):
      buf = io.BytesIO()
      Image.fromarray(np.round(img * 255).astype(np.uint8), "L").save(buf, "JPEG", quality=q)
      np.testing.assert_array_equal(np.round(out * 255), np.asarray(Image.open(buf)))
    err.append(np.abs(y - x).mean())
  assert err[-1] > err[0]


def test_plasma_fractal_spans_zero_to_one():
  f = ic.plasma_fractal(16, 2.0, np.random.default_rng(0))
  assert f.shape == (16, 16) and f.min() == 0.0 and f.max() == 1.0
  with pytest.raises(KfuseError, match="power of two"):
    ic.plasma_fractal(12, 2.0, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
                                  "pixelate", "elastic_transform"])
def test_blurs_and_warps_keep_a_constant_image(name):
  # Averaging kernels, swaps and resampling with edge-preserving borders move no mass.
  for severity in (1, 5):
    np.testing.assert_allclose(ic.corrupt_images(const(0.37, n=4), name, severity), 0.37,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                                  "motion_blur", "zoom_blur", "contrast", "pixelate",
                                  "jpeg_compression", "fog"])
def test_severity_5_corrupts_more_than_severity_1(name):
  x = images(n=64)
  d1 = np.abs(ic.corrupt_images(x, name, 1) - x).mean()
  d5 = np.abs(ic.corrupt_images(x, name, 5) - x).mean()
  assert d5 > d1 > 0


@pytest.mark.parametrize("name", ic.IMAGE_CORRUPTIONS)
def test_every_corruption_is_deterministic_in_range_and_leaves_input(name):
  x = images(n=6)
  before = x.copy()
  a = ic.corrupt_images(x, name, 5, seed=3)
  b = ic.corrupt_images(x, name, 5, seed=3)
  np.testing.assert_array_equal(x, before)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.float32 and a.shape == x.shape
  assert a.min() >= 0.0 and a.max() <= 1.0
  assert np.abs(a - x).mean() > 1e-3
  if name not in ("brightness", "contrast", "pixelate", "jpeg_compression", "zoom_blur",
                  "defocus_blur"):                           # the deterministic ones
    assert not np.array_equal(a, ic.corrupt_images(x, name, 5, seed=4))


def test_weather_corruptions_brighten():
  x = images(n=32)
  for name in ("snow", "frost", "fog"):
    assert ic.corrupt_images(x, name, 5).mean() > x.mean() + 0.05, name


def test_scaling_to_the_image_size():
  # The same blur on a 32x32 image and its 16x16 half: lengths are scaled by H / 32.
  big = np.kron(images(n=4, size=16), np.ones((2, 2), np.float32))
  for name in ("defocus_blur", "motion_blur"):
    small = ic.corrupt_images(big[:, ::2, ::2], name, 5)
    ref = ic.corrupt_images(big, name, 5)[:, ::2, ::2]
    d_small = np.abs(small - big[:, ::2, ::2]).mean()
    d_ref = np.abs(ref - big[:, ::2, ::2]).mean()
    assert 0.5 < d_small / d_ref < 2.0, (name, d_small, d_ref)


def test_bad_input_is_one_line():
  x = images(n=2)
  with pytest.raises(KfuseError, match=r"unknown image corruption 'gausian_noise'.*did you mean"):
    ic.corrupt_images(x, "gausian_noise", 1)
  for sev in (0, 6, 2.5, True):
    with pytest.raises(KfuseError, match="severity: must be an integer in 1..5"):
      ic.corrupt_images(x, "fog", sev)
  with pytest.raises(KfuseError, match=r"\[n, H, W\]"):
    ic.corrupt_images(x[0], "fog", 1)
  with pytest.raises(KfuseError, match=r"in \[0, 1\]"):
    ic.corrupt_images(x * 255, "fog", 1)
  for err in (KfuseError,):
    try:
      ic.corrupt_images(x, "nope", 1)
    except err as e:
      assert "\n" not in str(e)
