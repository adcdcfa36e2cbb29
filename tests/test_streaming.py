"""Streaming merges: planned output shards, bounded memory, faults, Orbax per-leaf reads.

Faults covered: the disk filling up while writing, a killed run, an input
shard missing from its index. Each must fail with one clear line, leave no
output that looks complete, never touch the inputs, and the same command must
work when re-run.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from kfuse import io as kio
from kfuse.io import safetensors_io as sio
from kfuse.merge import engine as E
from kfuse.mergekit_compat import run_yaml
from kfuse.tree import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama(path, seed, layers=2, base=None, max_shard_bytes=5e9):
  r = np.random.default_rng(seed)
  shapes = {"model.embed_tokens.weight": (96, 32)}
  for i in range(layers):
    shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (32, 32)
    shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (64, 32)
    shapes[f"model.layers.{i}.input_layernorm.weight"] = (32,)
  shapes["model.norm.weight"] = (32,)
  shapes["lm_head.weight"] = (96, 32)
  t = {k: (r.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
  if base is not None:
    t = {k: base[k] + v * 0.1 for k, v in t.items()}
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "num_hidden_layers": layers}
  kio.write_hf_dir(path, t, config=cfg, max_shard_bytes=max_shard_bytes)
  return t


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("zoo")
  base = llama(str(root / "base"), 0)
  for i in (1, 2):
    llama(str(root / f"e{i}"), i, base=base)
  yml = root / "ties.yml"
  yml.write_text(textwrap.dedent(f"""
      merge_method: ties
      base_model: {root / 'base'}
      models:
        - model: {root / 'e1'}
          parameters: {{weight: 1.0, density: 0.3}}
        - model: {root / 'e2'}
          parameters: {{weight: 0.7, density: 0.5}}
      """))
  return root, yml


def tree_hash(path) -> str:
  h = hashlib.sha256()
  for dirpath, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(dirpath, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def leftovers(parent, name):
  return [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


# ------------------------------------------------------------- planned writer


def test_planned_writer_matches_hfwriter_in_any_order(tmp_path):
  r = np.random.default_rng(0)
  t = {f"w{i}": r.standard_normal((7, 5)).astype(np.float32) for i in range(5)}
  t["half"] = r.standard_normal(9).astype(np.float16)
  specs = [(k, v.shape, v.dtype) for k, v in t.items()]
  with kio.HFWriter(tmp_path / "a", max_shard_bytes=300) as w:
    for k, v in t.items():
      w.add(k, v)
    w.finish()
  with kio.PlannedHFWriter(tmp_path / "b", specs, max_shard_bytes=300) as w:
    for k in reversed(list(t)):                       # any order
      if k == "w2":
        w.add_part(k, 20, t[k].reshape(-1)[20:])      # in parts
        w.add_part(k, 0, t[k].reshape(-1)[:20])
      else:
        w.add(k, t[k])
    w.finish()
  assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
  for f in os.listdir(tmp_path / "a"):
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_planned_writer_refuses_unfinished_and_cleans_up(tmp_path):
  w = kio.PlannedHFWriter(tmp_path, [("a", (3,), np.float32), ("b", (2,), np.float32)])
  w.add("a", np.ones(3, np.float32))
  with pytest.raises(KfuseError, match="'b' was never written"):
    w.finish()
  with pytest.raises(KfuseError, match="not in the output plan"):
    w.add("c", np.ones(1, np.float32))
  w.abort()
  assert os.listdir(tmp_path) == []


def test_full_disk_is_reported_before_any_work(tmp_path, monkeypatch):
  class Full:
    f_bavail, f_frsize = 10, 4096

  monkeypatch.setattr(os, "statvfs", lambda path: Full())
  with pytest.raises(KfuseError, match="needs 0.00 GB but only 0.00 GB are free"):
    kio.PlannedHFWriter(tmp_path, [("a", (100_000,), np.float32)])
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- engine


# A child process merges a model from disk and reports its peak resident set (VmHWM). With
# HOLD=1 it first reads every input tensor into memory: what an engine that does not stream would
# hold, so the test also shows its measurement can see such an engine.
_PEAK_RSS_CHILD = """
import os, sys
import numpy as np
from kfuse import io as kio
from kfuse.mergekit_compat import run_yaml
yml, out = sys.argv[1], sys.argv[2]
held = []
if os.environ.get("HOLD") == "1":
  for d in sys.argv[3:]:
    held.append({k: np.array(v) for k, v in kio.read_hf_dir(d).items()})  # copies in memory
