"""Registry of the test-time adaptation methods and their SPEC §C defaults.

``make(name, apply_fn, optimizer=..., **params)`` builds an `Adapter`;
``default_config(name)`` gives the paper / reference-repository defaults in one
place (optimizer + method parameters), ``names()`` lists the methods.

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
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import optax

from kfuse.adapt import core, entropy, mean_teacher, norm
from kfuse.tree import KfuseError

__all__ = ["METHODS", "names", "default_config", "make", "make_optimizer"]

_OPTIMIZERS = ("adam", "adamw", "sgd")

METHODS: dict[str, Callable[..., core.Adapter]] = {
    "source": norm.source,
    "bn_adapt": norm.bn_adapt,
    "tent": entropy.tent,
    "eta": entropy.eta,
    "eata": entropy.eata,
    "sar": entropy.sar,
    "cotta": mean_teacher.cotta,
    "rotta": mean_teacher.rotta,
}

_DEFAULTS: dict[str, dict] = {
    "source": dict(optimizer=None, params={}),
    "bn_adapt": dict(optimizer=None, params=dict(prior=0.0)),
    "tent": dict(optimizer=dict(name="adam", learning_rate=1e-3), params=dict(steps=1, episodic=False)),
    "eta": dict(optimizer=dict(name="sgd", learning_rate=2.5e-4, momentum=0.9),
                params=dict(e_margin_scale=0.4, d_margin=0.05)),
    "eata": dict(optimizer=dict(name="sgd", learning_rate=2.5e-4, momentum=0.9),
                 params=dict(e_margin_scale=0.4, d_margin=0.05, fisher_alpha=2000.0)),
    "sar": dict(optimizer=dict(name="sgd", learning_rate=2.5e-4, momentum=0.9),
                params=dict(e_margin_scale=0.4, rho=0.05, reset_constant=0.2)),
    "cotta": dict(optimizer=dict(name="adam", learning_rate=1e-3),
                  params=dict(mt=0.999, rst=0.01, ap=0.92, n_augment=32)),
    "rotta": dict(optimizer=dict(name="adam", learning_rate=1e-3),
                  params=dict(alpha=0.05, nu=0.001, capacity=64, update_frequency=64)),
}


def names() -> list[str]:
  return list(METHODS)


def default_config(name: str) -> dict:
  """``{'optimizer': {...} | None, 'params': {...}}`` — the SPEC §C defaults of ``name``."""
  _check(name)
  return copy.deepcopy(_DEFAULTS[name])


def _check(name: str) -> None:
  if name not in METHODS:
    raise KfuseError(f"method: unknown TTA method {name!r}; known: {', '.join(METHODS)}")


def make_optimizer(cfg: Mapping[str, Any] | optax.GradientTransformation | None) -> Any:
  """An optax optimizer from ``{'name': adam|adamw|sgd, 'learning_rate', **kwargs}`` (constant lr)."""
  if cfg is None or isinstance(cfg, optax.GradientTransformation):
    return cfg
  cfg = dict(cfg)
  name = cfg.pop("name", "adam")
  if name not in _OPTIMIZERS:
    raise KfuseError(f"optimizer.name: unknown optimizer {name!r}; known: {', '.join(_OPTIMIZERS)}")
  lr = float(cfg.pop("learning_rate", 1e-3))
  if lr <= 0:
    raise KfuseError(f"optimizer.learning_rate: must be positive, got {lr}")
  try:
    return getattr(optax, name)(lr, **cfg)
  except TypeError as e:
    raise KfuseError(f"optimizer: invalid arguments {sorted(cfg)} for {name!r}: {e}") from None


def make(name: str, apply_fn: Any, *, optimizer: Any = "default", **params: Any) -> core.Adapter:
  """Build method ``name``; ``optimizer='default'`` and missing params take `default_config`."""
  _check(name)
  defaults = default_config(name)
  opt_cfg = defaults["optimizer"] if isinstance(optimizer, str) and optimizer == "default" else optimizer
  kwargs = {**defaults["params"], **params}
  if name in ("source", "bn_adapt"):
    if opt_cfg is not None and optimizer != "default":
      raise KfuseError(f"optimizer: {name} has no trainable parameters; pass none")
  else:
    kwargs["optimizer"] = make_optimizer(opt_cfg)
  try:
    return METHODS[name](apply_fn, **kwargs)
  except TypeError as e:
    raise KfuseError(f"params: invalid parameters {sorted(params)} for TTA method {name!r}: {e}") from None
