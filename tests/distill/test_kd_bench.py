"""kd_bench: config validation (fast) and a tiny end-to-end run (slow)."""

import json
import os

import numpy as np
import pytest

from kfuse import train
from kfuse.bench import kd_bench
from kfuse.tree import KfuseError


def _config(tmp_path, **over):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "kd_bench.py")
  spec = importlib.util.spec_from_file_location("kd_bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("quick")
  config.workdir = str(tmp_path / "kd")
  for k, v in over.items():
    setattr(config, k, v)
  return config


def test_label_noise_is_symmetric_and_exact():
  y = np.arange(10000) % 10
  noisy = train.add_label_noise(y, 10, 0.4, seed=0)
  flipped = noisy != y
  assert abs(flipped.mean() - 0.4) < 0.02
  counts = np.bincount(noisy[flipped], minlength=10)
  assert counts.min() > 0.7 * counts.mean()          # spread over the other classes
  assert np.array_equal(noisy, train.add_label_noise(y, 10, 0.4, seed=0))


def test_config_errors_name_the_field(tmp_path):
  config = _config(tmp_path)
  config.methods.hinton.objective.temprature = 2.0
  with pytest.raises(KfuseError, match="methods.hinton.objective.hinton"):
    kd_bench.run(config)
  config = _config(tmp_path)
  config.methods.dkd.objective.beta = -1.0
  with pytest.raises(KfuseError, match="methods.dkd.beta"):
    kd_bench.run(config)
  config = _config(tmp_path)
  config.datasets.mnist1d.methods = ("alone", "nope")
  with pytest.raises(KfuseError, match="datasets.mnist1d.methods: 'nope'"):
    kd_bench.run(config)
  config = _config(tmp_path)
  config.seeds = (0, 0)
  with pytest.raises(KfuseError, match="seeds"):
    kd_bench.run(config)


@pytest.mark.slow
def test_tiny_run_writes_tables_plot_and_json(tmp_path):
  config = _config(tmp_path, seeds=(0, 1))
  config.datasets.mnist1d.teacher_steps = 30
  config.datasets.mnist1d.student_steps = 30
  config.datasets.mnist1d.methods = ("alone", "hinton", "dkd")
  config.forget_me_not.steps = 40
  config.forget_me_not.checkpoint_every = 10
  config.forget_me_not.distill_steps = 20
  config.fantastic_gains.steps = 10
  config.optimizer.warmup_steps = 5              # < the 20-40 steps of this tiny run
  config.forget_me_not.optimizer.warmup_steps = 5
  results = kd_bench.run(config)
  out = tmp_path / "kd"
  for name in ("results.json", "results.md", "kd_bench.png"):
    assert (out / name).exists()
  saved = json.loads((out / "results.json").read_text())
  rows = {r["name"]: r for r in saved["students"]["mnist1d"]["rows"]}
  assert set(rows) == {"alone", "hinton", "dkd"}
  assert len(rows["hinton"]["test"]["values"]) == 2 and "delta_vs_alone" in rows["hinton"]
  assert {r["name"] for r in results["forget_me_not"]["rows"]} >= {"original", "distilled"}
  assert {r["name"] for r in results["fantastic_gains"]["rows"]} >= {"kl", "kl_dp"}


def test_tables_and_plot_from_the_recorded_full_run(tmp_path):
  # fast coverage of the reporting path (the slow test above runs the whole pipeline)
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "kd_bench",
                      "results_full.json")
  if not os.path.exists(path):
    pytest.skip("experiments/kd_bench/results_full.json not present")
  with open(path) as f:
    results = json.load(f)
  tables = kd_bench.markdown_tables(results)
  assert "| hinton | student |" in tables and "| distilled |" in tables and "| kl_dp |" in tables
  png = kd_bench.plot(results, str(tmp_path / "p.png"))
  assert os.path.getsize(png) > 10_000
