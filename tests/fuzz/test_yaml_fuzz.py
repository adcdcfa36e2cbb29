"""Fuzzing mergekit YAML merges (`kfuse.mergekit_compat.run_yaml`, what
`configs/mergekit.py:X.yml` runs).

Valid configs (linear / task_arithmetic, per-model weights, top-level
normalize / lambda, dtype / out_dtype) must give the float64 NumPy merge to the
output dtype's precision; configs with one node replaced by any YAML value, and
arbitrary YAML text, must either run or fail with a one-line KfuseError that
leaves no output. Inputs are hashed before and after every run.
"""

from __future__ import annotations

import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import yaml
from hypothesis import given, strategies as st

from kfuse.io import open_hf_dir
from kfuse.mergekit_compat import run_yaml
from tests.fuzz.helpers import (fast, json_values, nonempty_shapes, run_checked, slow, small_values,
                                tally, write_model)

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
N_LAYERS = 2


@st.composite
def layouts(draw):
  """A small decoder-like layout: embed, N_LAYERS blocks, norm, lm_head (ranks 1-3)."""
  nonempty = nonempty_shapes
  names = (["model.embed_tokens.weight"]
           + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(N_LAYERS)]
           + [f"model.layers.{i}.input_layernorm.weight" for i in range(N_LAYERS)]
           + ["model.norm.weight", "lm_head.weight"])
  block = draw(nonempty)
  return {n: (block if ".layers." in n else draw(nonempty)) for n in names}


@st.composite
def yaml_cases(draw):
  method = draw(st.sampled_from(["linear", "task_arithmetic"]))
  n = draw(st.integers(1, 3))
  layout = draw(layouts())
  in_dtype = draw(st.sampled_from(sorted(DTYPES)))
  n_models = n + (method == "task_arithmetic")
  values = [{k: draw(small_values(sh)) for k, sh in layout.items()} for _ in range(n_models)]
  normalize = draw(st.booleans())
  lo = 0.25 if (normalize or method == "linear") else -2.0
  weights = draw(st.lists(st.floats(lo, 2.0, width=32), min_size=n, max_size=n))
  top = {"normalize": normalize}
  if method == "task_arithmetic":
    top["lambda"] = draw(st.floats(-2.0, 2.0, width=32))
  cfg = {"merge_method": method,
         "models": [{"model": f"m{i + (method == 'task_arithmetic')}",
                     "parameters": {"weight": w}} for i, w in enumerate(weights)],
         "parameters": top}
  if method == "task_arithmetic":
    cfg["base_model"] = "m0"
  dtype = draw(st.none() | st.sampled_from(sorted(DTYPES)))
  out_dtype = draw(st.none() | st.sampled_from(sorted(DTYPES)))
  if dtype:
    cfg["dtype"] = dtype
  if out_dtype:
    cfg["out_dtype"] = out_dtype
  return dict(cfg=cfg, layout=layout, in_dtype=in_dtype, values=values,
              shards=[draw(st.integers(1, 3)) for _ in range(n_models)])


def write_inputs(root: str, case) -> list[str]:
  shutil.rmtree(root, ignore_errors=True)
  dirs = []
  for i, (vals, k) in enumerate(zip(case["values"], case["shards"])):
    d = os.path.join(root, f"m{i}")
    write_model(d, {n: v.astype(DTYPES[case["in_dtype"]]) for n, v in vals.items()}, k,
                config={"architectures": ["LlamaForCausalLM"], "num_hidden_layers": N_LAYERS})
    dirs.append(d)
  return dirs


