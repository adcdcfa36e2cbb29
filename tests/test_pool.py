"""Pinned model pools: manifest, content hashes, expectations, half-written pools, resume after a kill."""

import copy
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from kfuse import train
from kfuse.bench import pool
from kfuse.tree import KfuseError

TINY = pool.PRESETS["tiny"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("pool_cache"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache):
  path = str(tmp_path_factory.mktemp("pools") / "tiny")
  manifest = pool.build_pool(TINY, path, cache=cache)
  return path, manifest


def _copy(built, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(built[0], dst)
  return dst


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  return msg


def _reference_hash(tree):
  """Independent recomputation: sha256 over (path, dtype, shape, bytes) in sorted path order."""
  leaves = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaves.append(("/".join(str(k.key) for k in kp), np.asarray(leaf)))
  h = hashlib.sha256()
  for name, a in sorted(leaves, key=lambda t: t[0]):
    h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def test_manifest_records_tasks_seeds_config_and_hashes(built):
  path, m = built
  assert m["format"] == pool.FORMAT and m["tasks"] == TINY["tasks"]
  assert m["config"] == pool.resolve_config(TINY)
  assert m["backbone"]["name"] == "vit" and m["backbone"]["kwargs"]["dim"] == 16
  assert m["backbone"]["kwargs"]["pool"] == "cls"              # factory defaults are pinned too
  assert not os.path.exists(os.path.join(path, pool.PROGRESS))
  with open(os.path.join(path, pool.MANIFEST)) as f:
    assert json.load(f) == json.loads(json.dumps(m))
  pre = train.restore_checkpoint(os.path.join(path, "pretrained"))
  assert m["pretrained"]["sha256"] == _reference_hash(pre)
  for t in TINY["tasks"]:
    e = m["experts"][t]
    assert e["data_seed"] == 0 and e["sizes"] == {"train": 64, "val": 32, "test": 32}
    assert e["num_classes"] == 8 and len(e["class_names"]) == 8
    expert = train.restore_checkpoint(os.path.join(path, "experts", t))
    probe = train.restore_checkpoint(os.path.join(path, "probes", t))
    assert e["expert"]["sha256"] == _reference_hash(expert)
    assert e["probe"]["sha256"] == _reference_hash(probe)
    assert set(probe["params"]) == {"head"}
    # finetune.trainable='backbone': the expert keeps the probe's head bit for bit
    for a, b in zip(jax.tree.leaves(probe["params"]["head"]), jax.tree.leaves(expert["params"]["head"])):
      np.testing.assert_array_equal(a, b)
    # the expert is fine-tuned from the pretrained backbone: same structure, moved weights
    b0, b1 = pre["params"]["backbone"], expert["params"]["backbone"]
    assert jax.tree.structure(b0) == jax.tree.structure(b1)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(b0), jax.tree.leaves(b1)))
    assert set(e["accuracy"]) == {"pretrained_val", "pretrained_test", "expert_val", "expert_test"}


def test_load_pool_returns_verified_checkpoints(built):
  path, m = built
  p = pool.load_pool(path, expect=m["config"])
  assert p.tasks == TINY["tasks"]
  for t in p.tasks:
    assert _reference_hash(p.experts[t]) == m["experts"][t]["expert"]["sha256"]
    x = np.zeros((2, 16, 16), np.float32)
    assert p.model(t).apply(p.experts[t], x).shape == (2, 8)
  only = pool.load_pool(path, tasks=["shapes"])
  assert only.tasks == ["shapes"]


def test_tampered_checkpoint_is_refused(built, tmp_path):
  path = _copy(built, tmp_path)
  tree = train.restore_checkpoint(os.path.join(path, "experts", "shapes"))
  tree = jax.tree.map(np.asarray, tree)
  tree["params"]["head"]["bias"] = tree["params"]["head"]["bias"] + 1e-3
  train.save_checkpoint(os.path.join(path, "experts", "shapes"), tree)
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path)
  assert "checkpoint experts/shapes has content hash" in _one_line(e)


