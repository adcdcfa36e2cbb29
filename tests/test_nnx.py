"""Flax NNX across kfuse (`kfuse.nnx`): the same model written in Linen and in NNX, with the same
weights, gives the same forward pass, the same merge (bitwise), the same Tent step and the same KD
step; an NNX state round-trips through Orbax; README's worked examples run.

The Linen side is the reference: its paths (Linen apply, `merge.merge` on variables, Tent, KD) are
tested against NumPy / PyTorch elsewhere. The NNX weights are set attribute by attribute from the
Linen variables (not through `kfuse.nnx`), so a conversion bug cannot cancel out.
"""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kfuse import adapt, distill, merge
from kfuse import nnx as knnx
from kfuse.io import orbax_io
from kfuse.tree import KfuseError, flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("dense1", "bn", "ln", "head")


class LinenNet(nn.Module):
  classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8, name="dense1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    x = nn.LayerNorm(name="ln")(nn.relu(x))
    return nn.Dense(self.classes, name="head")(x)


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, classes: int = 3):
    self.dense1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, classes, rngs=rngs)

  def __call__(self, x):
    return self.head(self.ln(nnx.relu(self.bn(self.dense1(x)))))


def linen_variables(seed: int, scale: float = 1.0) -> dict:
  """Random Linen variables, with non-trivial norm affines and running statistics."""
  v = LinenNet().init(jax.random.key(seed), jnp.zeros((2, 4)))
  leaves, tdef = jax.tree.flatten(jax.tree.map(jnp.asarray, dict(v)))
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [l + scale * 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  out = jax.tree.unflatten(tdef, leaves)
  out["batch_stats"]["bn"]["var"] = jnp.abs(out["batch_stats"]["bn"]["var"]) + 0.5
  return out


def nnx_model(variables: dict) -> NNXNet:
  """An NNXNet holding ``variables``, set attribute by attribute (independent of kfuse.nnx)."""
  m = NNXNet(nnx.Rngs(0))
  p, s = variables["params"], variables["batch_stats"]
  for name in ("dense1", "head"):
    getattr(m, name).kernel.set_value(p[name]["kernel"])
    getattr(m, name).bias.set_value(p[name]["bias"])
  for name in ("bn", "ln"):
    getattr(m, name).scale.set_value(p[name]["scale"])
    getattr(m, name).bias.set_value(p[name]["bias"])
  m.bn.mean.set_value(s["bn"]["mean"])
  m.bn.var.set_value(s["bn"]["var"])
  return m


def nnx_values(m: NNXNet) -> dict:
  """The Linen variables layout of ``m``, read attribute by attribute."""
  params = {n: {"kernel": getattr(m, n).kernel.get_value(), "bias": getattr(m, n).bias.get_value()}
            for n in ("dense1", "head")}
  params.update({n: {"scale": getattr(m, n).scale.get_value(), "bias": getattr(m, n).bias.get_value()}
                 for n in ("bn", "ln")})
  return {"params": params, "batch_stats": {"bn": {"mean": m.bn.mean.get_value(),
                                                   "var": m.bn.var.get_value()}}}


def assert_close(a, b, tol=0.0):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.shape == y.shape and x.dtype == y.dtype, k
    if tol == 0.0:
      np.testing.assert_array_equal(x, y, err_msg=k)
    else:
      np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=k)


X = jax.random.normal(jax.random.key(7), (6, 4))
Y = jnp.array([0, 1, 2, 0, 1, 2])


# ------------------------------------------------------------------ conversion and apply


def test_merge_and_io_do_not_import_flax_nnx():
  """kfuse.nnx imports flax.nnx (and with it optax, ~1 s) only when an NNX object is handed in."""
  import subprocess
  import sys
  code = ("import sys, kfuse.merge, kfuse.io.orbax_io, kfuse.nnx; "
          "assert 'flax.nnx' not in sys.modules and 'optax' not in sys.modules, 'eager import'")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_variables_layout_and_round_trip():
  v = linen_variables(0)
  m = nnx_model(v)
  graphdef, state = nnx.split(m)
  assert_close(knnx.to_variables(state), v)
  back = knnx.to_state(v, like=state)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  assert isinstance(back["bn"]["mean"], nnx.BatchStat) and isinstance(back["bn"]["scale"], nnx.Param)
  typed = knnx.to_state(v)                       # no template: the registered collection types
  assert isinstance(typed["bn"]["var"], nnx.BatchStat) and isinstance(typed["head"]["kernel"], nnx.Param)
  assert_close(nnx_values(nnx.merge(graphdef, typed)), v)
  short = {"params": v["params"], "batch_stats": {}}
  with pytest.raises(KfuseError, match="no 'batch_stats/bn/mean'"):
    knnx.to_state(short, like=state)
  extra = {**v, "params": {**v["params"], "extra": {"w": jnp.ones(2)}}}
  with pytest.raises(KfuseError, match="'params/extra/w' is not a variable"):
    knnx.to_state(extra, like=state)


