"""SAR, CoTTA and RoTTA step by step against PyTorch re-statements of the official code.

Each PyTorch side below restates the reference implementation line by line on the same
small BatchNorm network (same weights, same batches):

* SAR — mr-eggplant/SAR ``sar.py`` (``forward_and_adapt_sar``, ``update_ema``, ``SAR.forward``
  with its reset) and ``sam.py`` (``SAM.first_step`` / ``second_step``);
* CoTTA — qinenergy/cotta ``cifar10c/cotta.py`` (``CoTTA.forward_and_adapt``,
  ``update_ema_variables``, the stochastic restore loop);
* RoTTA — BIT-DA/RoTTA ``core/adapter/rotta.py`` (``forward_and_adapt``, ``update_model``,
  ``timeliness_reweighting``), ``core/utils/bn_layers.py`` (``RobustBN1d``) and
  ``core/utils/memory.py`` (``CSTU``).

Where the references draw random numbers (CoTTA's augmentations and restore masks, RoTTA's
strong augmentation) both sides get the same draws: the test derives them from the key kfuse
receives and hands them to the PyTorch side explicitly, so the comparison is exact up to
float32 rounding. Every step compares the online predictions; the parameters (and RoTTA's
RobustBN statistics and memory bank) are compared after every step too.
"""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfuse import adapt
from kfuse.adapt import augment as aug_lib
from kfuse.adapt import mean_teacher

from tests.adapt.helpers import shifted_batches

from .peer import require

torch = require("torch")
F = torch.nn.functional

DIM, HIDDEN, CLASSES = 12, 8, 3
TOL = dict(rtol=1e-5, atol=1e-5)


class Net(nn.Module):
  """``head(relu(bn1(dense1(relu(bn0(dense0(x)))))))``: two BatchNorm layers.

  The dense layers before a BatchNorm have no bias (as convolutions before BatchNorm in a
  ResNet): its gradient is zero up to rounding, and Adam would turn that noise into steps."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn0")(nn.Dense(HIDDEN, use_bias=False, name="dense0")(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(nn.Dense(HIDDEN, use_bias=False, name="dense1")(x)))
    return nn.Dense(CLASSES, name="head")(x)


def source_variables(seed=0, head_scale=3.0):
  """Random weights, non-trivial running statistics and affine, a head scaled for confidence."""
  model = Net()
  v = model.init(jax.random.key(seed), jnp.zeros((2, DIM)))
  r = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, v["params"])
  params = {k: dict(p) for k, p in params.items()}
  params["head"]["kernel"] = params["head"]["kernel"] * head_scale
  stats = {}
  for bn in ("bn0", "bn1"):
    params[bn]["scale"] = r.uniform(0.6, 1.4, HIDDEN).astype(np.float32)
    params[bn]["bias"] = r.normal(0, 0.2, HIDDEN).astype(np.float32)
    stats[bn] = {"mean": r.normal(0, 0.3, HIDDEN).astype(np.float32),
                 "var": r.uniform(0.5, 2.0, HIDDEN).astype(np.float32)}
  to_j = lambda t: jax.tree.map(jnp.asarray, t)
  return model, {"params": to_j(params), "batch_stats": to_j(stats)}


def batches(n, size, seed=1):
  return shifted_batches(n, size, DIM, seed)


# ------------------------------------------------------------------ the PyTorch twin

FLAX_TO_TORCH = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def torch_name(path):
  """Flax ``dense0/kernel`` -> torch ``dense0.weight``."""
  mod, leaf = path.split("/")
  return f"{mod}.{FLAX_TO_TORCH[leaf]}"


def to_torch(path, a):
  a = np.asarray(a)
  return torch.tensor(a.T.copy() if path.endswith("kernel") else a)


def from_torch(path, t):
  a = t.detach().numpy()
  return a.T if path.endswith("kernel") else a


class TorchNet(torch.nn.Module):
  """The same network; BatchNorm on batch statistics (``track_running_stats=False``), as
  the references' ``configure_model`` sets it for SAR and CoTTA."""

  def __init__(self, variables):
    super().__init__()
    self.dense0 = torch.nn.Linear(DIM, HIDDEN, bias=False)
    self.bn0 = torch.nn.BatchNorm1d(HIDDEN, eps=1e-5, track_running_stats=False)
    self.dense1 = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
    self.bn1 = torch.nn.BatchNorm1d(HIDDEN, eps=1e-5, track_running_stats=False)
    self.head = torch.nn.Linear(HIDDEN, CLASSES)
    flat = flat_params(variables)
    with torch.no_grad():
      named = dict(self.named_parameters())
      for path, a in flat.items():
        named[torch_name(path)].copy_(to_torch(path, a))

  def forward(self, x):
    x = F.relu(self.bn0(self.dense0(x)))
    x = F.relu(self.bn1(self.dense1(x)))
    return self.head(x)


