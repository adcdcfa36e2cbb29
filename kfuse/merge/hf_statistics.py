"""RegMean / Fisher statistics of HF causal LMs (`kfuse.models.hf`), keyed by HF tensor name.

    model = hf.load("expert_dir")
    batches = hf_statistics.token_batches(ids, seq_len=512, batch_size=8)
    st = hf_statistics.grams(model, batches).combine(hf_statistics.fisher(model, batches))
    statistics.save("stats/expert", st)            # the Orbax format of `kfuse.merge.statistics`

Calibration data are token windows ``x [B, T]`` int, right-padded with ``PAD`` = −1
(a row's real tokens first, then pads; `token_batches` cuts a token stream so).
The models are causal, so pads after a row's tokens change none of its real
positions; they are only masked out of the statistics (mask ``m = x ≥ 0``).

**Gram** (RegMean, Jin et al., ICLR 2023): for every linear projection
(``common.Linear`` ``[out, in]`` and GPT-2's ``Conv1D`` ``[in, out]``: q/k/v/o,
gate/up/down, c_attn/c_fc/c_proj, an untied lm_head) the input rows ``x_t ∈ R^{d_in}``
of every real token, ``G = Σ_t m_t x_t x_tᵀ / n`` with ``n = Σ_t m_t`` (the running
average over tokens as RegMean and FusionBench define it; kept as a sum, divided
once). Keyed by the layer's weight name (``model.layers.0.self_attn.q_proj.weight``),
``G`` is ``[d_in, d_in]`` whichever way the weight is stored. The inputs are taken by a
tap in ``common.Linear`` / ``Conv1D`` (`kfuse.models.hf.common.TAPS`) while the
jitted forward is traced: the model code is not forked and costs nothing otherwise.

**Fisher** (Matena & Raffel, NeurIPS 2022): the label-free score of
`kfuse.merge.statistics.fisher` summed over a window's real tokens,
``s(x) = Σ_t m_t Σ_c sg(√p_tc) log p_tc``; ``F = (1/N) Σ_n (∇_θ s(x_n))²`` over the N
windows (``mode="per_example"``: a batch of per-window gradients, so memory is
``batch_size`` parameter copies) or FusionBench's ``mode="batch"`` (one gradient
per batch). Keyed by every parameter's HF name.

Memory: one batch's activations plus the accumulators (``d_in²`` per projection;
one parameter copy for Fishers). On a mesh: load the model on it (`hf.load(..., mesh=)`)
and pass the same ``mesh=`` here; each batch is placed with `hf.batch_sharding` (windows
split over ``data`` x ``fsdp``) and the compiler reduces the partial sums (Grams and
Fishers are sums: the same numbers up to float32 summation order).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kfuse.merge import statistics as ST
from kfuse.merge.statistics import Statistics
from kfuse.models.hf import common
from kfuse.models.hf.loading import to_hf_dict, with_hf_dict
from kfuse.tree import KfuseError

__all__ = ["PAD", "token_batches", "grams", "fisher", "collect", "split_mask",
           "StatisticsStore", "stream_contexts"]

PAD = -1


def token_batches(ids, seq_len: int, batch_size: int) -> list[dict]:
  """``{'x': [batch_size, seq_len]}`` windows of a token stream ``ids`` (non-overlapping,
  the last window right-padded with `PAD`, the last batch with all-`PAD` rows)."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  if seq_len < 1 or batch_size < 1:
    raise KfuseError(f"token_batches: seq_len and batch_size must be ≥ 1, got {seq_len},"
                     f" {batch_size}")
  if ids.size == 0:
    raise KfuseError("token_batches: the calibration text holds no tokens")
  if np.any(ids < 0):
    raise KfuseError("token_batches: negative token ids (−1 is the padding marker)")
  rows = -(-ids.size // seq_len)
  total = -(-rows // batch_size) * batch_size
  x = np.full(total * seq_len, PAD, np.int32)
  x[:ids.size] = ids
  x = x.reshape(total, seq_len)
  return [{"x": x[i:i + batch_size]} for i in range(0, total, batch_size)]


def split_mask(x):
  """``(ids, mask)`` of a padded window batch: mask = x ≥ 0, pads replaced by id 0."""
  mask = x >= 0
  return jnp.where(mask, x, 0), mask


def _windows(batches: Iterable[Any], where: str) -> Iterator[np.ndarray]:
  """Each batch's ``x`` as int32 ``[B, T]``, right padding checked; `KfuseError` when empty."""
  seen = 0
  for batch in batches:
    ST.check_batch(batch, ("x",), where=f"{where} batch")
    x = np.asarray(batch["x"])
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
      raise KfuseError(f"{where}: a batch 'x' must be int token ids [B, T], got"
                       f" {x.dtype} {x.shape}")
    m = x >= 0
    if np.any(m[:, 1:] & ~m[:, :-1]):
      raise KfuseError(f"{where}: a token follows padding (−1) in a row; pad on the right only")
    if not m.any():
      continue
    seen += int(m.sum())
    yield x.astype(np.int32)
  if seen == 0:
    raise KfuseError(f"{where}: the data iterator yielded no tokens; statistics need a"
                     f" calibration text")


def _place(x: np.ndarray, mesh):
  """A window batch on ``mesh`` (`hf.batch_sharding`); unchanged without a mesh."""
  if mesh is None:
    return x
  from kfuse.models.hf import batch_sharding
  return jax.device_put(x, batch_sharding(mesh, x.shape[0]))


def _module_names(model: nnx.Module) -> dict[int, str]:
  return {id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_modules(model)}


@functools.partial(jax.jit, static_argnums=0)
def _gram_step(graphdef, acc, state, x):
  """One batch's masked ``Σ_t m_t x_t x_tᵀ`` per Linear / Conv1D added to ``acc`` (compiled
  once per model graph and batch shape)."""
  ids, mask = split_mask(x)
  m = nnx.merge(graphdef, state)
  names = _module_names(m)
  keep = mask.reshape(-1, 1).astype(jnp.float32)
  out: dict = {}

  def tap(module, h):
    name = names[id(module)] + ".weight"
    rows = h.reshape(-1, h.shape[-1]).astype(jnp.float32) * keep
    g = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
    out[name] = out.get(name, 0.0) + g

  common.TAPS.append(tap)
  try:
    m(ids)
  finally:
    common.TAPS.remove(tap)
  n = jnp.sum(mask, dtype=jnp.int32)
  if acc is None:
    return {k: (g, n) for k, g in out.items()}
  return {k: (acc[k][0] + g, acc[k][1] + n) for k, g in out.items()}


def grams(model: nnx.Module, batches: Iterable[Any], *,
          max_tokens: Optional[int] = None, mesh=None) -> Statistics:
  """Input Grams of every Linear / Conv1D of ``model`` (see the module doc).

  Args:
    model: a `kfuse.models.hf` causal LM (`hf.load`).
    batches: mappings ``{'x': int [B, T]}``, right-padded with `PAD` (`token_batches`).
    max_tokens: stop once this many real tokens were seen (whole batches).
    mesh: the `hf.make_mesh` mesh the model was loaded on (None: one device).
  Returns:
    `Statistics` with ``gram`` / ``tokens`` keyed by HF weight name, ``examples`` =
    windows seen.
  """
  graphdef, state = nnx.split(model)
  acc, examples, seen = None, 0, 0
  for x in _windows(batches, "hf_statistics.grams"):
    if max_tokens is not None and seen >= max_tokens:
      break
    acc = _gram_step(graphdef, acc, state, _place(x, mesh))
    examples += int(np.sum(np.any(x >= 0, axis=1)))
    seen += int(np.sum(x >= 0))
  if not acc:
    raise KfuseError("hf_statistics.grams: the model called no Linear / Conv1D layer")
  tokens = {k: int(n) for k, (_, n) in jax.device_get(acc).items()}
  gram = {k: g / tokens[k] for k, (g, _) in acc.items()}
  ST._finite_or_raise(gram, "the Gram", "hf_statistics.grams")
  return Statistics(gram=gram, tokens=tokens, examples=examples)


def fisher(model: nnx.Module, batches: Iterable[Any], *, mode: str = "per_example",
           max_examples: Optional[int] = None, mesh=None) -> Statistics:
  """Diagonal Fisher of every parameter of ``model``, keyed by HF name (see the module doc);
  ``max_examples`` counts windows (whole batches); ``mesh`` as in `grams`."""

  def apply_fn(tensors, x):
    ids, mask = split_mask(x)
    logits = with_hf_dict(model, tensors)(ids).astype(jnp.float32)
    return jnp.where(mask[..., None], logits, 0.0)   # padded positions: constant, no gradient

  real = [0, 0]   # windows with tokens, rows (incl. all-pad rows) that ST.fisher counts

  def xs():
    for x in _windows(batches, "hf_statistics.fisher"):
      real[0] += int(np.sum(np.any(x >= 0, axis=1)))
      real[1] += x.shape[0]
      yield {"x": _place(x, mesh)}

  st = ST.fisher(apply_fn, to_hf_dict(model), xs(), mode=mode, max_examples=max_examples)
  scale = real[1] / real[0]   # all-pad rows add zero gradients: divide by real windows
  return Statistics(fisher={k: v * scale for k, v in st.fisher.items()}, examples=real[0])


def collect(model: nnx.Module, batches, *, fisher_mode: Optional[str] = "per_example",
            max_tokens: Optional[int] = None, mesh=None) -> Statistics:
  """Grams and (unless ``fisher_mode`` is None) the Fisher; ``batches`` is iterated twice."""
  batches = list(batches)
  st = grams(model, batches, max_tokens=max_tokens, mesh=mesh)
  if fisher_mode is None:
    return st
  return st.combine(fisher(model, batches, mode=fisher_mode, mesh=mesh))


# ------------------------------------------------ streaming merge: statistics per tensor


def _flat(tree: Any, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


class StatisticsStore:
  """A saved statistics checkpoint (`statistics.save`) read one tensor at a time with
  Orbax's partial restore: the shapes and token counts up front, each Gram / Fisher
  only when its tensor is merged (so the host holds one tensor's statistics per expert)."""

  def __init__(self, path):
    from kfuse.io import orbax_io
    self.path = str(path)
    self._item = orbax_io._require_item_dir(path)
    meta = orbax_io.orbax_metadata(path)
    if not isinstance(meta, dict) or "examples" not in meta:
      raise KfuseError(f"{self.path}: not a kfuse statistics checkpoint (no 'examples' entry)")
    self.shapes = {kind: {k: tuple(v.shape) for k, v in _flat(meta.get(kind, {})).items()}
                   for kind in ("gram", "fisher")}
    small = self._restore({"tokens": {k: np.zeros((), np.int64) for k in
                                      _flat(meta.get("tokens", {}))}} if "tokens" in meta else {})
    self.tokens = {k: int(v) for k, v in _flat(small.get("tokens", {})).items()}

  def _restore(self, want: dict) -> dict:
    if not want:
      return {}
    import orbax.checkpoint as ocp
    nested = {kind: ST._nest(d) for kind, d in want.items()}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), nested)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ck:
      return ck.restore(self._item, args=ocp.args.PyTreeRestore(
          item=nested, restore_args=args, partial_restore=True))

  def read(self, kind: str, path: str) -> np.ndarray:
    """The ``kind`` ('gram' | 'fisher') statistic of parameter ``path``."""
    shape = self.shapes[kind][path]
    got = self._restore({kind: {path: np.zeros(shape, np.float32)}})
    return np.asarray(_flat(got[kind])[path])


class _Lazy(dict):
  """``ctx.stats[kind]`` for one tensor: its N experts' statistics, read and checked on use."""

  def __init__(self, load):
    super().__init__()
    self._load = load

  def get(self, path, default=None):
    return self._load(path)

  def __getitem__(self, path):
    return self._load(path)


def stream_contexts(method, statistics, shapes: dict, values: dict, layout: str) -> dict:
  """Per tensor, the `PrepareContext` a data-informed method's ``prepare`` reads in the
  streaming engine: ``{name: PrepareContext}``. Checks up front (one line each) that the
  statistics are one per model, of these tensors and shapes; notes on stderr Grams from
  fewer tokens than inputs (then only the off-diagonal shrink α / ridge make them
  invertible). Each tensor's statistics are read when the engine prepares it.

  Args:
    method: 'regmean' or 'fisher' (a `Method`).
    statistics: one saved statistics path per model, in the models' order.
    shapes: ``{tensor name: shape}`` of the models.
    values: ``{tensor name: resolved parameter values}``.
    layout: 'torch' or 'flax' (the models' weight layout).
  """
  import sys
  from kfuse.merge import informed
  from kfuse.merge.core import PrepareContext
  from kfuse.registry import suggest
  name = method.name
  if name not in ("regmean", "fisher"):
    raise KfuseError(f"config.statistics: method {name!r} cannot stream statistics"
                     f" (regmean, fisher can)")
  stores = [s if isinstance(s, StatisticsStore) else StatisticsStore(s) for s in statistics]
  kind = "gram" if name == "regmean" else "fisher"
  for s in stores:
    have = s.shapes[kind]
    if not have:
      raise KfuseError(f"{s.path}: no {'Grams' if kind == 'gram' else 'Fisher'} (method"
                       f" {name!r} needs them)")
    for k, shp in have.items():
      if k not in shapes:
        raise KfuseError(f"{s.path}: statistics of {k!r}, which the models do not have"
                         f" (statistics of another model?){suggest(k, shapes)}")
      if kind == "fisher" and shp != tuple(shapes[k]):
        raise KfuseError(f"{s.path}: Fisher of {k!r} has shape {shp}, the tensor"
                         f" {tuple(shapes[k])} (statistics of another model?)")
      if kind == "gram":
        t = informed._transposed(k, tuple(shapes[k]), layout == "torch")
        d = shapes[k][-1] if t else None
        if len(shp) != 2 or shp[0] != shp[1] or (
            d != shp[0] if t else informed._split(tuple(shapes[k]), shp[0]) is None):
          raise KfuseError(f"{s.path}: Gram of {k!r} is {shp}, the tensor {tuple(shapes[k])}"
                           f" has no input size {shp[0]} (statistics of another model?)")
    if kind == "fisher":
      missing = [k for k in shapes if k not in have]
      if missing:
        raise KfuseError(f"{s.path}: no Fisher for {missing[0]!r} (statistics of another"
                         f" model?)")
    if set(have) != set(stores[0].shapes[kind]):
      diff = sorted(set(have) ^ set(stores[0].shapes[kind]))[0]
      raise KfuseError(f"{s.path}: statistics paths differ from {stores[0].path}'s"
                       f" (e.g. {diff!r})")
  if kind == "gram":
    short = [(s.path, k, s.tokens.get(k, 0), shp[0]) for s in stores
             for k, shp in s.shapes["gram"].items() if s.tokens.get(k, 0) < shp[0]]
    if short:
      p, k, n, d = short[0]
      print(f"kfuse: note: {len(short)} Gram(s) from fewer tokens than inputs (e.g. {p}:"
            f" {k!r}, {n} < d_in={d}): rank-deficient, made invertible only by RegMean's"
            f" off-diagonal shrink alpha < 1 or ridge > 0; more calibration text is better",
            file=sys.stderr)
  coef = None
  if kind == "fisher":   # c_i ∝ 1/‖F_i‖: one pass over the Fishers, one tensor at a time
    norms = [{k: np.linalg.norm(s.read("fisher", k).astype(np.float64)) for k in shapes}
             for s in stores]
    first = values[next(iter(shapes))]
    coef = informed.fisher_coefficients(norms, bool(first.get("normalize", True)),
                                        float(first.get("epsilon", 1e-6)))

  def one(path: str, vals: dict):
    def load(p):
      if p != path:
        raise KfuseError(f"statistics asked for {p!r} while merging {path!r}")
      if kind == "gram" and path not in stores[0].shapes["gram"]:
        return None
      sts = [Statistics(gram={path: s.read("gram", path)}, tokens={path: s.tokens.get(path, 0)})
             if kind == "gram" else Statistics(fisher={path: s.read("fisher", path)})
             for s in stores]
      ref = {path: None}
      experts = {path: jax.ShapeDtypeStruct((len(stores),) + tuple(shapes[path]), np.float32)}
      binder = informed._BINDERS[name]
      try:
        out = binder(sts, ref, experts, vals)
      except KfuseError as e:
        msg = str(e)
        for i, s in enumerate(stores):
          msg = msg.replace(f"statistics[{i}]", s.path)
        raise KfuseError(msg) from None
      return out[kind][path]
    stats = {kind: _Lazy(load)}
    if coef is not None:
      stats["coef"] = coef.astype(np.float32)
    return PrepareContext(stats=stats)

  return {k: one(k, values[k]) for k in shapes}


# ------------------------------------------------------------------- the job


def _text_ids(model_dir: str, text_file: str, tokenizer: str, vocab: int, max_tokens: int):
  import os
  from kfuse.models import hf
  try:
    with open(text_file, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise KfuseError(f"config.text_files: cannot read {text_file}: {e}") from None
  tok = hf.load_tokenizer(tokenizer or model_dir)
  tok.check_model(vocab, os.path.join(model_dir, "config.json"))
  ids = tok.encode(text).ids
  return ids[:max_tokens] if max_tokens > 0 else ids


def run(config, workdir=None) -> dict:
  """``configs/merge_informed_hf.py``: statistics per model on its text, then the merge."""
  import json
  import os
  import sys
  from kfuse.merge import runner
  from kfuse.models import hf
  get = lambda k, d=None: runner._get(config, k, d)
  method = get("method")
  models = runner._split(get("models"))
  texts = runner._split(get("text_files"))
  out = get("output_dir")
  if not models:
    raise KfuseError("config.models: give the HF directories (--config.models=a,b)")
  if not out:
    raise KfuseError("config.output_dir: required (--config.output_dir=OUT)")
  if len(texts) not in (1, len(models)):
    raise KfuseError(f"config.text_files: {len(texts)} files for {len(models)} models (give one"
                     f" per model, or one for all)")
  texts = texts * len(models) if len(texts) == 1 else texts
  overwrite, progress = bool(get("overwrite", False)), bool(get("progress", True))
  # num_devices > 1: statistics with the windows split over that many devices (`data` axis),
  # the merge with every tensor split over them (as the merge jobs)
  ndev = int(get("num_devices", 0))
  stats_mesh = hf.make_mesh(data=ndev) if ndev > 1 else None
  stats_dir = get("stats_dir") or os.path.abspath(out).rstrip("/") + ".stats"
  paths = []
  for i, (d, t) in enumerate(zip(models, texts)):
    path = os.path.join(stats_dir, f"model_{i}")
    paths.append(path)
    if os.path.isdir(path) and not overwrite:
      print(f"kfuse: note: reusing the statistics in {path} (pass --config.overwrite=True to"
            f" recollect)", file=sys.stderr)
      continue
    model = hf.load(d, mesh=stats_mesh)
    ids = _text_ids(d, t, get("tokenizer", ""), model.config.vocab_size,
                    int(get("max_tokens", 0)))
    batches = token_batches(ids, int(get("seq_len")), int(get("batch_size")))
    st = (grams(model, batches, mesh=stats_mesh) if method == "regmean" else
          fisher(model, batches, mode=get("fisher_mode", "per_example"), mesh=stats_mesh))
    ST.save(path, st, overwrite=overwrite)
    if progress:
      print(f"merge_informed_hf: statistics of {d} on {len(ids)} tokens of {t} -> {path}",
            file=sys.stderr)
  params = get("params", {})
  params = params.to_dict() if hasattr(params, "to_dict") else dict(params)
  res = runner.merge_checkpoints(method, models, None, out, params=runner.cli_params(method, params),
                                 overwrite=overwrite, progress=progress, statistics=paths,
                                 mesh=runner.scale_options(config)["mesh"])
  res["statistics"] = paths
  print(json.dumps(res))
  return res
