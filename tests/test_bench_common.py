"""Shared benchmark helpers and job dispatch: bad inputs give one-line errors."""

import json
import os

import ml_collections
import pytest

from kfuse import tasks
from kfuse.bench import common
from kfuse.tree import KfuseError


def test_check_workdir_refuses_finished_results_unless_overwrite(tmp_path):
  wd = tmp_path / "run"
  assert common.check_workdir(str(wd), overwrite=False) == str(wd)    # created
  common.write_json(str(wd / "results.json"), {"a": 1.5})
  with pytest.raises(KfuseError, match=r"already holds results.json; pass --config.overwrite=True"):
    common.check_workdir(str(wd), overwrite=False)
  assert common.check_workdir(str(wd), overwrite=True) == str(wd)
  with pytest.raises(KfuseError, match="workdir: empty"):
    common.check_workdir("", overwrite=True)
  assert json.load(open(wd / "results.json")) == {"a": 1.5}
  assert [n for n in os.listdir(wd) if n.startswith(".")] == []      # no temp files left


def test_method_entries_refuse_unknown_fields():
  cfg = ml_collections.ConfigDict({"ta": {"method": "task_arithmetic", "params": {"x": 1}},
                                   "plain": None})
  assert dict(common.method_entries(cfg, ("method", "params"))) == {
      "ta": {"method": "task_arithmetic", "params": {"x": 1}}, "plain": {}}
  bad = {"ta": {"method": "x", "grdi": {}}}
  with pytest.raises(KfuseError, match=r"^methods.ta: unknown field 'grdi' \(expected method, params, grid\)$"):
    common.method_entries(bad, ("method", "params", "grid"))


def test_unknown_task_is_named():
  with pytest.raises(KfuseError, match=r"config.task: unknown task 'nope'; known: .*merge_bench"):
    tasks.entry(ml_collections.ConfigDict({"task": "nope"}))


def test_plain_makes_json_values():
  import numpy as np
  assert common.plain({1: (np.float32(0.5), [np.int64(2)])}) == {"1": [0.5, [2]]}


def test_one_config_reader_for_benchmarks_optimizers_and_merge_jobs():
  """`kfuse.configs.get` / `to_dict` are the one reader: the benchmarks' helpers are them, and
  kfuse.optim and the merge runner read ConfigDicts, dicts and plain objects through them."""
  import types
  from kfuse import configs, optim
  from kfuse.merge import runner
  assert common.get is configs.get and common.to_dict is configs.to_dict
  cd = ml_collections.ConfigDict({"learning_rate": 0.5, "kwargs": {"momentum": 0.9}, "x": None})
  for cfg in (cd, cd.to_dict(), types.SimpleNamespace(**cd.to_dict())):
    assert configs.get(cfg, "learning_rate") == 0.5 and configs.get(cfg, "nope", 3) == 3
    assert configs.get(cfg, "x", 3) is None and runner._get(cfg, "x", 3) == 3   # unset: default
  assert configs.to_dict(cd.kwargs) == {"momentum": 0.9} and configs.to_dict(None) == {}
  assert configs.get(None, "a", 1) == 1
  tx = optim.make_optimizer(ml_collections.ConfigDict(
      {"name": "sgd", "learning_rate": 0.5, "kwargs": {"momentum": 0.0}}), total_steps=1)
  import jax.numpy as jnp
  upd, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
  assert [float(u) for u in upd["w"]] == [-0.5, -0.5]     # sgd: −lr·g
