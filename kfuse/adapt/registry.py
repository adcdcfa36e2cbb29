"""Registry of the test-time adaptation methods and their paper defaults.

``make(name, apply_fn, optimizer=..., **params)`` builds an `Adapter`;
``default_config(name)`` gives the paper / reference-repository defaults
(optimizer + method parameters), declared once, at registration, in `REGISTRY`
(a `kfuse.registry.Registry`); ``names()`` lists the methods.

| name | paper defaults (reference repository) |
|---|---|
| source | eval mode, source BN statistics |
| bn_adapt | batch statistics, prior 0 (tent ``norm.py``) |
| tent | Adam 1e-3, norm affine, steps 1, episodic False (CIFAR-10-C 18.6 / 20.0) |
| eta | as eata without Fisher |
| eata | E0 = 0.4 ln C, ε 0.05, α 2000, SGD 2.5e-4 m 0.9 (benchmark CIFAR-10: Adam 1e-3, α 1, ε 0.4) |
| sar | E0 = 0.4 ln C, ρ 0.05, reset below 0.2, SGD 2.5e-4 m 0.9 |
| cotta | m 0.999, p 0.01, AP 0.92, N 32, Adam 1e-3, all params (16.2-16.5) |
| rotta | α 0.05, ν 0.001, K 64, every 64 samples, Adam 1e-3 (19.3) |
| vida | ranks 1 / 128, thr 0.05, N 10, m = m_vida = 0.999, restore 0.1, Adam 1e-4 (adapters 1e-5) |
| kff | ViT prompts: L_d 8, γ_d 20, τ 3, α_d 0.1, N_d 20, γ_c 0.2, γ_h 2, α_c 0.1, N_c 10, E 50 / 1, AdamW 0.1 (domain) / 1e-3 (class) (CIFAR-10 config) |
"""

from __future__ import annotations

from typing import Any

import optax

from kfuse import optim
from kfuse.adapt import core, entropy, mean_teacher, norm
from kfuse.adapt.kff import kff as _kff
from kfuse.adapt.vida import vida as _vida
from kfuse.registry import Registry
from kfuse.tree import KfuseError

__all__ = ["REGISTRY", "names", "default_config", "make"]

REGISTRY = Registry("TTA method")
"""name -> builder ``fn(apply_fn, [optimizer,] **params) -> Adapter``; ``defaults`` hold
``optimizer`` (a `kfuse.optim` config, or None for gradient-free methods) and the
method's parameters."""

_ADAM = dict(name="adam", learning_rate=1e-3)
_SGD = dict(name="sgd", learning_rate=2.5e-4, kwargs=dict(momentum=0.9))

REGISTRY.register("source", norm.source, defaults=dict(optimizer=None), doc="""
    Source model: BatchNorm with its running statistics, no adaptation (the baseline).""")
REGISTRY.register("bn_adapt", norm.bn_adapt, defaults=dict(optimizer=None, prior=0.0), doc="""
    BN-adapt: μ = p·μ_src + (1-p)·μ_B, σ² likewise (p = prior). Schneider et al., NeurIPS 2020.""")
REGISTRY.register("tent", entropy.tent, defaults=dict(optimizer=_ADAM, steps=1, episodic=False), doc="""
    Tent: one step on L = mean_i H(softmax(f(x_i))) over the norm-layer affine, BN on batch
    statistics. Wang et al., ICLR 2021.""")
REGISTRY.register("eta", entropy.eta, defaults=dict(optimizer=_SGD, e_margin_scale=0.4,
                                                     d_margin=0.05), doc="""
    ETA: L = Σ m_i e^{-(E_i - E0)} E_i / Σ m_i, m_i = [E_i < E0]·[|cos(p̄, p_i)| < ε].
    Niu et al., ICML 2022.""")
REGISTRY.register("eata", entropy.eata, defaults=dict(optimizer=_SGD, e_margin_scale=0.4,
                                                       d_margin=0.05, fisher_alpha=2000.0), doc="""
    EATA: ETA's loss + α Σ_k F_k (θ_k - θ⁰_k)² (diagonal Fisher anchor). Niu et al., ICML 2022.""")
REGISTRY.register("sar", entropy.sar, defaults=dict(optimizer=_SGD, e_margin_scale=0.4, rho=0.05,
                                                     reset_constant=0.2), doc="""
    SAR: reliable entropy with a SAM step ε = ρ g / ‖g‖, model recovery when the entropy EMA
    falls below the reset constant. Niu et al., ICLR 2023.""")
