"""config.json of Hugging Face model directories: layer counts, per-layer lists, dtype."""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from kfuse.errors import KfuseError
from kfuse.io.safetensors_format import as_dtype

__all__ = ["CONFIG_FILE", "LAYER_COUNT_KEYS", "PER_LAYER_KEYS", "hf_config", "config_num_layers",
           "check_config_layers"]

CONFIG_FILE = "config.json"
_TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16",
                      "bfloat16": "bfloat16", "float64": "float64"}


# Keys that hold the number of transformer blocks (Llama/Mistral/Qwen: num_hidden_layers,
# GPT-2/Bloom/GPT-J: n_layer, ChatGLM/T5: num_layers, MPT: n_layers).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Keys that hold one entry per block (Qwen2/3, Gemma 2/3, Mistral 3 ...: attention kind).
PER_LAYER_KEYS = ("layer_types",)
_SUB_CONFIGS = ("text_config",)


def _config_dtype_keys(cfg: dict, dtype: np.dtype) -> None:
  """Record ``dtype`` under both names: transformers 5 reads ``dtype`` and falls back
  to the legacy ``torch_dtype`` (which transformers 4 reads), so a donor's ``dtype``
  left alone would load the merge in the donor's precision."""
  if dtype is not None and dtype.name in _TORCH_DTYPE_NAMES:
    cfg["dtype"] = cfg["torch_dtype"] = _TORCH_DTYPE_NAMES[dtype.name]


def _relayer(cfg: dict, layers: list, where: str) -> None:
  """Set ``cfg``'s layer fields for output blocks ``layers`` = [(source config, index)]."""
  for key in LAYER_COUNT_KEYS:
    if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
      cfg[key] = len(layers)
  for key in PER_LAYER_KEYS:
    if not isinstance(cfg.get(key), list):
      continue
    vals = []
    for src, i in layers:
      lst = src.get(key)
      if not isinstance(lst, list) or not 0 <= i < len(lst):
        raise KfuseError(f"{where}: {key} has no entry for source layer {i}")
      vals.append(lst[i])
    cfg[key] = vals


def hf_config(config: Mapping[str, Any], dtype: Any = None, layers=None,
              where: str = CONFIG_FILE) -> dict:
  """The config.json of an output: a copy of ``config`` with the output's dtype and layers.

  ``dtype`` sets ``dtype`` and ``torch_dtype``. ``layers`` lists, per output
  block, ``(source_config, source_layer)``: every layer-count key
  (`LAYER_COUNT_KEYS`) becomes ``len(layers)`` and every per-layer list
  (`PER_LAYER_KEYS`) takes the source block's entry from its own config
  (``None``: from ``config``), also inside ``text_config``.
  """
  cfg = json.loads(json.dumps(dict(config)))
  _config_dtype_keys(cfg, as_dtype(dtype))
  if layers is not None:
    srcs = [(dict(config) if c is None else c, int(i)) for c, i in layers]
    _relayer(cfg, srcs, where)
    for sub in _SUB_CONFIGS:
      if isinstance(cfg.get(sub), dict):
        _relayer(cfg[sub], [(c.get(sub) if isinstance(c.get(sub), dict) else {}, i)
                            for c, i in srcs], f"{where}: {sub}")
  return cfg


def config_num_layers(config: Mapping[str, Any] | None) -> int | None:
  """The block count a config declares (first of `LAYER_COUNT_KEYS`), or None."""
  for key in LAYER_COUNT_KEYS:
    v = (config or {}).get(key)
    if isinstance(v, int) and not isinstance(v, bool):
      return v
  return None


def check_config_layers(config: Mapping[str, Any], names, where: str = CONFIG_FILE) -> None:
  """Refuse a config whose layer fields disagree with the tensors it describes.

  Blocks are counted from the tensor names (`kfuse.tree.num_layers`); every
  integer layer-count key and the length of every per-layer list must match,
  else transformers builds a different model (dropping tensors silently) or
  cannot build one. Tensors without block indices are not checked.
  """
  from kfuse.tree import num_layers
  n = num_layers(names)
  if n == 0:
    return
  for key in LAYER_COUNT_KEYS:
    v = config.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and v != n:
      raise KfuseError(f"{where}: {key} = {v} but the tensors hold {n} layers")
  for key in PER_LAYER_KEYS:
    v = config.get(key)
    if isinstance(v, list) and len(v) != n:
      raise KfuseError(f"{where}: {key} has {len(v)} entries but the tensors hold {n} layers")
