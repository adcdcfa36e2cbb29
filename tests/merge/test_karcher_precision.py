"""karcher in 16-bit floats is computed in float32 (against a float64 NumPy Karcher mean)."""

import jax.numpy as jnp
import numpy as np

from kfuse.merge import merge


def karcher64(xs, max_iter=10, tol=1e-5):
  """Karcher mean of the unit directions scaled by the mean norm, in float64
  (the iteration of mergekit's ``karcher``: Riemannian gradient steps on the sphere)."""
  xs = [np.asarray(x, np.float64).ravel() for x in xs]
  norms = np.array([np.linalg.norm(x) for x in xs])
  units = [x / nm for x, nm in zip(xs, norms)]
  a = 1.0 / len(xs)
  u = sum(a * v for v in units)
  u /= np.linalg.norm(u)
  for _ in range(max_iter):
    t = np.zeros_like(u)
    for v in units:
      c = np.clip(v @ u, -1, 1)
      th = np.arccos(c)
      if th >= tol:
        t += a * th / np.sin(th) * (v - c * u)
    tn = np.linalg.norm(t)
    if tn < tol:
      break
    u = np.cos(tn) * u + np.sin(tn) * t / tn
    u /= np.linalg.norm(u)
  return norms.mean() * u


def test_karcher_bf16_is_as_close_to_float64_as_rounding_allows():
  r = np.random.default_rng(3)
  common = r.standard_normal((48, 64))
  xs = [(common + 0.8 * r.standard_normal((48, 64))).astype(jnp.bfloat16) for _ in range(3)]
  ref = karcher64(xs)
  got = np.asarray(merge("karcher", [{"w": x} for x in xs], None)["w"], np.float64).ravel()
  floor = np.linalg.norm(np.asarray(ref.astype(jnp.bfloat16), np.float64) - ref)
  err = np.linalg.norm(got - ref)
  # the float64 result rounded once to bf16 is the best any bf16 output can do
  assert err <= 1.5 * floor, (err / np.linalg.norm(ref), floor / np.linalg.norm(ref))
