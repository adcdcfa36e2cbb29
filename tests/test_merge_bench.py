"""The merging benchmark on a pinned pool: a tiny end-to-end run checked against independent
recomputations (float64 NumPy merges, plain ``model.apply`` accuracies), the sequential and
data-informed hooks, negation's constraint, configs, and the bad-input lines through the CLI."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from kfuse import models, train
from kfuse.bench import merge_bench
from kfuse.data import image_tasks
from kfuse.tree import KfuseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_ORDER = ["texture", "grating_orientation", "shapes"]
LAMBDAS = [0.3, 1.0]
NEG_LAMBDAS = [0.5, 1.0, 3.0]


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_config(workdir, pool_path, cache):
  config = _config_module("merge_bench").get_config("quick,pool=tiny")
  config.workdir = str(workdir)
  config.progress = False
  config.pool.path = str(pool_path)
  config.data.cache_dir = str(cache)
  config.data.unlabeled_per_task = 7
  config.data.val_per_task = 5
  config.methods = ml_collections.ConfigDict(dict(
      simple_average=dict(name="simple_average", params={}, grid={}),
      task_arithmetic=dict(name="task_arithmetic", params=dict(weight=1.0),
                           grid={"lambda": list(LAMBDAS)}),
      ties=dict(name="ties", params=dict(density=0.5, weight=1.0), grid={"lambda": [0.5, 1.0]}),
      first_expert=dict(name="_test_first_expert", params={}, grid={}),
  ), sort_keys=False)
  config.negation.enabled = True
  config.negation.grid = {"lambda": list(NEG_LAMBDAS)}
  config.sequential.order = list(SEQ_ORDER)
  config.sequential.methods = ["task_arithmetic"]
  return config


SEEN = {}


def _first_expert(inputs, params):
  """A data-informed merger for the hook test: records its inputs, returns expert 0's backbone."""
  SEEN.update(tasks=list(inputs.tasks), params=dict(params),
              shapes={t: (d.unlabeled.shape, d.x_val.shape, d.y_val.shape) for t, d in inputs.data.items()},
              labels={t: np.asarray(d.y_val) for t, d in inputs.data.items()})
  return inputs.experts[0]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  if "_test_first_expert" not in merge_bench.MERGERS:
    merge_bench.register_merger("_test_first_expert", _first_expert, defaults={})
  root = tmp_path_factory.mktemp("bench")
  config = _tiny_config(root / "work", root / "pool", root / "cache")
  results = merge_bench.run(config)  # builds the tiny pool first (absent), then loads it
  return root, config, results


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _accuracy(model, variables, x, y):
  """Top-1 accuracy with one unbatched ``model.apply`` (no padding, no jit)."""
  logits = np.asarray(model.apply(variables, np.asarray(x), train=False), np.float64)
  return float(np.mean(logits.argmax(-1) == np.asarray(y)))


def _pool_parts(root, tasks):
  """The pool's checkpoints restored directly with Orbax (not through load_pool)."""
  pre = train.restore_checkpoint(str(root / "pool" / "pretrained"))
  experts = {t: train.restore_checkpoint(str(root / "pool" / "experts" / t)) for t in tasks}
  probes = {t: train.restore_checkpoint(str(root / "pool" / "probes" / t)) for t in tasks}
  return pre, experts, probes


def _tasks_and_models(results):
  cfg = results["pool"]["config"]
  kw = {k: v for k, v in cfg["model"].items() if k != "name"}
  out = {}
  for t in results["tasks"]:
    ds = image_tasks.load_task(t, seed=cfg["data"]["seed"], sizes=tuple(cfg["data"]["sizes"]),
                               cache=results["config"]["data"]["cache_dir"])
    out[t] = (ds, models.get_model(cfg["model"]["name"], num_classes=ds.num_classes, **kw))
  return out


def _tol(ds):
  return 1.01 / len(ds.y_test)   # padded, jitted batches may flip one float32 near-tie


