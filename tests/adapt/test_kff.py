"""KFF (Zhou et al., NeurIPS 2025, arXiv 2510.12150; zhoujiahuan1991/NeurIPS2025-KFF): the pool
operations against float64 NumPy re-statements of the released ``PromptBase`` and
``cls_prompt_gen``, and whole steps against a PyTorch re-statement of ``Ours.forward`` on a
small ViT (its forward re-written in torch from the Flax weights)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfuse import adapt, models
from kfuse.adapt import kff as kff_lib
from kfuse.tree import KfuseError

CLASSES, DIM, HEADS, PATCH = 4, 8, 2, 4
# float32 (kfuse) vs float64 (torch) through four steps; Adam's first steps are close to
# lr·sign(g), so rounding in small gradient components moves the prompts by up to ~1e-3 of lr
TOL = dict(rtol=1e-3, atol=1e-3)


def vit(seed=0, batch=6):
  model = models.get_model("vit", num_classes=CLASSES, patch_size=PATCH, dim=DIM, depth=1,
                           num_heads=HEADS)
  x = jax.random.normal(jax.random.key(seed + 7), (batch, 8, 8))
  v = model.init(jax.random.key(seed), x)
  # a head strong enough for confident, varied predictions
  v = jax.tree.map(lambda a: a, v)           # a mutable copy
  v["params"]["head"]["kernel"] = v["params"]["head"]["kernel"] * 4.0
  return model, v, x


def pool_of(keys, prompts, cap):
  n = len(keys)
  k = np.zeros((cap,) + np.shape(keys)[1:])
  p = np.zeros((cap,) + np.shape(prompts)[1:])
  k[:n], p[:n] = keys, prompts
  return kff_lib.PromptPool(jnp.asarray(k, jnp.float32), jnp.asarray(p, jnp.float32),
                      jnp.arange(cap) < n)


def entries(pool):
  n = int(np.sum(pool.valid))
  assert np.all(np.asarray(pool.valid)[:n]) and not np.any(np.asarray(pool.valid)[n:])
  return np.asarray(pool.keys)[:n], np.asarray(pool.prompts)[:n]


# ------------------------------------------------------------------ NumPy re-statements


def ref_greedy_merge(keys, prompts, max_num):
  """``delete_cls_prompt``: pairs by key dot product (descending, stable), Kruskal-style
  clusters until ``max_num`` remain, each replaced by its average at its first slot."""
  n = len(keys)
  pairs = sorted(((float(keys[i] @ keys[j]), i, j) for i in range(n) for j in range(i + 1, n)),
                 key=lambda t: t[0], reverse=True)
  clusters, where, count = [], {}, n
  for _, i, j in pairs:
    if count <= max_num:
      break
    if i not in where and j not in where:
      clusters.append([i, j])
      where[i] = where[j] = len(clusters) - 1
    elif i not in where or j not in where:
      free, held = (i, j) if i not in where else (j, i)
      clusters[where[held]].append(free)
      where[free] = where[held]
    elif where[i] != where[j]:
      a, b = sorted((where[i], where[j]))
      clusters[a] += clusters[b]
      clusters[b] = []
      for m in clusters[a]:
        where[m] = a
    else:
      continue
    count -= 1
  keys, prompts = keys.copy(), prompts.copy()
  drop = set()
  for c in clusters:
    if c:
      keys[c[0]] = keys[c].mean(0)
      prompts[c[0]] = prompts[c].mean(0)
      drop |= set(c[1:])
  keep = [i for i in range(n) if i not in drop]
  return keys[keep], prompts[keep]


@pytest.mark.slow
def test_class_merge_matches_released_greedy_clustering():
  r = np.random.default_rng(0)
  for trial in range(4):
    n, max_num = 11, 3 + trial
    keys = r.dirichlet(np.full(CLASSES, 0.3), n)
    prompts = r.normal(0, 1, (n, 1, DIM))
    got_k, got_p = entries(kff_lib.class_merge(pool_of(keys, prompts, n + 3), max_num))
    want_k, want_p = ref_greedy_merge(keys, prompts, max_num)
    assert len(got_k) == max_num == len(want_k)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_p, want_p, rtol=1e-5, atol=1e-6)


def test_domain_fuse_matches_released_prompt_base():
  """``PromptBase``: weights softmax(-d/τ) over d ≤ γ_d; update moves keys by α·w, prompts by w;
  add appends and merges the nearest pair (i < j) into slot i while over ``max_len``."""
  r = np.random.default_rng(1)
  keys, prompts = r.normal(0, 1, (4, 6)), r.normal(0, 1, (4, 2, 3))
  key, prompt = keys[2] + r.normal(0, 0.3, 6), r.normal(0, 1, (2, 3))
  pool = pool_of(keys, prompts, 5)
  thr, tau, alpha = 2.5, 3.0, 0.1
  w, in_dom, weighted = kff_lib.domain_match(pool, jnp.asarray(key, jnp.float32), thr, tau)
  d = np.linalg.norm(key - keys, axis=1)
  e = np.where(d <= thr, np.exp(-d / tau), 0.0)
  w_ref = e / e.sum()
  assert bool(in_dom) and (d <= thr).sum() >= 1
  np.testing.assert_allclose(np.asarray(w)[:4], w_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(weighted), np.tensordot(w_ref, prompts, 1), rtol=1e-5,
                             atol=1e-6)
  got_k, got_p = entries(kff_lib.domain_fuse(pool, w, in_dom, jnp.asarray(key, jnp.float32),
                                             jnp.asarray(prompt, jnp.float32), alpha, 4))
  np.testing.assert_allclose(got_k, keys + alpha * w_ref[:, None] * (key - keys), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(got_p, prompts + w_ref[:, None, None] * (prompt - prompts),
                             rtol=1e-5, atol=1e-6)
  # a new domain: appended, then the nearest pair merged (pool of 4)
  got_k, got_p = entries(kff_lib.domain_fuse(pool, w, jnp.asarray(False),
                                             jnp.asarray(key, jnp.float32),
                                             jnp.asarray(prompt, jnp.float32), alpha, 4))
  ks, ps = np.concatenate([keys, key[None]]), np.concatenate([prompts, prompt[None]])
  dist = np.linalg.norm(ks[:, None] - ks[None], axis=-1) + np.tril(np.full((5, 5), np.inf))
  i, j = np.unravel_index(np.argmin(dist), dist.shape)
  ks[i], ps[i] = (ks[i] + ks[j]) / 2, (ps[i] + ps[j]) / 2
  keep = [m for m in range(5) if m != j]
  np.testing.assert_allclose(got_k, ks[keep], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_p, ps[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_prompt_forward_and_source_statistics_float64():
  """No tokens: the plain model; z is the head's input; σ_s, μ_s over the CLS features."""
  model, v, x = vit()
  logits, z = kff_lib.prompt_forward(model.apply, v, x, None)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(v, x)), rtol=1e-6,
                             atol=1e-6)
  zt, _ = torch_vit(v)
  want_logits, want_z = (t.numpy() for t in zt(np.asarray(x, np.float64), None))
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z), want_z, rtol=1e-4, atol=1e-5)
  std, mean = kff_lib.source_statistics(model, v, [x[:3], x[3:]])
  np.testing.assert_allclose(np.asarray(std), want_z.std(0, ddof=1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mean), want_z.mean(0), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ PyTorch re-statement


def torch_vit(variables):
  """The Flax `kfuse.models.vit` forward in torch float64, with ``tokens`` inserted after CLS
  (``PromptViT.forward_features``); returns ``fwd(x, tokens) -> (logits, z)`` (NumPy in: arrays
  or torch tensors)."""
  from tests.peers.peer import require
  torch = require("torch")
  F = torch.nn.functional
  p = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float64)), variables["params"])
  bb = p["backbone"]

  def ln(h, q):
    return F.layer_norm(h, h.shape[-1:], q["scale"], q["bias"], eps=1e-6)

  def fwd(x, tokens):
    x = torch.as_tensor(x, dtype=torch.float64)
    b, hh, ww = x.shape
    patches = (x.reshape(b, hh // PATCH, PATCH, ww // PATCH, PATCH, 1)
               .permute(0, 1, 3, 2, 4, 5).reshape(b, -1, PATCH * PATCH))
    k = bb["patch_embed"]["kernel"].reshape(PATCH * PATCH, DIM)
    h = patches @ k + bb["patch_embed"]["bias"]
    h = torch.cat([bb["cls"].expand(b, 1, DIM), h], 1) + bb["pos_embed"]
    if tokens is not None:
      h = torch.cat([h[:, :1], tokens, h[:, 1:]], 1)
    blk = bb["layers_0"]
    a = ln(h, blk["norm_0"])
    at = blk["attn"]
    q, kk, vv = (torch.einsum("btd,dhk->bthk", a, at[n]["kernel"]) + at[n]["bias"]
                 for n in ("query", "key", "value"))
    s = torch.einsum("bqhk,bthk->bhqt", q, kk) / math.sqrt(DIM // HEADS)
    o = torch.einsum("bhqt,bthk->bqhk", s.softmax(-1), vv)
    h = h + torch.einsum("bqhk,hkd->bqd", o, at["out"]["kernel"]) + at["out"]["bias"]
    m = blk["mlp"]
    u = ln(h, blk["norm_1"]) @ m["fc_in"]["kernel"] + m["fc_in"]["bias"]
    h = h + F.gelu(u, approximate="tanh") @ m["fc_out"]["kernel"] + m["fc_out"]["bias"]
    z = ln(h, bb["norm"])[:, 0]
    return z @ p["head"]["kernel"] + p["head"]["bias"], z

  return fwd, torch


class TorchKFF:
  """``Ours.forward`` with ``PromptBase`` and ``cls_prompt_gen`` re-stated (torch float64,
  AdamW re-created every batch as released). New class prompts are handed in (kfuse's draws)."""

  def __init__(self, variables, src, prompt_init, cfg):
    self.fwd, self.torch = torch_vit(variables)
    self.src = [self.torch.tensor(np.asarray(a, np.float64)) for a in src]
    self.p0 = self.torch.tensor(np.asarray(prompt_init, np.float64))
    self.cfg = cfg
    self.dom = []           # [key, prompt]
    self.cls = []           # [key, prompt]

  def entropy(self, logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)

  def loss(self, z, logits):
    std, mean = self.torch.std_mean(z, dim=0)
    return (self.torch.norm(std - self.src[0]) + self.cfg["lam"] * self.torch.norm(mean - self.src[1])
            + 3.0 * self.entropy(logits).mean())

  def step(self, x, fresh):
    torch, c = self.torch, self.cfg
    with torch.no_grad():
      raw, z0 = self.fwd(x, None)
    std, mean = torch.std_mean(z0, dim=0)
    key = torch.cat([mean, std])
    in_dom, w_d = False, None
    if self.dom:
      d = torch.stack([torch.norm(key - k) for k, _ in self.dom])
      d = torch.where(d <= c["thr_d"], d, torch.inf)
      in_dom = bool(d.min() <= c["thr_d"])
      w_d = torch.softmax(-d / c["tau"], 0)
    # class prompts
    probs = raw.softmax(-1)
    rows, record = [], []
    for t in range(len(probs)):
      if not self.cls:
        rows.append(torch.tensor(fresh[t], dtype=torch.float64)); record.append(None); continue
      s = torch.stack([torch.nn.functional.cosine_similarity(k, probs[t], dim=0)
                       for k, _ in self.cls])
      s = torch.where(s > c["thr_c"], s, -torch.inf)
      if s.max() < c["thr_c"]:
        rows.append(torch.tensor(fresh[t], dtype=torch.float64)); record.append(None); continue
      w = torch.softmax(s, 0)
      rows.append(sum(wi * p for wi, (_, p) in zip(w, self.cls))); record.append(w)
    pc = torch.stack(rows).clone().requires_grad_(True)
    pd0 = sum(wi * p for wi, (_, p) in zip(w_d, self.dom)) if in_dom else self.p0
    pd = pd0.clone().requires_grad_(True)
    opt_d = torch.optim.AdamW([pd], lr=c["lr_d"])
    for _ in range(c["e_id"] if in_dom else c["e_ood"]):
      tokens = torch.cat([pc, pd[None].expand(len(x), -1, -1)], 1)
      logits, z = self.fwd(x, tokens)
      loss = self.loss(z, logits)
      opt_d.zero_grad()
      pc.grad = None
      loss.backward()
      opt_d.step()
    opt_c = torch.optim.AdamW([pc], lr=c["lr_c"])
    opt_c.step()
    with torch.no_grad():
      pd_new, pc_new, logits = pd.detach(), pc.detach(), logits.detach()
      if in_dom:
        for i, (k, p) in enumerate(self.dom):
          self.dom[i] = [k + w_d[i] * (key - k) * c["alpha_d"], p + w_d[i] * (pd_new - p)]
      else:
        self.dom.append([key, pd_new])
        while len(self.dom) > c["n_d"]:
          ks = [k for k, _ in self.dom]
          best = min(((torch.norm(ks[i] - ks[j]).item(), i, j) for i in range(len(ks))
                      for j in range(i + 1, len(ks))))
          _, i, j = best
          self.dom[i] = [(self.dom[i][0] + self.dom[j][0]) / 2, (self.dom[i][1] + self.dom[j][1]) / 2]
          self.dom.pop(j)
      ent, probs = self.entropy(logits), logits.softmax(-1)
      n_old = len(self.cls)
      for t in range(len(probs)):
        if ent[t] > c["thr_ent"]:
          continue
        if record[t] is None:
          self.cls.append([probs[t], pc_new[t]])
        else:
          for i in range(n_old):
            k, p = self.cls[i]
            self.cls[i] = [k + (probs[t] - k) * record[t][i] * c["alpha_c"],
                           p + (pc_new[t] - p) * record[t][i]]
      if len(self.cls) > c["n_c"]:
        ks, ps = ref_greedy_merge(np.stack([k.numpy() for k, _ in self.cls]),
                                  np.stack([p.numpy() for _, p in self.cls]), c["n_c"])
        self.cls = [[torch.tensor(k), torch.tensor(p)] for k, p in zip(ks, ps)]
    return logits.numpy(), in_dom


def test_steps_match_pytorch_restatement():
  """Four batches: a new domain (empty pools), the same domain again (in-domain, composed class
  prompts), a far domain (new: the domain pool of 1 merges the nearest pair), then that domain
  again; the class pool of 3 is merged greedily. Logits and both pools after every step (float32
  vs float64: logits differ by 1.4e-5 to 2.7e-5 in the first three steps, 5.8e-4 in the fourth)."""
  model, v, x = vit(batch=6)
  src = kff_lib.source_statistics(model, v, [x])
  cfg = dict(thr_d=1.0, tau=3.0, alpha_d=0.1, n_d=1, thr_c=0.5, alpha_c=0.1, thr_ent=10.0,
             n_c=3, lam=1.0, lr_d=0.05, lr_c=1e-2, e_id=1, e_ood=3)
  tta = adapt.make("kff", model, optimizer=dict(name="adamw", learning_rate=cfg["lr_c"],
                                                   kwargs=dict(weight_decay=0.01)),
                   domain_optimizer=dict(name="adamw", learning_rate=cfg["lr_d"],
                                         kwargs=dict(weight_decay=0.01)),
                   n_prompts=2, e_ood=3, e_id=1, thr_d=1.0, n_d=1, thr_c=0.5, n_c=3,
                   thr_ent=10.0)
  state = tta.init(v, {"x": x}, jax.random.key(1), source_stats=src)
  ref = TorchKFF(v, src, state.prompt_init, cfg)
  r = np.random.default_rng(3)
  far = (np.asarray(jax.random.normal(jax.random.key(99), x.shape)) * 0.3
         + np.linspace(-2, 2, 8)[None, :, None])          # key distance 2.2 from x's
  xs = [x, x + 0.05 * r.normal(size=x.shape), far, far + 0.01]
  seen_in = []
  for i, xb in enumerate(xs):
    k = jax.random.key(10 + i)
    fresh = np.asarray(jax.random.uniform(k, (6, 1, DIM), jnp.float32, -state.bound, state.bound),
                       np.float64)
    state, m = tta.step(state, {"x": jnp.asarray(xb, jnp.float32)}, k)
    want, in_dom = ref.step(np.asarray(xb, np.float64), fresh)
    seen_in.append(in_dom)
    assert float(m["in_domain"]) == float(in_dom)
    np.testing.assert_allclose(np.asarray(m["logits"]), want, **TOL)
    dk, dp = entries(state.domain)
    assert len(dk) == len(ref.dom)
    np.testing.assert_allclose(dk, np.stack([k.numpy() for k, _ in ref.dom]), **TOL)
    np.testing.assert_allclose(dp, np.stack([p.numpy() for _, p in ref.dom]), **TOL)
    ck, cp = entries(state.classes)
    assert len(ck) == len(ref.cls)
    np.testing.assert_allclose(ck, np.stack([k.numpy() for k, _ in ref.cls]), **TOL)
    np.testing.assert_allclose(cp, np.stack([p.numpy() for _, p in ref.cls]), **TOL)
  assert seen_in[:3] == [False, True, False]        # new, in-domain, new (then merged)


@pytest.mark.slow
def test_compiles_once_nan_skip_reset_and_bad_input():
  model, v, x = vit(batch=6)
  src = kff_lib.source_statistics(model, v, [x])
  tta = adapt.make("kff", model, e_ood=2, n_c=2)
  state = tta.init(v, {"x": x}, jax.random.key(0), source_stats=src)
  s0 = state
  for i in range(3):
    state, m = tta.step(state, {"x": x * (1 + i)}, jax.random.key(i))
    assert bool(jnp.all(jnp.isfinite(m["logits"])))
  zero = x.at[2].set(0.0)
  state, m = tta.step(state, {"x": zero}, jax.random.key(5))
  assert bool(jnp.all(jnp.isfinite(m["logits"]))) and float(m["skipped"]) == 0.0
  bad, m = tta.step(state, {"x": x.at[0, 0, 0].set(jnp.nan)}, jax.random.key(6))
  assert float(m["skipped"]) == 1.0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), bad, state)
  assert tta.step._cache_size() == 1
  back = tta.reset(state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, s0)
  with pytest.raises(KfuseError, match="source_stats"):
    tta.init(v, {"x": x}, jax.random.key(0))
  with pytest.raises(KfuseError, match="source_stats: expected"):
    tta.init(v, {"x": x}, jax.random.key(0), source_stats=(jnp.ones(3), jnp.ones(3)))
  with pytest.raises(KfuseError, match="found no module 'blocks_0'"):
    adapt.make("kff", model, inject="blocks_0").init(v, {"x": x}, jax.random.key(0),
                                                     source_stats=src)
  assert "kff" in adapt.names() and adapt.default_config("kff")["params"]["n_d"] == 20