def write_yaml(root: str, cfg) -> str:
  p = os.path.join(root, "merge.yml")
  with open(p, "w") as f:
    f.write(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
  return p


def reference(case) -> tuple[dict[str, np.ndarray], np.dtype]:
  """float64 linear / task arithmetic of the inputs as loaded (cast to ``dtype:``)."""
  cfg = case["cfg"]
  load = DTYPES[cfg.get("dtype") or case["in_dtype"]]
  out_dt = DTYPES[cfg.get("out_dtype") or cfg.get("dtype") or case["in_dtype"]]
  w = np.asarray([m["parameters"]["weight"] for m in cfg["models"]], np.float64)
  norm = cfg["parameters"]["normalize"]
  out = {}
  for k in case["layout"]:
    xs = [v[k].astype(DTYPES[case["in_dtype"]]).astype(load).astype(np.float64)
          for v in case["values"]]
    if cfg["merge_method"] == "linear":
      s = sum(wi * x for wi, x in zip(w, xs))
      out[k] = s / w.sum() if norm else s
    else:
      d = sum(wi * (x - xs[0]) for wi, x in zip(w, xs[1:]))
      out[k] = xs[0] + cfg["parameters"]["lambda"] * (d / w.sum() if norm else d)
  return out, out_dt


def check_valid(root: str, case) -> None:
  dirs = write_inputs(root, case)
  cfg_path = write_yaml(root, case["cfg"])
  out = os.path.join(root, "out")
  kind, msg = run_checked(lambda: run_yaml(cfg_path, out, progress=False), dirs + [cfg_path], out)
  assert kind == "ok", msg
  assert_yaml_output(out, case)


def assert_yaml_output(out: str, case) -> None:
  """The output directory holds the float64 reference merge in the output dtype."""
  ref, out_dt = reference(case)
  cfg = case["cfg"]
  eps = max(float(np.finfo(d).eps) for d in
            (out_dt, DTYPES[cfg.get("dtype") or case["in_dtype"]], DTYPES[case["in_dtype"]]))
  w = np.abs([m["parameters"]["weight"] for m in cfg["models"]]).sum()
  lam = abs(cfg["parameters"].get("lambda", 1.0))
  with open_hf_dir(out) as m:
    assert set(m.names) == set(ref)
    for k in m.names:
      g = m.get(k)
      assert g.shape == case["layout"][k] and g.dtype == out_dt, (k, g.shape, g.dtype)
      mag = max([float(np.abs(v[k]).max()) for v in case["values"]] + [1.0])
      scale = mag * (1 + w * (1 + lam)) / (min(1.0, w) if cfg["parameters"]["normalize"] else 1)
      np.testing.assert_allclose(g.astype(np.float64), ref[k], atol=2 * eps * scale, rtol=eps,
                                 err_msg=k)


@fast(12)
@given(case=yaml_cases())
def test_valid_yaml_merge_matches_float64_reference(tmp_path, case):
  check_valid(str(tmp_path / "w"), case)


@pytest.mark.slow
@slow(200)
@given(case=yaml_cases())
def test_valid_yaml_merge_matches_float64_reference_slow(tmp_path, case):
  check_valid(str(tmp_path / "w"), case)


# ----------------------------------------------------------------- mutated configs


def _paths(node, prefix=()):
  """Every path into a nested dict / list config."""
  yield prefix
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _paths(v, prefix + (k,))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      yield from _paths(v, prefix + (i,))


def _replace(node, path, value):
  if not path:
    return value
  node[path[0]] = _replace(node[path[0]], path[1:], value)
  return node


yaml_values = (json_values(6) | st.sampled_from(
    ["", "m9", "../m0", "m0@rev", "m0+lora", "linear", "ties", "float8", "nan", "-1", "1e999"])
    | st.floats() | st.lists(st.integers(-3, 5), max_size=3))
_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "slices",
         "tokenizer_source", "weight", "normalize", "lambda", "model", "layer_range", "sources",
         "density", "wieght", "unknown")


@st.composite
def mutated_cases(draw):
  """A valid case with one node replaced by any YAML value, or one key added/removed."""
  case = draw(yaml_cases())
  cfg = case["cfg"]
  how = draw(st.sampled_from(["replace", "add", "drop"]))
  path = draw(st.sampled_from(list(_paths(cfg))))
  if how == "replace":
    case["cfg"] = _replace(cfg, path, draw(yaml_values))
  else:
    parent = path[:-1] if how == "drop" and path else path
    node = cfg
    for p in parent:
      node = node[p]
    if how == "drop" and path and isinstance(node, (dict, list)):
      del node[path[-1]]
    elif how == "add" and isinstance(node, dict):
      node[draw(st.sampled_from(_KEYS))] = draw(yaml_values)
  case["mutation"] = (how, path)
  return case


def check_any(root: str, case) -> str:
  dirs = write_inputs(root, case)
  cfg_path = write_yaml(root, case["cfg"])
  out = os.path.join(root, "out")
  kind, _ = run_checked(lambda: run_yaml(cfg_path, out, progress=False), dirs + [cfg_path], out)
  tally(f"{case.get('mutation', ('text',))[0]}: {kind}")
  if kind == "ok":   # a complete model directory
    with open_hf_dir(out) as m:
      assert len(m.names) > 0
  return kind


@fast(25)
@given(case=mutated_cases())
def test_mutated_yaml_runs_or_fails_in_one_line(tmp_path, case):
  check_any(str(tmp_path / "w"), case)


@pytest.mark.slow
@slow(500)
@given(case=mutated_cases())
def test_mutated_yaml_runs_or_fails_in_one_line_slow(tmp_path, case):
  check_any(str(tmp_path / "w"), case)


