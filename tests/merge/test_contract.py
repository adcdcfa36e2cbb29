"""The method-author contract: a `chain` recipe runs through `merge.merge` and the
streaming engine (`merge_checkpoints`), and the engine follows what a method
declares (`elementwise`, `selection`, `prepare`'s context), not its name.

References are float64 NumPy recomputations of TIES (Yadav et al., NeurIPS 2023,
mergekit's per-tensor trim).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import io as kio
from kfuse import merge
from kfuse.merge import stages as S
from kfuse.merge.engine import DictSource, Stats, TensorTask, execute
from kfuse.merge.runner import merge_checkpoints
from kfuse.tree import KfuseError

RNG = np.random.default_rng(7)
SHAPES = {"model.layers.0.mlp.up_proj.weight": (24, 40), "model.layers.0.bias": (40,),
          "model.norm.weight": (5,)}
BASE = {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
EXPERTS = [{k: (v + RNG.normal(size=v.shape) * RNG.uniform(0.1, 1.0)).astype(np.float32)
            for k, v in BASE.items()} for _ in range(3)]
W = [1.0, 0.6, -0.4]
DENSITY = 0.3
LAM = 0.8
PARAMS = {"weight": W, "density": DENSITY, "lambda": LAM}


def readme_recipe(rule):
  """README.md's example: TIES built from stages (with the election rule ``rule``)."""
  return merge.chain(S.task_vectors(), S.trim_magnitude(), S.weigh(), S.elect_sign(rule),
                     S.combine(normalize=True), S.scale(), S.add_base())


def ties64(base, experts, rule):
  """float64 TIES: top-k |δ| (k = max(1, ⌊d·n⌋)), weighted, sign election, disjoint
  weighted mean, λ, + θ_b."""
  b = base.astype(np.float64)
  d = np.stack([e.astype(np.float64) - b for e in experts])
  n = b.size
  k = max(1, int(DENSITY * n))
  trimmed = np.zeros_like(d)
  for i in range(len(d)):
    flat = np.abs(d[i]).ravel()
    keep = np.zeros(n, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    trimmed[i] = d[i] * keep.reshape(d[i].shape)
  w = np.asarray(W).reshape((-1,) + (1,) * b.ndim)
  wd = w * trimmed
  total = wd.sum(0) if rule == "sum" else np.sign(wd).sum(0)
  s = np.where(total >= 0, 1.0, -1.0)
  m = np.sign(wd) == s
  div = (w * m).sum(0)
  return b + LAM * (wd * m).sum(0) / np.where(div == 0, 1, div)


def write_dirs(tmp_path):
  dirs = []
  for name, tensors in [("base", BASE)] + [(f"e{i}", e) for i, e in enumerate(EXPERTS)]:
    p = tmp_path / name
    kio.write_hf_dir(str(p), tensors)
    dirs.append(str(p))
  return dirs[0], dirs[1:]


def assert_ties(got, rule):
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k], np.float64),
                               ties64(BASE[k], [e[k] for e in EXPERTS], rule),
                               rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("rule", ["sum", "count"])
def test_chain_recipe_runs_through_merge(rule):
  my = merge.get_method("ties").like("my_ties", readme_recipe(rule))
  got = merge.merge(my, EXPERTS, BASE, params=PARAMS)
  assert_ties(got, rule)


@pytest.mark.parametrize("chunk", [None, 0])
@pytest.mark.parametrize("selection", ["magnitude", None])
def test_chain_recipe_runs_through_the_streaming_engine(tmp_path, chunk, selection):
  """Host-found cuts (``selection='magnitude'``, chunked or whole) and the in-kernel
  selection (``selection=None``) both give the float64 TIES result."""
  my = merge.get_method("ties").like("my_ties", readme_recipe("count"), selection=selection)
  base, experts = write_dirs(tmp_path)
  res = merge_checkpoints(my, experts, base, str(tmp_path / "out"), params=PARAMS,
                          progress=False, chunk=chunk)
  assert res["method"] == "my_ties"
  assert_ties(kio.read_hf_dir(str(tmp_path / "out")), "count")


def test_a_bare_recipe_is_refused_with_a_hint():
  with pytest.raises(KfuseError, match=r"like\('my_ties', recipe\)"):
    merge.merge(readme_recipe("sum"), EXPERTS, BASE, params=PARAMS)


def _engine(method, chunk):
  srcs = [DictSource(BASE)] + [DictSource(e) for e in EXPERTS]
  out, stats = {}, Stats()
  plan = [TensorTask(k, method, (0, k), [(i + 1, k) for i in range(3)],
                     merge.resolve_values(method, PARAMS, merge.TensorInfo(k, s, np.float32), 3),
                     merge.TensorInfo(k, s, np.float32)) for k, s in SHAPES.items()]
  execute(plan, srcs, out.__setitem__, progress=False, chunk=chunk, stats=stats)
  return out, stats


