"""End-to-end tta_bench on a tiny config, plus config checks."""

import importlib.util
import json
import os
import types

import ml_collections
import pytest

from kfuse.bench import tta_bench
from kfuse.tree import KfuseError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_module():
  path = os.path.join(ROOT, "configs", "tta_bench.py")
  spec = importlib.util.spec_from_file_location("cfg_tta_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny(workdir, cache):
  config = _config_module().get_config("quick")
  config.workdir = str(workdir)
  config.progress = False
  config.batch_size = 100
  # the shared array cache ($KFUSE_CACHE): MNIST-1D is generated once per machine, not per run
  # (caching itself is tested in tests/test_corruptions.py)
  del cache
  config.data.corruptions = ("gaussian_noise", "contrast")
  config.model.widths = (8, 16)
  config.source.steps = 150
  config.source.fisher.samples = 128
  methods = _config_module().methods()
  keep = ("source", "bn_adapt", "tent", "eata")     # CoTTA / RoTTA: unit tests + the slow run below
  methods = {k: methods[k] for k in keep}
  config.methods = ml_collections.ConfigDict(methods, sort_keys=False)
  config.long = dict(rounds=2, samples_per_domain=200, methods=("bn_adapt", "tent"))
  return config


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  workdir, cache = tmp_path_factory.mktemp("tta"), tmp_path_factory.mktemp("cache")
  config = _tiny(workdir, cache)
  return workdir, config, tta_bench.run(config)


def test_end_to_end_outputs(bench, capsys):
  workdir, config, results = bench
  for name in ("results.json", "results.md", "tta_bench.png"):
    assert os.path.isfile(workdir / name), name
  assert os.path.isdir(workdir / "checkpoints" / "source")
  saved = json.loads((workdir / "results.json").read_text())
  assert set(saved["protocols"]) == {"reset_per_shift", "continual"}
  for rows in saved["protocols"].values():
    assert list(rows) == ["source", "bn_adapt", "tent", "eata"]
    for r in rows.values():
      assert len(r["errors"]) == 2 and 0 <= r["mean"] <= 100
  # identical for the stateless methods, whatever the protocol
  protos = saved["protocols"]
  assert protos["continual"]["source"]["errors"] == protos["reset_per_shift"]["source"]["errors"]
  # contrast at severity 5 is a pure statistics shift: BN-adapt must beat the source model
  src = saved["protocols"]["continual"]["source"]["errors"][1]
  bn = saved["protocols"]["continual"]["bn_adapt"]["errors"][1]
  assert bn < src
  assert saved["long"]["rounds"] == 2 and len(saved["long"]["methods"]["tent"]["per_round"]) == 2
  md = (workdir / "results.md").read_text()
  assert "**continual**" in md and "| bn_adapt |" in md and "long continual stream" in md


def test_config_variants_and_errors(tmp_path):
  module = _config_module()
  full, quick = module.get_config(), module.get_config("quick")
  assert full.data.pool == "fresh" and full.data.severity == 5 and full.batch_size == 200
  assert list(full.methods.keys()) == ["source", "bn_adapt", "tent", "eta", "eata", "sar", "cotta", "rotta"]
  assert quick.source.steps < full.source.steps
  with pytest.raises(KfuseError, match="variant"):
    module.get_config("huge")
  with pytest.raises(KfuseError, match="methods.x.name: unknown TTA method"):
    tta_bench.method_specs({"x": {"name": "tentt"}})
  with pytest.raises(KfuseError, match="unknown field"):
    tta_bench.method_specs({"tent": {"lr": 1}})
  config = _tiny(tmp_path, tmp_path)
  config.protocols = ("episodic",)
  with pytest.raises(KfuseError, match="protocols"):
    tta_bench.run(config)


def test_shipped_methods_build_with_kfuse_optim_optimizers():
  """Every method entry of the full config builds: its optimizer follows the `kfuse.optim` schema."""
  model = types.SimpleNamespace(apply=lambda v, x, train=False: x)
  specs = {s["label"]: s for s in tta_bench.method_specs(_config_module().get_config().methods)}
  for spec in specs.values():
    tta_bench._build(spec, model, {"train": False})
  old_sgd = dict(name="sgd", learning_rate=2.5e-4, momentum=0.9)   # pre-kfuse.optim form
  with pytest.raises(KfuseError, match="methods.sar: optimizer.momentum: unknown field"):
    tta_bench._build(dict(specs["sar"], optimizer=old_sgd), model, {"train": False})


@pytest.mark.slow
def test_quick_config_runs_every_method(tmp_path):
  """The shipped ``:quick`` variant, every method, both protocols and the long stream (~3 min)."""
  config = _config_module().get_config("quick")
  config.workdir = str(tmp_path)
  config.progress = False
  results = tta_bench.run(config)
  for rows in results["protocols"].values():
    assert list(rows) == list(config.methods.keys())
    assert rows["bn_adapt"]["mean"] < rows["source"]["mean"]
  assert set(results["long"]["methods"]) == set(config.long.methods)
