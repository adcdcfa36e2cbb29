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
