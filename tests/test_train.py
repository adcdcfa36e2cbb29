"""Tests for kfuse.train: optimizers, jitted steps, evaluation, fit and checkpoints."""

import jax
import jax.numpy as jnp
import chex
import numpy as np
import pytest

import flax.linen as nn

from kfuse import models, optim, train
from kfuse.data import iterate
from kfuse.tree import KfuseError


class _Traces:
  """A log of forward traces (not a list: Flax would freeze a list attribute into a tuple)."""

  def __init__(self):
    self.modes = []

  def count(self, mode):
    return self.modes.count(mode)

  def __len__(self):
    return len(self.modes)


class _Counted(nn.Module):
  """Wraps a model and records every trace of its forward (a Python side effect)."""
  inner: nn.Module
  traces: _Traces

  @nn.compact
  def __call__(self, x, train=False):
    self.traces.modes.append(train)
    return self.inner(x, train=train)


def _blobs(n=256, d=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, d)) * 3
  y = rng.integers(classes, size=n).astype(np.int32)
  x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
  return x, y


def _setup(opt=None, trainable=None, steps=200):
  model = models.get_model("mlp", num_classes=3, hidden=(32,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  opt = opt or dict(name="adam", learning_rate=1e-2)
  tx = optim.make_optimizer(opt, steps, trainable)
  return model, params, tx, train.make_train_step(model, tx, trainable)


def test_schedules():
  cos = optim.make_schedule(dict(learning_rate=1.0, schedule="cosine", warmup_steps=10), 110)
  assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 1.0) < 1e-6 and float(cos(110)) < 1e-6
  lin = optim.make_schedule(dict(learning_rate=2.0, schedule="linear"), 100)
  assert abs(float(lin(50)) - 1.0) < 1e-6
  const = optim.make_schedule(dict(learning_rate=0.5), 100)
  assert float(const(99)) == 0.5


def test_optimizer_errors_name_the_field():
  with pytest.raises(KfuseError, match="optimizer.name.*adamw"):
    optim.make_optimizer(dict(name="adamax2"), 10)
  with pytest.raises(KfuseError, match="optimizer.schedule"):
    optim.make_optimizer(dict(name="adam", schedule="step"), 10)
  with pytest.raises(KfuseError, match="optimizer.learning_rate"):
    optim.make_optimizer(dict(name="adam", learning_rate=0.0), 10)
  with pytest.raises(KfuseError, match="optimizer.kwargs"):
    optim.make_optimizer(dict(name="adam", kwargs=dict(momentum_typo=0.9)), 10)
  with pytest.raises(KfuseError, match="optimizer.warmup_steps"):
    optim.make_optimizer(dict(name="adam", schedule="cosine", warmup_steps=10), 10)


def test_fit_learns_and_reports_history():
  x, y = _blobs()
  model, params, tx, step = _setup(dict(name="adamw", learning_rate=1e-2, schedule="cosine",
                                        warmup_steps=10, clip_norm=1.0,
                                        kwargs=dict(weight_decay=1e-4)))
  state = train.init_state(params, tx)
  batches = train.batches(jax.random.key(1), x, y, 32, epochs=None)
  state, hist = train.fit(step, state, batches, 200, jax.random.key(2), log_every=50,
                          progress=False)
  assert [h["step"] for h in hist] == [50, 100, 150, 200]
  assert hist[-1]["loss"] < hist[0]["loss"]
  assert int(state.step) == 200
  m = train.evaluate(train.make_predict(model), {"params": state.params}, x, y, batch_size=100)
  assert m["accuracy"] > 0.9 and m["loss"] < 0.5


def test_fit_errors_when_batches_run_out():
  x, y = _blobs(n=64)
  _, params, tx, step = _setup()
  state = train.init_state(params, tx)
  with pytest.raises(KfuseError, match="ran out after 2 of 5"):
    train.fit(step, state, train.batches(jax.random.key(0), x, y, 32, epochs=1), 5,
              jax.random.key(0), progress=False)


def test_trainable_subset_freezes_the_rest():
  x, y = _blobs()
  _, params, tx, step = _setup(trainable=("head",))
  state = train.init_state(params, tx)
  state, _ = train.fit(step, state, train.batches(jax.random.key(0), x, y, 32, epochs=None), 20,
                       jax.random.key(0), progress=False)
  same = jax.tree.map(np.array_equal, params["backbone"], state.params["backbone"])
  assert all(jax.tree.leaves(same))
  assert not np.allclose(params["head"]["kernel"], state.params["head"]["kernel"])


def test_donation_keeps_callers_params_and_one_compilation():
  x, y = _blobs()
  traces = _Traces()
  model = _Counted(models.get_model("mlp", num_classes=3, hidden=(32,)), traces)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  tx = optim.make_optimizer(dict(name="adam", learning_rate=1e-2), 200)
  step = train.make_train_step(model, tx)
  before = jax.tree.map(np.asarray, params)
  for seed in range(2):  # two "tasks" with the same shapes
    state = train.init_state(params, tx)
    for batch in train.batches(jax.random.key(seed), x, y, 32, epochs=1):
      state, _ = step(state, batch, jax.random.key(seed))
  # the caller's arrays are intact (init_state copies before donation)
  chex.assert_trees_all_equal(before, jax.tree.map(np.asarray, params))
  assert traces.count(True) == 1          # one train-mode trace for every step of both tasks


def test_step_takes_protocol_batches():
  x, y = _blobs()
  _, params, tx, step = _setup()
  with pytest.raises(KfuseError, match="batch: expected a mapping"):
    step(train.init_state(params, tx), (x[:32], y[:32]), jax.random.key(0))
  with pytest.raises(KfuseError, match="train: batch 0: missing key 'y'"):
    train.fit(step, train.init_state(params, tx), iter([{"x": x[:32]}]), 1, jax.random.key(0))
  lrn = train.learner(models.get_model("mlp", num_classes=3, hidden=(32,)), tx)
  state, m = lrn.step(lrn.init({"params": params}), {"x": x[:32], "y": y[:32]}, jax.random.key(0))
  assert int(state.step) == 1 and set(m) == {"loss", "accuracy"}


def test_evaluate_pads_to_fixed_chunks():
  x, y = _blobs(n=130)
  traces = _Traces()
  model = _Counted(models.get_model("mlp", num_classes=3, hidden=(32,)), traces)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  traces.modes.clear()
  predict = train.make_predict(model)
  full = np.asarray(predict({"params": params}, x))
  m = train.evaluate(predict, {"params": params}, x, y, batch_size=64)  # 64, 64, 2 (+62 pad)
  assert m["accuracy"] == pytest.approx(float(np.mean(full.argmax(-1) == y)))
  logp = full - np.log(np.exp(full).sum(-1, keepdims=True))
  assert m["loss"] == pytest.approx(float(-logp[np.arange(len(y)), y].mean()), rel=1e-4)
  assert len(traces) == 2  # the full array above + one chunk shape
  with pytest.raises(KfuseError, match="empty"):
    train.evaluate(predict, {"params": params}, x[:0], y[:0])


def test_checkpoint_roundtrip(tmp_path):
  _, params, _, _ = _setup()
  tree = {"experts": {"a": params, "b": params}, "step": jnp.asarray(3)}
  path = train.save_checkpoint(str(tmp_path / "ckpt"), tree)
  # overwriting is allowed by default
  train.save_checkpoint(str(tmp_path / "ckpt"), tree)
  restored = train.restore_checkpoint(path, tree)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  raw = train.restore_checkpoint(path)
  assert set(raw["experts"]) == {"a", "b"}
  with pytest.raises(KfuseError, match="no checkpoint"):
    train.restore_checkpoint(str(tmp_path / "missing"))


def test_batchnorm_model_step_updates_stats_and_learns():
  x, y = _blobs(d=12)
  x = x.reshape(-1, 12)
  model = models.get_model("cnn1d", num_classes=3, widths=(8,), kernel_size=3)
  # an 'rbg' key: conv initialisers compile much faster than with threefry on CPU
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 12)))
  tx = optim.make_optimizer(dict(name="adam", learning_rate=1e-2), 60)
  state = train.init_state_from_variables(variables, tx)
  assert set(state.model_state) == {"batch_stats"}
  step = train.make_train_step(model, tx)
  state, hist = train.fit(step, state, train.batches(jax.random.key(1), x, y, 32, epochs=None), 60,
                          jax.random.key(2), log_every=30, progress=False)
  before = variables["batch_stats"]["backbone"]["stem_norm"]["var"]
  after = state.model_state["batch_stats"]["backbone"]["stem_norm"]["var"]
  assert not np.allclose(before, after)
  assert set(state.variables) == {"params", "batch_stats"}
  m = train.evaluate(train.make_predict(model), state.variables, x, y)
  assert m["accuracy"] > 0.9
  # one step changes params and stats; the structure is kept (no recompile)
  s1 = train.init_state_from_variables(variables, tx)
  s2, _ = step(s1, {"x": x[:32], "y": y[:32]}, jax.random.key(0))
  assert int(s2.step) == 1


