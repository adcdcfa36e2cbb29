"""kfuse.data.corruptions: the corruption suite and the TTA stream builders."""

import numpy as np
import pytest

from kfuse.data import corruptions as C
from kfuse.tree import KfuseError


def _signals(n=64, length=40, seed=0):
  """A ramp plus a random bump plus a little noise (not periodic: shifts change it monotonically)."""
  rng = np.random.default_rng(seed)
  t = np.linspace(-1, 1, length)
  c = rng.uniform(-0.5, 0.5, (n, 1))
  return 1.5 * t + 2 * np.exp(-((t - c) / 0.15) ** 2) + 0.1 * rng.standard_normal((n, length))


def test_every_corruption_is_deterministic_and_grows_with_severity():
  x = _signals()
  img = np.random.default_rng(1).random((16, 8, 8)) * 2 - 1 + np.linspace(-1, 1, 8)[None, :, None]
  for name in C.ALL_CORRUPTIONS:
    dist = []
    for sev in range(1, 6):
      a = C.corrupt(x, name, sev, seed=3)
      np.testing.assert_array_equal(a, C.corrupt(x, name, sev, seed=3))
      assert a.shape == x.shape and a.dtype == np.float32 and np.all(np.isfinite(a))
      dist.append(float(np.mean(np.abs(a - x))))
      b = C.corrupt(img, name, sev)
      assert b.shape == img.shape and np.all(np.isfinite(b))
    assert dist[0] > 0, name
    assert dist[-1] > dist[0], (name, dist)                     # severity 5 is further than 1
  assert not np.array_equal(C.corrupt(x, "gaussian_noise", 3, seed=0),
                            C.corrupt(x, "gaussian_noise", 3, seed=1))


def test_corruptions_hand_checked():
  x = _signals(8)
  np.testing.assert_allclose(C.corrupt(x, "brightness", 2), x + 0.7, rtol=1e-6, atol=1e-6)
  m = x.mean(1, keepdims=True)
  np.testing.assert_allclose(C.corrupt(x, "contrast", 5), m + 0.45 * (x - m), rtol=1e-5, atol=1e-6)
  q = C.corrupt(x, "quantize", 5)
  np.testing.assert_allclose(q / 2.0, np.round(q / 2.0), atol=1e-5)
  occ = C.corrupt(x, "occlusion", 5)
  assert np.all((occ == 0).sum(1) >= 16)                          # 40 % of 40 samples blanked
  pix = C.corrupt(x, "pixelate", 5)                               # cells of 2: pairs are equal
  np.testing.assert_allclose(pix[:, 0::2], pix[:, 1::2], atol=1e-6)
  blur = C.corrupt(x, "gaussian_blur", 5)
  assert np.abs(np.diff(blur, axis=1)).mean() < np.abs(np.diff(x, axis=1)).mean()


def test_corrupt_errors():
  x = _signals(4)
  with pytest.raises(KfuseError, match="corruption: unknown"):
    C.corrupt(x, "snow", 1)
  with pytest.raises(KfuseError, match="severity"):
    C.corrupt(x, "gaussian_noise", 6)
  with pytest.raises(KfuseError, match="x: contains NaN"):
    C.corrupt(np.where(x > 0.5, np.nan, x), "gaussian_noise", 1)
  with pytest.raises(KfuseError, match="x: expected"):
    C.corrupt(x.reshape(-1), "gaussian_noise", 1)


def _domains(n=10, k=3):
  rng = np.random.default_rng(0)
  return [C.Domain(f"d{i}", 5, rng.standard_normal((n, 4)).astype(np.float32) + i,
                   np.repeat(np.arange(5), n // 5).astype(np.int32)) for i in range(k)]


def test_stream_protocols_and_shapes():
  doms = _domains()
  cont = C.make_stream(doms, 4, protocol="continual")
  assert cont.x.shape == (6, 4, 4) and cont.y.shape == (6, 4)     # 10 // 4 = 2 batches per domain
  np.testing.assert_array_equal(cont.domain, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(cont.reset, [1, 0, 0, 0, 0, 0])
  rps = C.make_stream(doms, 4, protocol="reset_per_shift")
  np.testing.assert_array_equal(rps.reset, [1, 0, 1, 0, 1, 0])
  for t in range(6):                                               # batches never span domains
    assert np.all(np.abs(cont.x[t].mean() - cont.domain[t]) < 2)
  long = C.make_stream(doms, 5, repeats=3)
  assert long.num_batches == 18 and len(long.names) == 9 and long.reset.sum() == 1
  one = C.make_stream(doms, 1)
  assert one.x.shape == (30, 1, 4)
  again = C.make_stream(doms, 4, protocol="continual")
  np.testing.assert_array_equal(again.x, cont.x)                   # deterministic
  with pytest.raises(KfuseError, match="protocol"):
    C.make_stream(doms, 4, protocol="episodic")
  with pytest.raises(KfuseError, match="batch_size"):
    C.make_stream(doms, 11)
  with pytest.raises(KfuseError, match="label_order"):
    C.make_stream(doms, 4, label_order="random")


def test_label_shifted_streams():
  y = np.repeat(np.arange(10), 100).astype(np.int32)
  d = [C.Domain("c", 5, np.zeros((1000, 2), np.float32), y)]
  srt = C.make_stream(d, 50, label_order="sorted")
  assert np.all(np.diff(srt.y.reshape(-1)) >= 0)
  iid = C.make_stream(d, 50)
  dirich = C.make_stream(d, 50, label_order="dirichlet", gamma=0.05)
  classes_per_batch = lambda s: np.mean([len(np.unique(b)) for b in s.y])
  assert classes_per_batch(dirich) < 0.6 * classes_per_batch(iid)  # temporally correlated labels
  assert sorted(dirich.y.reshape(-1).tolist()) == sorted(y.tolist())


def test_corrupted_domains_are_standardized_and_cached(tmp_path):
  data = C.clean_data("digits", pool="test", cache=str(tmp_path))
  doms = C.corrupted_domains(data, ("gaussian_noise", "contrast"), (1, 5), cache=str(tmp_path),
                             include_clean=True)
  assert [(d.name, d.severity) for d in doms] == [("clean", 0), ("gaussian_noise", 1), ("contrast", 1),
                                                  ("gaussian_noise", 5), ("contrast", 5)]
  np.testing.assert_allclose(doms[0].x, (data.pool_x - data.mean) / data.std, rtol=1e-5, atol=1e-5)
  again = C.corrupted_domains(data, ("gaussian_noise",), (5,), cache=str(tmp_path))
  np.testing.assert_array_equal(again[0].x, doms[3].x)
  assert len(list((tmp_path / "corruptions").glob("*.npz"))) == 4
  with pytest.raises(KfuseError, match="data.pool"):
    C.clean_data("digits", pool="fresh", cache=str(tmp_path))
