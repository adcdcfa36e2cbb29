"""ViDA (Liu et al., ICLR 2024; Yangsenqiao/vida): injection, init, the scale rule, and a
step-by-step comparison with a PyTorch re-statement of the released ``ViDA.forward_and_adapt``."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import adapt, models
from kfuse.adapt import augment as aug_lib
from kfuse.adapt import mean_teacher
from kfuse.adapt import vida as vida_lib
from kfuse.tree import KfuseError
from tests.adapt.helpers import shifted_batches

DIM, HIDDEN, CLASSES = 12, 8, 3
TOL = dict(rtol=1e-5, atol=1e-5)


class Net(nn.Module):
  """``head(relu(bn0(dense0(x))))``: one BatchNorm layer, two Dense layers to inject into."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(HIDDEN, use_bias=False, name="dense0")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn0")(x))
    return nn.Dense(CLASSES, name="head")(x)


def source_variables(seed=0):
  model = Net()
  v = model.init(jax.random.key(seed), jnp.zeros((2, DIM)))
  r = np.random.default_rng(seed)
  params = {k: dict(jax.tree.map(np.asarray, p)) for k, p in v["params"].items()}
  params["head"]["kernel"] = params["head"]["kernel"] * 3.0
  params["bn0"]["scale"] = r.uniform(0.6, 1.4, HIDDEN).astype(np.float32)
  params["bn0"]["bias"] = r.normal(0, 0.2, HIDDEN).astype(np.float32)
  stats = {"bn0": {"mean": r.normal(0, 0.3, HIDDEN).astype(np.float32),
                   "var": r.uniform(0.5, 2.0, HIDDEN).astype(np.float32)}}
  to_j = lambda t: jax.tree.map(jnp.asarray, t)
  return model, {"params": to_j(params), "batch_stats": to_j(stats)}


def batches(n, size, seed=1):
  return shifted_batches(n, size, DIM, seed)


# ------------------------------------------------------------------ injection and init


def test_adapter_init_equals_source_model_vit():
  """Up-projections start at zero, so the injected ViT is the source ViT (reference: apply)."""
  model = models.get_model("vit", num_classes=5, patch_size=4, dim=16, depth=2, num_heads=2)
  x = jax.random.normal(jax.random.key(1), (6, 8, 8))
  variables = model.init(jax.random.key(0), x)
  tta = adapt.make("vida", model, apply_kwargs={"train": False})
  state = tta.init(variables, {"x": x}, jax.random.key(2))
  # every attention projection (query, key, value, out of both blocks) got adapters
  assert sorted(state.adapters) == sorted(
      f"backbone/layers_{i}/attn/{p}" for i in range(2) for p in ("query", "key", "value", "out"))
  a = state.adapters["backbone/layers_0/attn/query"]
  assert a["down1"].shape == (16, 1) and a["up2"].shape == (128, 16)
  assert float(jnp.abs(a["down2"]).max()) > 0 and float(jnp.abs(a["up1"]).max()) == 0
  want = model.apply(variables, x, train=False)
  got = vida_lib.vida_forward(model.apply, variables, state.adapters, jnp.array([1.7, 0.3]), x,
                              apply_kwargs={"train": False})
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_init_std_is_one_over_rank_squared():
  """``nn.init.normal_(vida_down.weight, std=1 / r**2)`` (inject_vida.py)."""
  ad = vida_lib.init_adapters(jax.random.key(0), {"a": (400, 50)}, rank1=2, rank2=8)["a"]
  np.testing.assert_allclose(float(jnp.std(ad["down1"])), 1 / 4, rtol=0.1)
  np.testing.assert_allclose(float(jnp.std(ad["down2"])), 1 / 64, rtol=0.05)


