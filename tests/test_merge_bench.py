"""The merging benchmark on a pinned pool: a tiny end-to-end run checked against independent
recomputations (float64 NumPy merges, plain ``model.apply`` accuracies), the sequential and
data-informed hooks, negation's constraint, configs, and the bad-input lines through the CLI."""

import importlib.util
import functools
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
      regmean=dict(name="regmean", params={}, grid={}),
      regmean_plusplus=dict(name="regmean_plusplus", params={}, grid={}),
      adamerging_layer=dict(name="adamerging_layer", params=dict(steps=3, log_every=1), grid={}),
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


if "_test_first_expert" not in merge_bench.MERGERS:
  merge_bench.register_merger("_test_first_expert", _first_expert, defaults={})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
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
                   "first_expert", "regmean", "regmean_plusplus", "adamerging_layer",
                   "seq:task_arithmetic"]
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


def test_lambda_factored_merges_equal_the_method_at_every_lambda():
  """Every LAMBDA_LINEAR method with the full benchmark's grid: theta0 + lambda*(merge(1) - theta0),
  one merge per setting of the other parameters, equals kfuse.merge.merge at each lambda."""
  from kfuse import merge
  rng = np.random.default_rng(0)
  base = {"blk": {"kernel": rng.normal(size=(12, 10)).astype(np.float32)}}   # one shape: one compile
  experts = [jax.tree.map(lambda b: (b + 0.1 * rng.normal(size=b.shape)).astype(np.float32), base)
             for _ in range(4)]
  key = jax.random.key(3)
  table = _config_module("merge_bench")._full_methods()
  linear = sorted(merge_bench.LAMBDA_LINEAR)
  assert set(linear) <= {k for k, v in table.items() if "lambda" in v["grid"]}
  calls = []
  for label in linear:
    spec = table[label]
    points = merge_bench.grid_points(spec["params"], spec["grid"])
    direct = lambda p, name=spec["name"]: merge.merge(name, experts, base, params=p, key=key)
    counted = lambda p, direct=direct: calls.append(p) or direct(p)
    factored = merge_bench.lambda_factored(counted, base)
    calls.clear()
    for p in points:
      for a, b in zip(jax.tree.leaves(factored(p)), jax.tree.leaves(direct(p))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{label} {p}")
    assert len(calls) == len(points) // len(spec["grid"]["lambda"])   # one merge per other setting


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
  free = mod.get_config("8,informed=no").methods.to_dict()
  assert sorted(free) == sorted(set(mod.get_config("8").methods) - set(mod.informed_methods()))
  # every data-free method, none informed
  assert sorted(free) == sorted({**mod.methods(), **mod.subspace_methods()})
  with pytest.raises(KfuseError, match="informed"):
    mod.get_config("8,informed=maybe")
  with pytest.raises(KfuseError, match="variant"):
    mod.get_config("huge")
  with pytest.raises(KfuseError, match="tasks"):
    mod.get_config("8,tasks=21")
  some = mod.get_config("20,methods=ties+task_arithmetic").methods.to_dict()
  assert list(some) == ["task_arithmetic", "ties"]                       # the table's order
  assert some["ties"] == mod.get_config("20").methods.to_dict()["ties"]
  assert list(mod.get_config("14,informed=no,methods=tsv_m").methods) == ["tsv_m"]
  with pytest.raises(KfuseError, match=r"methods: 'tie' is not a row of this variant \(did you mean"):
    mod.get_config("20,methods=tie")
  with pytest.raises(KfuseError, match="methods: 'regmean' is not a row"):
    mod.get_config("8,informed=no,methods=regmean")


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


def test_a_half_written_pool_is_resumed_by_the_job(bench, tmp_path, monkeypatch):
  """A pool whose build was killed after two of three experts (progress.json, no manifest) is
  finished by the benchmark job (only the missing expert trained) and then loaded with its checks."""
  from kfuse.bench import pool as pool_lib
  root, config, results = bench
  half = tmp_path / "pool"
  shutil.copytree(root / "pool", half)
  m = json.loads((half / "manifest.json").read_text())
  last = m["tasks"][-1]
  progress = {"format": m["format"], "config": m["config"], "pretrained": m["pretrained"],
              "tasks": {t: m["experts"][t] for t in m["tasks"][:-1]}, "seconds": {}}
  (half / "progress.json").write_text(json.dumps(progress))
  os.remove(half / "manifest.json")
  shutil.rmtree(half / "experts" / last)
  assert pool_lib.pool_status(str(half)).startswith("interrupted (pretrained done, 2 of 3")
  calls = []
  real = pool_lib._build_task
  monkeypatch.setattr(pool_lib, "_build_task", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
  monkeypatch.setattr(pool_lib, "_pretrain", lambda *a, **k: pytest.fail("retrained the backbone"))
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.workdir, cfg.pool.path = str(tmp_path / "w"), str(half)
  cfg.methods = ml_collections.ConfigDict({})
  cfg.negation.enabled = False
  cfg.sequential.order = []
  out = merge_bench.run(cfg)
  assert calls == [last]
  resumed = json.loads((half / "manifest.json").read_text())
  assert resumed["experts"][last]["expert"]["sha256"] == m["experts"][last]["expert"]["sha256"]
  assert [r["name"] for r in out["rows"]] == ["Pretrained", "Individual"]
  want = next(r for r in results["rows"] if r["name"] == "Individual")["test"]
  assert out["rows"][1]["test"] == pytest.approx(want)


# ------------------------------------------------------------------ data-informed rows


def _np_regmean(grams, kernels, alpha=0.95):
  """float64 RegMean of one kernel: (Σ G̃_i)⁻¹ Σ G̃_i W_i, G̃ = αG + (1−α)diag(G) (Jin et al. 2023)."""
  gt = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
  d = grams[0].shape[0]
  w = [np.asarray(k, np.float64).reshape(d, -1) for k in kernels]
  return np.linalg.solve(sum(gt), sum(g @ wi for g, wi in zip(gt, w))).reshape(kernels[0].shape)


def _gram(rows):
  rows = np.asarray(rows, np.float64).reshape(-1, rows.shape[-1])
  return rows.T @ rows / len(rows)


def _patches(x, p):
  """[B, H, W] images -> [B·(H/p)·(W/p), p·p] patch rows (the patch embedding's inputs, C = 1)."""
  b, h, w = x.shape[:3]
  x = np.asarray(x, np.float64).reshape(b, h // p, p, w // p, p)
  return x.transpose(0, 1, 3, 2, 4).reshape(-1, p * p)


def _norm0_inputs(model, backbone, head, x):
  """The first block's LayerNorm outputs (the q/k/v projections' inputs), from Flax's own
  captured intermediates (not the benchmark's interception)."""
  _, inter = model.apply(models.with_params(backbone, head), np.asarray(x), train=False,
                         capture_intermediates=True, mutable=["intermediates"])
  return np.asarray(inter["intermediates"]["backbone"]["layers_0"]["norm_0"]["__call__"][0])


def _informed_parts(bench):
  root, config, results = bench
  tasks = results["tasks"]
  pre, experts, _ = _pool_parts(root, tasks)
  merged = train.restore_checkpoint(str(root / "work" / "checkpoints" / "merged"))
  tm = _tasks_and_models(results)
  x = {t: tm[t][0].x_test[:config.data.unlabeled_per_task] for t in tasks}
  return results, tasks, pre, experts, merged, tm, x


def test_regmean_row_is_a_numpy_regmean_of_numpy_grams(bench):
  results, tasks, _, experts, merged, tm, x = _informed_parts(bench)
  bb = {t: models.backbone_of(experts[t]) for t in tasks}
  got = merged["regmean"]
  p = results["pool"]["config"]["model"]["patch_size"]
  want = _np_regmean([_gram(_patches(x[t], p)) for t in tasks],
                     [bb[t]["patch_embed"]["kernel"] for t in tasks])
  np.testing.assert_allclose(got["patch_embed"]["kernel"], want, rtol=2e-4, atol=2e-5)
  g = [_gram(_norm0_inputs(tm[t][1], bb[t], models.head_of(experts[t]), x[t])) for t in tasks]
  for proj in ("query", "key", "value"):
    want = _np_regmean(g, [bb[t]["layers_0"]["attn"][proj]["kernel"] for t in tasks])
    np.testing.assert_allclose(got["layers_0"]["attn"][proj]["kernel"], want, rtol=2e-4, atol=2e-5)
  for path in (("cls",), ("pos_embed",), ("norm", "scale"), ("layers_0", "attn", "query", "bias")):
    leaf = lambda tree: functools.reduce(lambda a, k: a[k], path, tree)
    np.testing.assert_allclose(leaf(got), np.mean([leaf(bb[t]) for t in tasks], axis=0), atol=1e-6)
  log = next(r for r in results["rows"] if r["name"] == "regmean")["merger_log"][0]
  assert log["unlabeled_per_task"] == {t: 7 for t in tasks} and log["labeled_per_task"] == 0
  h, w = x[tasks[0]].shape[1:3]
  assert log["gram_tokens"][tasks[0]]["patch_embed/kernel"] == 7 * (h // p) * (w // p)


def test_regmean_plusplus_row_takes_grams_behind_the_merged_prefix(bench):
  results, tasks, _, experts, merged, tm, x = _informed_parts(bench)
  bb = {t: models.backbone_of(experts[t]) for t in tasks}
  got, rm = merged["regmean_plusplus"], merged["regmean"]
  log = next(r for r in results["rows"] if r["name"] == "regmean_plusplus")["merger_log"][0]
  assert log["stages"] == ["patch_embed", "layers_0"]        # forward order of the tiny ViT
  # stage 1 sees the raw inputs: RegMean's patch embedding
  np.testing.assert_allclose(got["patch_embed"]["kernel"], rm["patch_embed"]["kernel"], rtol=1e-5,
                             atol=1e-6)
  # stage 2: Grams of the q/k/v inputs with the merged patch embedding / averaged cls, pos in front
  front = {k: got[k] for k in ("patch_embed", "cls", "pos_embed")}
  g = [_gram(_norm0_inputs(tm[t][1], {**bb[t], **front}, models.head_of(experts[t]), x[t]))
       for t in tasks]
  for proj in ("query", "key", "value"):
    want = _np_regmean(g, [bb[t]["layers_0"]["attn"][proj]["kernel"] for t in tasks])
    np.testing.assert_allclose(got["layers_0"]["attn"][proj]["kernel"], want, rtol=2e-4, atol=2e-5)
  diff = np.max(np.abs(np.asarray(got["layers_0"]["attn"]["query"]["kernel"])
                       - np.asarray(rm["layers_0"]["attn"]["query"]["kernel"])))
  assert diff > 1e-6   # the merged prefix changed the Grams


def test_adamerging_row_starts_at_0_3_and_is_the_logged_lambda_merge(bench):
  results, tasks, pre, experts, merged, _, _ = _informed_parts(bench)
  row = next(r for r in results["rows"] if r["name"] == "adamerging_layer")
  log = row["merger_log"][0]
  traj = log["lambda_trajectory"]
  assert traj[0] == [pytest.approx(0.3)] * len(tasks) and len(traj) == 4   # init + 3 steps
  assert log["steps"] == 3 and log["inputs_seen_per_task"] == 3 * 16
  assert any(abs(v - 0.3) > 1e-5 for v in traj[-1])   # Adam moved them (lr 1e-3: ~1e-3 per step)
  lam = np.asarray(log["lambdas_final"], np.float64)  # [N, P], P tensors in flatten order
  b0 = _np(models.backbone_of(pre))
  leaves, treedef = jax.tree.flatten(b0)
  taus = [jax.tree.leaves(jax.tree.map(lambda e, b: e - b, _np(models.backbone_of(experts[t])), b0))
          for t in tasks]
  want = jax.tree.unflatten(treedef, [b + sum(lam[i, p] * taus[i][p] for i in range(len(tasks)))
                                      for p, b in enumerate(leaves)])
  for a, b in zip(jax.tree.leaves(merged["adamerging_layer"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
