"""The command-line front ends: `python -m kfuse.main`, `python -m kfuse.shard`.

Outputs never touch inputs, stale temporaries are only this host's, every
method parameter can be given on the command line, user mistakes are one line,
and ``--help`` documents the configs, the tasks and a config's fields.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from kfuse import io as kio
from kfuse import merge
from kfuse.io import atomic
from kfuse.merge import REQUIRED, get_method
from kfuse.merge import params as P
from kfuse.merge.api import canonical_params, resolve_values, validate_params
from kfuse.merge.core import TensorInfo
from kfuse.merge.runner import cli_params, merge_checkpoints
from kfuse.mergekit_compat import run_yaml
from kfuse.tree import KfuseError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.norm.weight"]


def tiny(path, seed):
  r = np.random.default_rng(seed)
  t = {n: r.standard_normal((4, 3) if n.endswith("proj.weight") else (3,)).astype(np.float32)
       for n in NAMES}
  kio.write_hf_dir(str(path), t, config={"model_type": "llama", "num_hidden_layers": 2})
  return t


def tree_bytes(root) -> dict:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
  return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("parent") / "zoo"
  trees = {n: tiny(root / n, i) for i, n in enumerate(["base", "e0", "e1"])}
  (root / "merge.yml").write_text(textwrap.dedent(f"""
      merge_method: linear
      models:
        - model: {root / 'e0'}
          parameters: {{weight: 1.0}}
        - model: {root / 'e1'}
          parameters: {{weight: 0.5}}
      """))
  return root, trees


def cli(*args, module="kfuse.main", env=None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def one_line_error(r) -> str:
  """The single stderr line of a failed run (its text after ``kfuse: error:``)."""
  lines = r.stderr.strip().splitlines()
  assert r.returncode not in (0, None), r.stdout
  assert len(lines) == 1 and lines[0].startswith("kfuse: error: "), r.stderr[-3000:]
  return lines[0]


def dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ------------------------------------------------- the output never touches an input


def test_output_that_is_contains_or_sits_inside_an_input_is_refused(zoo, tmp_path):
  root, _ = zoo
  os.symlink(root / "e0", tmp_path / "link")
  cases = [(root / "e0", "is the input"), (root, "contains the input"),
           (root.parent, "contains the input"), (root / "e1" / "sub", "is inside the input"),
           (tmp_path / "link", "is the input"), (tmp_path / "link" / "x", "is inside the input")]
  for out, how in cases:
    with pytest.raises(KfuseError, match=how):
      atomic.check_output_outside_inputs(out, [root / "e0", root / "e1"])
  atomic.check_output_outside_inputs(tmp_path / "out", [root / "e0", root / "e1"])
  atomic.check_output_outside_inputs(root / "e00", [root / "e0"])   # a prefix is not a parent


@pytest.mark.parametrize("front", ["native", "mergekit", "shard"])
def test_overwrite_onto_the_inputs_parent_is_refused_before_any_removal(zoo, front):
  """The reported bug: --config.overwrite=True with output_dir = the inputs' parent
  deleted base/, e0/, e1/ and exited 0. Also the stale-temp cleanup must not run."""
  root, _ = zoo
  before = tree_bytes(root)
  stale = atomic.temp_sibling(root).rsplit("-", 2)[0] + f"-{dead_pid()}-0"
  os.mkdir(stale)                                    # this host's, dead: would be cleaned
  common = [f"--config.output_dir={root}", "--config.overwrite=True", "--config.progress=False"]
  if front == "native":
    r = cli("--config=configs/merge.py:linear", f"--config.models={root}/e0,{root}/e1", *common)
  else:
    env = None if front == "mergekit" else {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "1",
        "JAX_PROCESS_ID": "0"}
    r = cli(f"--config=configs/mergekit.py:{root / 'merge.yml'}", *common,
            module="kfuse.main" if front == "mergekit" else "kfuse.shard", env=env)
  assert "contains the input" in one_line_error(r)
  assert tree_bytes(root) == before
  assert os.path.isdir(stale)
  os.rmdir(stale)


def test_in_process_front_ends_refuse_an_input_as_output(zoo, tmp_path):
  root, _ = zoo
  before = tree_bytes(root)
  os.symlink(root / "e1", tmp_path / "alias")
  with pytest.raises(KfuseError, match="is the input"):
    merge_checkpoints("linear", [str(root / "e0"), str(root / "e1")], None,
                      str(tmp_path / "alias"), overwrite=True, progress=False)
  with pytest.raises(KfuseError, match="is inside the input"):
    run_yaml(root / "merge.yml", root / "e0" / "merged", overwrite=True, progress=False)
  assert tree_bytes(root) == before


# ------------------------------------------------- stale temporaries: this host's only


def test_stale_temps_of_other_hosts_are_kept(tmp_path):
  """On a shared filesystem a pid means nothing on another host: only this host's
  temporaries of dead runs may be removed."""
  out = tmp_path / "merged"
  mine = atomic.temp_sibling(out)
  assert f"-{socket.gethostname().replace('-', '_')}-{os.getpid()}-" in os.path.basename(mine)
  pid = dead_pid()
  mine_dead = mine.rsplit("-", 2)[0] + f"-{pid}-0"
  other_host = os.path.join(tmp_path, f".merged.tmp-not{socket.gethostname()}-{pid}-0")
  legacy = os.path.join(tmp_path, f".merged.tmp-{pid}-0")   # no host: cannot tell
  for d in (mine, mine_dead, other_host, legacy):
    os.mkdir(d)
  assert atomic.remove_stale_outputs(out) == [mine_dead]
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(d) for d in (mine, other_host, legacy))


# ------------------------------------------------- method parameters on the command line


def parse_config(argv):
  """configs/... parsed by absl + config_flags exactly as `kfuse.main` does."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def cli_value(p, n):
  """(command-line text, parsed value) for one parameter of each kind, ``n`` models."""
  if p.kind is bool:
    return "true", True
  if p.kind is str:
    return p.default, p.default
  if p.per_model:
    vals = (0.5, 0.25)[:n]
    return ",".join(map(str, vals)) + ("," if n == 1 else ""), vals
  if p.kind is int:
    return "3", 3
  return "0.5", 0.5


