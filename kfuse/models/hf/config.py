"""An HF ``config.json`` as a hashable `LMConfig`: the fields the causal-LM families read.

Field names follow transformers' configs; both the transformers 5 form
(``rope_parameters``) and the older one (``rope_theta`` + ``rope_scaling``) are read.
Anything kfuse does not implement (an architecture, a RoPE type, an activation)
is refused with one line naming it and what is supported.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from kfuse.errors import KfuseError
from kfuse.registry import suggest

__all__ = ["LMConfig", "ARCHITECTURES", "ROPE_TYPES", "ACTIVATIONS", "from_hf"]

# architecture name (config.json "architectures") -> family (config.json "model_type")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "GPT2LMHeadModel": "gpt2"}
ROPE_TYPES = ("default", "linear", "llama3")
# HF ``hidden_act`` / ``activation_function`` names -> kfuse.models.hf.common.activation names
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """What a family module needs from config.json (static: hashable, part of the graph)."""
  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm_eps: float
  activation: str
  tie_embeddings: bool
  max_positions: int
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  rope_theta: float = 10000.0
  rope: tuple = ("default",)            # (type, *params): ("llama3", factor, low, high, orig)
  windows: tuple = ()                   # per layer: sliding window (keys j > i - w) or 0 = full
  scale_attn_weights: bool = True       # GPT-2
  scale_attn_by_inverse_layer_idx: bool = False   # GPT-2
  source: str = "{}"                    # the config.json it came from (JSON), written back by save

  @property
  def source_config(self) -> dict:
    return json.loads(self.source)


def _get(cfg: Mapping, key: str, where: str, kind=int, default: Any = dataclasses.MISSING):
  v = cfg.get(key, default)
  if v is dataclasses.MISSING or v is None and default is dataclasses.MISSING:
    raise KfuseError(f"{where}: missing {key!r}")
  if v is not None and kind is int and (isinstance(v, bool) or not isinstance(v, int)):
    raise KfuseError(f"{where}: {key} must be an integer, got {v!r}")
  if v is not None and kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
    raise KfuseError(f"{where}: {key} must be a number, got {v!r}")
  return v


def family_of(cfg: Mapping, where: str) -> str:
  """The family of a config.json: its architecture (first of ``architectures``) or model_type."""
  archs = cfg.get("architectures") or []
  supported = ", ".join(ARCHITECTURES)
  if archs:
    arch = archs[0] if isinstance(archs, list) else archs
    if arch not in ARCHITECTURES:
      raise KfuseError(f"{where}: architecture {arch!r} is not implemented by kfuse"
                       f"{suggest(str(arch), ARCHITECTURES)}; supported: {supported}")
    return ARCHITECTURES[arch]
  mt = cfg.get("model_type")
  if mt not in ARCHITECTURES.values():
    raise KfuseError(f"{where}: model_type {mt!r} is not implemented by kfuse; supported:"
                     f" {supported}")
  return mt


def _rope(cfg: Mapping, where: str) -> tuple[float, tuple]:
  """(theta, (type, *params)) from ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
  rp = cfg.get("rope_parameters")
  if not isinstance(rp, dict):
    rp = dict(cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
  theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise KfuseError(f"{where}: RoPE type {kind!r} is not implemented by kfuse; supported:"
                     f" {', '.join(ROPE_TYPES)}")
  if kind == "linear":
    return theta, ("linear", float(rp["factor"]))
  if kind == "llama3":
    try:
      return theta, ("llama3", float(rp["factor"]), float(rp["low_freq_factor"]),
                     float(rp["high_freq_factor"]), float(rp["original_max_position_embeddings"]))
    except KeyError as e:
      raise KfuseError(f"{where}: llama3 RoPE scaling needs {e.args[0]!r}") from None
  return theta, ("default",)


def _windows(cfg: Mapping, family: str, n: int, where: str) -> tuple:
  """Per-layer sliding windows as transformers applies them (0 = full causal attention)."""
  w = cfg.get("sliding_window")
  types = cfg.get("layer_types")
  if isinstance(types, list):
    if len(types) != n:
      raise KfuseError(f"{where}: layer_types has {len(types)} entries for {n} layers")
    bad = [t for t in types if t not in ("full_attention", "sliding_attention")]
    if bad:
      raise KfuseError(f"{where}: layer type {bad[0]!r} is not implemented by kfuse")
    return tuple(int(w or 0) if t == "sliding_attention" else 0 for t in types)
  if family == "mistral":
    return (int(w or 0),) * n
  if family == "qwen2" and cfg.get("use_sliding_window") and w:
    first = int(cfg.get("max_window_layers", 0))
    return tuple(int(w) if i >= first else 0 for i in range(n))
  return (0,) * n


def _activation(name: Any, where: str) -> str:
  if name not in ACTIVATIONS:
    raise KfuseError(f"{where}: activation {name!r} is not implemented by kfuse; supported:"
                     f" {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def from_hf(cfg: Mapping[str, Any], where: str = "config.json") -> LMConfig:
  """`LMConfig` of an HF config.json (a dict); `KfuseError` naming the field otherwise."""
  family = family_of(cfg, where)
  source = json.dumps(dict(cfg), sort_keys=True)
  if family == "gpt2":
    d = _get(cfg, "n_embd", where)
    heads = _get(cfg, "n_head", where)
    if d % heads:
      raise KfuseError(f"{where}: n_embd = {d} is not divisible by n_head = {heads}")
    n = _get(cfg, "n_layer", where)
    return LMConfig(
        family=family, vocab_size=_get(cfg, "vocab_size", where), hidden_size=d, num_layers=n,
        num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        intermediate_size=_get(cfg, "n_inner", where, default=None) or 4 * d,
        norm_eps=float(_get(cfg, "layer_norm_epsilon", where, float, 1e-5)),
        activation=_activation(cfg.get("activation_function", "gelu_new"), where),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_positions=_get(cfg, "n_positions", where), qkv_bias=True, o_bias=True,
        mlp_bias=True, windows=(0,) * n,
        scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
        source=source)
  d = _get(cfg, "hidden_size", where)
  heads = _get(cfg, "num_attention_heads", where)
  kv = _get(cfg, "num_key_value_heads", where, default=None) or heads
  if heads % kv:
    raise KfuseError(f"{where}: num_attention_heads = {heads} is not a multiple of"
                     f" num_key_value_heads = {kv}")
  head_dim = _get(cfg, "head_dim", where, default=None) or d // heads
  n = _get(cfg, "num_hidden_layers", where)
  theta, rope = _rope(cfg, where)
  bias = bool(cfg.get("attention_bias", False))
  return LMConfig(
      family=family, vocab_size=_get(cfg, "vocab_size", where), hidden_size=d, num_layers=n,
      num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
      intermediate_size=_get(cfg, "intermediate_size", where),
      norm_eps=float(_get(cfg, "rms_norm_eps", where, float, 1e-6)),
      activation=_activation(cfg.get("hidden_act", "silu"), where),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_positions=_get(cfg, "max_position_embeddings", where, default=None) or 0,
      qkv_bias=True if family == "qwen2" else bias, o_bias=False if family == "qwen2" else bias,
      mlp_bias=bool(cfg.get("mlp_bias", False)), rope_theta=theta, rope=rope,
      windows=_windows(cfg, family, n, where), source=source)