def flat_params(variables):
  return {f"{m}/{k}": np.asarray(a) for m, leaves in variables["params"].items()
          for k, a in leaves.items()}


def assert_params_match(variables, net, msg=""):
  named = dict(net.named_parameters())
  for path, a in flat_params(variables).items():
    np.testing.assert_allclose(a, from_torch(path, named[torch_name(path)]), **TOL,
                               err_msg=f"{msg} {path}")


def softmax_entropy(x):
  return -(x.softmax(1) * x.log_softmax(1)).sum(1)


# ------------------------------------------------------------------ SAR (mr-eggplant/SAR)


class SAM(torch.optim.Optimizer):
  """mr-eggplant/SAR ``sam.py`` (non-adaptive)."""

  def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
    defaults = dict(rho=rho, adaptive=False, **kwargs)
    super().__init__(params, defaults)
    self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
    self.param_groups = self.base_optimizer.param_groups
    self.defaults.update(self.base_optimizer.defaults)

  @torch.no_grad()
  def first_step(self, zero_grad=False):
    grad_norm = self._grad_norm()
    for group in self.param_groups:
      scale = group["rho"] / (grad_norm + 1e-12)
      for p in group["params"]:
        if p.grad is None:
          continue
        self.state[p]["old_p"] = p.data.clone()
        p.add_(p.grad * scale.to(p))
    if zero_grad:
      self.zero_grad()

  @torch.no_grad()
  def second_step(self, zero_grad=False):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        p.data = self.state[p]["old_p"]
    self.base_optimizer.step()
    if zero_grad:
      self.zero_grad()

  def _grad_norm(self):
    return torch.norm(torch.stack([p.grad.norm(p=2) for group in self.param_groups
                                   for p in group["params"] if p.grad is not None]), p=2)


def update_ema(ema, new_data):
  return new_data if ema is None else 0.9 * ema + (1 - 0.9) * new_data


def forward_and_adapt_sar(x, model, optimizer, margin, reset_constant, ema):
  """mr-eggplant/SAR ``forward_and_adapt_sar``, line by line."""
  optimizer.zero_grad()
  outputs = model(x)
  entropys = softmax_entropy(outputs)
  filter_ids_1 = torch.where(entropys < margin)
  entropys = entropys[filter_ids_1]
  loss = entropys.mean(0)
  loss.backward()
  optimizer.first_step(zero_grad=True)
  entropys2 = softmax_entropy(model(x))
  entropys2 = entropys2[filter_ids_1]
  filter_ids_2 = torch.where(entropys2 < margin)
  loss_second = entropys2[filter_ids_2].mean(0)
  if not np.isnan(loss_second.item()):
    ema = update_ema(ema, loss_second.item())
  loss_second.backward()
  optimizer.second_step(zero_grad=True)
  reset_flag = ema is not None and ema < reset_constant
  return outputs, ema, reset_flag


class TorchSAR:
  """``SAR.forward``: adapt, reset model and optimizer on the flag, then re-assign ``ema``."""

  def __init__(self, variables, trainable, lr, margin, reset_constant, rho):
    self.model = TorchNet(variables)
    self.model.train()
    self.model.requires_grad_(False)
    params = []
    for name, p in self.model.named_parameters():
      if name in trainable:
        p.requires_grad_(True)
        params.append(p)
    self.optimizer = SAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=0.9)
    self.model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
    self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
    self.margin, self.reset_constant, self.ema = margin, reset_constant, None

  def reset(self):
    self.model.load_state_dict(self.model_state, strict=True)
    self.optimizer.load_state_dict(self.optimizer_state)
    self.ema = None

  def forward(self, x):
    outputs, ema, reset_flag = forward_and_adapt_sar(x, self.model, self.optimizer, self.margin,
                                                     self.reset_constant, self.ema)
    if reset_flag:
      self.reset()
    self.ema = ema
    return outputs, ema, reset_flag


