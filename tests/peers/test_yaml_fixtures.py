"""mergekit-style YAMLs (tests/fixtures/mergekit_yaml) run unchanged through mergekit and kfuse.

Each fixture runs on the session's tiny random Llama family through mergekit 0.1.5
(in-process, CPU) and through ``kfuse.mergekit_compat.run_yaml``; the outputs are
compared tensor by tensor with test_mergekit_parity.py's tolerances (float32:
max|a-b|/max|b| <= 1e-5; half-precision compute or output: 1e-2; DARE / DELLA:
kept fraction and L1 of the task vector). The warnings kfuse prints for
parameters mergekit ignores are checked against the fixture's ``# warns:`` header.

Skipped only when torch or mergekit cannot be imported; with both installed any
failure (mergekit's or kfuse's) fails the test.
"""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from .peer import require

require("mergekit")
require("torch")

from kfuse import mergekit_compat as mc  # noqa: E402
from kfuse.merge.core import get_method  # noqa: E402

from .test_mergekit_parity import (  # noqa: E402
    BF16_RTOL, F32_RTOL, assert_same_stats, assert_same_tensors, load_tensors, render,
    run_kfuse, run_mergekit)

pytestmark = pytest.mark.peers

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "mergekit_yaml")
_IGNORED = re.compile(r"parameter '(\w+)' is not used by merge_method")
_DENSITY = re.compile(r"density .* for model .* is outside \(0, 1\]")


@dataclasses.dataclass
class Fixture:
  text: str
  kind: str              # exact | bf16 | stats
  density: float | None  # stats with one expert: the kept fraction to expect
  warns: set             # parameter names kfuse must report as ignored
  warns_density: int     # models with a density outside (0, 1]


def read_fixture(name: str) -> Fixture:
  with open(os.path.join(FIXTURES, name)) as f:
    text = f.read()
  head = dict(re.findall(r"^# ([\w-]+):[ \t]*(.*)$", text, flags=re.M))
  kind, *rest = head["parity"].split()
  density = float(rest[0].split("=")[1]) if rest else None
  warns = {w.strip() for w in head.get("warns", "").split(",") if w.strip()}
  return Fixture(text, kind, density, warns, int(head.get("warns-density", 0)))


NAMES = sorted(f for f in os.listdir(FIXTURES) if f.endswith(".yml"))


def test_fixture_dir_is_complete():
  """Every merge method of mergekit 0.1.5, both config forms, gradients, filters, dtypes."""
  import yaml
  from mergekit.merge_methods import registry
  cfgs = [yaml.safe_load(read_fixture(n).text) for n in NAMES]
  methods = {c["merge_method"] for c in cfgs}
  assert {m.spec.name for m in registry.registered_methods()} <= methods
  assert any("models" in c for c in cfgs) and any("slices" in c for c in cfgs)
  assert any("out_dtype" in c for c in cfgs) and any(c.get("dtype") == "bfloat16" for c in cfgs)
  assert not any("tokenizer_source" in c or "tokenizer" in c for c in cfgs)
  texts = "".join(read_fixture(n).text for n in NAMES)
  assert "filter:" in texts and re.search(r"value: \[", texts)   # filter rules, gradients
  assert sum(bool(read_fixture(n).warns) for n in NAMES) >= 9  # parameters a method ignores


def test_parameter_tables_match_mergekit():
  """MERGEKIT_PARAMS are mergekit's, and kfuse's methods declare `sparsifies` exactly where
  mergekit's sparsify; kfuse reads every parameter mergekit reads."""
  from mergekit.merge_methods import registry
  from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
  names, sparsifying, ours_sparsify = set(), set(), set()
  for m in registry.registered_methods():
    spec = m.spec
    names |= {p.name for p in spec.shared_parameters} | {p.name for p in spec.input_parameters}
    if isinstance(m, GeneralizedTaskArithmeticMerge) and m.sparsification_method is not None:
      sparsifying.add(spec.name)
    ours = get_method(spec.name).param_map
    if get_method(spec.name).sparsifies:
      ours_sparsify.add(spec.name)
    for p in spec.shared_parameters:
      assert p.name in ours and not ours[p.name].per_model, (spec.name, p.name)
    for p in spec.input_parameters:
      assert p.name in ours and ours[p.name].per_model, (spec.name, p.name)
  assert names == set(mc.MERGEKIT_PARAMS)
  assert sparsifying == ours_sparsify


@pytest.mark.parametrize("name", NAMES)
def test_fixture_parity(name, llama_family, tmp_path, capsys):
  fx = read_fixture(name)
  text = render(fx.text, llama_family)
  ref = load_tensors(run_mergekit(text, tmp_path / "mergekit"))
  capsys.readouterr()
  got_dir = run_kfuse(text, tmp_path / "kfuse")
  err = capsys.readouterr().err
  warnings = [ln for ln in err.splitlines() if ln.startswith("kfuse: warning:")]
  ignored = [m.group(1) for ln in warnings for m in [_IGNORED.search(ln)] if m]
  assert sorted(ignored) == sorted(fx.warns), warnings          # one line per parameter name
  assert sum(bool(_DENSITY.search(ln)) for ln in warnings) == fx.warns_density, warnings
  got = load_tensors(got_dir)
  if fx.kind == "stats":
    assert_same_stats(got, ref, load_tensors(llama_family["base"]), fx.density, name)
  else:
    assert_same_tensors(got, ref, F32_RTOL if fx.kind == "exact" else BF16_RTOL, name)
