"""configs/merge_informed_hf.py end to end: statistics on a text file, streamed RegMean, vs a
float64 NumPy RegMean of the saved Grams; bad input in one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from kfuse.merge import statistics as ST
from kfuse.models import hf
from tests.test_hf_lm import WORDS, _model_dir, _tokenizer


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "kfuse.main",
                         "--config=configs/merge_informed_hf.py:regmean", *args],
                        capture_output=True, text=True, env=env)


def _inputs(tmp_path):
  dirs = []
  for i in range(2):
    d = _model_dir(tmp_path / f"m{i}", seed=i)
    _tokenizer(os.path.join(d, "tokenizer.json"))
    dirs.append(d)
  rng = np.random.default_rng(0)
  texts = []
  for i in range(2):
    p = tmp_path / f"t{i}.txt"
    p.write_text(" ".join(rng.choice(WORDS, 120)))
    texts.append(str(p))
  return dirs, texts


def _check_against_float64(dirs, out):
  """The merged model vs a float64 NumPy RegMean of the saved Grams; returns the Grams."""
  sts = [ST.load(out + f".stats/model_{i}") for i in range(2)]
  assert all(s.tokens["model.layers.0.mlp.down_proj.weight"] == 120 for s in sts)
  ws = [hf.to_hf_dict(hf.load(d)) for d in dirs]
  got = hf.to_hf_dict(hf.load(out))
  for k in got:
    w = [np.asarray(x[k], np.float64) for x in ws]
    if k in sts[0].gram:
      g = [np.asarray(s.gram[k], np.float64) for s in sts]
      g = [0.95 * gi + 0.05 * np.diag(np.diag(gi)) for gi in g]
      want = np.linalg.solve(sum(g), sum(gi @ wi.T for gi, wi in zip(g, w))).T
    else:
      want = np.mean(w, axis=0)
    np.testing.assert_allclose(np.asarray(got[k]), want, rtol=0,
                               atol=1e-4 * np.abs(want).max(), err_msg=k)
  return sts


@pytest.mark.slow
def test_job_regmean_equals_float64_reference(tmp_path):
  dirs, texts = _inputs(tmp_path)
  out = str(tmp_path / "out")
  r = _cli(f"--config.models={','.join(dirs)}", f"--config.text_files={','.join(texts)}",
           f"--config.output_dir={out}", "--config.seq_len=16", "--config.batch_size=4",
           "--config.progress=False")
  assert r.returncode == 0, r.stderr[-2000:]
  _check_against_float64(dirs, out)


@pytest.mark.slow
def test_job_on_four_devices_equals_one_device(tmp_path):
  """--config.num_devices=4 (8 emulated CPU devices): the windows split over 4 devices for the
  Grams, the merge sharded; the Grams equal the one-device job's (max |diff| / max |G| ≤ 1e-5,
  float32 sums in another order) and the merge the float64 reference."""
  dirs, texts = _inputs(tmp_path)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  outs = {}
  for n in (0, 4):
    outs[n] = str(tmp_path / f"out{n}")
    r = _cli(f"--config.models={','.join(dirs)}", f"--config.text_files={','.join(texts)}",
             f"--config.output_dir={outs[n]}", "--config.seq_len=16", "--config.batch_size=4",
             "--config.progress=False", f"--config.num_devices={n}", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
  one = _check_against_float64(dirs, outs[0])
  four = _check_against_float64(dirs, outs[4])
  for a, b in zip(one, four):
    assert a.tokens == b.tokens and set(a.gram) == set(b.gram)
    for k in a.gram:
      g = np.asarray(a.gram[k], np.float64)
      assert np.abs(np.asarray(b.gram[k], np.float64) - g).max() <= 1e-5 * np.abs(g).max(), k


def test_job_text_files_count_is_one_line(tmp_path):
  r = _cli("--config.models=a,b,c", "--config.text_files=x,y", f"--config.output_dir={tmp_path}/o")
  assert r.returncode != 0
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith("kfuse: error: config.text_files: 2 files for 3 models")


SHARDED_HF = """
import json, sys
import numpy as np, jax
from kfuse.merge import hf_statistics as H
from kfuse.models import hf
from tests.test_hf_lm import _model_dir
assert len(jax.devices()) == 8
d = _model_dir(sys.argv[1], seed=0)
ids = np.random.default_rng(0).integers(0, 50, 90)
batches = H.token_batches(ids, seq_len=8, batch_size=4)   # 12 windows, the last padded
mesh = hf.make_mesh(data=4)
out = {}
for mode in ("per_example", "batch"):
  one = H.fisher(hf.load(d), batches, mode=mode)
  m = hf.load(d, mesh=mesh)
  x = H._place(batches[0]["x"], mesh)
  out["split"] = [not x.sharding.is_fully_replicated, x.addressable_shards[0].data.shape[0]]
  four = H.fisher(m, batches, mode=mode, mesh=mesh)
  out[mode] = max(float(np.abs(np.asarray(four.fisher[k], np.float64) - np.asarray(v, np.float64)).max()
                        / max(np.abs(np.asarray(v, np.float64)).max(), 1e-30)) for k, v in one.fisher.items())
  out[mode + "_examples"] = [one.examples, four.examples]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_hf_fisher_on_four_devices_equals_one_device(tmp_path):
  """`hf_statistics.fisher(..., mesh=)` (windows split over a data=4 mesh, 8 emulated CPU
  devices) vs one device, both modes: max |diff| / max |F| per tensor ≤ 1e-5."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
  p = subprocess.run([sys.executable, "-c", SHARDED_HF, str(tmp_path / "m")], capture_output=True,
                     text=True, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  import json
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["split"] == [True, 1], r
  for mode in ("per_example", "batch"):
    assert r[mode + "_examples"] == [12, 12], r
    assert r[mode] <= 1e-5, r