def run_sar(reset_constant, margin, steps=8, size=16):
  model, variables = source_variables()
  xs = batches(steps, size)
  trainable = ("bn0.weight", "bn0.bias")          # bn1 excluded, like SAR's frozen top blocks
  lr, rho = 0.5, 0.3
  ref = TorchSAR(variables, trainable, lr, margin, reset_constant, rho)
  tta = adapt.sar(model, optimizer=optax.sgd(lr, momentum=0.9), e_margin=margin, rho=rho,
                  reset_constant=reset_constant, exclude=(r"^bn1/",),
                  apply_kwargs={"train": False})
  state = tta.init(variables, {"x": jnp.asarray(xs[0])})
  flags = []
  for t, x in enumerate(xs):
    out, ema, flag = ref.forward(torch.tensor(x))
    state, m = tta.step(state, {"x": jnp.asarray(x)}, None)
    np.testing.assert_allclose(np.asarray(m["logits"]), out.detach().numpy(), **TOL,
                               err_msg=f"SAR step {t} logits")
    assert bool(m["reset"]) == bool(flag), f"SAR step {t}: reset {m['reset']} vs {flag}"
    np.testing.assert_allclose(float(m["ema"]), ema, **TOL, err_msg=f"SAR step {t} ema")
    assert_params_match(state.variables, ref.model, f"SAR step {t}")
    flags.append(bool(flag))
  return flags, ref


def sar_margin():
  """E0 between the source model's entropies on the first batch (some samples pass)."""
  _, variables = source_variables()
  with torch.no_grad():
    ent = softmax_entropy(TorchNet(variables).train()(torch.tensor(batches(1, 16)[0])))
  return float(np.quantile(ent.numpy(), 0.6))


def test_sar_matches_official_without_recovery():
  flags, _ = run_sar(reset_constant=0.0, margin=sar_margin())
  assert not any(flags)


def test_sar_matches_official_with_model_recovery():
  margin = sar_margin()
  # The EMA trace without recovery; recover once it drops below its median, so the run mixes
  # steps with and without a reset (and the optimizer's momentum is reset with the model).
  ref = TorchSAR(source_variables()[1], ("bn0.weight", "bn0.bias"), 0.5, margin, -1.0, 0.3)
  emas = [ref.forward(torch.tensor(x))[1] for x in batches(8, 16)]
  flags, _ = run_sar(reset_constant=float(np.median(emas)), margin=margin)
  assert any(flags) and not all(flags), flags


# ------------------------------------------------------------------ CoTTA (qinenergy/cotta)


class TorchCoTTA:
  """qinenergy/cotta ``CoTTA`` with the augmentations and restore masks passed in."""

  def __init__(self, variables, lr, mt, rst, ap):
    self.model = TorchNet(variables).train()
    self.model.requires_grad_(True)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.9, 0.999))
    self.model_state = copy.deepcopy(self.model.state_dict())
    self.model_ema = copy.deepcopy(self.model)
    for param in self.model_ema.parameters():
      param.detach_()
    self.model_anchor = copy.deepcopy(self.model)
    for param in self.model_anchor.parameters():
      param.detach_()
    self.mt, self.rst, self.ap = mt, rst, ap

  def forward_and_adapt(self, x, views, masks):
    outputs = self.model(x)
    anchor_prob = torch.nn.functional.softmax(self.model_anchor(x), dim=1).max(1)[0]
    standard_ema = self.model_ema(x)
    outputs_emas = [self.model_ema(v).detach() for v in views]     # self.transform(x), N times
    augmented = bool(anchor_prob.mean(0) < self.ap)
    outputs_ema = torch.stack(outputs_emas).mean(0) if augmented else standard_ema
    loss = (-(outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1)).mean(0)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad()
    for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters()):
      ema_param.data[:] = self.mt * ema_param[:].data[:] + (1 - self.mt) * param[:].data[:]
    for nm, m in self.model.named_modules():
      for npp, p in m.named_parameters(recurse=False):
        if npp in ["weight", "bias"] and p.requires_grad:
          mask = masks[f"{nm}.{npp}"].float()                   # torch.rand(p.shape) < rst
          with torch.no_grad():
            p.data = self.model_state[f"{nm}.{npp}"] * mask + p * (1. - mask)
    return outputs_ema, augmented