# ------------------------------------------------------------------ resumable fit (Orbax CheckpointManager)


class _Interrupt(Exception):
  pass


def _interrupting(batches, after):
  """Yield ``after`` batches, then raise (a run killed mid-training)."""
  for i, b in enumerate(batches):
    if i == after:
      raise _Interrupt
    yield b


def _resumable(model_hidden=(32,), total=40):
  model = models.get_model("mlp", num_classes=3, hidden=model_hidden, dropout=0.1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  tx = optim.make_optimizer(dict(name="adamw", learning_rate=1e-2, schedule="cosine",
                                 warmup_steps=5), total)
  return params, tx, train.make_train_step(model, tx)


def test_fit_resumes_after_interruption(tmp_path):
  x, y = _blobs()
  params, tx, step = _resumable()
  data = lambda: train.batches(jax.random.key(1), x, y, 32, epochs=None)
  kw = dict(log_every=10, progress=False, checkpoint_every=10, meta={"model": {"hidden": [32]}})
  ckpt = str(tmp_path / "ckpt")
  # uninterrupted reference run, no checkpoints
  ref, ref_hist = train.fit(step, train.init_state(params, tx), data(), 40, jax.random.key(2),
                            log_every=10, progress=False)
  # killed after 25 steps: checkpoints at 10 and 20 are on disk
  with pytest.raises(_Interrupt):
    train.fit(step, train.init_state(params, tx), _interrupting(data(), 25), 40,
              jax.random.key(2), checkpoint_dir=ckpt, **kw)
  assert train.latest_step(ckpt) == 20
  # rerun the same command: resumes at 20, replays the data stream, finishes at 40
  state, hist = train.fit(step, train.init_state(params, tx), data(), 40, jax.random.key(2),
                          checkpoint_dir=ckpt, **kw)
  assert int(state.step) == 40 and train.latest_step(ckpt) == 40
  assert [h["step"] for h in hist] == [10, 20, 30, 40]
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-5)
  # a finished run returns the restored state without training
  again, hist2 = train.fit(step, train.init_state(params, tx), iter(()), 40, jax.random.key(2),
                           checkpoint_dir=ckpt, **kw)
  assert int(again.step) == 40 and hist2 == hist
  # asking for more steps continues from the last checkpoint
  longer, _ = train.fit(step, train.init_state(params, tx), data(), 45, jax.random.key(2),
                        checkpoint_dir=ckpt, **kw)
  assert int(longer.step) == 45 and train.latest_step(ckpt) == 45