@pytest.mark.parametrize("train", [False, True])
def test_apply_matches_linen_and_the_nnx_call(train):
  v = linen_variables(0)
  m = nnx_model(v)
  graphdef, state = nnx.split(m)
  ref, ref_upd = LinenNet().apply(v, X, train=train, mutable=["batch_stats"])
  out, upd = knnx.apply_fn(graphdef)(state, X, train=train, mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert_close(upd, jax.tree.map(jnp.asarray, dict(ref_upd)))
  native = nnx_model(v)                            # NNX's own BatchNorm, same mode
  native.train() if train else native.eval()
  np.testing.assert_array_equal(np.asarray(native(X)), np.asarray(ref))
  assert type(m.bn) is nnx.BatchNorm                # the caller's model is untouched
  np.testing.assert_array_equal(np.asarray(m.bn.mean.get_value()), np.asarray(v["batch_stats"]["bn"]["mean"]))


def test_apply_refuses_variables_that_do_not_fit():
  graphdef, _ = nnx.split(NNXNet(nnx.Rngs(0)))
  with pytest.raises(KfuseError, match="do not fit the NNX graphdef"):
    knnx.apply_fn(graphdef)({"params": {"dense1": {"kernel": jnp.ones((4, 8))}}}, X)


# ------------------------------------------------------------------ merge


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),                # random: per-tensor keys come from the paths
    ("slerp", {"t": 0.3}),
    ("task_arithmetic", {"lambda": 0.7}),
])
def test_merge_of_nnx_states_equals_the_linen_merge_bitwise(method, params):
  vs = [linen_variables(s) for s in (0, 1, 2)]
  base, experts = vs[0], vs[1:] if method != "slerp" else vs[1:2]
  key = jax.random.key(3)
  ref = merge.merge(method, experts, base, params=params, key=key)
  graphdef, base_state = nnx.split(nnx_model(base))
  states = [nnx.state(nnx_model(e)) for e in experts]
  out = merge.merge(method, states, base_state, params=params, key=key)
  assert isinstance(out, nnx.State)
  assert jax.tree.structure(out) == jax.tree.structure(base_state)
  assert_close(nnx_values(nnx.merge(graphdef, out)), jax.tree.map(jnp.asarray, ref))


class DropoutNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(3, 3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.lin(x))


def test_merge_copies_rng_streams_and_refuses_different_ones():
  """RNG streams (typed PRNG keys, counters) are copied from the base like integer leaves, never
  merged (the typed key used to raise a TypeError), and stay keys."""
  a, b = DropoutNet(nnx.Rngs(0)), DropoutNet(nnx.Rngs(0))
  b.lin.kernel.set_value(b.lin.kernel.get_value() + 1.0)
  graphdef, sa = nnx.split(a)
  out = merge.merge("linear", [sa, nnx.state(b)])
  np.testing.assert_array_equal(np.asarray(out["lin"]["kernel"].get_value()),
                                np.asarray(a.lin.kernel.get_value()) + 0.5)
  key = out["drop"]["rngs"]["key"].get_value()
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(a.drop.rngs.key.get_value()))
  nnx.merge(graphdef, out)(jnp.ones((2, 3)))
  with pytest.raises(KfuseError, match="drop/rngs/key"):
    merge.merge("linear", [sa, nnx.state(DropoutNet(nnx.Rngs(1)))])