def cotta_draws(key, x, n_augment, augment, variables, rst):
  """The augmented views and restore masks kfuse's CoTTA draws from ``key`` (same splits)."""
  k_aug, k_rst = jax.random.split(key)
  views = [np.asarray(augment(k, jnp.asarray(x))) for k in jax.random.split(k_aug, n_augment)]
  flat = {p: jnp.asarray(a) for p, a in flat_params(variables).items()}
  # stochastic_restore(θ=0, θ_src=1) is the mask M itself.
  masks = jax.jit(lambda k: mean_teacher.stochastic_restore(
      k, jax.tree.map(jnp.zeros_like, flat), jax.tree.map(jnp.ones_like, flat), rst))(k_rst)
  return ([torch.tensor(v) for v in views],
          {torch_name(p): to_torch(p, m) > 0.5 for p, m in masks.items()})


def test_cotta_matches_official():
  model, variables = source_variables()
  steps, size, n_aug = 6, 16, 4
  xs = batches(steps, size, seed=2)
  lr, mt, rst = 1e-2, 0.8, 0.2
  augment = aug_lib.make_augment()
  with torch.no_grad():
    anchor = [float(F.softmax(TorchNet(variables).train()(torch.tensor(x)), 1).max(1)[0].mean())
              for x in xs]
  ap = float(np.median(anchor))                  # some batches take the augmented teacher
  ref = TorchCoTTA(variables, lr, mt, rst, ap)
  tta = adapt.cotta(model, optimizer=optax.adam(lr), mt=mt, rst=rst, ap=ap, n_augment=n_aug,
                    augment=augment, apply_kwargs={"train": False})
  state = tta.init(variables, {"x": jnp.asarray(xs[0])})
  branches, restored = [], 0
  for t, x in enumerate(xs):
    key = jax.random.key(100 + t)
    views, masks = cotta_draws(key, x, n_aug, augment, variables, rst)
    out, augmented = ref.forward_and_adapt(torch.tensor(x), views, masks)
    state, m = tta.step(state, {"x": jnp.asarray(x)}, key)
    assert bool(m["augmented"]) == augmented, f"CoTTA step {t}"
    np.testing.assert_allclose(np.asarray(m["logits"]), out.detach().numpy(), **TOL,
                               err_msg=f"CoTTA step {t} predictions")
    assert_params_match(state.variables, ref.model, f"CoTTA step {t} student")
    assert_params_match(state.teacher, ref.model_ema, f"CoTTA step {t} teacher")
    branches.append(augmented)
    restored += sum(int(v.sum()) for v in masks.values())
  assert any(branches) and not all(branches), branches
  assert restored > 0


# ------------------------------------------------------------------ RoTTA (BIT-DA/RoTTA)


class RobustBN1d(torch.nn.Module):
  """BIT-DA/RoTTA ``bn_layers.MomentumBN`` / ``RobustBN1d``."""

  def __init__(self, bn_layer, running_mean, running_var, momentum):
    super().__init__()
    self.momentum = momentum
    self.register_buffer("source_mean", running_mean.clone())
    self.register_buffer("source_var", running_var.clone())
    self.weight = torch.nn.Parameter(bn_layer.weight.detach().clone())
    self.bias = torch.nn.Parameter(bn_layer.bias.detach().clone())
    self.eps = bn_layer.eps

  def forward(self, x):
    if self.training:
      b_var, b_mean = torch.var_mean(x, dim=0, unbiased=False, keepdim=False)
      mean = (1 - self.momentum) * self.source_mean + self.momentum * b_mean
      var = (1 - self.momentum) * self.source_var + self.momentum * b_var
      self.source_mean, self.source_var = mean.detach().clone(), var.detach().clone()
      mean, var = mean.view(1, -1), var.view(1, -1)
    else:
      mean, var = self.source_mean.view(1, -1), self.source_var.view(1, -1)
    x = (x - mean) / torch.sqrt(var + self.eps)
    return x * self.weight.view(1, -1) + self.bias.view(1, -1)


