"""Input Grams and diagonal Fishers vs float64 NumPy; Orbax round trip; bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse.merge import statistics as S
from kfuse.models.mlp import make_mlp
from kfuse.models.transformer import TransformerBlock
from kfuse.tree import KfuseError


def _batches(x, bs):
  return [{"x": x[i:i + bs]} for i in range(0, len(x), bs)]


def _gelu(x):   # flax's gelu (tanh approximation), float64
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_mlp_grams_match_float64_numpy():
  model = make_mlp(3, hidden=(6, 5))
  x = np.asarray(jax.random.normal(jax.random.key(0), (10, 2, 2)), np.float32)
  v = model.init(jax.random.key(1), x[:1])
  st = S.grams(model, v, _batches(x, 4))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  h0 = x.reshape(10, -1).astype(np.float64)
  h1 = _gelu(h0 @ p["backbone"]["layers_0"]["kernel"] + p["backbone"]["layers_0"]["bias"])
  h2 = _gelu(h1 @ p["backbone"]["layers_1"]["kernel"] + p["backbone"]["layers_1"]["bias"])
  want = {"backbone/layers_0/kernel": h0, "backbone/layers_1/kernel": h1, "head/kernel": h2}
  assert set(st.gram) == set(want) and st.examples == 10
  for k, h in want.items():
    assert st.tokens[k] == 10
    np.testing.assert_allclose(st.gram[k], h.T @ h / 10, rtol=2e-5, atol=1e-6)


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def test_attention_projection_grams_match_float64_numpy():
  """q/k/v see LN(x) per token; `out` sees the heads' outputs [B, T, H, hd] flattened."""
  block = TransformerBlock(num_heads=2, mlp_ratio=2)
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 8)), np.float32)
  v = block.init(jax.random.key(1), x)
  st = S.grams(block, v, _batches(x, 2))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  h = _ln(x.astype(np.float64), p["norm_0"])
  a = p["attn"]
  q, k, vv = (np.einsum("btd,dhe->bthe", h, a[n]["kernel"]) + a[n]["bias"]
              for n in ("query", "key", "value"))
  logits = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhe->bqhe", w, vv)                      # [B, T, H, hd]
  attn = np.einsum("bthe,hed->btd", o, a["out"]["kernel"]) + a["out"]["bias"]
  h1 = _ln(x + attn, p["norm_1"])
  rows = {"attn/query/kernel": h.reshape(-1, 8), "attn/key/kernel": h.reshape(-1, 8),
          "attn/value/kernel": h.reshape(-1, 8), "attn/out/kernel": o.reshape(-1, 8),
          "mlp/fc_in/kernel": h1.reshape(-1, 8)}
  for k, r in rows.items():
    assert st.tokens[k] == 12
    np.testing.assert_allclose(st.gram[k], r.T @ r / 12, rtol=1e-4, atol=1e-5, err_msg=k)
  assert st.gram["mlp/fc_out/kernel"].shape == (16, 16)


def test_conv_gram_is_the_gram_of_its_patches():
  """conv(x) = rows @ kernel.reshape(-1, C_out) + b, so the Gram of those rows is the one."""
  m = nn.Conv(4, (3, 2), strides=(2, 1), padding="SAME")
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 5, 3)), np.float32)
  v = m.init(jax.random.key(1), x)
  st = S.grams(m, v, [{"x": x}])
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))   # SAME: (0,1), (0,1)
  rows = np.stack([xp[b, i:i + 3, j:j + 2, :].reshape(-1) for b in range(2)
                   for i in range(0, 6, 2) for j in range(5)])
  k = np.asarray(v["params"]["kernel"], np.float64).reshape(-1, 4)
  np.testing.assert_allclose(rows @ k + np.asarray(v["params"]["bias"]),
                             np.asarray(m.apply(v, x)).reshape(-1, 4), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.gram["kernel"], rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
  assert st.tokens["kernel"] == len(rows) == 30


def _linear_fisher(x, w, b, mode, bs):
  """Closed form for logits = x W + b: ∂s/∂z_j = √p_j − p_j Σ_c √p_c."""
  x = x.astype(np.float64)
  z = x @ w + b
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dz = np.sqrt(p) - p * np.sqrt(p).sum(-1, keepdims=True)
  if mode == "per_example":
    fw = np.einsum("ni,nj->ij", x ** 2, dz ** 2)
    fb = (dz ** 2).sum(0)
  else:
    fw = sum((x[i:i + bs].T @ dz[i:i + bs]) ** 2 for i in range(0, len(x), bs))
    fb = sum(dz[i:i + bs].sum(0) ** 2 for i in range(0, len(x), bs))
  return fw / len(x), fb / len(x)


@pytest.mark.parametrize("mode", ["per_example", "batch"])
def test_fisher_matches_closed_form(mode):
  m = nn.Dense(4)
  x = np.asarray(jax.random.normal(jax.random.key(0), (12, 5)), np.float32)
  params = m.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a * 3, params)
  st = S.fisher(lambda p, xb: m.apply({"params": p}, xb), params, _batches(x, 4), mode=mode)
  fw, fb = _linear_fisher(x, np.asarray(params["kernel"], np.float64),
                          np.asarray(params["bias"], np.float64), mode, 4)
  assert st.examples == 12
  np.testing.assert_allclose(st.fisher["kernel"], fw, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(st.fisher["bias"], fb, rtol=1e-4, atol=1e-8)


def test_max_examples_takes_whole_batches_like_fusionbench():
  m = nn.Dense(2)
  x = np.ones((10, 3), np.float32)
  v = m.init(jax.random.key(0), x)
  st = S.grams(m, v, _batches(x, 4), max_examples=5)   # batches of 4, 4 (stops at 8 >= 5)
  assert st.examples == 8 and st.tokens["kernel"] == 8


def test_statistics_round_trip_through_orbax(tmp_path):
  model = make_mlp(3, hidden=(4,))
  x = np.asarray(jax.random.normal(jax.random.key(0), (6, 3)), np.float32)
  v = model.init(jax.random.key(1), x)
  st = S.collect(model, v, _batches(x, 3))
  S.save(tmp_path / "st", st)
  back = S.load(tmp_path / "st")
  assert back.examples == st.examples == 6 and back.tokens == st.tokens
  assert set(back.gram) == set(st.gram) and set(back.fisher) == set(st.fisher)
  for k in st.gram:
    np.testing.assert_array_equal(back.gram[k], np.asarray(st.gram[k]))
  for k in st.fisher:
    np.testing.assert_array_equal(back.fisher[k], np.asarray(st.fisher[k]))
  assert set(st.under("backbone").gram) == {"layers_0/kernel"}


def test_empty_iterator_is_one_line():
  m = nn.Dense(2)
  v = m.init(jax.random.key(0), jnp.ones((1, 3)))
  with pytest.raises(KfuseError, match="yielded no examples"):
    S.grams(m, v, iter([]))
  with pytest.raises(KfuseError, match="yielded no examples"):
    S.fisher(lambda p, x: m.apply({"params": p}, x), v["params"], [])


def test_nan_in_the_data_is_one_line():
  m = nn.Dense(2)
  v = m.init(jax.random.key(0), jnp.ones((1, 3)))
  x = np.ones((2, 3), np.float32)
  x[1, 0] = np.nan
  with pytest.raises(KfuseError, match="'kernel' holds .* NaN/Inf"):
    S.grams(m, v, [{"x": x}])


def test_unknown_fisher_mode_suggests():
  with pytest.raises(KfuseError, match="did you mean 'batch'"):
    S.fisher(lambda p, x: x, {}, [], mode="batchh")