@pytest.mark.parametrize("method", merge.names())
def test_every_parameter_of_every_method_parses_on_the_command_line(method):
  m = get_method(method)
  n = 2 if m.max_models is None or m.max_models >= 2 else 1
  argv, want = ["kfuse", f"--config=configs/merge.py:{method}"], {}
  for p in m.params:
    field = "lambda_" if p.name == "lambda" else p.name
    text, want[field] = cli_value(p, n)
    argv.append(f"--config.params.{field}={text}")
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    config = parse_config(argv)
  finally:
    os.chdir(cwd)
  got = config.params.to_dict()
  assert got == want
  params = canonical_params(cli_params(method, got))
  validate_params(m, params, n, where="config.params")
  info = TensorInfo(NAMES[1], (4, 3), np.dtype(np.float32), 1, 2, "torch")
  vals = resolve_values(m, params, info, n)
  for p in m.params:
    want_v = want["lambda_" if p.name == "lambda" else p.name]
    assert vals[p.name] == (list(want_v) if isinstance(want_v, tuple) else want_v)


def test_required_parameters_start_unset_and_lists_become_gradients():
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    assert parse_config(["kfuse", "--config=configs/merge.py:slerp"]).params.t is None
    c = parse_config(["kfuse", "--config=configs/merge.py:slerp", "--config.params.t=0,0.5,1"])
  finally:
    os.chdir(cwd)
  p = cli_params("slerp", c.params.to_dict())
  assert p["t"] == P.Gradient([0, 0.5, 1])
  with pytest.raises(KfuseError, match=r"config.params.t: expected a float, got 'abc'"):
    cli_params("slerp", {"t": "abc"})