yaml_text = st.text(st.sampled_from("merge_thod:ls[]{}-,\n #&*!|>'\"0123456789.ab"), max_size=80)


@fast(30)
@given(case=yaml_cases(), text=yaml_text)
def test_arbitrary_yaml_text_runs_or_fails_in_one_line(tmp_path, case, text):
  case["cfg"] = text
  check_any(str(tmp_path / "w"), case)


@pytest.mark.parametrize("key,value,named", [
    ("merge_method", ["linear"], "'merge_method'"),
    ("merge_method", {"name": "linear"}, "'merge_method'"),
    ("dtype", 3, "'dtype'"), ("out_dtype", ["float16"], "'out_dtype'"),
    ("model_parameters", [1], "models[0].parameters"),
    ("parameters", [1], "'parameters'"),
], ids=["merge_method_list", "merge_method_map", "dtype_int", "out_dtype_list",
        "model_parameters_list", "parameters_list"])
def test_wrongly_typed_yaml_nodes_fail_in_one_line(tmp_path, key, value, named):
  """A wrongly typed node fails in one line naming its key (it used to raise a
  TypeError traceback)."""
  vals = [{n: np.ones(sh) for n, sh in _FIXED_LAYOUT.items()} for _ in range(2)]
  case = dict(layout=_FIXED_LAYOUT, in_dtype="float32", values=vals, shards=[1, 1],
              cfg={"merge_method": "linear", "models": [{"model": "m0", "parameters": {"weight": 1}},
                                                        {"model": "m1", "parameters": {"weight": 1}}]})
  if key == "model_parameters":
    case["cfg"]["models"][0]["parameters"] = value
  else:
    case["cfg"][key] = value
  root = str(tmp_path / "w")
  dirs = write_inputs(root, case)
  cfg_path = write_yaml(root, case["cfg"])
  out = os.path.join(root, "out")
  kind, msg = run_checked(lambda: run_yaml(cfg_path, out, progress=False), dirs + [cfg_path], out)
  assert kind == "error" and named in msg, msg


def _slices_cfg(how: str) -> tuple[dict, str]:
  """A two-source slices config with one node of the wrong type; the key its error names."""
  srcs = [{"model": "m0", "layer_range": [0, 2]}, {"model": "m1", "layer_range": [0, 2]}]
  cfg = {"merge_method": "linear", "slices": [{"sources": srcs}]}
  if how == "slice_parameters":
    cfg["slices"][0]["parameters"] = ["weight", 1]
    return cfg, "slices[0].parameters"
  if how == "source_parameters":
    srcs[1]["parameters"] = ["weight", 1]
    return cfg, "slices[0].sources[1].parameters"
  if how == "slices_int":
    cfg["slices"] = 3
    return cfg, "'slices'"
  if how == "sources_int":
    cfg["slices"][0]["sources"] = 3
    return cfg, "slices[0].sources"
  if how == "mixed_top_keys":   # YAML keys need not be strings: 1 and 'zz' do not sort
    cfg.update({1: 2, "zz": 3})
    return cfg, "unknown top-level key"
  srcs[0].update({1: 2, "zz": 3})   # mixed_source_keys
  return cfg, "slices[0].sources[0]: unknown key"


@pytest.mark.parametrize("how", ["slice_parameters", "source_parameters", "slices_int",
                                 "sources_int", "mixed_top_keys", "mixed_source_keys"])
def test_wrongly_typed_slice_nodes_fail_in_one_line(tmp_path, how):
  """Wrongly typed slices nodes fail in one line naming the key (TypeError / ValueError
  tracebacks before)."""
  vals = [{n: np.ones(sh) for n, sh in _FIXED_LAYOUT.items()} for _ in range(2)]
  cfg, named = _slices_cfg(how)
  case = dict(layout=_FIXED_LAYOUT, in_dtype="float32", values=vals, shards=[1, 1], cfg=cfg)
  root = str(tmp_path / "w")
  dirs = write_inputs(root, case)
  cfg_path = write_yaml(root, case["cfg"])
  out = os.path.join(root, "out")
  kind, msg = run_checked(lambda: run_yaml(cfg_path, out, progress=False), dirs + [cfg_path], out)
  assert kind == "error" and named in msg, msg


_FIXED_LAYOUT = {"model.embed_tokens.weight": (4, 2), "model.layers.0.mlp.up_proj.weight": (2, 2),
                 "model.layers.1.mlp.up_proj.weight": (2, 2), "model.norm.weight": (2,)}