def test_tampered_manifest_hash_is_refused(built, tmp_path):
  path = _copy(built, tmp_path)
  mpath = os.path.join(path, pool.MANIFEST)
  with open(mpath) as f:
    m = json.load(f)
  m["pretrained"]["sha256"] = "0" * 64
  with open(mpath, "w") as f:
    json.dump(m, f)
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path)
  assert "checkpoint pretrained has content hash" in _one_line(e) and "000000000000" in str(e.value)


def test_corrupt_or_missing_checkpoint_is_one_line(built, tmp_path):
  path = _copy(built, tmp_path)
  shutil.rmtree(os.path.join(path, "experts", "texture"))
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path)
  assert "checkpoint experts/texture is missing" in _one_line(e)
  probe_dir = os.path.join(path, "probes", "shapes")
  for root, _, files in os.walk(probe_dir):
    for f in files:
      if f != "commit_success.txt":
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path, tasks=["shapes"])
  assert "checkpoint probes/shapes cannot be read" in _one_line(e)


def test_wrong_backbone_is_refused(built):
  path, m = built
  wrong = copy.deepcopy(m["config"])
  wrong["model"]["dim"] = 32
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path, expect=wrong)
  assert "built with backbone vit" in _one_line(e) and "model.dim: 16 != 32" in str(e.value)
  with pytest.raises(KfuseError, match=r"model.name: 'vit' != 'mlp'"):
    pool.load_pool(path, expect={"model": {"name": "mlp"}})
  # a default argument spelled out is the same backbone
  same = {"model": {**m["config"]["model"], "pool": "cls"}}
  assert pool.load_pool(path, expect=same).tasks == TINY["tasks"]


def test_missing_task_and_data_mismatch_are_refused(built):
  path, _ = built
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path, expect={"tasks": ["shapes", "symmetry"]})
  assert "no expert for task 'symmetry'" in _one_line(e)
  with pytest.raises(KfuseError, match=r"data.seed=0 but the config asks for 1"):
    pool.load_pool(path, expect={"data": {"seed": 1}})


def test_not_a_pool(tmp_path):
  with pytest.raises(KfuseError, match="no such directory"):
    pool.load_pool(str(tmp_path / "nothing"))
  with pytest.raises(KfuseError, match=r"not a kfuse model pool \(no manifest.json\)"):
    pool.load_pool(str(tmp_path))
  (tmp_path / "other.txt").write_text("x")
  with pytest.raises(KfuseError, match="exists and is not a kfuse model pool"):
    pool.build_pool(TINY, str(tmp_path))


def test_config_errors_before_any_work(tmp_path):
  with pytest.raises(KfuseError, match=r"config.task: unknown field \(did you mean 'tasks'\?\)"):
    pool.resolve_config({"task": ["shapes"]})
  with pytest.raises(KfuseError, match=r"unknown image task 'shape'"):
    pool.resolve_config({"tasks": ["shape"]})
  with pytest.raises(KfuseError, match=r"config.model.name: .*'vitt'"):
    pool.resolve_config({"model": {"name": "vitt"}})
  with pytest.raises(KfuseError, match=r"config.finetune.optimizer.warmup_steps"):
    pool.resolve_config({**TINY, "finetune": {"optimizer": {"name": "adam", "schedule": "cosine",
                                                            "warmup_steps": 600}}})
  with pytest.raises(KfuseError, match=r"config.head.kind: unknown value 'prototyp'"
                                       r" \(did you mean 'prototype'\?\)"):
    pool.resolve_config({"head": {"kind": "prototyp"}})
  with pytest.raises(KfuseError, match=r"config.head: shots must be >= 1"):
    pool.resolve_config({"head": {"shots": 0}})
  with pytest.raises(KfuseError, match=r"config.finetune.trainable: unknown value 'backbon'"
                                       r" \(did you mean 'backbone'\?\)"):
    pool.resolve_config({"finetune": {"trainable": "backbon"}})
  assert not os.listdir(tmp_path)


