"""Tests for the MNIST-1D baselines job (kfuse.bench.mnist1d_baselines)."""

import importlib.util
import json
import os

import ml_collections
import pytest

from kfuse.bench import mnist1d_baselines
from kfuse.tree import KfuseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg=None):
  path = os.path.join(ROOT, "configs", "mnist1d_baselines.py")
  spec = importlib.util.spec_from_file_location("cfg_mnist1d_baselines", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_config_matches_the_paper_protocol():
  config = _config()
  runs = mnist1d_baselines.check_config(config)
  assert [r["label"] for r in runs] == ["logistic_regression", "mlp", "cnn", "resnet1d"]
  assert [r.get("paper") for r in runs] == [32, 68, 94, None]
  assert config.data.val_fraction == 0.0 and len(config.seeds) == 3
  for r in runs:
    assert r["steps"] == 6000 and r["batch_size"] == 100
    assert r["optimizer"]["name"] == "adam" and r["optimizer"]["learning_rate"] == 1e-2
  assert _config("quick").seeds == (0,)
  with pytest.raises(KfuseError, match="variant"):
    _config("huge")


def test_config_errors_name_the_field():
  config = _config()
  config.models.mlp.model.name = "transformer"
  with pytest.raises(KfuseError, match="models.mlp.model.name: unknown model"):
    mnist1d_baselines.check_config(config)
  config = _config().to_dict()
  config["models"]["cnn"]["steps"] = "6000"
  with pytest.raises(KfuseError, match="models.cnn.steps: expected int, got str"):
    mnist1d_baselines.check_config(config)
  config = _config().to_dict()
  config["models"]["mlp"]["model"]["hidden"] = 100
  with pytest.raises(KfuseError, match="models.mlp.model.hidden: expected Sequence"):
    mnist1d_baselines.check_config(config)
  config = _config().to_dict()
  config["seeds"] = (0, "1")
  with pytest.raises(KfuseError, match="config.seeds"):
    mnist1d_baselines.check_config(config)


def test_tiny_run_writes_the_table(tmp_path):
  config = _config("quick")
  config.workdir = str(tmp_path / "w")
  config.progress = False
  config.models = ml_collections.ConfigDict(dict(
      logistic_regression=dict(model=dict(name="linear"), steps=30, batch_size=100, paper=32,
                               optimizer=dict(name="adam", learning_rate=1e-2)),
      mlp=dict(model=dict(name="mlp", hidden=(16,)), steps=30, batch_size=100, paper=68,
               optimizer=dict(name="adam", learning_rate=1e-2)),
  ), sort_keys=False)
  results = mnist1d_baselines.run(config)
  on_disk = json.loads((tmp_path / "w" / "results.json").read_text())
  assert on_disk["sizes"] == {"train": 4000, "val": 0, "test": 1000}
  assert [r["label"] for r in on_disk["rows"]] == ["logistic_regression", "mlp"]
  for r in results["rows"]:
    assert 0.1 < r["test_mean"] <= 1.0  # better than chance after 30 steps
  md = (tmp_path / "w" / "results.md").read_text()
  assert "| logistic_regression | 32 |" in md and "| mlp | 68 |" in md
  with pytest.raises(KfuseError, match="overwrite"):
    config.overwrite = False
    mnist1d_baselines.run(config)
