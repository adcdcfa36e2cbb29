"""ViDA: visual domain adapters for continual test-time adaptation.

Liu et al., *ViDA: Homeostatic visual domain adapter for continual test time adaptation*,
ICLR 2024 (Yangsenqiao/vida ``cifar/vida.py``, ``imagenet/inject_vida.py``,
``cifar/cfgs/cifar10/vida.yaml``, ``cifar/cifar10c_vit.py``).

Every targeted linear layer ``y = W x`` gets two adapters, a low-rank (r₁) and a high-rank
(r₂) one (``ViDAInjectedLinear``)::

    y = W x + s₁ · U₁ D₁ x + s₂ · U₂ D₂ x,    D_i ~ N(0, (1/r_i²)²),  U_i = 0 at init

so the injected model equals the source model until the adapters learn. Per batch
(``ViDA.forward_and_adapt``):

1. uncertainty ``u = 0.1 · mean(Var_n f_θ′(aug_n(x)))`` over N = 10 augmented teacher views
   (unbiased variance over the views, mean over samples and classes), with the teacher's
   current scales;
2. homeostatic knowledge allotment: ``u ≥ thr``: λ_high = 1 + u, λ_low = 1 - u; else
   λ_low = 1 + u, λ_high = 1 - u; the low-rank adapter gets s₁ = λ_low, the high-rank one
   s₂ = λ_high. **As released**, ``ViDA.set_scale`` assigns ``scale2`` in an ``elif`` that is
   never reached (every injected layer has both attributes), so s₂ stays 1;
   ``scale_high_rank=False`` (default) reproduces that, ``True`` applies λ_high as the paper
   describes;
3. the teacher's prediction ``f_θ′(x)`` (the online output) and the student loss
   ``mean_i -Σ_c softmax(f_θ′(x))_ic log softmax(f_θ(x))_ic``; one optimizer step on every
   student weight (the released ``configure_model`` freezes nothing) and on the adapters,
   with two learning rates (model 1e-4, adapters 1e-5, Adam);
4. teacher EMA ``θ′ ← m θ′ + (1-m) θ`` (m = 0.999 for the model, m_vida = 0.999 for the
   adapters);
5. stochastic restore ``θ ← M ⊙ θ₀ + (1-M) ⊙ θ``, ``M ~ Bernoulli(0.1)`` over every
   trainable tensor, adapters included (θ₀: the source weights and the initial adapters).

Normalization: the released code runs the student in train mode and the teacher in eval
mode, so with BatchNorm the student uses test-batch statistics and the teacher the source
running statistics (``norm="batch"``, ``teacher_norm="source"``). The released experiments
use ViTs (LayerNorm), where this makes no difference.

Targets: the released code injects into every ``nn.Linear`` inside ``Attention`` modules;
here ``target`` is a regex over the module paths of the model's ``nn.Dense`` /
``nn.DenseGeneral`` layers (default ``attn/``: the query/key/value/out projections of
`kfuse.models.vit`). Injection is by `flax.linen.intercept_methods`, so models need no edit.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse import optim
from kfuse.adapt import augment as aug_lib
from kfuse.adapt import core
from kfuse.adapt.mean_teacher import stochastic_restore
from kfuse.tree import KfuseError

PyTree = Any

__all__ = ["VidaState", "vida", "vida_forward", "dense_layers", "init_adapters", "uncertainty_scales"]

ADAPTER_KEYS = ("down1", "up1", "down2", "up2")


class VidaState(NamedTuple):
  """ViDA state.

  Attributes:
    variables: the student's model variables.
    adapters: the student's adapters ``{module path: {down1, up1, down2, up2}}``.
    teacher, teacher_adapters: the EMA teacher's.
    opt_state, adapter_opt_state: the two optimizers' states (model subset, adapters).
    scales: ``[s₁, s₂]``, the scales set by the previous batch (used for its uncertainty views).
    source, source_adapters: θ₀, the reset and restore target.
    count: steps since the last reset.
  """
  variables: PyTree
  adapters: dict
  teacher: PyTree
  teacher_adapters: dict
  opt_state: PyTree
  adapter_opt_state: PyTree
  scales: jax.Array
  source: PyTree
  source_adapters: dict
  count: jax.Array


def _contracted(module: nn.Module, ndim: int) -> int:
  """Number of trailing input axes a Dense / DenseGeneral contracts (raises if not trailing)."""
  if isinstance(module, nn.DenseGeneral):
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = sorted(int(a) % ndim for a in axes)
    if axes != list(range(ndim - len(axes), ndim)):
      raise KfuseError(f"model: DenseGeneral {'/'.join(module.scope.path)!r} contracts axes"
                       f" {module.axis}; vida adapts only trailing-axis projections")
    return len(axes)
  return 1


def _is_linear(module: nn.Module) -> bool:
  return isinstance(module, (nn.Dense, nn.DenseGeneral))


def dense_layers(apply_fn: Callable, variables: PyTree, x: jax.ShapeDtypeStruct,
                 apply_kwargs: Mapping[str, Any] | None = None) -> dict[str, tuple[int, int]]:
  """``{module path: (in features, out features)}`` of every Dense / DenseGeneral the model calls."""
  found: dict[str, tuple[int, int]] = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    m = context.module
    if _is_linear(m) and context.method_name == "__call__":
      k = _contracted(m, args[0].ndim)
      feats = m.features if isinstance(m.features, (tuple, list)) else (m.features,)
      found["/".join(str(p) for p in m.scope.path)] = (
          int(np.prod(args[0].shape[args[0].ndim - k:])), int(np.prod(feats)))
    return y

  def run(v, xx):
    with nn.intercept_methods(record):
      return apply_fn(v, xx, **dict(apply_kwargs or {}))

  jax.eval_shape(run, variables, x)
  return found


def init_adapters(key: jax.Array, layers: Mapping[str, tuple[int, int]], rank1: int,
                  rank2: int) -> dict:
  """``ViDAInjectedLinear`` init: ``down_i ~ N(0, (1/r_i²)²)`` ``[in, r_i]``, ``up_i = 0`` ``[r_i, out]``."""
  out = {}
  for k, (path, (n_in, n_out)) in zip(jax.random.split(key, max(1, len(layers))), sorted(layers.items())):
    k1, k2 = jax.random.split(k)
    out[path] = {"down1": jax.random.normal(k1, (n_in, rank1), jnp.float32) / rank1 ** 2,
                 "up1": jnp.zeros((rank1, n_out), jnp.float32),
                 "down2": jax.random.normal(k2, (n_in, rank2), jnp.float32) / rank2 ** 2,
                 "up2": jnp.zeros((rank2, n_out), jnp.float32)}
  return out


def vida_forward(apply_fn: Callable, variables: PyTree, adapters: Mapping[str, Mapping],
                 scales: jax.Array, x: jax.Array, *, norm: str = "batch",
                 apply_kwargs: Mapping[str, Any] | None = None) -> jax.Array:
  """Logits of the model with the adapters injected: ``y = Wx + s₁ U₁D₁x + s₂ U₂D₂x``.

  ``norm``: the BatchNorm mode of `kfuse.adapt.core.forward`.
  """
  def inject(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    m = context.module
    if not (_is_linear(m) and context.method_name == "__call__"):
      return y
    a = adapters.get("/".join(str(p) for p in m.scope.path))
    if a is None:
      return y
    h = args[0]
    k = _contracted(m, h.ndim)
    hf = h.reshape(h.shape[:h.ndim - k] + (-1,)).astype(jnp.float32)
    delta = (scales[0] * ((hf @ a["down1"]) @ a["up1"])
             + scales[1] * ((hf @ a["down2"]) @ a["up2"]))
    return y + delta.reshape(y.shape).astype(y.dtype)

  with nn.intercept_methods(inject):
    return core.forward(apply_fn, variables, x, norm=norm, apply_kwargs=apply_kwargs)[0]


def uncertainty_scales(views_logits: jax.Array, thr: float,
                       scale_high_rank: bool = False) -> tuple[jax.Array, jax.Array]:
  """``u = 0.1·mean(Var_n(views))`` (unbiased over the N views) and ``[s₁, s₂]``.

  ``u ≥ thr``: λ_low = 1-u, λ_high = 1+u, else swapped; s₁ = λ_low, s₂ = λ_high if
  ``scale_high_rank`` else 1 (as released).
  """
  u = 0.1 * jnp.mean(jnp.var(views_logits.astype(jnp.float32), axis=0, ddof=1))
  high = jnp.where(u >= thr, 1.0 + u, 1.0 - u)
  low = jnp.where(u >= thr, 1.0 - u, 1.0 + u)
  return u, jnp.stack([low, high if scale_high_rank else jnp.ones_like(high)])


def _flat(adapters: Mapping[str, Mapping]) -> dict:
  return {f"{p}/{k}": a[k] for p, a in adapters.items() for k in ADAPTER_KEYS}


def _unflat(flat: Mapping[str, jax.Array], like: Mapping[str, Mapping]) -> dict:
  return {p: {k: flat[f"{p}/{k}"] for k in ADAPTER_KEYS} for p in like}


def _optimizer(cfg: Any, default: float) -> optax.GradientTransformation:
  if cfg is None:
    return optax.adam(default)
  if isinstance(cfg, optax.GradientTransformation):
    return cfg
  return optim.make_optimizer(dict(cfg), total_steps=0)


def vida(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
         adapter_optimizer: Any = None, rank1: int = 1, rank2: int = 128,
         target: str = r"(^|/)attn/", mt: float = 0.999, mt_vida: float = 0.999,
         rst: float = 0.1, unc_thr: float = 0.05, n_augment: int = 10,
         scale_high_rank: bool = False,
         augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
         norm: str = "batch", teacher_norm: str = "source", episodic: bool = False,
         trainable: Any = "all", exclude: Sequence[str] = (),
         apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """ViDA: low/high-rank adapters, uncertainty-scaled fusion, EMA teacher, stochastic restore.

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    optimizer: the model weights' optimizer; default ``optax.adam(1e-4)`` (``OPTIM.LR``).
    adapter_optimizer: the adapters' (an optax transformation or a `kfuse.optim` config);
      default ``optax.adam(1e-5)`` (``OPTIM.ViDALR``).
    rank1, rank2: low / high adapter ranks (``vida_rank1`` 1, ``vida_rank2`` 128).
    target: regex (``re.search``) over the module paths of the Dense / DenseGeneral layers
      that get adapters (default: the attention projections of `kfuse.models.vit`).
    mt, mt_vida: teacher EMA decays of the model weights and of the adapters (0.999).
    rst: stochastic-restore probability (the ``ViDA`` class default 0.1).
    unc_thr: uncertainty threshold (``--unc_thr`` 0.05).
    n_augment: augmented teacher views for the uncertainty (10).
    scale_high_rank: False: s₂ stays 1 as released; True: s₂ = λ_high (the paper).
    augment: ``aug(key, x) -> x``; default `kfuse.adapt.augment.make_augment` for ``x``'s
      spatial dims (CoTTA's transforms, which ViDA reuses).
    norm, teacher_norm: BatchNorm modes of the student (train mode: ``batch``) and of the
      teacher (eval mode: ``source``), as released.
    episodic: reset before every batch.
    trainable, exclude: the model weights the optimizer updates (default all, as released).
    apply_kwargs: e.g. ``{"train": False}``.
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx = optimizer if optimizer is not None else optax.adam(1e-4)
  tx_a = _optimizer(adapter_optimizer, 1e-5)
  for name, v in (("mt", mt), ("mt_vida", mt_vida), ("rst", rst)):
    if not 0.0 <= float(v) <= 1.0:
      raise KfuseError(f"{name}: must be in [0, 1], got {v}")
  for name, v in (("rank1", rank1), ("rank2", rank2), ("n_augment", n_augment)):
    if int(v) < 1 or (name == "n_augment" and int(v) < 2):
      raise KfuseError(f"{name}: must be >= {2 if name == 'n_augment' else 1}, got {v}")
  for name, v in (("norm", norm), ("teacher_norm", teacher_norm)):
    if v not in core.NORM_MODES[:2]:
      raise KfuseError(f"{name}: expected 'source' or 'batch', got {v!r}")
  pattern = re.compile(target)
  sel = core.Trainable(trainable, tuple(exclude))
  augs: dict[int, Callable] = {}

  def aug_for(x):
    if augment is not None:
      return augment
    dims = 1 if x.ndim <= 2 else 2
    if dims not in augs:
      augs[dims] = aug_lib.make_augment(aug_lib.COTTA, spatial_dims=dims)
    return augs[dims]

  def fresh(source, source_adapters):
    return VidaState(source, source_adapters, source, source_adapters, sel.init(tx, source),
                     tx_a.init(_flat(source_adapters)), jnp.ones((2,), jnp.float32), source,
                     source_adapters, jnp.zeros((), jnp.int32))

  def reset(state: VidaState) -> VidaState:
    return fresh(state.source, state.source_adapters)

  def fwd(variables, adapters, scales, x, mode):
    return vida_forward(apply_fn, variables, adapters, scales, x, norm=mode,
                        apply_kwargs=apply_kwargs)

  def step(state: VidaState, x, key):
    k_aug, k_rst = jax.random.split(core.need_key(key, "vida"))
    finite = core.is_finite(x)
    s = reset(state) if episodic else state
    aug = aug_for(x)

    def view(_, k):
      return None, fwd(s.teacher, s.teacher_adapters, s.scales, aug(k, x), teacher_norm)

    _, views = jax.lax.scan(view, None, jax.random.split(k_aug, int(n_augment)))
    unc, scales = uncertainty_scales(views, unc_thr, scale_high_rank)
    target_logits = jax.lax.stop_gradient(
        fwd(s.teacher, s.teacher_adapters, scales, x, teacher_norm).astype(jnp.float32))

    def loss_fn(sub, flat_ad):
      v = sel.put(s.variables, sub)
      logits = fwd(v, _unflat(flat_ad, s.adapters), scales, x, norm)
      return core.soft_cross_entropy(logits, target_logits).mean()

    sub, flat_ad = sel.get(s.variables), _flat(s.adapters)
    loss, (g_model, g_ad) = jax.value_and_grad(loss_fn, argnums=(0, 1))(sub, flat_ad)
    student, opt_state = sel.update(tx, g_model, s.opt_state, s.variables)
    upd, ad_opt = tx_a.update(g_ad, s.adapter_opt_state, flat_ad)
    flat_ad = optax.apply_updates(flat_ad, upd)
    teacher = core.with_params(s.teacher, core.ema(s.teacher["params"], student["params"], mt))
    teacher_ad = core.ema(s.teacher_adapters, _unflat(flat_ad, s.adapters), mt_vida)
    k_m, k_a = jax.random.split(k_rst)
    student = sel.put(student, stochastic_restore(k_m, sel.get(student), sel.get(s.source), rst))
    adapters = _unflat(stochastic_restore(k_a, flat_ad, _flat(s.source_adapters), rst), s.adapters)
    new = VidaState(student, adapters, teacher, teacher_ad, opt_state, ad_opt, scales, s.source,
                    s.source_adapters, s.count + 1)
    new = core.guard(finite, new, state)
    metrics = {"loss": loss, "uncertainty": unc, "scale_low": scales[0], "scale_high": scales[1],
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return new, target_logits, metrics

  def init(variables, batch, key=None, **kw):
    if kw:
      raise KfuseError(f"vida.init: unexpected arguments {sorted(kw)}")
    core.check_variables(variables, "vida")
    example = core.check_example(batch, "vida")
    key = core.need_key(key, "vida")      # the adapters' random init
    variables = core.copy_tree(variables)
    layers = dense_layers(apply_fn, variables, example, apply_kwargs)
    chosen = {p: d for p, d in layers.items() if pattern.search(p)}
    if not chosen:
      raise KfuseError(f"target: {target!r} matches no Dense / DenseGeneral layer; the model's"
                       f" are: {', '.join(sorted(layers)) or 'none'}")
    state = fresh(variables, init_adapters(key, chosen, int(rank1), int(rank2)))
    core.validate(step, state, example)
    return state

  return core.adapter("vida", init, step, reset)