run_yaml(yml, out, progress=False)
status = open("/proc/self/status").read()
print("PEAK_KB", [l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:")][0])
"""
_LAYER_SHAPE = (1024, 1024)  # 4 MiB of float32 per layer tensor
_MIB = 1 << 20


def _peak_rss_merge(tmp_path, layers, hold=False):
  """Peak RSS (bytes) of a fresh process running a task_arithmetic merge of `layers` layers."""
  r = np.random.default_rng(layers)
  dirs = []
  for name in ("base", "expert"):
    t = {f"model.layers.{i}.mlp.up_proj.weight": r.standard_normal(_LAYER_SHAPE, np.float32)
         for i in range(layers)}
    t["model.norm.weight"] = np.ones(1024, np.float32)
    d = tmp_path / f"{name}{layers}"
    if not d.exists():
      kio.write_hf_dir(str(d), t, config={"architectures": ["LlamaForCausalLM"],
                                          "model_type": "llama", "num_hidden_layers": layers})
    dirs.append(str(d))
  yml = tmp_path / f"ta{layers}.yml"
  yml.write_text(f"merge_method: task_arithmetic\nbase_model: {dirs[0]}\n"
                 f"models:\n  - model: {dirs[1]}\n    parameters: {{weight: 0.5}}\n")
  out = tmp_path / f"out{layers}{'h' if hold else ''}"
  env = {**os.environ, "PYTHONPATH": REPO, "HOLD": "1" if hold else "0"}
  res = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(yml), str(out), *dirs],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert len(sio.read_safetensors_header(next(out.glob("*.safetensors"))).tensors) == layers + 1
  return int(res.stdout.split("PEAK_KB")[1].split()[0]) * 1024


def test_memory_does_not_grow_with_the_number_of_layers(tmp_path):
  """Peak RSS of a 4-layer and a 16-layer merge (16 vs 64 MiB per model): streaming holds about
  (experts + 2) x one 4 MiB tensor whatever the depth, so the peaks may differ by process noise
  only. The 12 extra layers are 2 x 48 MiB of inputs plus 48 MiB of output: an engine that held
  all tensors would grow by about 144 MiB. Margin: 24 MiB (6 layer tensors)."""
  small = _peak_rss_merge(tmp_path, 4)
  big = _peak_rss_merge(tmp_path, 16)
  assert big - small < 24 * _MIB, (small / _MIB, big / _MIB)  # measured: 298.9 vs 298.8 MiB


@pytest.mark.slow  # a third merge process (~20 s on a loaded machine)
def test_peak_rss_measurement_sees_held_tensors(tmp_path):
  """Control for the test above: a child that reads the 16-layer inputs into memory before the
  same merge peaks well above the streaming one (measured: 479 vs 299 MiB)."""
  big = _peak_rss_merge(tmp_path, 16)
  held = _peak_rss_merge(tmp_path, 16, hold=True)
  assert held - big > 64 * _MIB, (big / _MIB, held / _MIB)


def test_progress_bar_shows_tensors_and_rate(zoo, tmp_path, capsys):
  root, yml = zoo
  run_yaml(str(yml), str(tmp_path / "out"), progress=True)
  err = capsys.readouterr().err
  assert "tensors" in err and "B/s" in err


# ------------------------------------------------------------- faults


def test_disk_full_while_writing_leaves_nothing_and_rerun_works(zoo, tmp_path, monkeypatch):
  root, yml = zoo
  before = tree_hash(root)
  out = tmp_path / "merged"
  calls = {"n": 0}
  from kfuse.io import hf_writers
  real = hf_writers.pwrite_all

  def fill_up(fd, data, pos):
    calls["n"] += 1
    if calls["n"] > 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd, data, pos)

  monkeypatch.setattr(hf_writers, "pwrite_all", fill_up)
  with pytest.raises(KfuseError, match="No space left on device"):
    run_yaml(str(yml), str(out), progress=False)
  assert not out.exists() and leftovers(tmp_path, "merged") == []
  assert tree_hash(root) == before
  monkeypatch.setattr(hf_writers, "pwrite_all", real)
  run_yaml(str(yml), str(out), progress=False)
  assert len(kio.read_hf_dir(str(out))) == 9


def test_missing_input_shard_is_named_and_nothing_is_written(tmp_path):
  base = llama(str(tmp_path / "base"), 0, max_shard_bytes=20_000)
  llama(str(tmp_path / "e1"), 1, base=base, max_shard_bytes=20_000)
  index = json.loads((tmp_path / "e1" / sio.INDEX_FILE).read_text())
  victim = sorted(set(index["weight_map"].values()))[1]
  os.remove(tmp_path / "e1" / victim)
  yml = tmp_path / "m.yml"
  yml.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\n"
                 f"models:\n  - model: {tmp_path / 'e1'}\n    parameters: {{weight: 1.0}}\n")
  with pytest.raises(KfuseError, match=f"shard file '{victim}'.* not found"):
    run_yaml(str(yml), str(tmp_path / "out"), progress=False)
  assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# Runs `kfuse.main` with the output writer blocked after its first tensor: the
# test kills the process while it waits, i.e. mid-write, every time.
BLOCKED_RUN = textwrap.dedent("""
    import sys, threading
    from absl import app
    from kfuse.io import safetensors_io as sio
    from kfuse import main
    marker, argv = sys.argv[1], sys.argv[2:]

    def blocking(original):
      def wrapped(self, *a, **k):
        original(self, *a, **k)             # one tensor is in the temporary output
        open(marker, "w").close()           # tell the test, then wait to be killed
        threading.Event().wait()
      return wrapped

    sio.PlannedHFWriter.add = blocking(sio.PlannedHFWriter.add)
    sio.PlannedHFWriter.add_part = blocking(sio.PlannedHFWriter.add_part)
    sys.argv = ["kfuse"] + argv
    main.cli()
    """)


def test_killed_run_leaves_no_complete_looking_output_and_rerun_works(zoo, tmp_path):
  root, yml = zoo
  before = tree_hash(root)
  out, marker = tmp_path / "merged", tmp_path / "writing"
  flags = [f"--config={REPO}/configs/mergekit.py:{yml}", f"--config.output_dir={out}",
           "--config.progress=False"]
  env = dict(os.environ, PYTHONPATH=REPO)
  p = subprocess.Popen([sys.executable, "-c", BLOCKED_RUN, str(marker), *flags], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not marker.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert marker.exists(), f"the run never reached the writer: {p.poll()} {p.stderr.read()[-2000:]}"
  p.kill()          # SIGKILL mid-write: no cleanup can run
  p.wait()
  p.stderr.close()
  assert not out.exists()                                # nothing complete-looking at OUT
  assert len(leftovers(tmp_path, "merged")) == 1         # only the dead run's temporary
  assert tree_hash(root) == before
  r = subprocess.run([sys.executable, "-m", "kfuse.main", *flags], env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(kio.read_hf_dir(str(out))) == 9
  assert leftovers(tmp_path, "merged") == []           # the dead run's temp dir is gone
  assert tree_hash(root) == before


# ------------------------------------------------------------- orbax


def test_orbax_source_restores_one_leaf_at_a_time(tmp_path, monkeypatch):
  r = np.random.default_rng(0)
  tree = {"params": {"dense": {"kernel": r.standard_normal((4, 3)).astype(np.float32),
                               "bias": np.zeros(3, np.float32)}}}
  kio.save_orbax(str(tmp_path / "ck"), tree)
  from kfuse.io import orbax_io

  def whole(*a, **k):
    raise AssertionError("restored the whole checkpoint")

  monkeypatch.setattr(orbax_io, "restore_orbax", whole)
  src = E.OrbaxSource(str(tmp_path / "ck"))
  assert sorted(src.names) == ["params/dense/bias", "params/dense/kernel"]
  assert src.shape("params/dense/kernel") == (4, 3)
  np.testing.assert_array_equal(src.get("params/dense/kernel"),
                                tree["params"]["dense"]["kernel"])
  with pytest.raises(KfuseError, match="no tensor"):
    src.get("params/nope")


@pytest.mark.parametrize("method,params,top", [
    ("task_arithmetic", "{weight: 0.7}", ""),
    ("linear", "{weight: 0.4}", "parameters: {normalize: true}"),
    ("ties", "{weight: 1.0, density: 0.3}", ""),          # selection: never segmented
])
def test_segmented_streaming_equals_whole_tensors(tmp_path, method, params, top):
  """Big tensors of elementwise recipes are read, computed and written in flat
  segments (`engine.SEGMENT_CHUNKS` chunks each); the files must be identical to
  the whole-tensor program's, and the tensors/bytes accounting unchanged."""
  base = llama(str(tmp_path / "b"), 0)
  for i in (1, 2):
    llama(str(tmp_path / f"e{i}"), i, base=base)
  yml = tmp_path / "m.yml"
  head = "" if method == "linear" else f"base_model: {tmp_path / 'b'}\n"
  yml.write_text(f"merge_method: {method}\n{head}models:\n"
                 + "".join(f"  - model: {tmp_path / f'e{i}'}\n    parameters: {params}\n"
                           for i in (1, 2)) + (top + "\n" if top else ""))
  whole, seg = E.Stats(), E.Stats()
  run_yaml(str(yml), str(tmp_path / "whole"), progress=False, stats=whole, chunk=0)
  run_yaml(str(yml), str(tmp_path / "seg"), progress=False, stats=seg, chunk=128)
  # 128 x 4 = 512-entry segments: the 96x32 embedding is read in 6 segments
  assert seg.tensors == whole.tensors == 3 * 2 + 3
  assert (seg.bytes_read, seg.bytes_written) == (whole.bytes_read, whole.bytes_written)
  with kio.open_hf_dir(str(tmp_path / "whole")) as a, kio.open_hf_dir(str(tmp_path / "seg")) as b:
    assert sorted(a.names) == sorted(b.names)
    for n in a.names:
      np.testing.assert_array_equal(a.view(n), b.view(n), err_msg=n)
  if method != "ties":   # buffers held: a few segments, not the largest tensor's inputs
    assert seg.peak_buffer_bytes <= (E.LOOKAHEAD + 2) * 3 * 512 * 4 < whole.peak_buffer_bytes


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts", "wudi"])
def test_subspace_method_on_a_model_without_matrices_says_so_once(tmp_path, capsys, method):
  """A 1-D-only model (norms, biases, a 0-d scale): nothing to decompose. One note line for
  the whole model, and every tensor is the mean task vector θ_b + λ·(1/T)Σ τ_i (float64)."""
  from kfuse.merge.runner import merge_checkpoints
  r = np.random.default_rng(0)
  # HF (PyTorch-layout) names: there every 2-D tensor is a matrix (`subspace.matrix_view`)
  shapes = {"norm.weight": (16,), "proj.bias": (7,), "head.scale": ()}
  trees = [{k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(4)]
  paths = []
  for i, t in enumerate(trees):
    p = tmp_path / f"m{i}"
    kio.write_hf_dir(str(p), t)
    paths.append(str(p))
  res = merge_checkpoints(method, paths[1:], paths[0], str(tmp_path / "out"),
                          params={"lambda": 0.7}, progress=False)
  notes = [ln for ln in capsys.readouterr().err.splitlines() if "no" in ln and method in ln]
  assert len(notes) == 1 and notes[0].startswith("kfuse: note:"), notes
  assert "decomposes weight matrices" in notes[0] and "3 tensors of rank 0/1" in notes[0]
  assert res["note"] in notes[0]
  got = kio.read_hf_dir(str(tmp_path / "out"))
  for k in shapes:
    b = trees[0][k].astype(np.float64)
    ref = b + 0.7 * np.mean([t[k].astype(np.float64) - b for t in trees[1:]], axis=0)
    np.testing.assert_allclose(got[k], ref, rtol=1e-6, atol=1e-7, err_msg=k)
  # one matrix is enough to decompose: no note
  for t in trees:
    t["w.weight"] = r.standard_normal((6, 5)).astype(np.float32)
  for i, t in enumerate(trees):
    kio.write_hf_dir(str(tmp_path / f"n{i}"), t)
  res = merge_checkpoints(method, [str(tmp_path / f"n{i}") for i in (1, 2, 3)],
                          str(tmp_path / "n0"), str(tmp_path / "out2"), params={"lambda": 0.7},
                          progress=False)
  assert "note" not in res and "decomposes" not in capsys.readouterr().err