def test_injected_forward_matches_float64_numpy():
  """``y = Wx + s₁U₁D₁x + s₂U₂D₂x`` at both Dense layers, BN on source statistics (float64 NumPy)."""
  model, variables = source_variables()
  x = batches(1, 10)[0]
  r = np.random.default_rng(3)
  ad = {p: {"down1": r.normal(0, 0.5, (n, 1)), "up1": r.normal(0, 0.5, (1, m)),
            "down2": r.normal(0, 0.5, (n, 4)), "up2": r.normal(0, 0.5, (4, m))}
        for p, (n, m) in (("dense0", (DIM, HIDDEN)), ("head", (HIDDEN, CLASSES)))}
  s = np.array([0.8, 1.3])
  got = vida_lib.vida_forward(model.apply, variables, jax.tree.map(jnp.float32, ad),
                              jnp.asarray(s, jnp.float32), jnp.asarray(x), norm="source",
                              apply_kwargs={"train": False})
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  st = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  x64 = x.astype(np.float64)
  delta = lambda h, a: s[0] * h @ a["down1"] @ a["up1"] + s[1] * h @ a["down2"] @ a["up2"]
  h = x64 @ p["dense0"]["kernel"] + delta(x64, ad["dense0"])
  h = (h - st["bn0"]["mean"]) / np.sqrt(st["bn0"]["var"] + 1e-5) * p["bn0"]["scale"] + p["bn0"]["bias"]
  h = np.maximum(h, 0)
  want = h @ p["head"]["kernel"] + p["head"]["bias"] + delta(h, ad["head"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_uncertainty_scales_float64():
  r = np.random.default_rng(0)
  views = r.normal(0, 2.0, (10, 6, 4))
  u_ref = 0.1 * np.var(views, axis=0, ddof=1).mean()
  for thr, high_rank in ((0.0, False), (1e3, True)):
    u, s = vida_lib.uncertainty_scales(jnp.asarray(views, jnp.float32), thr, high_rank)
    np.testing.assert_allclose(float(u), u_ref, rtol=1e-5)
    low, high = (1 - u_ref, 1 + u_ref) if u_ref >= thr else (1 + u_ref, 1 - u_ref)
    np.testing.assert_allclose(np.asarray(s), [low, high if high_rank else 1.0], rtol=1e-5)


def test_bad_target_and_key():
  model, variables = source_variables()
  x = jnp.zeros((4, DIM))
  with pytest.raises(KfuseError, match="matches no Dense.*dense0, head"):
    adapt.make("vida", model, apply_kwargs={"train": False}).init(variables, {"x": x},
                                                                   jax.random.key(0))
  with pytest.raises(KfuseError, match="needs a PRNG key"):
    adapt.make("vida", model, target="head", apply_kwargs={"train": False}).init(variables, {"x": x})
  assert "vida" in adapt.names()
  assert adapt.default_config("vida")["params"]["rst"] == 0.1


def test_reset_and_nan_batch_keep_source():
  model, variables = source_variables()
  x = jnp.asarray(batches(1, 8)[0])
  tta = adapt.make("vida", model, target="dense0|head", n_augment=3,
                   optimizer=optax.adam(1e-2), adapter_optimizer=optax.adam(1e-2),
                   apply_kwargs={"train": False})
  s0 = tta.init(variables, {"x": x}, jax.random.key(0))
  s1, _ = tta.step(s0, {"x": x}, jax.random.key(1))
  assert float(jnp.abs(s1.adapters["head"]["up2"]).max()) > 0
  s2, m = tta.step(s1, {"x": x.at[0, 0].set(jnp.nan)}, jax.random.key(2))
  assert float(m["skipped"]) == 1.0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s2, s1)
  s3 = tta.reset(s1)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s3, s0)


# ------------------------------------------------------------------ PyTorch re-statement


