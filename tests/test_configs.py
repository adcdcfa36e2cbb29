"""configs/*.py and their helpers (`kfuse.configs`): parse_arg, no JAX at flag-parse time,
one field name per concept, the merge-parameter table in step with the registry."""

import glob
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from kfuse import configs as C
from kfuse.errors import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def _module(path):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------ parse_arg


def test_parse_arg_typed_defaults_and_overrides():
  a = C.parse_arg("steps=10,lr=0.5,name=x,widths=(8, 16)", steps=3, lr=1e-3, name="y",
                  widths=(4,), quick=False)
  assert a.to_dict() == {"steps": 10, "lr": 0.5, "name": "x", "widths": (8, 16), "quick": False}
  assert type(a.steps) is int and type(a.lr) is float
  assert C.parse_arg(None, steps=3).to_dict() == {"steps": 3}
  assert C.parse_arg("", steps=3).to_dict() == {"steps": 3}


def test_parse_arg_bare_items():
  # a bare item: the first key's value, or True for a boolean key of that name
  assert C.parse_arg("ties", method="task_arithmetic").method == "ties"
  a = C.parse_arg("quick,runlocal", variant="full", runlocal=False)
  assert (a.variant, a.runlocal) == ("quick", True)
  a = C.parse_arg("runlocal=no", variant="full", runlocal=True)
  assert a.runlocal is False
  with pytest.raises(KfuseError, match=r"unexpected item 'b'; keys: variant"):
    C.parse_arg("a,b", variant="full")
  with pytest.raises(KfuseError, match="this config takes no argument"):
    C.parse_arg("quick")


def test_parse_arg_errors_are_one_line_and_name_the_key():
  with pytest.raises(KfuseError, match=r"unknown key 'stesp' \(did you mean 'steps'\?\)"):
    C.parse_arg("stesp=3", steps=1)
  with pytest.raises(KfuseError, match=r"steps: invalid literal for int"):
    C.parse_arg("steps=x", steps=1)
  with pytest.raises(KfuseError, match=r"flag: not a boolean"):
    C.parse_arg("flag=maybe", flag=False)
  with pytest.raises(KfuseError, match=r"variant: unknown value 'huge'; use full or quick"):
    C.parse_arg("huge", variant=("full", C.one_of("full", "quick")))
  lazy = C.parse_arg("extra=3,other=abc", lazy=True, steps=1)
  assert lazy.to_dict() == {"steps": 1, "extra": 3, "other": "abc"}


# ------------------------------------------------------------------ the configs


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_configs_import_only_ml_collections_and_config_helpers(path):
  """Loading a config and building it (every variant) imports no JAX."""
  code = (
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('c', {path!r})\n"
      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      f"for arg in (None, {_VARIANTS.get(os.path.basename(path), 'quick')!r}):\n"
      "  try: m.get_config(arg)\n"
      "  except Exception: pass\n"
      "if hasattr(m, 'field_docs'): m.field_docs('ties')\n"
      "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax'))\n"
      "print(bad[:3])\n")
  r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "[]", r.stdout


_VARIANTS = {"merge.py": "ties", "mergekit.py": "x.yml", "merge_bench.py": "negation",
             "merge_informed_hf.py": "fisher"}


def _walk(node, prefix=""):
  if isinstance(node, (dict, ml_collections.ConfigDict)):
    for k, v in node.items():
      yield f"{prefix}{k}"
      yield from _walk(v, f"{prefix}{k}.")


def test_one_name_per_concept_across_configs():
  """No config uses a retired name (`kfuse.configs.RENAMED`); ``seed`` is an int and
  ``seeds`` a list of ints wherever they appear; every job has ``overwrite=False``."""
  for path in CONFIGS:
    module = _module(path)
    for arg in (None, _VARIANTS.get(os.path.basename(path), "quick")):
      if os.path.basename(path) == "default.py" and arg:
        continue
      config = module.get_config(arg)
      old = [n for n in _walk(config) if C.renamed(n)]
      assert not old, (path, old)
      if "seed" in config:
        assert type(config.seed) is int
      if "seeds" in config:
        assert all(type(s) is int for s in config.seeds)
      assert config.overwrite is False, path
      assert ("workdir" in config) != ("output_dir" in config), path


def test_merge_param_table_matches_the_registry():
  """`kfuse/merge_params.py` is generated from the registry; regenerate it with
  ``python -m kfuse.merge_params`` when a method's parameters change."""
  from kfuse import merge_params
  assert merge_params.PARAMS == merge_params.table_from_registry()


def test_renamed_paths():
  assert C.renamed("methods.tent.method") == "name" and C.renamed("data.suite") == "name"
  assert C.renamed("method") is None and C.renamed("data.name") is None


def test_merge_config_params_come_from_the_table():
  from kfuse.merge import REQUIRED, get_method
  config = _module(os.path.join(REPO, "configs", "merge.py")).get_config("slerp")
  m = get_method("slerp")
  assert set(config.params) == {"lambda_" if p.name == "lambda" else p.name for p in m.params}
  for p in m.params:
    want = None if p.default is REQUIRED else p.default
    assert config.params["lambda_" if p.name == "lambda" else p.name] == want
  with pytest.raises(KfuseError, match=r"unknown merge method 'tie' \(did you mean 'ties'\?\)"):
    _module(os.path.join(REPO, "configs", "merge.py")).get_config("tie")


# ------------------------------------------------------------------ tasks


def test_tasks_are_a_registry_with_lazy_modules():
  from kfuse import tasks
  from kfuse.registry import Registry
  assert isinstance(tasks.TASKS, Registry)
  assert {"merge", "mergekit", "merge_bench", "kd_bench", "tta_bench",
          "mnist1d_baselines"} <= set(tasks.TASKS.names())
  with pytest.raises(KfuseError, match=r"config.task: unknown task 'merge_bnech' "
                                       r"\(did you mean 'merge_bench'\?\)"):
    tasks.entry(ml_collections.ConfigDict({"task": "merge_bnech"}))
  from kfuse.bench import mnist1d_baselines
  assert tasks.entry(ml_collections.ConfigDict({"task": "mnist1d_baselines"})) \
      is mnist1d_baselines.run