def test_engine_chunks_what_a_method_declares_elementwise():
  """Chunking follows `Method.elementwise`, not the method's name: a renamed TIES
  is chunked; the same recipe declared non-elementwise runs on whole tensors."""
  ties = merge.get_method("ties")
  renamed = ties.like("renamed_ties", ties.recipe(normalize=True, rescale=False))
  whole = ties.like("whole_ties", ties.recipe(normalize=True, rescale=False), elementwise=False)
  a, sa = _engine(renamed, chunk=16)
  b, sb = _engine(whole, chunk=16)
  assert sa.chunked == len(SHAPES) and sb.chunked == 0
  for k in SHAPES:
    np.testing.assert_array_equal(a[k], b[k])
  assert_ties(a, "sum")


def test_rescale_makes_gta_whole_tensor():
  ties = merge.get_method("ties")
  assert ties.is_elementwise({"rescale": False}) and not ties.is_elementwise({"rescale": True})
  assert merge.get_method("dare_ties").selection is None
  assert merge.get_method("breadcrumbs").selection == "band"


def test_prepare_context_carries_the_dialect_and_stats():
  """mergekit's lenient density is a `PrepareContext`, not a key in the values; a
  whole-model pre-pass reaches prepare as ``ctx.stats``."""
  m = merge.get_method("ties")
  info = merge.TensorInfo("w", (4, 4), np.float32)
  vals = {"weight": [1.0], "density": [0.0], "lambda": 1.0, "normalize": True, "rescale": False}
  with pytest.raises(KfuseError, match="density 0.0"):
    m.prepare(m, vals, info, 1)
  _, hp = m.prepare(m, vals, info, 1, merge.MERGEKIT)
  assert int(hp["k"][0]) == 0
  tp = merge.get_method("ties_paper")
  with pytest.raises(KfuseError, match="whole-model statistics"):
    tp.prepare(tp, {"k": 0.2, "lambda": 0.3, "disjoint": "sum"}, info, 1)
  _, hp = tp.prepare(tp, {"k": 0.2, "lambda": 0.3, "disjoint": "sum"}, info, 1,
                     merge.PrepareContext(stats={"thr": [0.5], "zero_sign": 1.0}))
  np.testing.assert_allclose(hp["thr"], [0.5])


def test_registry_is_the_shared_registry():
  from kfuse.registry import Registry
  from kfuse.merge import core
  assert isinstance(core.METHODS, Registry)
  assert core.METHODS.defaults("ties")["density"] == 1.0
  with pytest.raises(KfuseError, match="did you mean 'ties'"):
    merge.get_method("tiess")


def _with_method(monkeypatch, method):
  """Register ``method`` in a copy of the merge registry for this test only."""
  from kfuse.merge import core
  from kfuse.registry import Registry
  reg = Registry("merge method")
  for name in core.names():
    reg.register(name, core.get_method(name), defaults=core.METHODS.defaults(name))
  monkeypatch.setattr(core, "METHODS", reg)
  core.register(method)


@pytest.mark.parametrize("sparsifies", [True, False])
def test_a_new_method_declaring_sparsifies_gets_the_density_behaviour(monkeypatch, tmp_path,
                                                                      sparsifies, capsys):
  """`Method.sparsifies`, not a list of names, decides what ``density`` means: a newly
  registered method that declares it gets mergekit's lenient density (one warning line for a
  density outside (0, 1]) in YAML and the (0, 1] check in the native API; one that does not
  declare it gets neither."""
  import textwrap
  from kfuse.mergekit_compat import run_yaml
  recipe = merge.chain(S.task_vectors(), S.weigh(), S.combine(normalize=False), S.scale(),
                       S.add_base())
  m = merge.get_method("task_arithmetic").like("my_sparse", recipe, sparsifies=sparsifies)
  _with_method(monkeypatch, m)
  root = tmp_path / "zoo"
  for i, t in enumerate([BASE] + EXPERTS[:2]):
    kio.write_hf_dir(str(root / f"m{i}"), t)
  yml = tmp_path / "m.yml"
  yml.write_text(textwrap.dedent(f"""
      merge_method: my_sparse
      base_model: {root}/m0
      models:
        - model: {root}/m1
          parameters: {{weight: 1.0, density: 1.5}}
        - model: {root}/m2
          parameters: {{weight: 0.5, density: 0.5}}
      """))
  run_yaml(str(yml), str(tmp_path / "out"), progress=False)
  warned = [ln for ln in capsys.readouterr().err.splitlines() if "outside (0, 1]" in ln]
  assert len(warned) == (1 if sparsifies else 0), warned
  if sparsifies:
    assert "density 1.5" in warned[0] and "m1" in warned[0]
  ex = [{k: jnp.asarray(v) for k, v in e.items()} for e in EXPERTS[:2]]
  call = lambda: merge.merge(m, ex, {k: jnp.asarray(v) for k, v in BASE.items()},
                             params={"weight": [1.0, 0.5], "density": [1.5, 0.5]})
  if sparsifies:
    with pytest.raises(KfuseError, match=r"density 1\.5 for my_sparse must be in \(0, 1\]"):
      call()
  else:   # the recipe ignores density: plain task arithmetic, checked in float64
    got = call()
    for k, b in BASE.items():
      ref = b.astype(np.float64) + sum(w * (e[k].astype(np.float64) - b)
                                       for w, e in zip([1.0, 0.5], EXPERTS[:2]))
      np.testing.assert_allclose(np.asarray(got[k]), ref, rtol=1e-5, atol=1e-5)
