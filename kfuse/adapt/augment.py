"""Random test-time augmentations for signals and images (pure ``jnp``, static shapes).

The analogue of CoTTA's / RoTTA's ``get_tta_transforms`` (colour jitter, pad +
random affine, Gaussian blur, centre crop, Gaussian noise) for standardized
1-D signals ``[B, L]`` and 2-D images ``[B, H, W]`` (optionally with trailing
channel axes):

1. intensity jitter, per sample: ``x ← m + c·(g·x - m) + b`` with gain
   ``g ~ U[1-s_g, 1+s_g]``, contrast ``c ~ U[1-s_c, 1+s_c]`` around the sample
   mean ``m`` and offset ``b ~ U[-s_b, s_b]``;
2. random affine with edge padding and linear interpolation: scale
   ``U[1-s, 1+s]``, translation ``U[-t, t]``·size, rotation ``U[-r, r]`` (2-D);
3. Gaussian blur, kernel 5, ``σ ~ U[0.001, σ_max]`` (reflect padding);
4. additive Gaussian noise ``N(0, noise_std²)``.

Horizontal flips are off by default: mirroring is not label-preserving for
MNIST-1D signals or digits. Every sample draws its own parameters from a
split of ``key``, so a call is a pure function of ``(key, x)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from kfuse.tree import KfuseError

__all__ = ["AugmentConfig", "COTTA", "ROTTA", "make_augment", "augment"]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the random augmentation (see the module docstring)."""
  spatial_dims: int = 1
  gain: float = 0.2
  contrast: float = 0.15
  offset: float = 0.1
  scale: float = 0.1
  translate: float = 1.0 / 16.0
  rotate_deg: float = 15.0
  blur_sigma: float = 0.5
  noise_std: float = 0.005
  flip: bool = False


COTTA = AugmentConfig()                                  # CoTTA CIFAR: ±15°, scale 0.9-1.1, σ ≤ 0.5
ROTTA = AugmentConfig(gain=0.4, contrast=0.3, offset=0.2)  # RoTTA's "strong" jitter


def _jitter(key, x, cfg: AugmentConfig):
  kg, kc, kb = jax.random.split(key, 3)
  g = jax.random.uniform(kg, (), minval=1 - cfg.gain, maxval=1 + cfg.gain)
  c = jax.random.uniform(kc, (), minval=1 - cfg.contrast, maxval=1 + cfg.contrast)
  b = jax.random.uniform(kb, (), minval=-cfg.offset, maxval=cfg.offset)
  x = g * x
  m = x.mean()
  return m + c * (x - m) + b


def _affine(key, x, cfg: AugmentConfig):
  """Resample ``x`` (spatial dims first, channels after) at an inverse-affine grid."""
  d = cfg.spatial_dims
  ks, kt, kr = jax.random.split(key, 3)
  size = jnp.array(x.shape[:d], jnp.float32)
  center = (size - 1) / 2
  s = jax.random.uniform(ks, (), minval=1 - cfg.scale, maxval=1 + cfg.scale)
  t = jax.random.uniform(kt, (d,), minval=-cfg.translate, maxval=cfg.translate) * size
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in x.shape[:d]],
                                indexing="ij"))           # [d, *spatial]
  rel = grid - (center + t).reshape((d,) + (1,) * d)
  if d == 2:
    a = jnp.deg2rad(jax.random.uniform(kr, (), minval=-cfg.rotate_deg, maxval=cfg.rotate_deg))
    rot = jnp.array([[jnp.cos(a), jnp.sin(a)], [-jnp.sin(a), jnp.cos(a)]])
    rel = jnp.einsum("ij,j...->i...", rot, rel)
  coords = rel / s + center.reshape((d,) + (1,) * d)
  flat = x.reshape(x.shape[:d] + (-1,))
  out = jax.vmap(lambda ch: ndimage.map_coordinates(ch, list(coords), order=1, mode="nearest"),
                 in_axes=-1, out_axes=-1)(flat)
  return out.reshape(x.shape)


def _blur(key, x, cfg: AugmentConfig):
  sigma = jax.random.uniform(key, (), minval=0.001, maxval=cfg.blur_sigma)
  t = jnp.arange(-2, 3, dtype=jnp.float32)
  k = jnp.exp(-0.5 * jnp.square(t / sigma))
  k = k / k.sum()
  for axis in range(cfg.spatial_dims):
    xm = jnp.moveaxis(x, axis, -1)
    pad = [(0, 0)] * (xm.ndim - 1) + [(2, 2)]
    xp = jnp.pad(xm, pad, mode="reflect")
    n = xm.shape[-1]
    xm = sum(k[i] * xp[..., i:i + n] for i in range(5))
    x = jnp.moveaxis(xm, -1, axis)
  return x


def _one(key, x, cfg: AugmentConfig):
  kj, ka, kb, kn, kf = jax.random.split(key, 5)
  x = _jitter(kj, x, cfg)
  x = _affine(ka, x, cfg)
  if cfg.blur_sigma > 0:
    x = _blur(kb, x, cfg)
  if cfg.flip:
    x = jnp.where(jax.random.bernoulli(kf), jnp.flip(x, cfg.spatial_dims - 1), x)
  return x + cfg.noise_std * jax.random.normal(kn, x.shape, x.dtype)


def augment(key: jax.Array, x: jax.Array, cfg: AugmentConfig = COTTA) -> jax.Array:
  """One random augmentation of every sample of ``x [B, *spatial, *channels]``."""
  if x.ndim < 1 + cfg.spatial_dims:
    raise KfuseError(f"x: augment with spatial_dims={cfg.spatial_dims} needs a batch"
                     f" [B, {'L' if cfg.spatial_dims == 1 else 'H, W'}, ...], got shape {x.shape}")
  xf = x.astype(jnp.float32)
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(lambda k, xi: _one(k, xi, cfg))(keys, xf).astype(x.dtype)


def make_augment(cfg: AugmentConfig | None = None,
                 **overrides) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``aug(key, x)`` with the ranges of ``cfg`` (default `COTTA`) updated by ``overrides``."""
  cfg = dataclasses.replace(cfg or COTTA, **overrides)
  if cfg.spatial_dims not in (1, 2):
    raise KfuseError(f"spatial_dims: must be 1 (signals) or 2 (images), got {cfg.spatial_dims}")
  return jax.jit(functools.partial(augment, cfg=cfg))
