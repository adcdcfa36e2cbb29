"""mergekit-YAML runs without mergekit installed: plans, CLI, and every bad input."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kfuse import io as kio
from kfuse.mergekit_compat import run_yaml
from kfuse.tree import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, H = 3, 8


def make_model(path, seed, base=None, nan_key=None, drop=None, reshape=None):
  r = np.random.default_rng(seed)
  names = {"model.embed_tokens.weight": (16, H)}
  for i in range(L):
    names[f"model.layers.{i}.self_attn.q_proj.weight"] = (H, H)
    names[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * H, H)
    names[f"model.layers.{i}.input_layernorm.weight"] = (H,)
  names["model.norm.weight"] = (H,)
  names["lm_head.weight"] = (16, H)
  t = {}
  for k, s in names.items():
    if base is not None:
      t[k] = base[k] + 0.05 * r.standard_normal(s).astype(np.float32)
    else:
      t[k] = r.standard_normal(s).astype(np.float32)
  if nan_key:
    t[nan_key] = t[nan_key].copy()
    t[nan_key].flat[0] = np.nan
  if drop:
    del t[drop]
  if reshape:
    t[reshape] = np.zeros((3, 3), np.float32)
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": L,
         "hidden_size": H}
  kio.write_hf_dir(path, t, config=cfg)
  return t


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("zoo")
  base = make_model(str(root / "base"), 0)
  for i in range(3):
    make_model(str(root / f"e{i}"), i + 1, base=base)
  return root, base


def write_yaml(path, text):
  path.write_text(textwrap.dedent(text))
  return str(path)


def dir_hash(d):
  h = hashlib.sha256()
  for name in sorted(os.listdir(d)):
    with open(os.path.join(d, name), "rb") as f:
      h.update(name.encode() + f.read())
  return h.hexdigest()


def test_task_arithmetic_with_gradient_and_slices(zoo, tmp_path):
  root, base = zoo
  y = write_yaml(tmp_path / "ta.yml", f"""
      merge_method: task_arithmetic
      base_model: {root}/base
      models:
        - model: {root}/e0
          parameters: {{weight: [1.0, 0.0]}}
        - model: {root}/e1
          parameters: {{weight: 0.5}}
      dtype: float32
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  out = kio.read_hf_dir(str(tmp_path / "out"))
  e0, e1 = kio.read_hf_dir(str(root / "e0")), kio.read_hf_dir(str(root / "e1"))
  for i in range(L):  # weight gradient 1 -> 0 over the layers, t = i/(L-1)
    k = f"model.layers.{i}.mlp.up_proj.weight"
    w0 = 1 - i / (L - 1)
    np.testing.assert_allclose(out[k], base[k] + w0 * (e0[k] - base[k]) + 0.5 * (e1[k] - base[k]),
                               rtol=1e-5, atol=1e-6)
  k = "lm_head.weight"  # post weights use t = 0
  np.testing.assert_allclose(out[k], base[k] + (e0[k] - base[k]) + 0.5 * (e1[k] - base[k]),
                             rtol=1e-5, atol=1e-6)
  assert json.load(open(tmp_path / "out" / "config.json"))["num_hidden_layers"] == L


