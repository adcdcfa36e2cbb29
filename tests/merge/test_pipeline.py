"""The one merge pipeline (`kfuse.merge.pipeline`): both checkpoint front ends (native
`merge_checkpoints`, mergekit `run_yaml`) validate, execute and write through it."""

import os
import textwrap

import numpy as np
import pytest

from kfuse import io as kio
from kfuse.merge import get_method, pipeline
from kfuse.merge.core import TensorInfo
from kfuse.merge.engine import DictSource, TensorTask
from kfuse.merge.runner import merge_checkpoints
from kfuse.mergekit_compat import run_yaml
from kfuse.tree import KfuseError

H = 6


def _model(path, seed):
  r = np.random.default_rng(seed)
  t = {"model.embed_tokens.weight": r.standard_normal((10, H)).astype(np.float32),
       "model.layers.0.mlp.up_proj.weight": r.standard_normal((2 * H, H)).astype(np.float32),
       "model.layers.1.mlp.up_proj.weight": r.standard_normal((2 * H, H)).astype(np.float32),
       "model.position_ids": np.arange(5, dtype=np.int64),
       "model.norm.weight": r.standard_normal(H).astype(np.float32)}
  kio.write_hf_dir(path, t, config={"model_type": "llama", "num_hidden_layers": 2,
                                    "hidden_size": H})
  return t


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  return root, [_model(str(root / f"e{i}"), i) for i in range(2)]


def test_both_front_ends_write_the_same_merge_and_the_same_report(zoo, tmp_path, capsys):
  """A weighted linear merge through the native runner and through a mergekit YAML: the same
  files' tensors, equal to float64 NumPy (Σ w_i θ_i / Σ w_i), the integer tensor copied, and
  one result shape (format, seconds, copied) with one note line each."""
  root, models = zoo
  w = [1.0, 0.25]
  native = merge_checkpoints("linear", [str(root / "e0"), str(root / "e1")], None,
                             str(tmp_path / "native"), params={"weight": w}, progress=False)
  yml = tmp_path / "m.yml"
  yml.write_text(textwrap.dedent(f"""
      merge_method: linear
      models:
        - model: {root}/e0
          parameters: {{weight: {w[0]}}}
        - model: {root}/e1
          parameters: {{weight: {w[1]}}}
      """))
  viayaml = run_yaml(str(yml), str(tmp_path / "yaml"), progress=False)
  err = capsys.readouterr().err
  assert sorted(native) == sorted(viayaml), (native, viayaml)
  assert native["format"] == viayaml["format"] == "safetensors"
  assert native["copied"] == viayaml["copied"] == 1
  assert err.count("kfuse: note: 1 integer/bool tensor(s) copied") == 2, err
  a, b = kio.read_hf_dir(str(tmp_path / "native")), kio.read_hf_dir(str(tmp_path / "yaml"))
  assert sorted(a) == sorted(b) == sorted(models[0])
  for k, x in models[0].items():
    if x.dtype.kind == "i":
      np.testing.assert_array_equal(a[k], x)
      np.testing.assert_array_equal(b[k], x)
      continue
    ref = (w[0] * x.astype(np.float64) + w[1] * models[1][k].astype(np.float64)) / sum(w)
    np.testing.assert_allclose(a[k], ref, rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(b[k], ref, rtol=1e-6, atol=1e-7, err_msg=k)
  assert os.path.isfile(tmp_path / "yaml" / "mergekit_config.yml")


def test_a_yaml_with_a_whole_model_statistics_method_is_refused_in_one_line(zoo, tmp_path):
  """ties_paper needs a whole-model pre-pass the streaming engine cannot run: both front ends
  refuse it in the pipeline's validation, before any output exists."""
  root, _ = zoo
  yml = tmp_path / "tp.yml"
  yml.write_text(textwrap.dedent(f"""
      merge_method: ties_paper
      base_model: {root}/e0
      models:
        - model: {root}/e1
      parameters: {{k: 0.5}}
      """))
  out = tmp_path / "out"
  with pytest.raises(KfuseError, match=r"tp\.yml: method 'ties_paper' needs whole-model"):
    run_yaml(str(yml), str(out), progress=False)
  with pytest.raises(KfuseError, match=r"needs whole-model statistics"):
    merge_checkpoints("ties_paper", [str(root / "e1")], str(root / "e0"), str(out),
                      params={"k": 0.5}, progress=False)
  assert not out.exists()


def _plan(method, base, n, **kw):
  src = DictSource({"w": np.ones((2, 3), np.float32)}, path="m")
  info = TensorInfo("w", (2, 3), np.float32)
  task = TensorTask("w", method, (0, "w") if base else None, [(0, "w")] * n, {}, info)
  return pipeline.Plan(method, [task], [src], **kw)


def test_validate_is_the_method_contract_naming_the_front_ends_words():
  """`pipeline.validate` applies `core.check_models` to the planned tasks: a missing base is
  named as ``base_where`` / ``base_word`` say, a model count out of range as ``where``."""
  ties, slerp = get_method("ties"), get_method("slerp")
  with pytest.raises(KfuseError, match=r"^config\.base: merge method 'ties' requires a base model$"):
    pipeline.validate(_plan(ties, False, 2, where="config.models", base_where="config.base"))
  with pytest.raises(KfuseError, match=r"^x\.yml: merge method 'ties' requires a base_model$"):
    pipeline.validate(_plan(ties, False, 2, where="x.yml", base_word="base_model"))
  with pytest.raises(KfuseError, match=r"^x\.yml: merge method 'slerp' takes 1 non-base models, got 2$"):
    pipeline.validate(_plan(slerp, True, 2, where="x.yml"))
  with pytest.raises(KfuseError, match=r"unknown output format 'npz'"):
    pipeline.validate(_plan(ties, True, 2, format="npz"))
  pipeline.validate(_plan(ties, True, 2))   # within the contract: no error