class MemoryItem:
  def __init__(self, data=None, uncertainty=0, age=0):
    self.data, self.uncertainty, self.age = data, uncertainty, age

  def increase_age(self):
    self.age += 1


class CSTU:
  """BIT-DA/RoTTA ``core/utils/memory.py`` (plus counters of what happened)."""

  def __init__(self, capacity, num_class, lambda_t=1.0, lambda_u=1.0):
    self.capacity, self.num_class = capacity, num_class
    self.per_class = self.capacity / self.num_class
    self.lambda_t, self.lambda_u = lambda_t, lambda_u
    self.data = [[] for _ in range(self.num_class)]
    self.replaced = self.refused = 0

  def get_occupancy(self):
    return sum(len(d) for d in self.data)

  def per_class_dist(self):
    return [len(class_list) for class_list in self.data]

  def add_instance(self, instance):
    x, prediction, uncertainty = instance
    new_item = MemoryItem(data=x, uncertainty=uncertainty, age=0)
    new_score = self.heuristic_score(0, uncertainty)
    if self.remove_instance(prediction, new_score):
      self.data[prediction].append(new_item)
    self.add_age()

  def remove_instance(self, cls, score):
    class_occupied = len(self.data[cls])
    if class_occupied < self.per_class:
      if self.get_occupancy() < self.capacity:
        return True
      return self.remove_from_classes(self.get_majority_classes(), score)
    return self.remove_from_classes([cls], score)

  def remove_from_classes(self, classes, score_base):
    max_class = max_index = max_score = None
    for cls in classes:
      for idx, item in enumerate(self.data[cls]):
        score = self.heuristic_score(age=item.age, uncertainty=item.uncertainty)
        if max_score is None or score >= max_score:
          max_score, max_index, max_class = score, idx, cls
    if max_class is not None:
      if max_score > score_base:
        self.data[max_class].pop(max_index)
        self.replaced += 1
        return True
      self.refused += 1
      return False
    return True

  def get_majority_classes(self):
    dist = self.per_class_dist()
    return [i for i, occupied in enumerate(dist) if occupied == max(dist)]

  def heuristic_score(self, age, uncertainty):
    return (self.lambda_t * 1 / (1 + math.exp(-age / self.capacity))
            + self.lambda_u * uncertainty / math.log(self.num_class))

  def add_age(self):
    for class_list in self.data:
      for item in class_list:
        item.increase_age()

  def get_memory(self):
    tmp_data, tmp_age = [], []
    for class_list in self.data:
      for item in class_list:
        tmp_data.append(item.data)
        tmp_age.append(item.age)
    return tmp_data, [a / self.capacity for a in tmp_age]


def timeliness_reweighting(ages):
  ages = torch.tensor(ages).float()
  return torch.exp(-ages) / (1 + torch.exp(-ages))


class TorchRoTTA:
  """BIT-DA/RoTTA ``RoTTA`` with the strong augmentation passed in per update."""

  def __init__(self, variables, lr, alpha, nu, capacity, update_frequency):
    net = TorchNet(variables)
    for bn in ("bn0", "bn1"):                    # configure_model: BatchNorm -> RobustBN
      st = variables["batch_stats"][bn]
      setattr(net, bn, RobustBN1d(getattr(net, bn), torch.tensor(np.asarray(st["mean"])),
                                  torch.tensor(np.asarray(st["var"])), alpha))
    net.requires_grad_(False)
    params = []
    for m in (net.bn0, net.bn1):
      m.requires_grad_(True)
      params += [m.weight, m.bias]
    self.model = net
    self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    self.model_ema = copy.deepcopy(net)
    for param in self.model_ema.parameters():
      param.detach_()
    self.mem = CSTU(capacity, CLASSES)
    self.nu, self.update_frequency, self.current_instance = nu, update_frequency, 0

  def forward_and_adapt(self, batch_data, transforms):
    with torch.no_grad():
      self.model.eval()
      self.model_ema.eval()
      ema_out = self.model_ema(batch_data)
      predict = torch.softmax(ema_out, dim=1)
      pseudo_label = torch.argmax(predict, dim=1)
      entropy = torch.sum(- predict * torch.log(predict + 1e-6), dim=1)
    updates = 0
    for i, data in enumerate(batch_data):
      self.mem.add_instance((data, pseudo_label[i].item(), entropy[i].item()))
      self.current_instance += 1
      if self.current_instance % self.update_frequency == 0:
        self.update_model(transforms[updates])
        updates += 1
    return ema_out

  def update_model(self, transform):
    self.model.train()
    self.model_ema.train()
    sup_data, ages = self.mem.get_memory()
    l_sup = None
    if len(sup_data) > 0:
      sup_data = torch.stack(sup_data)
      strong_sup_aug = transform(sup_data)
      ema_sup_out = self.model_ema(sup_data)
      stu_sup_out = self.model(strong_sup_aug)
      instance_weight = timeliness_reweighting(ages)
      l_sup = ((-(ema_sup_out.softmax(1) * stu_sup_out.log_softmax(1)).sum(1))
               * instance_weight).mean()
    if l_sup is not None:
      self.optimizer.zero_grad()
      l_sup.backward()
      self.optimizer.step()
    for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters()):
      ema_param.data[:] = (1 - self.nu) * ema_param[:].data[:] + self.nu * param[:].data[:]


