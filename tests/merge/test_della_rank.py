"""`stages.ascending_rank` (DELLA's per-row |δ| rank) against NumPy's stable double argsort."""

import jax.numpy as jnp
import numpy as np
import pytest

from kfuse.merge import stages


def _rank64(x, axis):
  """Float64 NumPy reference: argsort of the stable argsort (ties by index)."""
  order = np.argsort(x.astype(np.float64), axis=axis, kind="stable")
  return np.argsort(order, axis=axis, kind="stable")


@pytest.mark.parametrize("shape,axis", [((7,), 0), ((6, 5), 1), ((6, 5), 0), ((6, 5), -1),
                                        ((3, 4, 9), 1), ((3, 4, 9), 2), ((1, 1), 1),
                                        ((0,), 0), ((4, 0), 1), ((4, 0), 0), ((0, 3), 1)])
def test_ascending_rank_matches_numpy_with_ties(shape, axis):
  r = np.random.default_rng(sum(shape) + axis)
  x = r.integers(-3, 4, size=shape).astype(np.float32)   # many exact ties
  if x.size > 1:
    x[..., 0] = -0.0
  got = np.asarray(stages.ascending_rank(jnp.asarray(x), axis=axis))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, _rank64(x, axis))


def test_ascending_rank_distinct_values_is_a_permutation_per_row():
  x = np.random.default_rng(3).standard_normal((50, 256)).astype(np.float32)
  got = np.asarray(stages.ascending_rank(jnp.asarray(np.abs(x)), axis=1))
  np.testing.assert_array_equal(np.sort(got, axis=1), np.broadcast_to(np.arange(256), (50, 256)))
  np.testing.assert_array_equal(got, _rank64(np.abs(x), 1))
