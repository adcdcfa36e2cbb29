"""KFF: class-aware domain knowledge fusion and fission for continual test-time adaptation.

Zhou et al., *Class-aware Domain Knowledge Fusion and Fission for Continual Test-Time
Adaptation*, NeurIPS 2025 (arXiv 2510.12150; zhoujiahuan1991/NeurIPS2025-KFF ``ours.py``,
``vpt.py``, ``conf.py``, ``cfgs/cifar10.yaml``, ``cfgs/ours.yaml``).

The source ViT is frozen; only prompt tokens learn. Two prompt pools hold the knowledge:
a **domain pool** of (key Γ_i = [μ_i, σ_i] of CLS features, prompt P_i ∈ R^{L_d×D}), at
most N_d entries, and a **class pool** of (key y_i = a class-probability vector, prompt
P_i ∈ R^{1×D}), at most N_c entries. Per test batch B (``Ours.forward``):

1. raw forward (no prompts): CLS features z_t and logits; batch key
   Γ = [mean_t z_t, std_t z_t] (unbiased std).
2. **domain fission** (KFI): d_i = ‖Γ - Γ_i‖₂; entries with d_i ≤ γ_d match, with weights
   w = softmax(-d/τ_d) over them and prompt P_d = Σ_i w_i P_i ("in-domain"). No match
   (or an empty pool): a new domain, P_d = the initial prompt P⁰ (``PromptViT.reset``).
3. **class fission**: for each sample, s_ti = cos(softmax(logits_t), y_i); entries with
   s_ti > γ_c match, weights softmax(s_t) over them, P_t = Σ_i w_ti P_i; no match (or an
   empty pool): a new prompt P_t ~ U(-v, v), v = √(6 / (fan_in(patch) + D)) (VPT's init).
4. tokens [CLS, P_t, P_d, patches] (prompts after CLS, ``PromptViT.forward_features``);
   loss ``L = ‖σ(z) - σ_s‖₂ + λ‖μ(z) - μ_s‖₂ + a · mean_t H(softmax(f(x_t)))`` (source
   statistics σ_s, μ_s of clean CLS features; a = 3, λ = 1). The domain prompt takes
   E steps of a fresh AdamW (lr 0.1), E = 1 in-domain, E = E_OOD = 50 for a new domain;
   the class prompts take one step of a fresh AdamW (lr 1e-3) with the gradient of the
   last of those E losses. The online prediction is the last forward's logits (before
   its update).
5. **domain fusion** (KFU): in-domain, every entry moves towards the batch:
   Γ_i ← Γ_i + α_d w_i (Γ - Γ_i), P_i ← P_i + w_i (P_d* - P_i); a new domain appends
   (Γ, P_d*) and, when the pool exceeds N_d, the nearest pair (‖Γ_i - Γ_j‖₂) is replaced
   by its average.
6. **class fusion**: samples with H(softmax(f(x_t))) ≤ γ_h update the class pool in batch
   order: a new prompt is appended with key softmax(f(x_t)); a composed one moves every
   entry it was composed of, y_i ← y_i + α_c w_ti (softmax(f(x_t)) - y_i),
   P_i ← P_i + w_ti (P_t* - P_i). When the pool exceeds N_c, the **greedy merge**
   (``cls_prompt_gen.delete_cls_prompt``): pairs sorted by y_i·y_j (descending) join
   clusters, Kruskal-style, until N_c clusters remain; each cluster becomes the average
   of its keys and prompts (kept at the slot of its first member).

Pools are fixed slots with a valid mask, kept compact in insertion order, so the step is
one jitted program (no dynamic shapes). Where the paper and the release differ, the
release is followed: the class pool's clusters come from the greedy Kruskal pass over key
*dot products* (the paper: an MST over cosine similarities), and L_d is the release's
``distribution_loss`` (unsquared norms, λ on the mean term).
Thresholds γ_d and the source statistics are in the model's feature units (the released
γ_d = 20 is for ViT-B/16 features, D = 768).

The model: a ViT whose CLS token (index 0 of the token sequence) is read by a final
Dense head, e.g. `kfuse.models.vit` with ``pool='cls'``. ``inject`` names the first
transformer block (its input gets the prompts), ``head`` the classifier's Dense layer
(its input is z). Both are found by Flax method interception; the model needs no edit.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfuse import optim
from kfuse.adapt import core
from kfuse.tree import KfuseError, flatten

PyTree = Any

__all__ = ["KffState", "PromptPool", "kff", "prompt_forward", "source_statistics", "batch_key",
           "distribution_loss", "domain_match", "class_match", "domain_fuse", "class_update",
           "class_merge", "empty_pool"]

RELEASED_ENTROPY_MAX = math.log(1000) / 2 - 1
"""``obtain_src_stat`` keeps clean samples with entropy below ln(1000)/2 - 1 (as released)."""


class PromptPool(NamedTuple):
  """A prompt pool: ``keys [S, K]``, ``prompts [S, ...]``, ``valid [S]`` (a prefix: compact)."""
  keys: jax.Array
  prompts: jax.Array
  valid: jax.Array


class KffState(NamedTuple):
  """KFF state.

  Attributes:
    variables: the frozen source model.
    src_std, src_mean: σ_s, μ_s of the clean CLS features.
    prompt_init: P⁰ ``[L_d, D]``, the domain prompt of a new domain.
    bound: v, the uniform bound of new class prompts.
    domain, classes: the two pools (capacities N_d + 1 and N_c + batch).
    count: steps since the last reset.
  """
  variables: PyTree
  src_std: jax.Array
  src_mean: jax.Array
  prompt_init: jax.Array
  bound: jax.Array
  domain: PromptPool
  classes: PromptPool
  count: jax.Array


def empty_pool(capacity: int, key_dim: int, prompt_shape: tuple) -> PromptPool:
  return PromptPool(jnp.zeros((capacity, key_dim), jnp.float32),
              jnp.zeros((capacity,) + tuple(prompt_shape), jnp.float32),
              jnp.zeros((capacity,), bool))


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.scope.path)


def prompt_forward(apply_fn: Callable, variables: PyTree, x: jax.Array,
                   tokens: jax.Array | None, *, inject: str = "backbone/layers_0",
                   head: str = "head",
                   apply_kwargs: Mapping[str, Any] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(logits, z)``: the model with ``tokens [B, T, D]`` inserted after the CLS token of the
  input of module ``inject``; ``z`` is the input of the ``head`` module (the CLS feature).
  ``tokens=None``: the plain model (``forward_raw_features``)."""
  seen: dict[str, jax.Array] = {}

  def intercept(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      path = _path(context.module)
      if path == inject:
        seen["inject"] = args[0]
        if tokens is not None:
          h = args[0]
          args = (jnp.concatenate([h[:, :1], tokens.astype(h.dtype), h[:, 1:]], axis=1),
                  ) + tuple(args[1:])
      elif path == head:
        seen["z"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    logits = apply_fn(variables, x, **dict(apply_kwargs or {}))
  for what, name in (("inject", inject), ("z", head)):
    if what not in seen:
      raise KfuseError(f"model: kff found no module {name!r} (inject= the first transformer"
                       f" block, head= the classifier Dense); module paths look like"
                       f" 'backbone/layers_0', 'head'")
  if seen["inject"].ndim != 3:
    raise KfuseError(f"model: kff's inject module {inject!r} takes {seen['inject'].shape};"
                     " expected tokens [B, N, D]")
  return logits, seen["z"]


def batch_key(z: jax.Array) -> jax.Array:
  """Γ = [mean_t z_t, std_t z_t] (unbiased std; ``DomainExtractor``)."""
  z = z.astype(jnp.float32)
  return jnp.concatenate([z.mean(0), z.std(0, ddof=1)])


def _norm(v: jax.Array) -> jax.Array:
  """‖v‖₂ with a finite gradient at 0."""
  sq = jnp.sum(jnp.square(v))
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def distribution_loss(z: jax.Array, src_std: jax.Array, src_mean: jax.Array,
                      lam: float = 1.0) -> jax.Array:
  """``L_d = ‖σ(z) - σ_s‖₂ + λ‖μ(z) - μ_s‖₂`` (unbiased σ over the batch; ``distribution_loss``)."""
  z = z.astype(jnp.float32)
  return _norm(z.std(0, ddof=1) - src_std) + lam * _norm(z.mean(0) - src_mean)


def domain_match(pool: PromptPool, key: jax.Array, thr: float, tau: float):
  """``(weights [S], in_domain, P_d)``: w = softmax(-d/τ) over the entries with d ≤ γ_d."""
  d = jnp.sqrt(jnp.sum(jnp.square(pool.keys - key[None]), axis=-1))
  ok = pool.valid & (d <= thr)
  logits = jnp.where(ok, -d / tau, -jnp.inf)
  w = jnp.where(ok, jax.nn.softmax(jnp.where(ok, logits, -1e30)), 0.0)
  w = jnp.where(ok.any(), w, 0.0)
  return w, ok.any(), jnp.tensordot(w, pool.prompts, axes=1)


def class_match(pool: PromptPool, probs: jax.Array, thr: float):
  """``(weights [B, S], new [B])``: w_t = softmax(s_t) over entries with cos similarity > γ_c."""
  num = probs @ pool.keys.T
  den = (jnp.linalg.norm(probs, axis=-1)[:, None] * jnp.linalg.norm(pool.keys, axis=-1)[None])
  s = num / jnp.maximum(den, 1e-8)
  ok = pool.valid[None] & (s > thr)
  w = jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1)
  new = ~ok.any(-1)
  return jnp.where(ok & ~new[:, None], w, 0.0), new


def _compact(pool: PromptPool, keep: jax.Array) -> PromptPool:
  """Keep the ``keep`` slots in their order, moved to the front."""
  idx = jnp.arange(keep.shape[0])
  perm = jnp.argsort(jnp.where(keep, idx, idx + keep.shape[0]), stable=True)
  return PromptPool(pool.keys[perm], pool.prompts[perm], keep[perm])


def _append(pool: PromptPool, key: jax.Array, prompt: jax.Array, do: jax.Array) -> PromptPool:
  i = jnp.sum(pool.valid)
  return PromptPool(jnp.where(do, pool.keys.at[i].set(key), pool.keys),
              jnp.where(do, pool.prompts.at[i].set(prompt), pool.prompts),
              jnp.where(do, pool.valid.at[i].set(True), pool.valid))


def _merge_nearest(pool: PromptPool) -> PromptPool:
  """``PromptBase.delete``: the pair (i < j) with the smallest ‖Γ_i - Γ_j‖₂ becomes its average."""
  s = pool.keys.shape[0]
  d = jnp.sqrt(jnp.sum(jnp.square(pool.keys[:, None] - pool.keys[None]), axis=-1))
  upper = jnp.triu(jnp.ones((s, s), bool), 1) & pool.valid[:, None] & pool.valid[None]
  flat = jnp.argmin(jnp.where(upper, d, jnp.inf).reshape(-1))
  i, j = flat // s, flat % s
  keys = pool.keys.at[i].set((pool.keys[i] + pool.keys[j]) / 2)
  prompts = pool.prompts.at[i].set((pool.prompts[i] + pool.prompts[j]) / 2)
  return _compact(PromptPool(keys, prompts, pool.valid), pool.valid & (jnp.arange(s) != j))


def domain_fuse(pool: PromptPool, weights: jax.Array, in_domain: jax.Array, key: jax.Array,
                prompt: jax.Array, alpha: float, max_len: int) -> PromptPool:
  """Algorithm 2: in-domain, Γ_i += α w_i (Γ - Γ_i), P_i += w_i (P* - P_i); else append (Γ, P*)
  and merge the nearest pair while the pool holds more than ``max_len``."""
  w = weights[:, None]
  moved = PromptPool(pool.keys + alpha * w * (key[None] - pool.keys),
               pool.prompts + weights.reshape((-1,) + (1,) * (pool.prompts.ndim - 1))
               * (prompt[None] - pool.prompts), pool.valid)
  added = _append(pool, key, prompt, jnp.asarray(True))
  added = jax.lax.cond(jnp.sum(added.valid) > max_len, _merge_nearest, lambda p: p, added)
  return jax.tree.map(lambda a, b: jnp.where(in_domain, a, b), moved, added)


def class_update(pool: PromptPool, logits: jax.Array, prompts: jax.Array, weights: jax.Array,
                 new: jax.Array, thr_ent: float, alpha: float) -> PromptPool:
  """Algorithm 1's update, sample by sample: skip H > γ_h; a new prompt is appended with key
  softmax(f(x_t)); a composed one moves each entry i: y_i += α w_ti (p_t - y_i),
  P_i += w_ti (P_t* - P_i)."""
  ent = core.entropy(logits)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def one(p, t):
    use = ent[t] <= thr_ent
    w = weights[t][:, None]
    wp = weights[t].reshape((-1,) + (1,) * (p.prompts.ndim - 1))
    moved = PromptPool(p.keys + alpha * w * (probs[t][None] - p.keys),
                 p.prompts + wp * (prompts[t][None] - p.prompts), p.valid)
    moved = jax.tree.map(lambda a, b: jnp.where(use & ~new[t], a, b), moved, p)
    return _append(moved, probs[t], prompts[t], use & new[t]), None

  pool, _ = jax.lax.scan(one, pool, jnp.arange(logits.shape[0]))
  return pool


def class_merge(pool: PromptPool, max_num: int) -> PromptPool:
  """``cls_prompt_gen.delete_cls_prompt``: greedy clustering to ``max_num`` entries.

  Pairs (i < j) sorted by y_i·y_j, descending (ties in (i, j) order), are taken in turn
  while more than ``max_num`` clusters remain: two free entries open a cluster (kept at
  slot i), a free entry joins the other's cluster, two clusters join (the older one
  stays). Each cluster becomes the average of its members' keys and prompts.
  """
  s = pool.keys.shape[0]
  ii, jj = (jnp.asarray(a) for a in np.triu_indices(s, 1))
  pair_ok = pool.valid[ii] & pool.valid[jj]
  score = jnp.where(pair_ok, jnp.sum(pool.keys[ii] * pool.keys[jj], -1), -jnp.inf)
  order = jnp.argsort(-score, stable=True)

  def body(k, carry):
    label, rep, nxt, n = carry
    p = order[k]
    a, b = ii[p], jj[p]
    ok = pair_ok[p] & (n > max_num)
    la, lb = label[a], label[b]
    both_free, a_free, b_free = (la < 0) & (lb < 0), (la < 0) & (lb >= 0), (la >= 0) & (lb < 0)
    join = (la >= 0) & (lb >= 0) & (la != lb)
    keep, drop = jnp.minimum(la, lb), jnp.maximum(la, lb)
    new = jnp.where(both_free, label.at[a].set(nxt).at[b].set(nxt),
                    jnp.where(a_free, label.at[a].set(lb),
                              jnp.where(b_free, label.at[b].set(la),
                                        jnp.where(join & (label == drop), keep, label))))
    merged = ok & (both_free | a_free | b_free | join)
    label = jnp.where(ok, new, label)
    rep = jnp.where(ok & both_free, rep.at[nxt].set(a), rep)
    return label, rep, nxt + (ok & both_free), n - merged

  init = (jnp.full((s,), -1), jnp.zeros((s,), jnp.int32), jnp.zeros((), jnp.int32),
          jnp.sum(pool.valid))
  label, rep, _, _ = jax.lax.fori_loop(0, ii.shape[0], body, init)
  member = (label[None, :] == jnp.arange(s)[:, None]).astype(jnp.float32)      # [cluster, slot]
  size = jnp.maximum(member.sum(1), 1.0)
  mean_k = (member @ pool.keys) / size[:, None]
  flat_p = pool.prompts.reshape(s, -1)
  mean_p = ((member @ flat_p) / size[:, None]).reshape(pool.prompts.shape)
  lab = jnp.maximum(label, 0)
  is_rep = (label >= 0) & (rep[lab] == jnp.arange(s))
  keys = jnp.where(is_rep[:, None], mean_k[lab], pool.keys)
  prompts = jnp.where(is_rep.reshape((-1,) + (1,) * (pool.prompts.ndim - 1)), mean_p[lab],
                      pool.prompts)
  return _compact(PromptPool(keys, prompts, pool.valid), pool.valid & ((label < 0) | is_rep))


def source_statistics(apply_fn: Any, variables: PyTree, batches: Iterable[Any], *,
                      inject: str = "backbone/layers_0", head: str = "head",
                      entropy_max: float = RELEASED_ENTROPY_MAX,
                      apply_kwargs: Mapping[str, Any] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(σ_s, μ_s)`` of the clean CLS features z of samples whose entropy is below
  ``entropy_max`` (``obtain_src_stat``; unbiased σ)."""
  apply_fn = core.as_apply_fn(apply_fn)
  fn = jax.jit(lambda v, x: prompt_forward(apply_fn, v, x, None, inject=inject, head=head,
                                           apply_kwargs=apply_kwargs))
  zs = []
  for x in batches:
    logits, z = fn(variables, jnp.asarray(x))
    keep = np.asarray(core.entropy(logits)) < entropy_max
    zs.append(np.asarray(z, np.float64)[keep])
  z = np.concatenate(zs) if zs else np.zeros((0, 1))
  if z.shape[0] < 2:
    raise KfuseError(f"kff.source_statistics: {z.shape[0]} clean samples passed the entropy"
                     f" filter (< {entropy_max:.3f}); need at least 2")
  return jnp.asarray(z.std(0, ddof=1), jnp.float32), jnp.asarray(z.mean(0), jnp.float32)


def _optimizer(cfg: Any, default: float) -> optax.GradientTransformation:
  if cfg is None:
    return optax.adamw(default, weight_decay=0.01)
  if isinstance(cfg, optax.GradientTransformation):
    return cfg
  return optim.make_optimizer(dict(cfg), total_steps=0)


def _init_scale(variables: PyTree, dim: int) -> float:
  """VPT's uniform bound √(6 / (fan_in + D)), fan_in of the patch embedding (3·16·16 in ViT-B/16)."""
  for path, leaf in flatten(variables["params"]).items():
    if re.search(r"patch_embed/kernel$", path):
      return math.sqrt(6.0 / (float(np.prod(leaf.shape[:-1])) + dim))
  raise KfuseError("model: kff needs a ViT with a 'patch_embed/kernel' parameter (the prompt"
                   " init scale); the model has none")


def kff(apply_fn: Any, optimizer: optax.GradientTransformation | None = None, *,
        domain_optimizer: Any = None, n_prompts: int = 8, e_ood: int = 50, e_id: int = 1,
        thr_d: float = 20.0, tau: float = 3.0, alpha_d: float = 0.1, n_d: int = 20,
        thr_c: float = 0.2, alpha_c: float = 0.1, thr_ent: float = 2.0, n_c: int = 10,
        lam: float = 1.0, ent_weight: float = 3.0, inject: str = "backbone/layers_0",
        head: str = "head", apply_kwargs: Mapping[str, Any] | None = None) -> core.Adapter:
  """KFF: domain and class prompt pools, fission by key matching, fusion by EMA and merging.

  Args:
    apply_fn: Flax ViT ``Module`` or its ``apply`` (CLS token first, a Dense ``head``).
    optimizer: the class prompts' (fresh every batch); default AdamW 1e-3, weight decay 0.01
      (``OPTIM.LR``; torch's AdamW defaults).
    domain_optimizer: the domain prompt's (fresh every batch); default AdamW 0.1, weight
      decay 0.01 (``OPTIM.LR_DOMAIN``).
    n_prompts: domain prompt length L_d (``PROMPT_NUM`` 8); class prompts have length 1.
    e_ood, e_id: domain-prompt steps for a new domain (``OPTIM.STEPS`` 50) and in-domain (1).
    thr_d, tau, alpha_d, n_d: γ_d (CIFAR-10: 20; ImageNet: 25), τ_d 3, α_d 0.1, N_d 20.
    thr_c, alpha_c, thr_ent, n_c: γ_c (CIFAR-10: 0.2; ImageNet: 0.005), α_c 0.1, γ_h 2,
      N_c (CIFAR-10: 10; ImageNet: 100).
    lam, ent_weight: λ of the mean term (``OPTIM.LAMDA`` 1) and a (3).
    inject, head: module paths of the first transformer block and of the classifier head.
    apply_kwargs: e.g. ``{"train": False}``.

  ``init(variables, batch, key, source_stats=(σ_s, μ_s))``: the key draws P⁰; the source
  statistics come from `source_statistics` on clean data.
  """
  apply_fn = core.as_apply_fn(apply_fn)
  tx_c = _optimizer(optimizer, 1e-3)
  tx_d = _optimizer(domain_optimizer, 0.1)
  for name, v in (("n_prompts", n_prompts), ("e_ood", e_ood), ("e_id", e_id), ("n_d", n_d),
                  ("n_c", n_c)):
    if int(v) < 1:
      raise KfuseError(f"{name}: must be >= 1, got {v}")
  for name, v in (("alpha_d", alpha_d), ("alpha_c", alpha_c)):
    if not 0.0 <= float(v) <= 1.0:
      raise KfuseError(f"{name}: must be in [0, 1], got {v}")
  if float(tau) <= 0:
    raise KfuseError(f"tau: must be > 0, got {tau}")

  def fwd(variables, x, tokens):
    return prompt_forward(apply_fn, variables, x, tokens, inject=inject, head=head,
                          apply_kwargs=apply_kwargs)

  def reset(state: KffState) -> KffState:
    return state._replace(domain=jax.tree.map(jnp.zeros_like, state.domain),
                          classes=jax.tree.map(jnp.zeros_like, state.classes),
                          count=jnp.zeros((), jnp.int32))

  def step(state: KffState, x, key):
    key = core.need_key(key, "kff")
    finite = core.is_finite(x)
    b = x.shape[0]
    if b < 2:
      raise KfuseError("batch: kff needs at least 2 samples per batch (batch standard"
                       " deviation of the CLS features)")
    if b > state.classes.keys.shape[0] - int(n_c):
      raise KfuseError(f"batch: kff was initialised for batches of at most"
                       f" {state.classes.keys.shape[0] - int(n_c)}, got {b}")
    v = state.variables
    raw_logits, z0 = fwd(v, x, None)
    gamma = batch_key(z0)
    w_d, in_domain, weighted = domain_match(state.domain, gamma, thr_d, tau)
    probs0 = jax.nn.softmax(raw_logits.astype(jnp.float32), axis=-1)
    w_c, new = class_match(state.classes, probs0, thr_c)
    dim = state.prompt_init.shape[-1]
    fresh = jax.random.uniform(key, (b, 1, dim), jnp.float32, -state.bound, state.bound)
    p_cls = jnp.where(new[:, None, None], fresh,
                      jnp.einsum("bs,sld->bld", w_c, state.classes.prompts))
    p_dom = jnp.where(in_domain, weighted, state.prompt_init)

    def loss_fn(pd, pc):
      tokens = jnp.concatenate([pc, jnp.broadcast_to(pd[None], (b,) + pd.shape)], axis=1)
      logits, z = fwd(v, x, tokens)
      loss = (distribution_loss(z, state.src_std, state.src_mean, lam)
              + ent_weight * core.entropy(logits).mean())
      return loss, logits

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def body(_, carry):
      pd, opt, _, _, _ = carry
      (loss, logits), (g_d, g_c) = grad_fn(pd, p_cls)
      upd, opt = tx_d.update(g_d, opt, pd)
      return optax.apply_updates(pd, upd), opt, logits.astype(jnp.float32), g_c, loss

    n_iter = jnp.where(in_domain, int(e_id), int(e_ood))
    carry = (p_dom, tx_d.init(p_dom), jnp.zeros(raw_logits.shape, jnp.float32),
             jnp.zeros_like(p_cls), jnp.zeros((), jnp.float32))
    p_dom_new, _, logits, g_c, loss = jax.lax.fori_loop(0, n_iter, body, carry)
    upd, _ = tx_c.update(g_c, tx_c.init(p_cls), p_cls)
    p_cls_new = optax.apply_updates(p_cls, upd)

    domain = domain_fuse(state.domain, w_d, in_domain, gamma, p_dom_new, alpha_d, int(n_d))
    classes = class_update(state.classes, logits, p_cls_new, w_c, new, thr_ent, alpha_c)
    classes = jax.lax.cond(jnp.sum(classes.valid) > int(n_c),
                           lambda p: class_merge(p, int(n_c)), lambda p: p, classes)
    out = state._replace(domain=domain, classes=classes, count=state.count + 1)
    out = core.guard(finite, out, state)
    metrics = {"loss": loss, "in_domain": in_domain.astype(jnp.float32),
               "new_class_prompts": new.astype(jnp.float32).mean(),
               "domain_pool": jnp.sum(out.domain.valid).astype(jnp.float32),
               "class_pool": jnp.sum(out.classes.valid).astype(jnp.float32),
               "skipped": 1.0 - finite.astype(jnp.float32)}
    return out, logits, metrics

  def init(variables, batch, key=None, source_stats=None, **kw):
    if kw:
      raise KfuseError(f"kff.init: unexpected arguments {sorted(kw)}")
    core.check_variables(variables, "kff")
    example = core.check_example(batch, "kff")
    key = core.need_key(key, "kff")        # P⁰, the initial domain prompt
    if source_stats is None:
      raise KfuseError("kff.init: pass source_stats=kfuse.adapt.kff.source_statistics(model,"
                       " variables, clean_batches) (the source CLS-feature std and mean)")
    variables = core.copy_tree(variables)
    _, z = jax.eval_shape(lambda v, x: fwd(v, x, None), variables, example)
    dim = int(z.shape[-1])
    src_std, src_mean = (jnp.asarray(a, jnp.float32) for a in source_stats)
    if src_std.shape != (dim,) or src_mean.shape != (dim,):
      raise KfuseError(f"source_stats: expected (std, mean) of shape ({dim},), got"
                       f" {tuple(src_std.shape)}, {tuple(src_mean.shape)}")
    bound = _init_scale(variables, dim)
    n_cls = int(jax.eval_shape(lambda v, x: fwd(v, x, None)[0], variables, example).shape[-1])
    prompt_init = jax.random.uniform(key, (int(n_prompts), dim), jnp.float32, -bound, bound)
    state = KffState(variables, src_std, src_mean, prompt_init, jnp.asarray(bound, jnp.float32),
                     empty_pool(int(n_d) + 1, 2 * dim, (int(n_prompts), dim)),
                     empty_pool(int(n_c) + int(example.shape[0]), n_cls, (1, dim)),
                     jnp.zeros((), jnp.int32))
    core.validate(step, state, example)
    return state

  return core.adapter("kff", init, step, reset)
