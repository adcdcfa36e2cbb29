"""End-to-end test of the merge benchmark on a tiny config, plus config checks."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from kfuse import train
from kfuse.bench import merge_bench
from kfuse.tree import KfuseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_config(workdir, cache):
  config = _load_config_module("default").get_config()
  config.workdir = str(workdir)
  config.progress = False
  config.data.num_tasks = 2
  config.data.cache_dir = str(cache)
  config.data.pretrain_samples = 0  # the base split: no 20k-signal pool to generate
  config.model.hidden = (64,)
  config.model.dropout = 0.0
  config.pretrain.steps = 150
  config.pretrain.optimizer.warmup_steps = 10
  config.finetune.probe_steps = 20
  config.finetune.steps = 100
  config.finetune.optimizer.warmup_steps = 10
  config.finetune.optimizer.learning_rate = 1e-3
  config.checkpoint_every = 25
  config.methods = ml_collections.ConfigDict(dict(
      simple_average=dict(name="linear", params=dict(weight=1.0), grid={}),
      task_arithmetic=dict(name="task_arithmetic", params={}, grid={"lambda": [0.5, 1.0]}),
      ties=dict(name="ties", params=dict(density=0.5, weight=1.0), grid={}),
      dare_ties=dict(name="dare_ties", params=dict(density=0.5), grid={}),
  ), sort_keys=False)
  return config


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bench")
  cache = tmp_path_factory.mktemp("cache")
  config = _tiny_config(workdir, cache)
  results = merge_bench.run(config)
  return workdir, config, results


def test_end_to_end_outputs(bench, capsys):
  workdir, _, results = bench
  for name in ("results.json", "results.md", "merge_bench.png"):
    assert os.path.isfile(workdir / name), name
  with open(workdir / "merge_bench.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not [f for f in os.listdir(workdir) if f.startswith(".tmp-")]
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["tasks"] == results["tasks"] == ["reverse", "shift"]
  names = [r["name"] for r in on_disk["rows"]]
  assert names == ["Pretrained", "Individual", "simple_average", "task_arithmetic", "ties", "dare_ties"]
  md = (workdir / "results.md").read_text()
  assert all(f"| {n} |" in md for n in names)
  for sub in ("pretrained", "experts", "merged"):
    assert os.path.isdir(workdir / "checkpoints" / sub), sub
  assert not os.path.exists(workdir / "train_state")  # removed once the run has finished
  assert set(on_disk["ordering"]) >= {"individual >= every merge", "every merge >= pretrained",
                                      "ties > task_arithmetic"}


def _accuracy(model, variables, x, y):
  """Top-1 accuracy of ``model`` on the whole split at once (no batching, no padding)."""
  logits = np.asarray(model.apply(variables, jax.numpy.asarray(x), train=False), np.float64)
  return float(np.mean(logits.argmax(-1) == np.asarray(y)))


def test_reported_accuracies_match_an_independent_evaluation(bench):
  """Rebuild the tasks, restore the saved experts and merged backbones, and recompute every
  expert / merged test accuracy with a plain ``model.apply`` + argmax. The bench evaluates in
  padded batches of 512, so a logit can move by float32 rounding: allow one example per task."""
  from kfuse import models
  from kfuse.data import make_suite
  workdir, config, results = bench
  suite = make_suite("mnist1d", config.data.num_tasks, seed=config.seed, relabel=True,
                     val_fraction=config.data.val_fraction, cache=config.data.cache_dir)
  assert [t.name for t in suite] == results["tasks"]
  experts = train.restore_checkpoint(str(workdir / "checkpoints" / "experts"))
  merged = train.restore_checkpoint(str(workdir / "checkpoints" / "merged"))
  kw = config.model.to_dict()
  name = kw.pop("name", "mlp")
  rows = {r["name"]: r for r in results["rows"]}
  for task in suite:
    model = models.get_model(name, num_classes=task.num_classes, **kw)
    tol = 1.01 / len(task.y_test)
    expert = experts[task.name]
    ind = _accuracy(model, expert, task.x_test, task.y_test)
    assert rows["Individual"]["test"][task.name] == pytest.approx(ind, abs=tol), task.name
    assert ind > 0.25  # 10 classes: chance is 0.1
    head = expert["params"]["head"]
    for label, backbone in merged.items():
      variables = {"params": {"backbone": backbone, "head": head}}
      acc = _accuracy(model, variables, task.x_test, task.y_test)
      assert rows[label]["test"][task.name] == pytest.approx(acc, abs=tol), (label, task.name)
  for r in results["rows"]:
    assert r["test_avg"] == pytest.approx(np.mean(list(r["test"].values())))
    norm = [r["test"][t] / rows["Individual"]["test"][t] for t in results["tasks"]]
    assert r["normalized_avg"] == pytest.approx(np.mean(norm))


def test_ordering_claims_are_the_measured_comparisons(bench):
  """Each ordering entry is True exactly when the reported test averages satisfy it."""
  _, _, results = bench
  avg = {r["name"]: r["test_avg"] for r in results["rows"]}
  merges = [avg[n] for n in ("simple_average", "task_arithmetic", "ties", "dare_ties")]
  want = {"individual >= every merge": avg["Individual"] >= max(merges),
          "every merge >= pretrained": min(merges) >= avg["Pretrained"],
          "task_arithmetic > simple_average": avg["task_arithmetic"] > avg["simple_average"],
          "ties > simple_average": avg["ties"] > avg["simple_average"],
          "ties > task_arithmetic": avg["ties"] > avg["task_arithmetic"]}
  assert results["ordering"] == want
  on_disk = json.loads((bench[0] / "results.json").read_text())
  assert on_disk["ordering"] == want


def test_accuracies_are_sane(bench):
  _, _, results = bench
  rows = {r["name"]: r for r in results["rows"]}
  for r in results["rows"]:
    for split in ("val", "test"):
      assert set(r[split]) == set(results["tasks"])
      assert all(0.0 <= a <= 1.0 for a in r[split].values())
    assert 0.0 <= r["test_avg"] <= 1.0 and np.isfinite(r["normalized_avg"])
  ind = rows["Individual"]
  assert all(a > 0.25 for a in ind["test"].values())  # chance is 0.1
  assert ind["normalized_avg"] == pytest.approx(1.0)
  assert ind["test_avg"] >= rows["Pretrained"]["test_avg"]
  ta = rows["task_arithmetic"]
  assert [g["params"]["lambda"] for g in ta["grid"]] == [0.5, 1.0]
  assert ta["params"]["lambda"] in (0.5, 1.0)
  best = max(ta["grid"], key=lambda g: g["val_avg"])
  assert ta["val_avg"] == pytest.approx(best["val_avg"])
  assert results["pretrain"]["base_test_accuracy"] > 0.25


def test_checkpoints_restore(bench):
  workdir, _, results = bench
  merged = train.restore_checkpoint(str(workdir / "checkpoints" / "merged"))
  assert set(merged) == {"simple_average", "task_arithmetic", "ties", "dare_ties"}
  experts = train.restore_checkpoint(str(workdir / "checkpoints" / "experts"))
  assert set(experts) == set(results["tasks"])
  bb = experts["reverse"]["params"]["backbone"]
  assert jax.tree.structure(bb) == jax.tree.structure(merged["ties"])
  pre = train.restore_checkpoint(str(workdir / "checkpoints" / "pretrained"))
  assert set(pre["params"]) == {"backbone", "head"}


def test_existing_results_need_overwrite(bench):
  workdir, config, _ = bench
  config = ml_collections.ConfigDict(config.to_dict())
  config.overwrite = False
  with pytest.raises(KfuseError, match="overwrite"):
    merge_bench.run(config)


def test_bad_methods_fail_before_training(tmp_path):
  config = _tiny_config(tmp_path / "w", tmp_path / "c")
  config.methods.ties.params.densty = 0.3
  with pytest.raises(KfuseError, match="methods.ties.params.*'densty'"):
    merge_bench.run(config)
  config = _tiny_config(tmp_path / "w", tmp_path / "c")
  config.methods.simple_average.name = "averaging"
  with pytest.raises(KfuseError, match="methods.simple_average.name.*unknown merge method"):
    merge_bench.run(config)
  config = _tiny_config(tmp_path / "w", tmp_path / "c")
  config.methods.task_arithmetic.grid["lambda"] = []
  with pytest.raises(KfuseError, match="methods.task_arithmetic.grid.lambda"):
    merge_bench.run(config)
  assert not os.path.exists(tmp_path / "c" / "mnist1d_seed42.npz")  # nothing ran


def test_grid_points_cartesian_order():
  pts = merge_bench.grid_points({"weight": 1.0}, {"density": [0.2, 0.5], "lambda": [1, 2]})
  assert pts == [{"weight": 1.0, "density": 0.2, "lambda": 1},
                 {"weight": 1.0, "density": 0.2, "lambda": 2},
                 {"weight": 1.0, "density": 0.5, "lambda": 1},
                 {"weight": 1.0, "density": 0.5, "lambda": 2}]
  assert merge_bench.grid_points({"k": 0.2}, {}) == [{"k": 0.2}]


def test_configs_are_complete_and_valid():
  default = _load_config_module("default").get_config()
  for field in ("task", "workdir", "seed", "data", "model", "pretrain", "finetune", "methods",
                "overwrite"):
    assert field in default, field
  assert default.task == "merge_bench" and default.workdir == "workdirs/default"
  assert default.overwrite is False and default.data.num_tasks == 4
  full_mod = _load_config_module("merge_bench")
  assert full_mod.get_config("quick").to_dict() == default.to_dict()
  full = full_mod.get_config()
  assert full.data.num_tasks >= 8
  for cfg in (default, full, full_mod.get_config("digits")):
    specs = merge_bench.method_specs(cfg.methods)  # names + params known to kfuse.merge
    assert specs and all(s["points"] for s in specs)
  with pytest.raises(KfuseError, match="variant"):
    full_mod.get_config("huge")


class _Killed(Exception):
  pass


@pytest.mark.slow  # a second tiny benchmark (~20 s); fit-level resume is in test_train.py
def test_interrupted_run_resumes_from_its_checkpoints(bench, tmp_path, monkeypatch):
  _, config, reference = bench
  workdir = tmp_path / "w"
  config = ml_collections.ConfigDict(config.to_dict())
  config.workdir = str(workdir)
  keep = ("task_arithmetic", "dare_ties")  # dare_ties: its random key must not depend on order
  config.methods = ml_collections.ConfigDict({k: config.methods[k].to_dict() for k in keep})
  calls = []
  real_iterate = merge_bench.iterate

  def killed_after(it, n):
    for i, b in enumerate(it):
      if i == n:
        raise _Killed
      yield b

  def killing_iterate(*args, **kwargs):  # the 5th stream is task 2's fine-tuning
    calls.append(1)
    it = real_iterate(*args, **kwargs)
    return killed_after(it, 60) if len(calls) == 5 else it

  monkeypatch.setattr(merge_bench, "iterate", killing_iterate)
  with pytest.raises(_Killed):
    merge_bench.run(config)
  state = workdir / "train_state"
  assert train.latest_step(str(state / "pretrain")) == 150
  assert train.latest_step(str(state / "finetune_reverse")) == 100
  assert train.latest_step(str(state / "finetune_shift")) == 50  # killed at step 60
  assert not (workdir / "results.json").exists()

  # a different model cannot resume these checkpoints: the error names the field
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.hidden = (32,)
  with pytest.raises(KfuseError, match="saved with model=.*but this run has model="):
    merge_bench.run(other)

  # rerunning the same command resumes and reproduces the uninterrupted run
  monkeypatch.setattr(merge_bench, "iterate", real_iterate)
  results = merge_bench.run(config)
  assert not state.exists()
  want = {r["name"]: r["test"] for r in reference["rows"]}
  got = {r["name"]: r["test"] for r in results["rows"]}
  assert set(got) == {"Pretrained", "Individual", *keep}
  for name in got:
    assert got[name] == pytest.approx(want[name], abs=1e-6), name


def test_wrong_types_name_the_field(tmp_path):
  cases = [
      (("pretrain", "steps"), "100", "config.pretrain.steps: expected int, got str"),
      (("data", "num_tasks"), 2.5, "config.data.num_tasks: expected int or None, got float"),
      (("finetune", "optimizer", "learning_rate"), "fast",
       "config.finetune.optimizer.learning_rate: expected float"),
      (("data", "relabel"), "yes", "config.data.relabel: expected bool"),
      (("model", "hidden"), "64", "model.hidden: expected Sequence"),
      (("model", "name"), "resnet9", "model.name: unknown model 'resnet9'"),
      (("finetune", "trainable"), "heads", "config.finetune.trainable"),
  ]
  for path, value, message in cases:
    config = _tiny_config(tmp_path / "w", tmp_path / "c").to_dict()
    node = config
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = value  # a plain dict: ConfigDict itself would refuse the type change
    with pytest.raises(KfuseError, match=message.replace("(", r"\(")):
      merge_bench.run(config)
  assert not os.path.exists(tmp_path / "c")  # nothing was generated or trained