def _torch_vida(variables, adapters, lr, lr_vida, mt, mt_vida, rst, thr, scale_high_rank):
  from tests.peers.peer import require
  torch = require("torch")
  F = torch.nn.functional

  class InjectedLinear(torch.nn.Module):
    """``ViDAInjectedLinear`` (imagenet/inject_vida.py)."""

    def __init__(self, n_in, n_out, bias, r, r2):
      super().__init__()
      self.linear_vida = torch.nn.Linear(n_in, n_out, bias)
      self.vida_down = torch.nn.Linear(n_in, r, bias=False)
      self.vida_up = torch.nn.Linear(r, n_out, bias=False)
      self.vida_down2 = torch.nn.Linear(n_in, r2, bias=False)
      self.vida_up2 = torch.nn.Linear(r2, n_out, bias=False)
      self.scale1 = 1.0
      self.scale2 = 1.0

    def forward(self, x):
      return (self.linear_vida(x) + self.vida_up(self.vida_down(x)) * self.scale1
              + self.vida_up2(self.vida_down2(x)) * self.scale2)

  r1, r2 = adapters["head"]["down1"].shape[1], adapters["head"]["down2"].shape[1]

  class TorchNet(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.dense0 = InjectedLinear(DIM, HIDDEN, False, r1, r2)
      self.bn0 = torch.nn.BatchNorm1d(HIDDEN, eps=1e-5)
      self.head = InjectedLinear(HIDDEN, CLASSES, True, r1, r2)

    def forward(self, x):
      return self.head(F.relu(self.bn0(self.dense0(x))))

  net = TorchNet()
  t = lambda a: torch.tensor(np.asarray(a).T.copy())
  p, st = variables["params"], variables["batch_stats"]
  with torch.no_grad():
    for name in ("dense0", "head"):
      mod = getattr(net, name)
      mod.linear_vida.weight.copy_(t(p[name]["kernel"]))
      for k, sub in (("down1", "vida_down"), ("up1", "vida_up"), ("down2", "vida_down2"),
                     ("up2", "vida_up2")):
        getattr(mod, sub).weight.copy_(t(adapters[name][k]))
    net.head.linear_vida.bias.copy_(torch.tensor(np.asarray(p["head"]["bias"])))
    net.bn0.weight.copy_(torch.tensor(np.asarray(p["bn0"]["scale"])))
    net.bn0.bias.copy_(torch.tensor(np.asarray(p["bn0"]["bias"])))
    net.bn0.running_mean.copy_(torch.tensor(np.asarray(st["bn0"]["mean"])))
    net.bn0.running_var.copy_(torch.tensor(np.asarray(st["bn0"]["var"])))
  net.train()

  class Ref:
    """``ViDA`` (cifar/vida.py) with the augmented views and restore masks passed in."""

    def __init__(self):
      self.model = net
      model_param = [q for n, q in net.named_parameters() if "vida_" not in n]
      vida_param = [q for n, q in net.named_parameters() if "vida_" in n]
      self.optimizer = torch.optim.Adam([{"params": model_param, "lr": lr},
                                         {"params": vida_param, "lr": lr_vida}],
                                        lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
      self.model_state = copy.deepcopy(net.state_dict())
      self.model_ema = copy.deepcopy(net)
      for q in self.model_ema.parameters():
        q.detach_()

    def set_scale(self, update_model, high, low):
      for _, module in update_model.named_modules():
        if hasattr(module, "scale1"):
          module.scale1 = low.item()
          if scale_high_rank:                 # the paper; released: the elif below never runs
            module.scale2 = high.item()
        elif hasattr(module, "scale2"):
          module.scale2 = high.item()

    def forward_and_adapt(self, x, views, masks):
      self.model_ema.eval()
      with torch.no_grad():
        outputs_unc = torch.stack([self.model_ema(v).detach() for v in views])
      uncertainty = torch.mean(torch.var(outputs_unc, dim=0)) * 0.1
      if uncertainty >= thr:
        lambda_high, lambda_low = 1 + uncertainty, 1 - uncertainty
      else:
        lambda_low, lambda_high = 1 + uncertainty, 1 - uncertainty
      self.set_scale(self.model, lambda_high, lambda_low)
      self.set_scale(self.model_ema, lambda_high, lambda_low)
      standard_ema = self.model_ema(x)
      outputs = self.model(x)
      loss = (-(standard_ema.detach().softmax(1) * outputs.log_softmax(1)).sum(1)).mean(0)
      loss.backward()
      self.optimizer.step()
      self.optimizer.zero_grad()
      for ema_param, (name, param) in zip(self.model_ema.parameters(), self.model.named_parameters()):
        a = mt_vida if "vida_" in name else mt
        ema_param.data[:] = a * ema_param[:].data[:] + (1 - a) * param[:].data[:]
      for npp, q in self.model.named_parameters():
        if q.requires_grad:
          mask = masks[npp].float()
          with torch.no_grad():
            q.data = self.model_state[npp] * mask + q * (1. - mask)
      return standard_ema, float(uncertainty)

  return torch, Ref()


TORCH_NAME = {"dense0/kernel": "dense0.linear_vida.weight", "head/kernel": "head.linear_vida.weight",
              "head/bias": "head.linear_vida.bias", "bn0/scale": "bn0.weight", "bn0/bias": "bn0.bias"}
SUB = {"down1": "vida_down", "up1": "vida_up", "down2": "vida_down2", "up2": "vida_up2"}


def _torch_name(path):
  if path in TORCH_NAME:
    return TORCH_NAME[path]
  mod, k = path.split("/")
  return f"{mod}.{SUB[k]}.weight"


def _flat(variables, adapters):
  out = {f"{m}/{k}": np.asarray(a) for m, leaves in variables["params"].items() for k, a in leaves.items()}
  out.update({f"{m}/{k}": np.asarray(a) for m, leaves in adapters.items() for k, a in leaves.items()})
  return out


def _assert_match(variables, adapters, net, msg):
  named = dict(net.named_parameters())
  for path, a in _flat(variables, adapters).items():
    tq = named[_torch_name(path)].detach().numpy()
    np.testing.assert_allclose(a, tq if tq.ndim == 1 else tq.T, **TOL, err_msg=f"{msg} {path}")


def _draws(torch, key, x, n_augment, augment, state, rst):
  """The views and restore masks kfuse's ViDA draws from ``key`` (same splits as ``step``)."""
  k_aug, k_rst = jax.random.split(key)
  views = [torch.tensor(np.asarray(augment(k, jnp.asarray(x))))
           for k in jax.random.split(k_aug, n_augment)]
  k_m, k_a = jax.random.split(k_rst)
  ones = lambda d: jax.tree.map(jnp.ones_like, d)
  zeros = lambda d: jax.tree.map(jnp.zeros_like, d)
  model_flat = {f"{m}/{k}": a for m, leaves in state.source["params"].items() for k, a in leaves.items()}
  ad_flat = {f"{m}/{k}": a for m, leaves in state.source_adapters.items() for k, a in leaves.items()}
  masks = {}
  for k, flat in ((k_m, model_flat), (k_a, ad_flat)):
    m = mean_teacher.stochastic_restore(k, zeros(flat), ones(flat), rst)   # = the mask M
    for path, v in m.items():
      v = np.asarray(v) > 0.5
      masks[_torch_name(path)] = torch.tensor(v if v.ndim == 1 else v.T.copy())
  return views, masks


@pytest.mark.parametrize("thr,scale_high_rank", [(0.0, False),
                                                   pytest.param(10.0, True, marks=pytest.mark.slow)])
def test_step_matches_pytorch_restatement(thr, scale_high_rank):
  """Online predictions, uncertainty, student / teacher weights and adapters after every step."""
  model, variables = source_variables()
  steps, size, n_aug = 5, 16, 4
  lr, lr_vida, mt, mt_vida, rst = 1e-2, 5e-3, 0.8, 0.7, 0.2
  augment = aug_lib.make_augment()
  tta = adapt.make("vida", model, optimizer=optax.adam(lr), adapter_optimizer=optax.adam(lr_vida),
                   rank1=1, rank2=4, target="dense0|head", mt=mt, mt_vida=mt_vida, rst=rst,
                   unc_thr=thr, n_augment=n_aug, scale_high_rank=scale_high_rank, augment=augment,
                   apply_kwargs={"train": False})
  xs = batches(steps, size, seed=2)
  state = tta.init(variables, {"x": jnp.asarray(xs[0])}, jax.random.key(7))
  torch, ref = _torch_vida(variables, jax.tree.map(np.asarray, state.adapters), lr, lr_vida, mt,
                           mt_vida, rst, thr, scale_high_rank)
  restored = 0
  for t, x in enumerate(xs):
    key = jax.random.key(100 + t)
    views, masks = _draws(torch, key, x, n_aug, augment, state, rst)
    out, unc = ref.forward_and_adapt(torch.tensor(x), views, masks)
    state, m = tta.step(state, {"x": jnp.asarray(x)}, key)
    np.testing.assert_allclose(float(m["uncertainty"]), unc, rtol=1e-5, atol=1e-7,
                               err_msg=f"step {t}")
    np.testing.assert_allclose(np.asarray(m["logits"]), out.detach().numpy(), **TOL,
                               err_msg=f"step {t} predictions")
    _assert_match(state.variables, state.adapters, ref.model, f"step {t} student")
    _assert_match(state.teacher, state.teacher_adapters, ref.model_ema, f"step {t} teacher")
    restored += sum(int(v.sum()) for v in masks.values())
  assert restored > 0
  assert float(jnp.abs(state.adapters["head"]["up1"]).max()) > 1e-3     # the adapters learned