def slerp64(a, b, t):
  """mergekit's slerp of two flattened tensors in float64 (lerp when nearly parallel)."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  na, nb = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
  dot = float(np.clip(na @ nb, -1, 1))
  if abs(dot) > 0.9995:
    return (1 - t) * a + t * b
  th = np.arccos(dot)
  return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def test_slerp_runs_from_the_command_line(zoo, tmp_path):
  """`configs/merge.py:slerp --config.params.t=0.5` was a FATAL flags error."""
  root, trees = zoo
  r = cli("--config=configs/merge.py:slerp", f"--config.models={root}/e1",
          f"--config.base={root}/base", "--config.params.t=0.5",
          f"--config.output_dir={tmp_path / 's'}", "--config.progress=False")
  assert r.returncode == 0, r.stderr[-3000:]
  got = kio.read_hf_dir(str(tmp_path / "s"))
  for n in NAMES:
    np.testing.assert_allclose(got[n], slerp64(trees["base"][n], trees["e1"][n], 0.5),
                               rtol=1e-5, atol=1e-6)


def test_gradient_from_the_command_line(zoo, tmp_path):
  """t=0,1 over two layers: layer 0 is the base, layer 1 the expert, the final norm
  (outside the layer stack, t=0) the base."""
  root, trees = zoo
  r = cli("--config=configs/merge.py:slerp", f"--config.models={root}/e1",
          f"--config.base={root}/base", "--config.params.t=0,1",
          f"--config.output_dir={tmp_path / 'g'}", "--config.progress=False")
  assert r.returncode == 0, r.stderr[-3000:]
  got = kio.read_hf_dir(str(tmp_path / "g"))
  np.testing.assert_allclose(got[NAMES[0]], trees["base"][NAMES[0]], rtol=1e-6)
  np.testing.assert_allclose(got[NAMES[1]], trees["e1"][NAMES[1]], rtol=1e-6)
  np.testing.assert_allclose(got[NAMES[2]], trees["base"][NAMES[2]], rtol=1e-6)


def test_per_model_weights_from_the_command_line(zoo, tmp_path):
  root, trees = zoo
  r = cli("--config=configs/merge.py:linear", f"--config.models={root}/e0,{root}/e1",
          "--config.params.weight=1.0,0.5", f"--config.output_dir={tmp_path / 'l'}",
          "--config.progress=False")
  assert r.returncode == 0, r.stderr[-3000:]
  got = kio.read_hf_dir(str(tmp_path / "l"))
  for n in NAMES:
    ref = (1.0 * trees["e0"][n].astype(np.float64) + 0.5 * trees["e1"][n]) / 1.5
    np.testing.assert_allclose(got[n], ref, rtol=1e-6)
  r = cli("--config=configs/merge.py:linear", f"--config.models={root}/e0,{root}/e1",
          "--config.params.weight=1.0,0.5,2.0", f"--config.output_dir={tmp_path / 'l3'}")
  assert "'weight' has 3 per-model values for 2 models" in one_line_error(r)


def sweep_params(m, n):
  out = []
  for p in m.params:
    field = "lambda_" if p.name == "lambda" else p.name
    if p.default is REQUIRED or (p.default is None and p.per_model):
      out.append(f"--config.params.{field}={','.join(['0.5'] * n) + ',' if p.per_model else '0.5'}")
  return out


@pytest.mark.slow
@pytest.mark.parametrize("method", merge.names())
def test_every_method_runs_from_the_command_line(zoo, tmp_path, method):
  root, _ = zoo
  m = get_method(method)
  models = [f"{root}/e0", f"{root}/e1"][:1 if m.max_models == 1 else 2]
  base = [] if m.base == "unused" else [f"--config.base={root}/base"]
  r = cli(f"--config=configs/merge.py:{method}", f"--config.models={','.join(models)}", *base,
          *sweep_params(m, len(models)), f"--config.output_dir={tmp_path / 'o'}", "--config.progress=False")
  if m.tree_stats is not None:
    assert "needs whole-model statistics" in one_line_error(r)
    return
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(kio.read_hf_dir(str(tmp_path / "o"))) == sorted(NAMES)


# ------------------------------------------------- one-line errors


def test_unwritable_output_is_one_line(zoo, tmp_path):
  root, _ = zoo
  (tmp_path / "file").write_text("x")
  models = f"--config.models={root}/e0,{root}/e1"
  r = cli("--config=configs/merge.py:linear", models,
          f"--config.output_dir={tmp_path / 'file' / 'out'}")
  assert f"{tmp_path / 'file'} is not a directory" in one_line_error(r)
  r = cli("--config=configs/merge.py:linear", models, "--config.output_dir=/proc/kfuse_out")
  assert "cannot create the output directory /proc/kfuse_out" in one_line_error(r)


def test_unwritable_orbax_output_is_one_line_before_the_work(zoo, tmp_path):
  """Orbax output into /proc printed ~150 lines of tracebacks and hung for 5 minutes."""
  root, _ = zoo
  r = cli("--config=configs/merge.py:linear", f"--config.models={root}/e0,{root}/e1",
          "--config.output_format=orbax", "--config.output_dir=/proc/kfuse_out")
  assert "cannot create the output directory /proc/kfuse_out" in one_line_error(r)


def test_config_field_typos_are_one_line_and_name_the_closest_field():
  r = cli("--config=configs/merge.py:ties", "--config.params.denisty=0.2")
  assert "no field 'denisty' (did you mean 'density'?)" in one_line_error(r)
  r = cli("--config=configs/mergekit.py", "--config.outptu_dir=x")
  assert "no field 'outptu_dir' (did you mean 'output_dir'?)" in one_line_error(r)


def test_config_file_mistakes_are_one_line():
  r = cli("--config=configs/merg.py")
  assert "config file configs/merg.py does not exist (did you mean 'configs/merge.py'?)" \
      in one_line_error(r)
  r = cli("--config=configs/merge.py", "--config.seed=abc")
  assert "--config.seed=abc" in one_line_error(r)


# ------------------------------------------------- --help


def test_help_lists_configs_and_tasks():
  from kfuse.tasks import TASKS
  r = cli("--help")
  assert r.returncode == 0, r.stderr
  for f in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if f.endswith(".py") and not f.startswith("_"):
      assert f"configs/{f}" in r.stdout
  assert "configs/merge.py              Merge checkpoints" in r.stdout   # first docstring line
  for t in TASKS:
    assert f"  {t} " in r.stdout


def test_help_with_a_config_lists_its_fields_and_docs():
  r = cli("--config=configs/merge.py:slerp", "--help")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert any(ln.split()[:3] == ["params.t", "=", "None"] and "required" in ln for ln in lines)
  assert any(ln.split()[:1] == ["models"] and "comma-separated paths" in ln for ln in lines)
  r = cli("--config=configs/mergekit.py", "-h")
  assert r.returncode == 0, r.stderr
  assert any(ln.split()[:1] == ["num_devices"] and "shard every tensor" in ln
             for ln in r.stdout.splitlines())


def test_old_field_names_point_to_the_new_ones():
  """Renamed fields (WORKSPACE.md, "Config vocabulary") get a one-line (did you mean ...)."""
  r = cli("--config=configs/mnist1d_baselines.py:quick", "--config.data.suite=mnist1d", "--help")
  assert r.returncode == 0   # --help wins; the check runs on a real parse:
  r = cli("--config=configs/mnist1d_baselines.py:quick", "--config.data.suite=mnist1d")
  assert "config.data in configs/mnist1d_baselines.py has no field 'suite' (did you mean 'name'?" \
      in one_line_error(r)
  r = cli("--config=configs/tta_bench.py:quick", "--config.methods.tent.method=tent")
  assert "no field 'method' (did you mean 'name'?" in one_line_error(r)
  r = cli("--config=configs/tta_bench.py:quick", "--config.source.fisher_batch_size=8")
  assert "no field 'fisher_batch_size' (did you mean 'fisher'?" in one_line_error(r)


def test_config_arguments_are_parsed_with_one_line_errors():
  r = cli("--config=configs/kd_bench.py:huge")
  assert "variant: unknown value 'huge'; use full or quick" in one_line_error(r)
  r = cli("--config=configs/merge_bench.py:quick,stesp=3")
  assert "unknown key 'stesp'" in one_line_error(r)


def test_help_of_a_config_imports_no_jax():
  """Flag parsing (configs, `--help`) stays JAX-free: measured 2.4 s -> 0.5 s."""
  r = cli("--config=configs/merge.py:ties", "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
  assert r.returncode == 0, r.stderr
  assert "params.density" in r.stdout
  imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines()
              if ln.startswith("import time:")}
  assert "kfuse" in imported and not imported & {"jax", "jaxlib", "flax", "optax"}
