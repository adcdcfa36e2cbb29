"""Every registered distillation objective keeps the student finite on blank inputs / dead layers.

Regression for normalisations written ``x / max(‖x‖, eps)``: the derivative of ‖x‖ at
x = 0 is NaN, so one step on a batch with an all-zero sample (or behind a dead ReLU
layer) turned every student parameter into NaN (attention transfer, TRG).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import distill
from kfuse.distill import objectives as O

C, L, W = 5, 6, 4


class Net(nn.Module):
  """conv -> relu -> Dense token map ``tokens`` [B, L, W] -> mean over positions -> Dense.

  Biases start at 0, so a blank (all-zero) input gives an all-zero ``tokens`` map for
  that sample; ``dead=True`` shifts the ReLU's input far below 0, so the map is zero
  for every sample (a dead ReLU layer). Either way the NaN of a non-smooth norm
  reaches the ``tokens`` layer's parameters (ReLU's select would stop it if the map
  were the ReLU output itself).
  """
  dead: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Conv(W, (3,), name="conv")(x[..., None]) - (1e3 if self.dead else 0.0))
    tokens = nn.Dense(W, name="tokens")(h)
    return nn.Dense(C, name="head")(tokens.mean(axis=1))


# the keyword arguments each objective needs on this model (features by module path)
_ARGS = {
    "supervised": {}, "hinton": {}, "forward_kl": {}, "reverse_kl": {}, "jsd": {},
    "dkd": {}, "topk": {"k": 3}, "kl_dp": {},
    "fitnets": {"student_feature": "tokens", "teacher_feature": "tokens"},
    "rkd": {"student_feature": "tokens", "teacher_feature": "tokens"},
    "attention": {"student_features": ["tokens"], "teacher_features": ["tokens"]},
    "trg": {"student_feature": "tokens", "teacher_feature": "tokens"},
}


def test_every_registered_objective_is_covered():
  assert set(_ARGS) == set(O.names())


def _batch(n=8):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, L)).astype(np.float32)
  x[0] = 0.0                                              # a blank sample
  return {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, C, n), jnp.int32)}


@pytest.mark.parametrize("dead", [False, True], ids=["blank_sample", "dead_layer"])
@pytest.mark.parametrize("name", sorted(_ARGS))
def test_one_step_keeps_every_parameter_finite(name, dead):
  batch = _batch()
  student, teacher = Net(dead=dead), Net(dead=dead)
  sv = student.init(jax.random.key(1), batch["x"])
  tv = teacher.init(jax.random.key(2), batch["x"])
  obj = O.get(name, **_ARGS[name])
  teachers = [distill.Teacher(teacher, tv)]
  if obj.min_teachers >= 2:
    teachers.append(distill.Teacher(student, sv))
  step = distill.make_step(student, obj, optax.sgd(0.1), teachers if obj.needs_teachers
                           or name == "topk" else [])
  state = step.init(sv, batch["x"])
  state, metrics = step(state, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  bad = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(
      (state.params, state.aux)) if not np.all(np.isfinite(np.asarray(v)))]
  assert not bad, f"{name}: non-finite parameters after one step: {bad}"