def test_merge_by_path_of_nnx_states():
  vs = [linen_variables(s) for s in (0, 1, 2)]
  rules = [("bn|ln", "linear", None), (".*", "ties", {"density": 0.5})]
  ref = merge.merge_by_path(rules, vs[1:], vs[0])
  graphdef, base_state = nnx.split(nnx_model(vs[0]))
  out = merge.merge_by_path(rules, [nnx.state(nnx_model(e)) for e in vs[1:]], base_state)
  assert isinstance(out, nnx.State)
  assert_close(nnx_values(nnx.merge(graphdef, out)), jax.tree.map(jnp.asarray, ref))


# ------------------------------------------------------------------ Tent and KD steps


@pytest.mark.parametrize("name", ["tent", pytest.param("rotta", marks=pytest.mark.slow)])
def test_adaptation_step_nnx_equals_linen(name):
  v = linen_variables(0)
  lin = adapt.make(name, LinenNet().apply, optimizer=optax.adam(1e-2), apply_kwargs={"train": False})
  graphdef, state = nnx.split(nnx_model(v))
  nx = adapt.make(name, graphdef, optimizer=optax.adam(1e-2))
  example = {"x": X}
  s_lin, s_nnx = lin.init(v, example), nx.init(state, example)
  for t in range(2):
    batch = {"x": X * (1.0 + 0.5 * t)}
    key = jax.random.key(t)
    s_lin, m_lin = lin.step(s_lin, batch, key)
    s_nnx, m_nnx = nx.step(s_nnx, batch, key)
    np.testing.assert_allclose(np.asarray(m_nnx["logits"]), np.asarray(m_lin["logits"]),
                               rtol=1e-6, atol=1e-6)
  assert_close(s_nnx, jax.tree.map(jnp.asarray, s_lin), tol=1e-6)
  if name == "tent":       # the norm affine moved; the adapted NNX model runs
    moved = np.abs(np.asarray(s_nnx.variables["params"]["bn"]["scale"]) - np.asarray(v["params"]["bn"]["scale"]))
    assert moved.max() > 1e-4
    adapted = nnx.merge(graphdef, knnx.to_state(s_nnx.variables, like=state))
    adapted.eval()
    np.testing.assert_allclose(np.asarray(adapted(X)),
                               np.asarray(LinenNet().apply(s_lin.variables, X)), rtol=1e-6, atol=1e-6)