def test_passthrough_slices_stack_layers(zoo, tmp_path):
  root, _ = zoo
  y = write_yaml(tmp_path / "pt.yml", f"""
      merge_method: passthrough
      slices:
        - sources: [{{model: {root}/e0, layer_range: [0, 2]}}]
        - sources: [{{model: {root}/e1, layer_range: [1, 3]}}]
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  out = kio.read_hf_dir(str(tmp_path / "out"))
  e0, e1 = kio.read_hf_dir(str(root / "e0")), kio.read_hf_dir(str(root / "e1"))
  q = "model.layers.{}.self_attn.q_proj.weight"
  np.testing.assert_array_equal(out[q.format(1)], e0[q.format(1)])
  np.testing.assert_array_equal(out[q.format(2)], e1[q.format(1)])
  np.testing.assert_array_equal(out[q.format(3)], e1[q.format(2)])
  assert json.load(open(tmp_path / "out" / "config.json"))["num_hidden_layers"] == 4


def test_cli_runs_and_writes_bf16(zoo, tmp_path):
  root, _ = zoo
  y = write_yaml(tmp_path / "ties.yml", f"""
      merge_method: ties
      base_model: {root}/base
      models:
        - {{model: {root}/e0, parameters: {{weight: 1.0, density: 0.5}}}}
        - {{model: {root}/e1, parameters: {{weight: 1.0, density: 0.5}}}}
      out_dtype: bfloat16
  """)
  out = tmp_path / "cli_out"
  r = subprocess.run([sys.executable, "-m", "kfuse.main", f"--config=configs/mergekit.py:{y}",
                      f"--config.output_dir={out}", "--config.progress=False"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  m = kio.open_hf_dir(str(out))
  assert str(m.dtype("lm_head.weight")) == "bfloat16"
  # same command again: the existing output is refused with one line, exit code 2
  r2 = subprocess.run([sys.executable, "-m", "kfuse.main", f"--config=configs/mergekit.py:{y}",
                       f"--config.output_dir={out}"], cwd=REPO, capture_output=True, text=True,
                      timeout=300)
  assert r2.returncode == 2
  last = r2.stderr.strip().splitlines()[-1]
  assert last.startswith("kfuse: error: output directory") and "exists" in last, r2.stderr


BAD_YAMLS = {
    "both_models_and_slices": ("""
        merge_method: linear
        models: [{model: E0, parameters: {weight: 1}}]
        slices: [{sources: [{model: E0, layer_range: [0, 1]}]}]
     """, "exactly one of 'models', 'slices'"),
    "no_method": ("models: [{model: E0}]", "missing required key 'merge_method'"),
    "unknown_method": ("""
        merge_method: frobnicate
        models: [{model: E0}]
     """, "unknown merge_method 'frobnicate'"),
    "unknown_param": ("""
        merge_method: ties
        base_model: BASE
        models: [{model: E0, parameters: {weight: 1, densty: 0.5}}]
     """, "unknown parameter 'densty'"),
    "missing_weight": ("""
        merge_method: ties
        base_model: BASE
        models: [{model: E0, parameters: {density: 0.5}}]
     """, "missing required parameter 'weight'"),
    "missing_base": ("""
        merge_method: ties
        models: [{model: E0, parameters: {weight: 1}}]
     """, "requires a base_model"),
    "slerp_three_models": ("""
        merge_method: slerp
        base_model: BASE
        parameters: {t: 0.5}
        models: [{model: E0}, {model: E1}]
     """, "takes 1 non-base models, got 2"),
    "bad_layer_range": ("""
        merge_method: passthrough
        slices: [{sources: [{model: E0, layer_range: [2, 1]}]}]
     """, "layer_range must be"),
    "unequal_slice": ("""
        merge_method: linear
        slices: [{sources: [{model: E0, layer_range: [0, 2]}, {model: E1, layer_range: [0, 1]}]}]
     """, "same number of layers"),
    "bad_bool": ("""
        merge_method: ties
        base_model: BASE
        parameters: {normalize: maybe}
        models: [{model: E0, parameters: {weight: 1}}]
     """, "must be a boolean"),
    "unknown_top_key": ("""
        merge_method: linear
        modelz: []
        models: [{model: E0, parameters: {weight: 1}}]
     """, "unknown top-level key 'modelz'"),
    "bad_dtype": ("""
        merge_method: linear
        dtype: float13
        models: [{model: E0, parameters: {weight: 1}}]
     """, "unknown dtype 'float13'"),
    "missing_model_dir": ("""
        merge_method: linear
        models: [{model: /nonexistent/model, parameters: {weight: 1}}]
     """, "/nonexistent/model"),
    "not_yaml": ("merge_method: [unclosed", "invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAMLS))
def test_yaml_that_mergekit_would_reject(zoo, tmp_path, case):
  root, _ = zoo
  text, msg = BAD_YAMLS[case]
  text = text.replace("BASE", f"{root}/base").replace("E0", f"{root}/e0").replace("E1", f"{root}/e1")
  y = write_yaml(tmp_path / "bad.yml", text)
  with pytest.raises(KfuseError, match=msg) as ei:
    run_yaml(y, tmp_path / "out", progress=False)
  assert "\n" not in str(ei.value)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("defect,msg", [
    ("nan", r"e_bad.*'model.layers.1.mlp.up_proj.weight'.*contains NaN"),
    ("drop", r"e_bad.*missing tensor 'model.layers.2.self_attn.q_proj.weight'"),
    ("reshape", r"shape mismatch for 'model.layers.0.mlp.up_proj.weight'"),
    ("truncate", r"e_bad.*(truncated|shorter|size)"),
])
def test_bad_checkpoints_fail_cleanly_and_leave_nothing(zoo, tmp_path, defect, msg):
  root, base = zoo
  bad = tmp_path / "e_bad"
  kw = {"nan": {"nan_key": "model.layers.1.mlp.up_proj.weight"},
        "drop": {"drop": "model.layers.2.self_attn.q_proj.weight"},
        "reshape": {"reshape": "model.layers.0.mlp.up_proj.weight"}}.get(defect, {})
  make_model(str(bad), 9, base=base, **kw)
  if defect == "truncate":
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
  before = {d: dir_hash(d) for d in (str(root / "base"), str(root / "e0"), str(bad))}
  y = write_yaml(tmp_path / "m.yml", f"""
      merge_method: ties
      base_model: {root}/base
      parameters: {{weight: 1.0, density: 0.5}}
      models: [{{model: {root}/e0}}, {{model: {bad}}}]
  """)
  out = tmp_path / "out"
  with pytest.raises(KfuseError, match=msg):
    run_yaml(y, out, progress=False)
  assert not out.exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []  # no temp dir left
  assert before == {d: dir_hash(d) for d in before}  # inputs untouched


def test_existing_output_refused_then_overwritten(zoo, tmp_path):
  root, _ = zoo
  y = write_yaml(tmp_path / "l.yml", f"""
      merge_method: linear
      models: [{{model: {root}/e0, parameters: {{weight: 1}}}}, {{model: {root}/e1, parameters: {{weight: 3}}}}]
  """)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(KfuseError, match="exists"):
    run_yaml(y, out, progress=False)
  assert (out / "keep.txt").exists()
  run_yaml(y, out, overwrite=True, progress=False)
  assert not (out / "keep.txt").exists()
  assert kio.is_hf_dir(str(out))


# ---------------------------------------------------------------- mergekit's leniency, kept


def warnings_of(err: str) -> list:
  return [ln for ln in err.splitlines() if ln.startswith("kfuse: warning:")]


def test_base_lacking_a_tensor_every_expert_has_is_refused_like_the_native_merge(zoo, tmp_path):
  """The layout came from the base, so its missing lm_head was silently left out."""
  from kfuse.merge.runner import merge_checkpoints
  root, base = zoo
  b = {k: v for k, v in base.items() if k != "lm_head.weight"}
  kio.write_hf_dir(str(tmp_path / "base_nohead"), b, config={
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": L})
  y = write_yaml(tmp_path / "m.yml", f"""
      merge_method: ties
      base_model: {tmp_path}/base_nohead
      parameters: {{weight: 1.0, density: 0.5}}
      models: [{{model: {root}/e0}}, {{model: {root}/e1}}, {{model: {root}/e2}}]
  """)
  with pytest.raises(KfuseError) as ei:
    run_yaml(y, tmp_path / "out", progress=False)
  msg = str(ei.value)
  assert "\n" not in msg
  assert msg.startswith(f"{tmp_path}/base_nohead: missing tensor 'lm_head.weight'"), msg
  assert f"{root}/e0/model.safetensors" in msg, msg   # the file that holds it
  assert not (tmp_path / "out").exists()
  with pytest.raises(KfuseError, match="lm_head.weight"):  # the native path agrees
    merge_checkpoints("ties", [f"{root}/e{i}" for i in range(3)], f"{tmp_path}/base_nohead",
                      str(tmp_path / "out_native"), params={"weight": 1.0, "density": 0.5},
                      progress=False)


def test_slices_outside_layer_range_are_not_expected(zoo, tmp_path):
  """The coverage check leaves out layers a source does not contribute."""
  root, _ = zoo
  y = write_yaml(tmp_path / "pt.yml", f"""
      merge_method: passthrough
      slices:
        - sources: [{{model: {root}/e0, layer_range: [0, 1]}}]
        - sources: [{{model: {root}/e1, layer_range: [2, 3]}}]
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  assert json.load(open(tmp_path / "out" / "config.json"))["num_hidden_layers"] == 2


def test_weight_on_a_method_without_weights_runs_with_one_warning(zoo, tmp_path, capsys):
  """mergekit's test YAMLs put `weight` on every model, also for nearswap (it ignores it)."""
  root, base = zoo
  y = write_yaml(tmp_path / "ns.yml", f"""
      merge_method: nearswap
      base_model: {root}/base
      parameters: {{t: 0.02}}
      models:
        - {{model: {root}/base, parameters: {{weight: 1.0}}}}
        - {{model: {root}/e0, parameters: {{weight: 0.5}}}}
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  err = capsys.readouterr().err
  w = warnings_of(err)
  assert len(w) == 1, err
  assert "'weight' is not used by merge_method 'nearswap'" in w[0] and "ns.yml" in w[0]
  out = kio.read_hf_dir(str(tmp_path / "out"))
  e0 = kio.read_hf_dir(str(root / "e0"))
  for k in out:  # nearswap closed form in float64 (mergekit's nearswap.py)
    a, b = base[k].astype(np.float64), e0[k].astype(np.float64)
    w64 = np.clip(0.02 / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    np.testing.assert_allclose(out[k], w64 * b + (1 - w64) * a, rtol=1e-6, atol=1e-7, err_msg=k)


def test_shared_parameter_given_per_model_is_ignored_with_a_warning(zoo, tmp_path, capsys):
  root, base = zoo
  y = write_yaml(tmp_path / "ta.yml", f"""
      merge_method: task_arithmetic
      base_model: {root}/base
      models:
        - {{model: {root}/e0, parameters: {{weight: 0.5, lambda: 3.0}}}}
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  w = warnings_of(capsys.readouterr().err)
  assert len(w) == 1 and "'lambda'" in w[0] and "shared" in w[0], w
  out = kio.read_hf_dir(str(tmp_path / "out"))
  e0 = kio.read_hf_dir(str(root / "e0"))
  k = "model.layers.1.mlp.up_proj.weight"  # lambda stays 1.0
  ref = base[k].astype(np.float64) + 0.5 * (e0[k].astype(np.float64) - base[k])
  np.testing.assert_allclose(out[k], ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,typo,hint", [
    ("nearswap", "wieght", "weight"),     # not a nearswap parameter: closest mergekit name
    ("ties", "densty", "density"),
    ("slerp", "tt", "t"),
])
def test_typo_in_parameter_name_is_an_error_with_a_suggestion(zoo, tmp_path, method, typo, hint):
  root, _ = zoo
  y = write_yaml(tmp_path / "bad.yml", f"""
      merge_method: {method}
      base_model: {root}/base
      parameters: {{t: 0.5, weight: 1.0}}
      models: [{{model: {root}/e0, parameters: {{{typo}: 0.5}}}}]
  """)
  with pytest.raises(KfuseError) as ei:
    run_yaml(y, tmp_path / "out", progress=False)
  msg = str(ei.value)
  assert f"unknown parameter {typo!r}" in msg and f"(did you mean {hint!r}?)" in msg, msg
  assert "\n" not in msg
  assert not (tmp_path / "out").exists()


def test_density_outside_unit_interval_is_kept_with_one_warning_per_model(zoo, tmp_path, capsys):
  """density 0 drops a model's task vector, 1.5 keeps all of it (mergekit's sparsify)."""
  root, base = zoo
  y = write_yaml(tmp_path / "ties.yml", f"""
      merge_method: ties
      base_model: {root}/base
      models:
        - {{model: {root}/e0, parameters: {{weight: 1.0, density: 0.0}}}}
        - {{model: {root}/e1, parameters: {{weight: 0.5, density: 1.5}}}}
        - {{model: {root}/e2, parameters: {{weight: 0.5, density: [1.0, -0.5]}}}}
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  w = warnings_of(capsys.readouterr().err)
  assert len(w) == 3, w
  assert any(f"density 0 for model '{root}/e0'" in x for x in w), w
  assert any(f"density 1.5 for model '{root}/e1'" in x for x in w), w
  # e2's gradient goes below 0 at layer 2 only (t = 1: -0.5; t = 0.5: 0.25 is in range)
  assert any(f"density -0.5 for model '{root}/e2'" in x for x in w), w
  out = kio.read_hf_dir(str(tmp_path / "out"))
  e1, e2 = kio.read_hf_dir(str(root / "e1")), kio.read_hf_dir(str(root / "e2"))
  k = f"model.layers.{L - 1}.mlp.up_proj.weight"   # only e1's full delta survives
  b = base[k].astype(np.float64)
  # TIES (normalize): sum of agreeing weighted deltas / sum of their weights = δ1 where δ1 != 0
  np.testing.assert_allclose(out[k], b + (e1[k] - b), rtol=1e-6, atol=1e-7)
  assert not np.allclose(out[k], e2[k])


def test_density_in_range_gives_no_warning(zoo, tmp_path, capsys):
  root, _ = zoo
  y = write_yaml(tmp_path / "ties.yml", f"""
      merge_method: ties
      base_model: {root}/base
      parameters: {{density: [1.0, 0.5], weight: 1.0}}
      models: [{{model: {root}/e0}}, {{model: {root}/e1}}]
  """)
  run_yaml(y, tmp_path / "out", progress=False)
  assert warnings_of(capsys.readouterr().err) == []