def jitter(key, x):
  """A random strong augmentation, one draw per call: gain, offset and a nonlinearity.

  The same draw for every sample makes it independent of where a sample sits in the bank
  (kfuse stores by slot, the reference by class list)."""
  g, b = jax.random.uniform(key, (2,))
  return (0.7 + 0.6 * g) * x + (b - 0.5) + 0.1 * jnp.sin(3.0 * x)


def torch_jitter(key):
  g, b = (float(v) for v in jax.random.uniform(key, (2,)))
  return lambda x: (0.7 + 0.6 * g) * x + (b - 0.5) + 0.1 * torch.sin(3.0 * x)


def test_rotta_matches_official():
  model, variables = source_variables(seed=3, head_scale=2.0)
  steps, size = 8, 10
  lr, alpha, nu, capacity, freq = 1e-2, 0.2, 0.2, 6, 4
  xs = batches(steps, size, seed=4)
  ref = TorchRoTTA(variables, lr, alpha, nu, capacity, freq)
  tta = adapt.rotta(model, optimizer=optax.adam(lr), alpha=alpha, nu=nu, capacity=capacity,
                    update_frequency=freq, augment=jitter, apply_kwargs={"train": False})
  state = tta.init(variables, {"x": jnp.asarray(xs[0])})
  total_updates = 0
  for t, x in enumerate(xs):
    key = jax.random.key(200 + t)
    # kfuse's j-th update within a step draws from fold_in(key, j).
    transforms = [torch_jitter(jax.random.fold_in(key, j)) for j in range(-(-size // freq))]
    out = ref.forward_and_adapt(torch.tensor(x), transforms)
    state, m = tta.step(state, {"x": jnp.asarray(x)}, key)
    np.testing.assert_allclose(np.asarray(m["logits"]), out.numpy(), **TOL,
                               err_msg=f"RoTTA step {t} predictions")
    assert_params_match(state.variables, ref.model, f"RoTTA step {t} student")
    assert_params_match(state.teacher, ref.model_ema, f"RoTTA step {t} teacher")
    for who, v, net in (("student", state.variables, ref.model),
                        ("teacher", state.teacher, ref.model_ema)):
      for bn in ("bn0", "bn1"):
        for ours, theirs in (("mean", "source_mean"), ("var", "source_var")):
          np.testing.assert_allclose(np.asarray(v["batch_stats"][bn][ours]),
                                     getattr(getattr(net, bn), theirs).numpy(), **TOL,
                                     err_msg=f"RoTTA step {t} {who} {bn} {ours}")
    mem = state.memory
    valid = np.asarray(mem.valid)
    counts = np.bincount(np.asarray(mem.label)[valid], minlength=CLASSES)
    assert counts.tolist() == ref.mem.per_class_dist(), f"RoTTA step {t} memory classes"
    ages = sorted(np.asarray(mem.age)[valid].tolist())
    assert ages == sorted(float(i.age) for c in ref.mem.data for i in c), f"RoTTA step {t} ages"
    total_updates = int(m["num_updates"])
  assert total_updates == steps * size // freq
  assert ref.mem.replaced > 0 and ref.mem.refused > 0, (ref.mem.replaced, ref.mem.refused)
