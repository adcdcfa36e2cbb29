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


def _per_seed(seed, errors, per_round):
  row = lambda e: {"errors": e, "mean": sum(e) / len(e), "seconds": 1.0}
  return {"seed": seed, "dataset": "d", "severity": 5, "corruptions": ["a", "b"],
          "batch_size": 10, "samples_per_domain": 20, "clean": {"pool_accuracy": 0.9},
          "protocols": {"continual": {"tent": row(errors)}},
          "long": {"rounds": 2, "samples_per_domain": 5,
                   "methods": {"tent": {"errors": errors + errors, "per_round": per_round}}},
          "timing_s": {"total": 2.0}}


def test_aggregate_is_mean_and_sample_std_over_seeds():
  import statistics
  runs = [_per_seed(0, [10.0, 20.0], [15.0, 14.0]), _per_seed(1, [12.0, 30.0], [21.0, 20.0]),
          _per_seed(2, [11.0, 25.0], [18.0, 19.0])]
  agg = tta_bench.aggregate(runs)
  row = agg["protocols"]["continual"]["tent"]
  means = [15.0, 21.0, 18.0]
  assert row["seed_means"] == means
  assert row["mean"] == pytest.approx(statistics.mean(means))
  assert row["std"] == pytest.approx(statistics.stdev(means))
  assert row["errors"] == pytest.approx([11.0, 25.0])
  assert row["errors_std"] == pytest.approx([statistics.stdev([10, 12, 11]),
                                             statistics.stdev([20, 30, 25])])
  lg = agg["long"]["methods"]["tent"]
  assert lg["per_round"] == pytest.approx([18.0, 53 / 3])
  assert lg["per_round_std"][0] == pytest.approx(statistics.stdev([15, 21, 18]))
  assert agg["seeds"] == [0, 1, 2] and agg["timing_s"]["total"] == 6.0
  md = tta_bench.markdown_tables(agg)
  assert f"**18.0 ± {statistics.stdev(means):.1f}**" in md
  one = tta_bench.markdown_tables(tta_bench.aggregate(runs[:1]))     # one seed: no "± 0.0"
  assert "**15.0**" in one and "±" not in one


def test_images_variant_config():
  module = _config_module()
  img, quick = module.get_config("images"), module.get_config("images_quick")
  assert img.seeds == (0, 1, 2) and img.model.name == "cnn2d" and img.data.name == "glyph_digits"
  assert img.data.sizes[2] // img.batch_size == 50       # CIFAR-10-C's 50 steps per corruption
  assert quick.seeds == (0,) and quick.data.sizes[2] < img.data.sizes[2]
  assert set(quick.methods.keys()) == {"source", "bn_adapt", "tent", "eata"}
  assert set(img.methods.keys()) == {"source", "bn_adapt", "tent", "eata", "cotta"}
  assert set(img.long.methods) <= set(img.methods.keys())
  assert "vida" not in module.get_config().methods and "vida" in module.methods()


@pytest.mark.slow
def test_images_end_to_end_two_seeds(tmp_path):
  """(~90 s CPU, mostly compiling CoTTA's 2-D augmentation) Tiny 2-D run: the image task, two corruptions, two seeds aggregated; CoTTA gets 2-D views."""
  config = _config_module().get_config("images_quick")
  config.workdir = str(tmp_path)
  config.progress = False
  config.seeds = (0, 1)
  config.data.sizes = (300, 50, 200)
  config.data.corruptions = ("gaussian_noise", "contrast")
  config.model.widths = (4, 8)
  config.source.steps = 30
  config.source.optimizer.warmup_steps = 5
  config.source.fisher.samples = 64
  methods = _config_module().methods()
  methods["cotta"]["params"]["n_augment"] = 2
  config.methods = ml_collections.ConfigDict({k: methods[k] for k in ("source", "bn_adapt", "cotta")},
                                             sort_keys=False)
  config.long = dict(rounds=0)
  results = tta_bench.run(config)
  assert results["seeds"] == [0, 1] and len(results["per_seed"]) == 2
  for seed in (0, 1):
    assert os.path.isdir(tmp_path / "checkpoints" / f"source_seed{seed}")
  rows = results["protocols"]["continual"]
  for label, r in rows.items():
    per = [s["protocols"]["continual"][label]["mean"] for s in results["per_seed"]]
    assert r["mean"] == pytest.approx(sum(per) / 2)
  assert results["corruptions"] == ["gaussian_noise", "contrast"]
  assert "±" in (tmp_path / "results.md").read_text()
  config.source_checkpoint = str(tmp_path / "checkpoints" / "source_seed0")
  config.overwrite = True
  with pytest.raises(KfuseError, match="source_checkpoint: one checkpoint cannot serve several"):
    tta_bench.run(config)


@pytest.mark.slow
def test_images_vit_variant_runs_kff(tmp_path):
  """(~1-2 min CPU, compiling KFF's step) The ViT variant: KFF gets the source statistics from the
  bench (clean training CLS features) and runs the continual stream."""
  module = _config_module()
  vit = module.get_config("images_vit")
  assert vit.model.name == "vit" and vit.protocols == ("continual",) and vit.seeds == (0, 1, 2)
  assert list(vit.methods.keys()) == ["source", "tent", "cotta", "vida", "kff"]
  config = vit
  config.workdir = str(tmp_path)
  config.progress = False
  config.seeds = (0,)
  config.data.sizes = (300, 50, 200)
  config.data.corruptions = ("gaussian_noise", "contrast")
  config.model.dim, config.model.depth = 8, 1
  config.source.steps = 30
  config.source.optimizer.warmup_steps = 5
  config.source.fisher.samples = 64
  config.methods = ml_collections.ConfigDict({k: module.methods()[k] for k in ("source", "kff")},
                                             sort_keys=False)
  config.methods.kff.params.e_ood = 2
  results = tta_bench.run(config)
  kff = results["per_seed"][0]["protocols"]["continual"]["kff"]
  assert 0.0 <= kff["mean"] <= 100.0 and kff["metrics"]["domain_pool"] >= 1.0