def test_outputs_and_rows(bench):
  root, _, results = bench
  work = root / "work"
  for name in ("results.json", "results.md", "merge_bench.png"):
    assert (work / name).is_file(), name
  assert (work / "merge_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  on_disk = json.loads((work / "results.json").read_text())
  assert on_disk["tasks"] == ["grating_orientation", "shapes", "texture"]
  names = [r["name"] for r in on_disk["rows"]]
  assert names == ["Pretrained", "Individual", "simple_average", "task_arithmetic", "ties",
                   "first_expert", "seq:task_arithmetic"]
  md = (work / "results.md").read_text()
  assert all(f"| {n} |" in md for n in names) and "Task negation" in md
  assert os.path.isfile(root / "pool" / "manifest.json")   # the job built the pool
  assert on_disk["pool"]["experts_sha256"] == {
      t: json.loads((root / "pool" / "manifest.json").read_text())["experts"][t]["expert"]["sha256"]
      for t in on_disk["tasks"]}
  assert {"pool_build", "merges", "negation", "total"} <= set(on_disk["timing_s"])


def test_reference_rows_match_an_independent_evaluation(bench):
  root, _, results = bench
  rows = {r["name"]: r for r in results["rows"]}
  tm = _tasks_and_models(results)
  pre, experts, probes = _pool_parts(root, results["tasks"])
  for t, (ds, model) in tm.items():
    ind = _accuracy(model, experts[t], ds.x_test, ds.y_test)
    assert rows["Individual"]["test"][t] == pytest.approx(ind, abs=_tol(ds)), t
    zs = {"params": {"backbone": pre["params"]["backbone"], "head": probes[t]["params"]["head"]}}
    assert rows["Pretrained"]["test"][t] == pytest.approx(
        _accuracy(model, zs, ds.x_test, ds.y_test), abs=_tol(ds)), t
  for r in results["rows"]:
    norm = {t: r["test"][t] / rows["Individual"]["test"][t] for t in results["tasks"]}
    assert r["normalized"] == pytest.approx(norm)
    assert r["normalized_avg"] == pytest.approx(np.mean(list(norm.values())))
    assert r["test_avg"] == pytest.approx(np.mean(list(r["test"].values())))
  assert rows["Pretrained"]["literature"] == {"avg": 48.2, "normalized": pytest.approx(48.2 / 90.3)}
  assert rows["ties"]["literature"]["avg"] == 72.2 and "literature" not in rows["first_expert"]


def test_task_arithmetic_row_is_the_val_argmax_of_a_numpy_merge(bench):
  """The chosen lambda is the argmax of the recorded val trace; the saved merged backbone is
  theta0 + lambda * sum_i tau_i recomputed in float64; its test accuracies are recomputed."""
  root, _, results = bench
  ta = next(r for r in results["rows"] if r["name"] == "task_arithmetic")
  assert [g["params"]["lambda"] for g in ta["grid"]] == LAMBDAS
  best = max(ta["grid"], key=lambda g: g["val_avg"])   # first max, as the bench breaks ties
  assert ta["params"]["lambda"] == best["params"]["lambda"]
  assert ta["val_avg"] == pytest.approx(best["val_avg"])
  lam = ta["params"]["lambda"]
  pre, experts, probes = _pool_parts(root, results["tasks"])
  b0 = _np(pre["params"]["backbone"])
  taus = [jax.tree.map(lambda e, b: e - b, _np(experts[t]["params"]["backbone"]), b0)
          for t in results["tasks"]]
  want = jax.tree.map(lambda b, *ts: b + lam * sum(ts), b0, *taus)
  merged = train.restore_checkpoint(str(root / "work" / "checkpoints" / "merged"))
  got = _np(merged["task_arithmetic"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for t, (ds, model) in _tasks_and_models(results).items():
    v = {"params": {"backbone": merged["task_arithmetic"], "head": experts[t]["params"]["head"]}}
    assert ta["test"][t] == pytest.approx(_accuracy(model, v, ds.x_test, ds.y_test), abs=_tol(ds))


def test_sequential_hook_folds_in_the_given_order(bench):
  """seq:task_arithmetic folds theta <- theta0 + lambda*((theta - theta0) + tau_t) over SEQ_ORDER,
  starting from the first expert (float64 NumPy); another order gives another model."""
  root, _, results = bench
  assert results["sequential"] == {"order": SEQ_ORDER, "methods": ["task_arithmetic"]}
  pre, experts, _ = _pool_parts(root, results["tasks"])
  b0 = _np(pre["params"]["backbone"])
  e = {t: _np(experts[t]["params"]["backbone"]) for t in results["tasks"]}
  merged = train.restore_checkpoint(str(root / "work" / "checkpoints" / "merged"))
  row = next(r for r in results["rows"] if r["name"] == "seq:task_arithmetic")
  assert row["order"] == SEQ_ORDER
  assert [g["params"]["lambda"] for g in row["grid"]] == LAMBDAS
  assert row["params"]["lambda"] == max(row["grid"], key=lambda g: g["val_avg"])["params"]["lambda"]

  def fold(order, lam):
    theta = e[order[0]]
    for t in order[1:]:
      theta = jax.tree.map(lambda m, x, z: z + lam * ((m - z) + (x - z)), theta, e[t], b0)
    return theta

  want = fold(SEQ_ORDER, row["params"]["lambda"])
  for g, w in zip(jax.tree.leaves(_np(merged["seq:task_arithmetic"])), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  other = fold(SEQ_ORDER[::-1], 0.3)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(fold(SEQ_ORDER, 0.3)), jax.tree.leaves(other))) > 1e-4   # order matters


def test_data_informed_hook_gets_the_recorded_budget(bench):
  root, _, results = bench
  assert SEEN["tasks"] == results["tasks"] and SEEN["params"] == {}
  tm = _tasks_and_models(results)
  for t, (ds, _) in tm.items():
    unl, xv, yv = SEEN["shapes"][t]
    assert unl == (7,) + ds.x_test.shape[1:] and xv == (5,) + ds.x_val.shape[1:] and yv == (5,)
    np.testing.assert_array_equal(SEEN["labels"][t], ds.y_val[:5])
    assert results["data_budget"]["per_task"][t] == {
        "unlabeled_test": 7, "labeled_val": 5, "val_split": len(ds.y_val), "test_split": len(ds.y_test)}
  row = next(r for r in results["rows"] if r["name"] == "first_expert")
  first = results["tasks"][0]
  ind = next(r for r in results["rows"] if r["name"] == "Individual")
  assert row["test"][first] == pytest.approx(ind["test"][first])   # expert 0 with its own head


def test_negation_lambda_meets_the_control_constraint(bench):
  root, _, results = bench
  neg = results["negation"]
  assert neg["targets"] == results["tasks"] and neg["literature"] == {"target": 24.0, "control": 60.9}
  pre, experts, probes = _pool_parts(root, results["tasks"])
  tm = _tasks_and_models(results)
  b0 = _np(pre["params"]["backbone"])
  for target, r in neg["per_target"].items():
    trace = r["trace"]
    assert [p["params"]["lambda"] for p in trace] == NEG_LAMBDAS
    bound = 0.95 * r["pretrained"]["control_val"]
    feasible = [p for p in trace if p["control_val"] >= bound]
    assert r["feasible"] == bool(feasible)
    if feasible:
      want = min(feasible, key=lambda p: p["target_val"])
      assert r["negated"]["control_val"] >= bound
    else:
      want = max(trace, key=lambda p: p["control_val"])
    assert r["lambda"] == want["params"]["lambda"]
    # theta0 - lambda * tau_target, evaluated independently with the zero-shot heads
    tau = jax.tree.map(lambda e, b: e - b, _np(experts[target]["params"]["backbone"]), b0)
    bb = jax.tree.map(lambda b, t: (b - r["lambda"] * t).astype(np.float32), b0, tau)
    acc = {t: _accuracy(model, {"params": {"backbone": bb, "head": probes[t]["params"]["head"]}},
                        ds.x_test, ds.y_test) for t, (ds, model) in tm.items()}
    ds_t = tm[target][0]
    assert r["negated"]["target_test"] == pytest.approx(acc[target], abs=_tol(ds_t))
    control = [t for t in results["tasks"] if t != target]
    assert r["control_tasks"] == control
    assert r["negated"]["control_test"] == pytest.approx(np.mean([acc[t] for t in control]), abs=_tol(ds_t))
  assert neg["average"]["negated_target"] == pytest.approx(
      np.mean([r["negated"]["target_test"] for r in neg["per_target"].values()]))


def test_ordering_claims_are_the_measured_comparisons(bench):
  _, _, results = bench
  avg = {r["name"]: 100 * r["test_avg"] for r in results["rows"]}
  norm = {r["name"]: 100 * r["normalized_avg"] for r in results["rows"]}
  want = {"Individual >= Pretrained + 30": avg["Individual"] >= avg["Pretrained"] + 30,
          "simple_average normalised <= 85": norm["simple_average"] <= 85,
          "simple_average < task_arithmetic": avg["simple_average"] < avg["task_arithmetic"],
          "task_arithmetic + 2 <= ties": avg["task_arithmetic"] + 2 <= avg["ties"],
          "ties < Individual": avg["ties"] < avg["Individual"]}
  assert results["ordering"] == want


def test_negation_choice_rule():
  tr = [{"target_val": 0.5, "control_val": 0.9}, {"target_val": 0.2, "control_val": 0.86},
        {"target_val": 0.1, "control_val": 0.5}]
  assert merge_bench.negation_choice(tr, 0.9, 0.95) == (1, True)   # 0.86 >= 0.855
  assert merge_bench.negation_choice(tr, 0.95, 0.95) == (0, False)  # none feasible: best control


def test_existing_results_need_overwrite(bench):
  root, config, _ = bench
  config = ml_collections.ConfigDict(config.to_dict())
  with pytest.raises(KfuseError, match="overwrite"):
    merge_bench.run(config)


def test_bad_methods_fail_before_any_work(tmp_path):
  cases = [(("methods", "ties", "params", "densty"), 0.3, r"methods.ties.params.*'densty'"),
           (("methods", "simple_average", "name"), "averaging",
            "methods.simple_average.name.*unknown merge method"),
           (("methods", "task_arithmetic", "grid", "lambda"), [], "methods.task_arithmetic.grid.lambda"),
           (("pool", "preset"), "tiyn", r"config.pool.preset: unknown preset 'tiyn' \(did you mean 'tiny'"),
           (("negation", "control_threshold"), 1.5, "control_threshold"),
           (("data", "val_per_task"), "5", "config.data.val_per_task: expected int"),
           (("sequential", "order"), ["shapes", "textrue"],
            r"config.sequential.order: 'textrue' is not one of the benchmark's tasks \(did you mean 'texture'"),
           (("negation", "targets"), ["sk_digits"], "config.negation.targets: 'sk_digits'")]
  for path, value, message in cases:
    config = _tiny_config(tmp_path / "w", tmp_path / "p", tmp_path / "c").to_dict()
    node = config
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = value
    with pytest.raises(KfuseError, match=message):
      merge_bench.run(config)
  assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "c")


def test_configs_are_complete_and_valid():
  mod = _config_module("merge_bench")
  assert mod.TASK_NAMES == image_tasks.TASK_NAMES
  default = _config_module("default").get_config()
  assert default.to_dict() == mod.get_config("quick").to_dict()
  assert default.task == "merge_bench" and default.workdir == "workdirs/default"
  assert default.overwrite is False and default.pool.path == ""
  for arg, n in (("8", 8), ("14", 14), ("20", 20), ("negation", 8)):
    cfg = mod.get_config(arg)
    assert list(cfg.pool.tasks) == list(image_tasks.TASK_NAMES[:n]) and cfg.pool.preset == "default"
    merge_bench.method_specs(cfg.methods)
    merge_bench.pool_config(cfg)   # resolves against kfuse.bench.pool
  assert mod.get_config("negation").negation.enabled and not mod.get_config("negation").methods
  mlp = mod.get_config("8,model=mlp")
  assert merge_bench.pool_config(mlp)["model"]["name"] == "mlp" and mlp.pool.path.endswith("_mlp")
  with pytest.raises(KfuseError, match="variant"):
    mod.get_config("huge")
  with pytest.raises(KfuseError, match="tasks"):
    mod.get_config("8,tasks=21")


def _cli(*args, env_cache):
  r = subprocess.run([sys.executable, "-m", "kfuse.main", *args], capture_output=True, text=True,
                     cwd=ROOT, timeout=300,
                     env=dict(os.environ, PYTHONPATH=ROOT, KFUSE_CACHE=str(env_cache)))
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kfuse: error:")]
  return r.returncode, lines


def test_bad_pools_are_one_line_through_the_cli(bench, tmp_path):
  """Another backbone, a missing task and a tampered hash: exit 1 with one `kfuse: error:` line."""
  root, _, _ = bench
  pool = str(root / "pool")
  common = ["--config.progress=False", f"--config.data.cache_dir={root / 'cache'}"]
  rc, err = _cli("--config=configs/merge_bench.py:quick,pool=tiny,model=mlp", f"--config.pool.path={pool}",
                 f"--workdir={tmp_path / 'w1'}", *common, env_cache=root / "cache")
  assert rc == 2 and len(err) == 1 and "built with backbone vit but the config names another" in err[0]
  rc, err = _cli("--config=configs/merge_bench.py:quick,pool=tiny,tasks=2", f"--config.pool.path={pool}",
                 f"--workdir={tmp_path / 'w2'}", *common, env_cache=root / "cache")
  assert rc == 2 and len(err) == 1 and "no expert for task 'sk_digits'" in err[0]
  tampered = str(tmp_path / "tampered")
  shutil.copytree(pool, tampered)
  mpath = os.path.join(tampered, "manifest.json")
  with open(mpath) as f:
    m = json.load(f)
  m["experts"]["shapes"]["expert"]["sha256"] = "0" * 64
  with open(mpath, "w") as f:
    json.dump(m, f)
  rc, err = _cli("--config=configs/merge_bench.py:quick,pool=tiny", f"--config.pool.path={tampered}",
                 f"--workdir={tmp_path / 'w3'}", *common, env_cache=root / "cache")
  assert rc == 2 and len(err) == 1 and "checkpoint experts/shapes has content hash" in err[0]
  assert not any(os.path.exists(tmp_path / w / "results.json") for w in ("w1", "w2", "w3"))