def test_complete_pool_is_reused_and_another_config_refused(built, monkeypatch):
  path, m = built
  monkeypatch.setattr(pool, "_pretrain", lambda *a, **k: pytest.fail("retrained a complete pool"))
  assert pool.build_pool(TINY, path) == pool.load_pool(path).manifest
  other = {**TINY, "seed": 1}
  with pytest.raises(KfuseError, match=r"already built with another config \(config.seed: 0 != 1\)"):
    pool.build_pool(other, path)


def test_killed_build_is_half_written_then_resumes_to_the_same_pool(built, tmp_path, cache,
                                                                    monkeypatch):
  _, reference = built
  path = str(tmp_path / "resumed")
  real = pool._build_task
  calls = []

  def dies_on_second(cfg, task, *a, **k):
    calls.append(task)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the build is killed while training the second expert
    return real(cfg, task, *a, **k)

  monkeypatch.setattr(pool, "_build_task", dies_on_second)
  with pytest.raises(KeyboardInterrupt):
    pool.build_pool(TINY, path, cache=cache)
  with pytest.raises(KfuseError) as e:
    pool.load_pool(path)
  assert "half-written" in _one_line(e) and "1 of 3 experts finished" in str(e.value)
  assert pool.pool_status(path).startswith("interrupted (pretrained done, 1 of 3")

  calls.clear()
  monkeypatch.setattr(pool, "_build_task", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
  monkeypatch.setattr(pool, "_pretrain", lambda *a, **k: pytest.fail("retrained the backbone"))
  manifest = pool.build_pool(TINY, path, cache=cache)
  assert calls == TINY["tasks"][1:]                      # the finished expert was kept
  # deterministic parts: the resumed pool holds the uninterrupted pool's exact checkpoints
  assert manifest["pretrained"]["sha256"] == reference["pretrained"]["sha256"]
  for t in TINY["tasks"]:
    assert manifest["experts"][t]["expert"]["sha256"] == reference["experts"][t]["expert"]["sha256"]
    assert manifest["experts"][t]["probe"]["sha256"] == reference["experts"][t]["probe"]["sha256"]
  assert pool.load_pool(path).tasks == TINY["tasks"]


def test_resume_retrains_a_finished_part_whose_hash_changed(built, tmp_path, cache, monkeypatch):
  path = str(tmp_path / "p")
  real = pool._build_task
  calls = []

  def dies_on_third(cfg, task, *a, **k):
    calls.append(task)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(cfg, task, *a, **k)

  monkeypatch.setattr(pool, "_build_task", dies_on_third)
  with pytest.raises(KeyboardInterrupt):
    pool.build_pool(TINY, path, cache=cache)
  tree = jax.tree.map(np.asarray, train.restore_checkpoint(os.path.join(path, "experts", "shapes")))
  tree["params"]["head"]["kernel"] = tree["params"]["head"]["kernel"] * 2
  train.save_checkpoint(os.path.join(path, "experts", "shapes"), tree)
  calls.clear()
  monkeypatch.setattr(pool, "_build_task", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
  manifest = pool.build_pool(TINY, path, cache=cache)
  assert calls == ["shapes", "texture"]
  want = built[1]["experts"]["shapes"]["expert"]["sha256"]
  assert manifest["experts"]["shapes"]["expert"]["sha256"] == want   # retrained to the same expert


def test_reuse_copies_the_shared_parts_and_equals_a_fresh_build(built, tmp_path, cache,
                                                                monkeypatch):
  """A pool grown from a smaller one (``reuse``) holds exactly the checkpoints a fresh build trains."""
  src, _ = built
  cfg = {**TINY, "tasks": ["texture", "grating_frequency", "shapes"]}   # 2 shared, 1 new
  fresh = pool.build_pool(cfg, str(tmp_path / "fresh"), cache=cache)   # the independent reference
  real, calls = pool._build_task, []
  monkeypatch.setattr(pool, "_build_task", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
  monkeypatch.setattr(pool, "_pretrain", lambda *a, **k: pytest.fail("retrained the backbone"))
  grown = pool.build_pool(cfg, str(tmp_path / "grown"), cache=cache, reuse=src)
  assert calls == ["grating_frequency"]                   # only the task src lacks is trained
  assert grown["pretrained"]["sha256"] == fresh["pretrained"]["sha256"]
  for t in cfg["tasks"]:
    for kind in ("probe", "expert"):
      assert grown["experts"][t][kind]["sha256"] == fresh["experts"][t][kind]["sha256"], (t, kind)
  assert grown["reused_from"] == {"path": os.path.abspath(src),
                                  "parts": ["pretrain", "texture", "shapes"]}
  assert pool.load_pool(str(tmp_path / "grown")).tasks == cfg["tasks"]


def test_reuse_refuses_another_recipe_or_an_unfinished_pool(built, tmp_path, cache):
  src, _ = built
  other = {**TINY, "finetune": {**TINY["finetune"], "steps": 7}}
  with pytest.raises(KfuseError) as e:
    pool.build_pool(other, str(tmp_path / "a"), cache=cache, reuse=src)
  assert "built with another recipe (config.finetune.steps: 6 != 7)" in _one_line(e)
  excl = {**TINY, "tasks": ["shapes"], "data": {**TINY["data"], "pretrain_exclude_tasks": True}}
  pool.build_pool(excl, str(tmp_path / "b"), cache=cache)   # pretrained without shapes' generator
  with pytest.raises(KfuseError, match="pretrain_exclude_tasks makes pretraining depend on the task"):
    pool.build_pool({**excl, "tasks": ["shapes", "texture"]}, str(tmp_path / "b2"), cache=cache,
                    reuse=str(tmp_path / "b"))
  with pytest.raises(KfuseError, match="cannot reuse it, it is missing"):
    pool.build_pool(TINY, str(tmp_path / "c"), cache=cache, reuse=str(tmp_path / "nothing"))


def test_cli_builds_and_reports(tmp_path, cache, capsys):
  rc = pool.main(["--path", str(tmp_path / "bad"), "--preset", "tiny", "--tasks", "shapez",
                  "--cache", cache])
  assert rc == 1 and "kfuse: error: " in capsys.readouterr().err


def _cosine_nearest_prototype(f, y, k, queries):
  """Reference (float64, per sample loops): SimpleShot's CL2N nearest-prototype prediction."""
  mu = sum(f) / len(f)
  unit = lambda v: v / np.sqrt(np.dot(v, v))
  g = [unit(v - mu) for v in f]
  protos = [unit(sum(g[i] for i in range(len(f)) if y[i] == c) / np.sum(y == c)) for c in range(k)]
  out = []
  for q in queries:
    cos = [float(np.dot(unit(q - mu), p)) for p in protos]
    out.append((int(np.argmax(cos)), cos))
  return out


def test_prototype_head_is_a_tempered_cosine_nearest_prototype_classifier():
  rng = np.random.default_rng(0)
  k, d, t = 5, 12, 20.0
  centers = rng.normal(size=(k, d)) + 3.0                    # a shared offset, as LN'd features have
  y = np.repeat(np.arange(k), 4)
  f = centers[y] + 0.8 * rng.normal(size=(len(y), d))
  q = centers[rng.integers(0, k, 50)] + 1.5 * rng.normal(size=(50, d))
  head = pool.prototype_head(f, y, k, t)
  assert head["kernel"].shape == (d, k) and head["bias"].shape == (k,)
  logits = q @ head["kernel"].astype(np.float64) + head["bias"]
  mu = f.mean(0)
  s = np.mean([np.sqrt(np.dot(v - mu, v - mu)) for v in f])
  for i, (pred, cos) in enumerate(_cosine_nearest_prototype(f, y, k, q)):
    assert logits[i].argmax() == pred
    scale = t * np.sqrt(np.dot(q[i] - mu, q[i] - mu)) / s     # logit_c = T cos_c |q - mu| / s
    np.testing.assert_allclose(logits[i], scale * np.array(cos), rtol=1e-5, atol=1e-5)


def test_shot_indices_take_the_first_shots_of_each_class():
  y = np.array([2, 0, 1, 0, 2, 0, 1, 2, 0])
  assert pool.shot_indices(y, 3, 2).tolist() == [1, 3, 2, 6, 0, 4]
  assert pool.shot_indices(y, 3, 9).tolist() == [1, 3, 5, 8, 2, 6, 0, 4, 7]
  with pytest.raises(KfuseError, match="head.shots: the val split has no example of class 3"):
    pool.shot_indices(y, 4, 2)


def test_pool_head_is_the_prototype_of_recorded_val_shots(built, cache):
  """The stored head = prototypes of the pretrained backbone's features on the recorded val shots.

  The features are read through an independent route: the full classifier with an identity head.
  """
  from kfuse import models
  from kfuse.data import image_tasks
  path, m = built
  p = pool.load_pool(path)
  cfg = m["config"]
  assert cfg["head"]["kind"] == "prototype"
  dim = m["backbone"]["kwargs"]["dim"]
  ident = models.with_params(models.backbone_of(p.pretrained),
                             {"kernel": np.eye(dim, dtype=np.float32), "bias": np.zeros(dim, np.float32)})
  for t in p.tasks:
    rec = m["experts"][t]["head"]
    ds = image_tasks.load_task(t, seed=cfg["data"]["seed"], sizes=tuple(cfg["data"]["sizes"]),
                               cache=cache)
    idx = np.array(rec["shot_indices"])
    for c in range(ds.num_classes):   # the first `shots` val examples of each class, all recorded
      want = np.flatnonzero(ds.y_val == c)[:cfg["head"]["shots"]]
      assert set(want) <= set(idx) and np.all(ds.y_val[idx[np.isin(idx, want)]] == c)
    feats = np.asarray(pool._model(cfg, dim).apply(ident, ds.x_val[idx]), np.float64)
    head = p.probes[t]["params"]["head"]
    preds = [c for c, _ in _cosine_nearest_prototype(feats, ds.y_val[idx], ds.num_classes, feats)]
    logits = feats @ np.asarray(head["kernel"], np.float64) + head["bias"]
    np.testing.assert_array_equal(logits.argmax(1), preds)
    # the pool's zero-shot accuracy is the head's accuracy on the pretrained backbone (no training)
    x, yv = ds.x_val, ds.y_val
    fv = np.asarray(pool._model(cfg, dim).apply(ident, x), np.float64)
    acc = np.mean((fv @ np.asarray(head["kernel"], np.float64) + head["bias"]).argmax(1) == yv)
    assert abs(acc - m["experts"][t]["accuracy"]["pretrained_val"]) < 1e-3


def test_probe_head_option_trains_a_linear_probe(built, tmp_path, cache):
  over = copy.deepcopy(TINY)
  over["tasks"] = ["shapes"]
  over["head"] = {"kind": "probe"}
  m = pool.build_pool(over, str(tmp_path / "probe"), cache=cache)
  assert m["experts"]["shapes"]["head"] == {"kind": "probe", "trained_on": "train"}
  # the same pretrained backbone as the prototype pool, but another (trained) head
  assert m["pretrained"]["sha256"] == built[1]["pretrained"]["sha256"]
  probe = pool.load_pool(str(tmp_path / "probe")).probes["shapes"]["params"]["head"]["kernel"]
  proto = pool.load_pool(built[0], tasks=["shapes"]).probes["shapes"]["params"]["head"]["kernel"]
  assert probe.shape == proto.shape == (16, 8) and not np.allclose(probe, proto, atol=1e-3)


def test_cli_protocol_number_selects_the_first_tasks(monkeypatch, tmp_path, capsys):
  seen = {}
  def fake_build(over, path, **kw):
    seen["tasks"] = over["tasks"]
    raise pool.KfuseError("stop")
  monkeypatch.setattr(pool, "build_pool", fake_build)
  assert pool.main(["--path", str(tmp_path / "p"), "--tasks", "14"]) == 1
  from kfuse.data import image_tasks
  assert seen["tasks"] == list(image_tasks.TASK_NAMES[:14])