def test_resume_refuses_a_different_model_or_config(tmp_path):
  x, y = _blobs()
  ckpt = str(tmp_path / "ckpt")
  params, tx, step = _resumable((32,), total=10)
  train.fit(step, train.init_state(params, tx), train.batches(jax.random.key(0), x, y, 32, epochs=None),
            10, jax.random.key(0), progress=False, checkpoint_dir=ckpt, meta={"lr": 0.01})
  other, tx2, step2 = _resumable((16,), total=10)
  with pytest.raises(KfuseError, match=r"different model: params/backbone/layers_0/bias: shape \(32,\)"):
    train.fit(step2, train.init_state(other, tx2), iter(()), 20, jax.random.key(0),
              progress=False, checkpoint_dir=ckpt)
  with pytest.raises(KfuseError, match="saved with lr=0.01, but this run has lr=0.1"):
    train.fit(step, train.init_state(params, tx), iter(()), 20, jax.random.key(0),
              progress=False, checkpoint_dir=ckpt, meta={"lr": 0.1})
  with pytest.raises(KfuseError, match="beyond num_steps=5"):
    train.fit(step, train.init_state(params, tx), iter(()), 5, jax.random.key(0),
              progress=False, checkpoint_dir=ckpt, meta={"lr": 0.01})


def test_optimizer_field_types_name_the_field():
  with pytest.raises(KfuseError, match="optimizer.learning_rate: expected float, got str"):
    optim.make_optimizer(dict(name="adam", learning_rate="1e-3"), 10)
  with pytest.raises(KfuseError, match="optimizer.warmup_steps: expected int, got float"):
    optim.make_optimizer(dict(name="adam", warmup_steps=1.5), 10)
  optim.make_optimizer(dict(name="adam", learning_rate=1, clip_norm=None), 10)  # int lr is fine