def test_kd_step_nnx_equals_linen():
  sv, tv = linen_variables(0), linen_variables(5, scale=2.0)
  objective = distill.objectives.hinton(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
  lin = distill.make_step(LinenNet(), objective, optax.adam(1e-2),
                          teachers=[distill.Teacher(LinenNet(), tv)], donate=False)
  s_graph, s_state = nnx.split(nnx_model(sv))
  nx = distill.make_step(s_graph, objective, optax.adam(1e-2),
                         teachers=[distill.Teacher(*nnx.split(nnx_model(tv)))], donate=False)
  st_lin, st_nnx = lin.init(sv, X), nx.init(s_state, X)
  for t in range(2):
    batch = {"x": X * (1.0 + 0.5 * t), "y": Y}
    st_lin, m_lin = lin(st_lin, batch, jax.random.key(t))
    st_nnx, m_nnx = nx(st_nnx, batch, jax.random.key(t))
    np.testing.assert_allclose(float(m_nnx["loss"]), float(m_lin["loss"]), rtol=1e-6)
  assert_close(st_nnx, jax.tree.map(jnp.asarray, st_lin), tol=1e-6)
  moved = np.asarray(st_nnx.model_state["batch_stats"]["bn"]["mean"]) - np.asarray(sv["batch_stats"]["bn"]["mean"])
  assert np.abs(moved).max() > 1e-3                # train-mode BatchNorm updated its statistics
  predict = distill.make_predict(s_graph)
  trained = knnx.to_state({"params": st_nnx.params, **st_nnx.model_state}, like=s_state)
  np.testing.assert_allclose(np.asarray(predict(trained, X)),
                             np.asarray(LinenNet().apply({"params": st_lin.params, **st_lin.model_state}, X)),
                             rtol=1e-6, atol=1e-6)


def test_stacked_nnx_teacher_equals_linen():
  """A checkpoint ensemble (Teacher(..., stacked=True)) of NNX states: vmapped through the edge."""
  sv, tvs = linen_variables(0), [linen_variables(5, scale=2.0), linen_variables(6, scale=2.0)]
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  objective = distill.objectives.hinton(temperature=2.0)
  lin = distill.make_step(LinenNet(), objective, optax.sgd(0.1),
                          teachers=[distill.Teacher(LinenNet(), stack(tvs), stacked=True)],
                          donate=False)
  graphdef, s_state = nnx.split(nnx_model(sv))
  stacked_state = stack([nnx.state(nnx_model(v)) for v in tvs])
  nx = distill.make_step(graphdef, objective, optax.sgd(0.1),
                         teachers=[distill.Teacher(graphdef, stacked_state, stacked=True)],
                         donate=False)
  st_lin, m_lin = lin(lin.init(sv, X), {"x": X, "y": Y}, jax.random.key(0))
  st_nnx, m_nnx = nx(nx.init(s_state, X), {"x": X, "y": Y}, jax.random.key(0))
  np.testing.assert_allclose(float(m_nnx["loss"]), float(m_lin["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m_nnx["teacher_accuracy"]), float(m_lin["teacher_accuracy"]))
  assert_close(st_nnx.params, jax.tree.map(jnp.asarray, st_lin.params), tol=1e-6)


def test_supervised_train_step_nnx_equals_linen():
  from kfuse import train
  v = linen_variables(0)
  lin = train.learner(LinenNet(), optax.sgd(0.1, momentum=0.9))
  graphdef, state = nnx.split(nnx_model(v))
  nx = train.learner(graphdef, optax.sgd(0.1, momentum=0.9))
  st_lin, st_nnx = lin.init(v), nx.init(state)
  for t in range(2):
    batch = {"x": X * (1.0 + 0.5 * t), "y": Y}
    st_lin, m_lin = lin.step(st_lin, batch, jax.random.key(t))
    st_nnx, m_nnx = nx.step(st_nnx, batch, jax.random.key(t))
    np.testing.assert_allclose(float(m_nnx["loss"]), float(m_lin["loss"]), rtol=1e-6)
  assert_close(st_nnx, jax.tree.map(jnp.asarray, st_lin), tol=1e-6)


def test_nnx_features_are_refused():
  graphdef, _ = nnx.split(NNXNet(nnx.Rngs(0)))
  with pytest.raises(KfuseError, match="feature capture by module path needs a Linen module"):
    distill.as_forward(graphdef, features=("dense1",))


# ------------------------------------------------------------------ Orbax


def test_orbax_round_trip_and_exchange_with_linen(tmp_path):
  v = linen_variables(0)
  graphdef, state = nnx.split(nnx_model(v))
  orbax_io.save_orbax(tmp_path / "nnx", state)
  back = orbax_io.restore_orbax(tmp_path / "nnx", target=state)
  assert isinstance(back, nnx.State) and jax.tree.structure(back) == jax.tree.structure(state)
  assert_close(nnx_values(nnx.merge(graphdef, back)), v)
  abstract = nnx.state(nnx.eval_shape(lambda: NNXNet(nnx.Rngs(1))))
  assert_close(nnx_values(nnx.merge(graphdef, orbax_io.restore_orbax(tmp_path / "nnx", target=abstract))), v)
  plain = orbax_io.restore_orbax(tmp_path / "nnx")     # the Linen variables layout
  np.testing.assert_array_equal(LinenNet().apply(plain, X), LinenNet().apply(v, X))
  orbax_io.save_orbax(tmp_path / "linen", v)           # a Linen checkpoint restores as NNX
  assert_close(nnx_values(nnx.merge(graphdef, orbax_io.restore_orbax(tmp_path / "linen", target=state))), v)


def test_orbax_round_trip_of_rng_streams(tmp_path):
  model = DropoutNet(nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  orbax_io.save_orbax(tmp_path / "drop", state)
  abstract = nnx.state(nnx.eval_shape(lambda: DropoutNet(nnx.Rngs(0))))
  back = orbax_io.restore_orbax(tmp_path / "drop", target=abstract)
  key = back["drop"]["rngs"]["key"].get_value()
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(model.drop.rngs.key.get_value()))
  np.testing.assert_array_equal(np.asarray(back["lin"]["kernel"].get_value()),
                                np.asarray(model.lin.kernel.get_value()))


def test_orbax_restores_a_native_nnx_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  v = linen_variables(0)
  graphdef, state = nnx.split(nnx_model(v))
  with ocp.StandardCheckpointer() as ckptr:           # flax's NNX guide: the State as is
    ckptr.save(os.fspath(tmp_path / "native"), state)
  back = orbax_io.restore_orbax(tmp_path / "native", target=state)
  assert_close(nnx_values(nnx.merge(graphdef, back)), v)


def test_orbax_restore_into_a_different_nnx_model_is_one_line(tmp_path):
  v = linen_variables(0)
  orbax_io.save_orbax(tmp_path / "ckpt", nnx.state(nnx_model(v)))
  other = nnx.state(NNXNet(nnx.Rngs(0), classes=5))
  with pytest.raises(KfuseError, match=r"params/head/(bias|kernel)' has shape"):
    orbax_io.restore_orbax(tmp_path / "ckpt", target=other)


def test_checkpoint_merge_of_nnx_orbax_checkpoints(tmp_path):
  """NNX states saved with save_orbax merge on disk (the CLI's merge_checkpoints) and restore as an
  nnx.State equal to merge.merge of the states in memory."""
  from kfuse.merge.runner import merge_checkpoints
  vs = [linen_variables(s) for s in (0, 1, 2)]
  graphdef, base = nnx.split(nnx_model(vs[0]))
  experts = [nnx.state(nnx_model(v)) for v in vs[1:]]
  paths = [os.fspath(tmp_path / n) for n in ("base", "a", "b")]
  for p, st in zip(paths, [base] + experts):
    orbax_io.save_orbax(p, st)
  merge_checkpoints("ties", paths[1:], paths[0], os.fspath(tmp_path / "out"),
                    params={"density": 0.5}, progress=False)
  got = orbax_io.restore_orbax(tmp_path / "out", target=base)
  ref = merge.merge("ties", experts, base, params={"density": 0.5})
  assert_close(nnx_values(nnx.merge(graphdef, got)), nnx_values(nnx.merge(graphdef, ref)))


def test_orbax_restores_from_a_relative_path(tmp_path, monkeypatch):
  """Regression: orbax refuses relative paths, so restore_orbax('ckpt') failed after save_orbax('ckpt')."""
  monkeypatch.chdir(tmp_path)
  tree = {"a": np.arange(3, dtype=np.float32)}
  orbax_io.save_orbax("ckpt", tree)
  np.testing.assert_array_equal(orbax_io.restore_orbax("ckpt")["a"], tree["a"])
  np.testing.assert_array_equal(np.asarray(orbax_io.restore_orbax("ckpt", target=tree)["a"]), tree["a"])
  assert flatten(orbax_io.orbax_metadata("ckpt"))["a"].shape == (3,)


# ------------------------------------------------------------------ README


def readme_examples() -> list[str]:
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = text.split("## Flax NNX models", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_nnx_examples_run(tmp_path, monkeypatch):
  """Each README block (merge, distillation, adaptation, Orbax) runs on NNXNet and gives the
  Linen path's result."""
  blocks = readme_examples()
  assert len(blocks) == 4
  monkeypatch.chdir(tmp_path)
  vs = [linen_variables(s) for s in (0, 1, 2, 5)]
  ns = {"pretrained": nnx_model(vs[0]), "finetuned_a": nnx_model(vs[1]),
        "finetuned_b": nnx_model(vs[2]), "student": nnx_model(vs[0]),
        "teacher": nnx_model(vs[3]), "x": X, "y": Y, "x_test": X * 2.0}
  exec(blocks[0], ns)                             # merge
  ref = merge.merge("ties", vs[1:3], vs[0], params={"density": 0.2})
  assert_close(nnx_values(ns["model"]), jax.tree.map(jnp.asarray, ref))
  exec(blocks[1], ns)                             # distillation
  assert np.isfinite(float(ns["metrics"]["loss"]))
  assert_close(nnx_values(ns["student"]), {"params": ns["state"].params, **ns["state"].model_state})
  exec(blocks[2], ns)                             # Tent
  lin = adapt.make("tent", LinenNet().apply, apply_kwargs={"train": False})
  s = lin.init(ref, {"x": X})
  s, _ = lin.step(s, {"x": X * 2.0}, None)
  assert_close(nnx_values(ns["adapted"]), jax.tree.map(jnp.asarray, s.variables), tol=1e-6)
  exec(blocks[3], ns)                             # Orbax
  assert_close(nnx_values(nnx.merge(ns["graphdef"], ns["restored"])), nnx_values(ns["adapted"]))