REGISTRY.register("cotta", mean_teacher.cotta, defaults=dict(optimizer=_ADAM, mt=0.999, rst=0.01,
                                                              ap=0.92, n_augment=32), doc="""
    CoTTA: EMA teacher θ′ ← mθ′ + (1-m)θ, augmentation-averaged targets when the anchor
    confidence < AP, stochastic restore θ ← M⊙θ_src + (1-M)⊙θ. Wang et al., CVPR 2022.""")
REGISTRY.register("rotta", mean_teacher.rotta, defaults=dict(optimizer=_ADAM, alpha=0.05, nu=0.001,
                                                              capacity=64, update_frequency=64), doc="""
    RoTTA: RobustBN, CSTU memory, timeliness-weighted teacher→student CE, θ′ ← (1-ν)θ′ + νθ.
    Yuan et al., CVPR 2023.""")
REGISTRY.register("vida", _vida, defaults=dict(
    optimizer=dict(name="adam", learning_rate=1e-4),
    adapter_optimizer=dict(name="adam", learning_rate=1e-5), rank1=1, rank2=128, mt=0.999,
    mt_vida=0.999, rst=0.1, unc_thr=0.05, n_augment=10), doc="""
    ViDA: y = Wx + s₁U₁D₁x + s₂U₂D₂x (ranks 1 / 128, U = 0 at init); u = 0.1·mean Var over 10
    augmented teacher views sets s₁ = 1∓u (s₂ as released: 1); teacher→student soft CE, EMA
    teacher, stochastic restore. Liu et al., ICLR 2024 (Yangsenqiao/vida).""")
REGISTRY.register("kff", _kff, defaults=dict(
    optimizer=dict(name="adamw", learning_rate=1e-3, kwargs=dict(weight_decay=0.01)),
    domain_optimizer=dict(name="adamw", learning_rate=0.1, kwargs=dict(weight_decay=0.01)),
    n_prompts=8, e_ood=50, e_id=1, thr_d=20.0, tau=3.0, alpha_d=0.1, n_d=20, thr_c=0.2,
    alpha_c=0.1, thr_ent=2.0, n_c=10, lam=1.0, ent_weight=3.0), doc="""
    KFF: frozen ViT + prompts. Domain pool (key [μ, σ] of CLS features): d ≤ γ_d matches,
    P_d = Σ softmax(-d/τ)·P_i, else a new prompt (50 steps); class pool (key: class
    probabilities): cos > γ_c matches, else a new prompt. L = ‖σ - σ_s‖ + λ‖μ - μ_s‖ +
    3·H; pools fused by EMA, nearest-pair and greedy max-dot merging. Zhou et al., NeurIPS
    2025, arXiv 2510.12150 (zhoujiahuan1991/NeurIPS2025-KFF).""")


def names() -> list[str]:
  return REGISTRY.names()


def _get(name: str):
  try:
    return REGISTRY.get(name)
  except KfuseError as e:
    raise KfuseError(f"method: {e}") from None


def default_config(name: str) -> dict:
  """``{'optimizer': {...} | None, 'params': {...}}`` — the registered defaults of ``name``."""
  params = dict(REGISTRY.defaults(_get(name).name))
  return {"optimizer": params.pop("optimizer"), "params": params}


def _optimizer(cfg: Any) -> optax.GradientTransformation | None:
  """An optax transformation as is; a `kfuse.optim` config (constant schedule: a stream has no length)."""
  if cfg is None or isinstance(cfg, optax.GradientTransformation):
    return cfg
  return optim.make_optimizer(cfg, total_steps=0)


def make(name: str, apply_fn: Any, *, optimizer: Any = "default", **params: Any) -> core.Adapter:
  """Build method ``name``; ``optimizer='default'`` and missing params take `default_config`.

  ``optimizer``: an optax transformation, or a `kfuse.optim` config such as
  ``dict(name="sgd", learning_rate=2.5e-4, kwargs=dict(momentum=0.9))``
  (``schedule`` must stay ``constant``, optionally after ``warmup_steps``).
  """
  entry = _get(name)
  defaults = default_config(name)
  opt_cfg = defaults["optimizer"] if isinstance(optimizer, str) and optimizer == "default" else optimizer
  kwargs = {**defaults["params"], **params}
  if defaults["optimizer"] is None:                       # gradient-free (source, bn_adapt)
    if opt_cfg is not None and optimizer != "default":
      raise KfuseError(f"optimizer: {name} has no trainable parameters; pass none")
  else:
    kwargs["optimizer"] = _optimizer(opt_cfg)
  try:
    return entry.fn(apply_fn, **kwargs)
  except TypeError as e:
    raise KfuseError(f"params: invalid parameters {sorted(params)} for TTA method {name!r}: {e}") from None
