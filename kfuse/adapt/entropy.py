"""Entropy-minimization methods: Tent, ETA / EATA and SAR.

All three update only the affine parameters of the normalization layers
(``trainable="norm"``), force BatchNorm to test-batch statistics, and return the
student's *pre-update* logits of the forward pass that computed the update.

* `tent` — Wang et al., *Tent: Fully test-time adaptation by entropy
  minimization*, ICLR 2021 (DequanWang/tent). Per batch, one gradient step on
  ``L = mean_i H(softmax(f(x_i)))``. Defaults: Adam lr 1e-3, steps 1,
  episodic False. Reproduces CIFAR-10-C sev-5 18.6 (reset per corruption) /
  20.0 (continual) with WRN-28-10, bs 200.
* `eata` / `eta` — Niu et al., *Efficient test-time model adaptation without
  forgetting*, ICML 2022 (mr-eggplant/EATA). Sample mask
  ``m_i = [E_i < E0] · [|cos(p̄, p_i)| < ε]`` (the second factor only once p̄
  exists), weights ``c_i = exp(-(E_i - E0))`` (no gradient), loss
  ``Σ m_i c_i E_i / Σ m_i  +  α Σ_k F_k (θ_k - θ⁰_k)²`` (EATA; ETA: α = 0), and
  ``p̄ ← 0.9 p̄ + 0.1 mean_{m_i=1} p_i``. The update is skipped when no sample
  survives. Defaults (official): E0 = 0.4 ln C, ε = 0.05, α = 2000, SGD 2.5e-4
  momentum 0.9; the benchmark's CIFAR-10 setting is Adam 1e-3, α = 1, ε = 0.4
  (17.9 continual).
* `sar` — Niu et al., *Towards stable test-time adaptation in dynamic wild
  world*, ICLR 2023 (mr-eggplant/SAR). Reliable entropy
  ``L1 = mean_{E_i < E0} E_i``; SAM ascent ``ε = ρ g / (‖g‖ + 1e-12)``; at
  ``θ + ε``: ``L2 = mean_{E_i < E0, E'_i < E0} E'_i``; base-optimizer step at θ
  with ``∇L2(θ + ε)``; ``ema ← 0.9 ema + 0.1 L2`` (skipped when L2 is empty) and
  model recovery (the parameters back to the source; as in the official code, the moving
  average and the base optimizer's state survive it) when ``ema < 0.2``. Defaults: E0 = 0.4 ln C,
  ρ = 0.05, SGD 2.5e-4 momentum 0.9.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from kfuse.adapt import core
from kfuse.tree import KfuseError

PyTree = Any

__all__ = [
    "TentState", "EataState", "SarState", "SAR_EXCLUDE",
    "tent", "eata", "eta", "sar", "fisher_information", "entropy_margin",
]

# SAR freezes the top of the network: ResNet layer4, ViT blocks 9-11 and the final norm.
SAR_EXCLUDE = (r"(^|/)layer4", r"(^|/)blocks[._/]?(9|10|11)(/|$)", r"(^|/)norm(/|$)")


def entropy_margin(num_classes: int, scale: float = 0.4) -> float:
  """``E0 = scale · ln C`` (EATA / SAR: 0.4 ln 1000 on ImageNet)."""
  return float(scale) * math.log(num_classes)


def _batch_entropy(apply_fn, variables, x, apply_kwargs) -> tuple[jax.Array, jax.Array]:
  """(H(softmax(f(x))) per sample, logits) with the test batch's BatchNorm statistics: the
  entropy every method of this module minimises (Tent, EATA / ETA, SAR)."""
  logits, _ = core.forward(apply_fn, variables, x, norm="batch", apply_kwargs=apply_kwargs)
  return core.entropy(logits), logits


def _num_classes(logits: jax.Array) -> int:
  return int(logits.shape[-1])


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """``Σ mask·v / max(Σ mask, 1)`` (an empty selection gives 0 with zero gradient)."""
  m = mask.astype(values.dtype)
  return jnp.sum(m * values) / jnp.maximum(jnp.sum(m), 1.0)


# ------------------------------------------------------------------ Tent


class TentState(NamedTuple):
  """Tent state.

  Attributes:
    variables: current model variables (only the trainable subset of ``params`` changes).
    opt_state: optimizer state over the flat trainable subset ``{path: leaf}``.
    source: the source variables (the reset target).
    count: number of steps taken since the last reset.
  """
  variables: PyTree
  opt_state: PyTree
  source: PyTree
  count: jax.Array


def tent(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
         steps: int = 1, episodic: bool = False, trainable: Any = "norm",
         exclude: Sequence[str] = (), apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """Tent: minimize ``mean_i H(softmax(f(x_i)))`` over norm-layer scale/shift, BN on batch stats.

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    optimizer: optax optimizer (default ``optax.adam(1e-3)``, Tent's CIFAR setting).
    steps: gradient steps per batch (the returned logits are those of the last forward).
    episodic: reset to the source before every batch.
    trainable: parameter selection (`core.Trainable` / `core.trainable_paths`); ``"bn"`` is the official
      Tent (BatchNorm only), ``"norm"`` the benchmark's (BN/LN/GN).
    exclude: regexes of parameters to freeze.
    apply_kwargs: extra keyword arguments for ``apply_fn``.
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx = optimizer if optimizer is not None else optax.adam(1e-3)
  if int(steps) < 1:
    raise KfuseError(f"steps: must be >= 1, got {steps}")

  sel = core.Trainable(trainable, tuple(exclude))

  def fresh(source):
    return TentState(source, sel.init(tx, source), source, jnp.zeros((), jnp.int32))

  def reset(state: TentState) -> TentState:
    return fresh(state.source)

  def step(state: TentState, x, key):
    del key
    finite = core.is_finite(x)
    start = reset(state) if episodic else state

    def loss_fn(v):
      ent, logits = _batch_entropy(apply_fn, v, x, apply_kwargs)
      return ent.mean(), logits

    variables, opt_state = start.variables, start.opt_state
    for _ in range(int(steps)):
      (loss, logits), grads = sel.value_and_grad(loss_fn, variables)
      variables, opt_state = sel.update(tx, grads, opt_state, variables)
    new = TentState(variables, opt_state, start.source, start.count + 1)
    new = core.guard(finite, new, state)
    return new, logits, {"loss": loss, "skipped": 1.0 - finite.astype(jnp.float32)}

  return core.adapter("tent", core.make_init("tent", lambda v, _: fresh(v), step), step, reset)


# ------------------------------------------------------------------ EATA / ETA


class EataState(NamedTuple):
  """EATA state.

  Attributes:
    variables, opt_state, source, count: as `TentState`.
    probs: p̄, the moving average of the selected samples' predictions ``[C]``.
    has_probs: whether p̄ exists yet (the redundancy filter is off until then).
    fisher: ``{path: F}`` diagonal Fisher information of the trainable subset (empty for ETA).
    anchor: ``{path: θ⁰}`` the source values the EWC term pulls towards.
  """
  variables: PyTree
  opt_state: PyTree
  source: PyTree
  probs: jax.Array
  has_probs: jax.Array
  fisher: PyTree
  anchor: PyTree
  count: jax.Array


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Row-wise cosine similarity of ``a [C]`` with ``b [B, C]`` (PyTorch's eps clamp).

  ``max(‖v‖, eps)`` as ``sqrt(max(‖v‖², eps²))``: the same value, a finite gradient
  at ``v = 0`` (``‖·‖`` itself has none there).
  """
  na = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a)), eps * eps))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(b), axis=-1), eps * eps))
  return (b @ a) / (na * nb)


def eata(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
         e_margin: float | None = None, e_margin_scale: float = 0.4, d_margin: float = 0.05,
         fisher_alpha: float = 2000.0, probs_decay: float = 0.9, episodic: bool = False,
         trainable: Any = "norm", exclude: Sequence[str] = (),
         apply_kwargs: Mapping[str, Any] | None = None, name: str = "eata") -> core.Adapter:
  """EATA: reliable + non-redundant, entropy-weighted entropy minimization with an EWC anchor.

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    optimizer: default ``optax.sgd(2.5e-4, momentum=0.9)`` (official ImageNet setting).
    e_margin: E0; None → ``e_margin_scale · ln C`` (C from the logits).
    e_margin_scale: 0.4 (EATA ``main.py``).
    d_margin: ε of the redundancy filter ``|cos(p̄, p_i)| < ε``.
    fisher_alpha: α of ``α Σ F (θ - θ⁰)²``; 0 gives ETA. With α > 0, ``init`` needs
      ``fisher=`` (see `fisher_information`).
    probs_decay: decay of the p̄ moving average (0.9).
    episodic, trainable, exclude, apply_kwargs: as `tent`.
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx = optimizer if optimizer is not None else optax.sgd(2.5e-4, momentum=0.9)
  if fisher_alpha < 0:
    raise KfuseError(f"fisher_alpha: must be >= 0, got {fisher_alpha}")
  if d_margin <= 0:
    raise KfuseError(f"d_margin: must be > 0, got {d_margin}")

  sel = core.Trainable(trainable, tuple(exclude))

  def fresh(source, fisher, num_classes):
    return EataState(source, sel.init(tx, source), source, jnp.zeros((num_classes,), jnp.float32),
                     jnp.zeros((), bool), fisher, sel.get(source), jnp.zeros((), jnp.int32))

  def build(variables, example, *, fisher=None):
    paths = sel.paths(variables)
    if fisher_alpha > 0:
      if fisher is None:
        raise KfuseError(f"fisher: {name} with fisher_alpha={fisher_alpha} needs fisher="
                         " (kfuse.adapt.fisher_information); use eta or fisher_alpha=0 without it")
      missing = [p for p in paths if p not in fisher]
      if missing:
        raise KfuseError(f"fisher: no entry for trainable parameter {missing[0]!r}")
      fisher = {p: jnp.asarray(fisher[p], jnp.float32) for p in paths}
    else:
      fisher = {}
    out = jax.eval_shape(lambda v, x: core.forward(apply_fn, v, x, norm="source",
                                                    apply_kwargs=apply_kwargs)[0], variables, example)
    return fresh(variables, fisher, _num_classes(out))

  def reset(state: EataState) -> EataState:
    return fresh(state.source, state.fisher, state.probs.shape[0])

  def step(state: EataState, x, key):
    del key
    finite = core.is_finite(x)
    start = reset(state) if episodic else state

    def loss_fn(v):
      ent, logits = _batch_entropy(apply_fn, v, x, apply_kwargs)
      e0 = e_margin if e_margin is not None else entropy_margin(_num_classes(logits), e_margin_scale)
      ent_sg = jax.lax.stop_gradient(ent)
      probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
      reliable = ent_sg < e0
      cos = _cosine(start.probs, probs)
      redundant_ok = jnp.where(start.has_probs, jnp.abs(cos) < d_margin, True)
      mask = reliable & redundant_ok
      coeff = jnp.exp(-(ent_sg - e0))                       # 1 / exp(E - E0)
      loss = _masked_mean(ent * coeff, mask)
      if fisher_alpha > 0:
        sub = sel.get(v)
        ewc = sum(jnp.sum(start.fisher[p] * jnp.square(sub[p] - start.anchor[p])) for p in sub)
        loss = loss + fisher_alpha * ewc
      return loss, (logits, probs, reliable, mask)

    (loss, (logits, probs, reliable, mask)), grads = sel.value_and_grad(loss_fn, start.variables)
    n_sel = jnp.sum(mask)
    take = n_sel > 0                                        # EATA skips the step when nothing survives
    variables, opt_state = sel.update(tx, grads, start.opt_state, start.variables, take)
    sel_mean = jnp.sum(mask[:, None] * probs, 0) / jnp.maximum(n_sel, 1)
    new_probs = jnp.where(start.has_probs, probs_decay * start.probs + (1 - probs_decay) * sel_mean,
                          sel_mean)
    probs_bar = jnp.where(take, new_probs, start.probs)
    new = EataState(variables, opt_state, start.source, probs_bar, start.has_probs | take,
                    start.fisher, start.anchor, start.count + 1)
    new = core.guard(finite, new, state)
    metrics = {"loss": loss, "num_reliable": jnp.sum(reliable).astype(jnp.float32),
               "num_selected": n_sel.astype(jnp.float32),
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return new, logits, metrics

  return core.adapter(name, core.make_init(name, build, step), step, reset)


def eta(apply_fn: Any, optimizer: optax.GradientTransformation | None = None,
        **kwargs: Any) -> core.Adapter:
  """ETA: `eata` without the Fisher anti-forgetting term (``fisher_alpha=0``)."""
  if "fisher_alpha" in kwargs:
    raise KfuseError("fisher_alpha: eta has no Fisher term; use eata")
  return eata(apply_fn, optimizer, fisher_alpha=0.0, name="eta", **kwargs)


def fisher_information(apply_fn: Any, variables: PyTree, batches: Any, *,
                       trainable: Any = "norm", exclude: Sequence[str] = (),
                       apply_kwargs: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
  """EATA's diagonal Fisher: ``F_k = mean_batches (∂/∂θ_k CE(f(x), argmax f(x)))²``.

  The cross-entropy of each batch is its mean over samples, with BatchNorm on
  batch statistics (EATA computes it on ``fisher_size`` = 2000 clean samples,
  batch 64). Returns ``{path: F}`` over the trainable subset.

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    variables: the source variables.
    batches: iterable of input batches ``[B, ...]`` (clean / source-like data).
  """
  apply_fn = core.as_apply_fn(apply_fn)
  sel = core.Trainable(trainable, tuple(exclude))
  sel.paths(variables)                                  # refuse an empty selection up front

  @jax.jit
  def sq_grad(variables, x):
    def loss_fn(v):
      logits, _ = core.forward(apply_fn, v, x, norm="batch", apply_kwargs=apply_kwargs)
      labels = jnp.argmax(jax.lax.stop_gradient(logits), -1)
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    _, g = sel.value_and_grad(loss_fn, variables, has_aux=False)
    return jax.tree.map(jnp.square, g)

  total, n = None, 0
  for x in batches:
    core.check_inputs(jnp.asarray(x)[None], "fisher batches")
    g2 = sq_grad(variables, jnp.asarray(x))
    total = g2 if total is None else jax.tree.map(jnp.add, total, g2)
    n += 1
  if n == 0:
    raise KfuseError("batches: fisher_information needs at least one batch")
  return jax.tree.map(lambda t: t / n, total)


# ------------------------------------------------------------------ SAR


class SarState(NamedTuple):
  """SAR state.

  Attributes:
    variables, opt_state, source, count: as `TentState`.
    ema: moving average of the second-pass reliable entropy (the collapse detector).
    has_ema: whether ``ema`` holds a value yet.
    num_resets: how many times model recovery fired.
  """
  variables: PyTree
  opt_state: PyTree
  source: PyTree
  ema: jax.Array
  has_ema: jax.Array
  num_resets: jax.Array
  count: jax.Array


def sar(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
        e_margin: float | None = None, e_margin_scale: float = 0.4, rho: float = 0.05,
        reset_constant: float = 0.2, ema_decay: float = 0.9, clear_ema_on_reset: bool = False,
        keep_optimizer_on_reset: bool = True, episodic: bool = False, trainable: Any = "norm",
        exclude: Sequence[str] = SAR_EXCLUDE,
        apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """SAR: sharpness-aware, reliable entropy minimization with model recovery.

  Args:
    apply_fn: Flax ``Module`` or its ``apply``.
    optimizer: the base optimizer (default ``optax.sgd(2.5e-4, momentum=0.9)``).
    e_margin: E0; None → ``e_margin_scale · ln C``.
    rho: SAM radius ρ.
    reset_constant: recover (reset to the source) when ``ema < reset_constant``.
    ema_decay: decay of the entropy moving average (0.9).
    clear_ema_on_reset: the official ``SAR.forward`` calls ``reset()`` (which clears
      ``ema``) and then re-assigns the returned ``ema``, so the moving average
      *survives* a recovery; False (default) reproduces that, True clears it.
    keep_optimizer_on_reset: the official recovery reloads the *SAM wrapper's* state dict,
      which does not reach the base optimizer's state (``SAM.base_optimizer.state``), so
      SGD's momentum buffer survives a recovery; True (default) reproduces that, False
      restarts the optimizer state with the model.
    exclude: frozen parameters (default `SAR_EXCLUDE`: ResNet layer4, ViT blocks
      9-11, the final norm); pass the equivalent names of your model.
    episodic, trainable, apply_kwargs: as `tent`.
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx = optimizer if optimizer is not None else optax.sgd(2.5e-4, momentum=0.9)
  if rho < 0:
    raise KfuseError(f"rho: must be >= 0, got {rho}")

  sel = core.Trainable(trainable, tuple(exclude))

  def fresh(source, ema=None, has_ema=None, num_resets=None):
    return SarState(source, sel.init(tx, source), source,
                    jnp.zeros((), jnp.float32) if ema is None else ema,
                    jnp.zeros((), bool) if has_ema is None else has_ema,
                    jnp.zeros((), jnp.int32) if num_resets is None else num_resets,
                    jnp.zeros((), jnp.int32))

  def reset(state: SarState) -> SarState:
    return fresh(state.source)

  def step(state: SarState, x, key):
    del key
    finite = core.is_finite(x)
    start = reset(state) if episodic else state

    def entropies(v):
      return _batch_entropy(apply_fn, v, x, apply_kwargs)

    def first(v):
      ent, logits = entropies(v)
      e0 = e_margin if e_margin is not None else entropy_margin(_num_classes(logits), e_margin_scale)
      mask = jax.lax.stop_gradient(ent) < e0
      return _masked_mean(ent, mask), (logits, mask, e0)

    (loss1, (logits, mask1, e0)), g1 = sel.value_and_grad(first, start.variables)
    gnorm = core.tree_norm(g1)                               # 0 (not NaN) for a zero gradient
    perturbed = jax.tree.map(lambda p, g: p + rho * g / (gnorm + 1e-12), sel.get(start.variables), g1)

    def second(v_adv):
      ent2, _ = entropies(v_adv)
      mask2 = mask1 & (jax.lax.stop_gradient(ent2) < e0)
      return _masked_mean(ent2, mask2), mask2

    (loss2, mask2), g2 = sel.value_and_grad(second, sel.put(start.variables, perturbed))
    variables, opt_state = sel.update(tx, g2, start.opt_state, start.variables)
    n2 = jnp.sum(mask2)
    # PyTorch's mean over an empty selection is NaN and the EMA update is skipped.
    new_ema = jnp.where(start.has_ema, ema_decay * start.ema + (1 - ema_decay) * loss2, loss2)
    ema_val = jnp.where(n2 > 0, new_ema, start.ema)
    has_ema = start.has_ema | (n2 > 0)
    updated = SarState(variables, opt_state, start.source, ema_val, has_ema, start.num_resets,
                       start.count + 1)
    recover = has_ema & (ema_val < reset_constant)
    recovered = fresh(start.source,
                      None if clear_ema_on_reset else ema_val,
                      None if clear_ema_on_reset else has_ema,
                      start.num_resets + 1)
    if keep_optimizer_on_reset:
      recovered = recovered._replace(opt_state=opt_state)
    new = core.tree_where(recover, recovered, updated)
    new = core.guard(finite, new, state)
    metrics = {"loss": loss1, "loss_second": loss2, "ema": ema_val,
               "num_reliable": jnp.sum(mask1).astype(jnp.float32),
               "num_selected": n2.astype(jnp.float32), "reset": recover.astype(jnp.float32),
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return new, logits, metrics

  return core.adapter("sar", core.make_init("sar", lambda v, _: fresh(v), step), step, reset)