def test_trainable_paths_select_nested_layers():
  ones = lambda *shape: jnp.ones(shape)
  params = {"backbone": {"layers_0": {"kernel": ones(2, 2)}, "layers_1": {"kernel": ones(2, 2)}},
            "head": {"kernel": ones(2)}}
  tx = optim.make_optimizer(dict(name="sgd", learning_rate=0.5), 10, ["backbone/layers_1"])
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(upd["backbone"]["layers_1"]["kernel"], -0.5 * np.ones((2, 2)))
  np.testing.assert_array_equal(upd["backbone"]["layers_0"]["kernel"], np.zeros((2, 2)))
  np.testing.assert_array_equal(upd["head"]["kernel"], np.zeros(2))
  with pytest.raises(KfuseError, match="optimizer.name: unknown optimizer 'adm' \\(did you mean 'adam'"):
    optim.make_optimizer(dict(name="adm"), 10)


def test_add_label_noise_flips_to_other_classes_at_the_rate():
  y = np.arange(20000) % 10
  noisy = train.add_label_noise(y, 10, 0.3, seed=0)
  flipped = noisy != y
  assert abs(flipped.mean() - 0.3) < 0.01                      # binomial sd ≈ 0.003
  assert np.all((noisy >= 0) & (noisy < 10))
  with pytest.raises(KfuseError, match="forget_me_not.noise"):
    train.add_label_noise(y, 10, 1.0, seed=0, name="forget_me_not.noise")


def test_train_classifier_equals_the_explicit_loop():
  x, y = _blobs()
  model, params, tx, step = _setup(steps=30)
  opt = dict(name="adam", learning_rate=1e-2)
  kd, kdrop = jax.random.key(1), jax.random.key(2)
  ref, _ = train.fit(step, train.init_state(params, tx), train.batches(kd, x, y, 32), 30, kdrop,
                     progress=False)
  got, hist = train.train_classifier(model, {"params": params}, x, y, optimizer=opt, steps=30,
                                     batch_size=32, data_key=kd, dropout_key=kdrop,
                                     progress=False)
  chex.assert_trees_all_close(got.params, ref.params, rtol=1e-6)
  assert hist[-1]["step"] == 30


def test_optimizer_unknown_fields_and_unbounded_runs_are_errors():
  # an optax argument at the top level was silently dropped: it belongs in kwargs
  with pytest.raises(KfuseError, match=r"optimizer.momentum: unknown field; known: name, .*optimizer.kwargs"):
    optim.make_optimizer(dict(name="sgd", learning_rate=0.1, momentum=0.9), 10)
  with pytest.raises(KfuseError, match="optimizer.learning_rat: unknown field \\(did you mean 'learning_rate'"):
    optim.make_optimizer(dict(name="adam", learning_rat=0.1), 10)
  # total_steps=0 (a stream of unknown length): a decaying schedule would decay over one step
  for kind in ("cosine", "linear"):
    with pytest.raises(KfuseError, match=f"optimizer.schedule: '{kind}' decays"):
      optim.make_optimizer(dict(name="adam", schedule=kind), 0)
  sched = optim.make_schedule(dict(learning_rate=0.5, warmup_steps=4), 0)
  assert [float(sched(i)) for i in (0, 2, 4, 1000)] == [0.0, 0.25, 0.5, 0.5]


def test_fit_on_step_sees_every_step_state():
  """``on_step(i, state)`` after step i equals a hand-run loop of the same step over the same batches."""
  x, y = _blobs(n=256)
  model, params, tx, step = _setup(steps=6)
  k_data, k_drop = jax.random.key(1), jax.random.key(2)
  seen = {}
  keep = lambda i, s: seen.setdefault(i, jax.device_get(s.params))
  state, _ = train.train_classifier(model, {"params": params}, x, y, optimizer=None, steps=6,
                                    batch_size=32, data_key=k_data, dropout_key=k_drop,
                                    step=(tx, step), progress=False, on_step=keep)
  assert sorted(seen) == [1, 2, 3, 4, 5, 6]
  manual = train.init_state(params, tx)
  for i, (xb, yb) in enumerate(iterate(k_data, x, y, 32, epochs=None)):
    if i == 6:
      break
    manual, _ = step(manual, {"x": xb, "y": yb}, k_drop)
    for a, b in zip(jax.tree.leaves(seen[i + 1]), jax.tree.leaves(manual.params)):
      np.testing.assert_array_equal(a, np.asarray(b))
