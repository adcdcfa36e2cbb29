"""Start-up and compile cost of merge jobs: lazy imports, the persistent compilation cache
on by default (a second run loads its programs instead of compiling them), the timers
the result reports."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kfuse import io as kio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(path, seed, base=None):
  r = np.random.default_rng(seed)
  shapes = {"model.embed_tokens.weight": (48, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
            "model.layers.0.input_layernorm.weight": (16,), "lm_head.weight": (48, 16)}
  t = {k: (r.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
  if base is not None:
    t = {k: base[k] + v for k, v in t.items()}
  kio.write_hf_dir(path, t, config={"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "num_hidden_layers": 1})
  return t


def _merge(yml, out, env, *flags):
  r = subprocess.run([sys.executable, "-m", "kfuse.main", f"--config={REPO}/configs/mergekit.py:{yml}",
                      f"--config.output_dir={out}", "--config.progress=False",
                      "--config.overwrite=True", *flags],
                     env=env, capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


YAMLS = {
    "slerp": """
      merge_method: slerp
      base_model: {d}/base
      models:
        - model: {d}/base
        - model: {d}/e1
      parameters: {{t: 0.3}}
      dtype: float32
      """,
    "ties": """
      merge_method: ties
      base_model: {d}/base
      models:
        - model: {d}/e1
          parameters: {{weight: 1.0, density: 0.3}}
        - model: {d}/e2
          parameters: {{weight: 0.7, density: 0.5}}
      dtype: float32
      """,
}


@pytest.mark.parametrize("method", ["slerp", pytest.param("ties", marks=pytest.mark.slow)])
def test_second_run_loads_every_program_from_the_default_cache(tmp_path, method):
  """slerp: whole-tensor programs; ties: chunked programs and the cut-search passes."""
  base = _model(str(tmp_path / "base"), 0)
  for i in (1, 2):
    _model(str(tmp_path / f"e{i}"), i, base)
  yml = tmp_path / f"{method}.yml"
  yml.write_text(textwrap.dedent(YAMLS[method].format(d=tmp_path)))
  env = dict(os.environ, PYTHONPATH=REPO, KFUSE_CACHE=str(tmp_path / "cache"))
  first = _merge(yml, tmp_path / "out1", env)["compile_cache"]
  cache = str(tmp_path / "cache" / "xla")
  assert first["dir"] == cache      # on by default, under $KFUSE_CACHE
  # the cache starts empty, so the first run writes; it may also load a program it wrote
  # itself moments before (two threads compiling one program at once: the later one finds
  # the earlier one's entry), so its hit count is not asserted
  assert first["writes"] > 0
  assert any(n.endswith("-cache") for n in os.listdir(cache))
  second = _merge(yml, tmp_path / "out2", env)
  # nothing compiled the second time: every program loaded from the cache
  assert second["compile_cache"]["writes"] == 0
  # every program in the cache was loaded (the first run's miss count can exceed the entries
  # when two threads compile one program at once, so count the entries)
  entries = [n for n in os.listdir(cache) if n.endswith("-cache")]
  assert second["compile_cache"]["hits"] >= len(entries) > 0
  with kio.open_hf_dir(str(tmp_path / "out1")) as a, kio.open_hf_dir(str(tmp_path / "out2")) as b:
    for name in a.names:
      np.testing.assert_array_equal(a.get(name), b.get(name))
  # and the same bits as without any cache
  off = _merge(yml, tmp_path / "out3", dict(env, KFUSE_CACHE=str(tmp_path / "cache_off")),
               "--config.compile_cache=off")
  assert "compile_cache" not in off and not os.path.exists(tmp_path / "cache_off")
  with kio.open_hf_dir(str(tmp_path / "out1")) as a, kio.open_hf_dir(str(tmp_path / "out3")) as b:
    for name in a.names:
      np.testing.assert_array_equal(a.get(name), b.get(name))
  assert 0 < second["startup_s"] <= second["first_tensor_s"]   # process start <= engine <= first
  assert 0 < second["startup_cpu_s"] <= second["first_tensor_cpu_s"]


def test_job_called_from_python_leaves_the_jax_cache_setting_alone(tmp_path):
  """The persistent cache is process-wide JAX state: the command line turns it on, a merge
  job called in-process (a notebook, a test) does not, whatever its config says."""
  code = textwrap.dedent(f"""
      import json, jax
      from kfuse.main import load_config
      from kfuse.merge import runner
      _, cfg, _ = load_config({REPO + "/configs/mergekit.py:" + str(yml_path := tmp_path / "m.yml")!r})
      cfg.output_dir = {str(tmp_path / "out")!r}
      cfg.progress = False
      before = jax.config.jax_compilation_cache_dir
      res = runner.run_mergekit(cfg)
      print(json.dumps([before, jax.config.jax_compilation_cache_dir, "compile_cache" in res]))
      """)
  base = _model(str(tmp_path / "base"), 0)
  _model(str(tmp_path / "e1"), 1, base)
  yml_path.write_text(textwrap.dedent(YAMLS["slerp"].format(d=tmp_path)))
  env = dict(os.environ, PYTHONPATH=REPO, KFUSE_CACHE=str(tmp_path / "cache"))
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  before, after, reported = json.loads(r.stdout.strip().splitlines()[-1])
  assert after == before and not reported
  assert not os.path.exists(tmp_path / "cache" / "xla")


def test_merge_jobs_do_not_import_flax_or_optax():
  """What every merge job imports before its first tensor: no Flax (Linen models are only
  needed by the data statistics), no optax, no Orbax unless an input is an Orbax checkpoint."""
  code = ("import sys, kfuse.tasks, kfuse.merge, kfuse.merge.runner, kfuse.mergekit_compat;"
          "print(sorted(m for m in ('flax', 'optax', 'orbax', 'orbax.checkpoint')"
          " if m in sys.modules))")
  r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                     capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]"


def test_statistics_layers_are_still_the_flax_linear_layers():
  import flax.linen as nn
  from kfuse.merge import statistics as ST
  assert ST.LAYERS == (nn.Dense, nn.DenseGeneral, nn.Conv)

