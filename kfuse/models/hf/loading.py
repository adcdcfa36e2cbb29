"""HF directory <-> NNX causal LM: per-tensor reads into (sharded) arrays, HF writes.

`load` parses config.json (`config.from_hf`), builds the family's module
abstractly (`nnx.eval_shape`: no parameter memory), checks every tensor's name
and shape against it, then reads each tensor from its memory-mapped shard
straight into a `jax.Array` with the sharding the partition rules give it: each
device's slice is read with positional reads of just its rows (no memory map), so
beyond the loaded arrays the host holds one slice at a time. `save` writes the parameters back under
their HF names (`kfuse.io.write_hf_dir`, atomic), with the source config.json.

Partition rules (`RULES`) name mesh axes per tensor dimension, in HF layouts:
``tensor`` splits heads / MLP columns (Megatron-style: q, k, v, gate, up by
output rows, o and down by input columns), ``fsdp`` splits the other dimension,
``data`` (with ``fsdp``) splits the batch of activations. A dimension that a
mesh axis does not divide stays whole on that axis; the head counts must be
divisible by the ``tensor`` axis.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kfuse.errors import KfuseError
from kfuse.io.hf_dir import open_hf_dir
from kfuse.io.hf_writers import write_hf_dir
from kfuse.io.safetensors_format import as_dtype
from kfuse.models.hf import config as config_lib
from kfuse.models.hf.gpt2 import GPT2LMHeadModel
from kfuse.models.hf.llama import LlamaForCausalLM
from kfuse.registry import suggest

__all__ = ["FAMILIES", "RULES", "MESH_AXES", "make_mesh", "partition_spec", "check_mesh",
           "build", "load", "save", "to_hf_dict", "with_hf_dict", "batch_sharding"]

FAMILIES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
            "gpt2": GPT2LMHeadModel}
MESH_AXES = ("data", "fsdp", "tensor")

# (regex on the HF name, mesh axis per dimension); first match wins
RULES = (
    (r"(embed_tokens|wte|lm_head)\.weight$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", ("tensor",)),
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "tensor")),
    (r"(c_attn|c_fc)\.weight$", ("fsdp", "tensor")),       # GPT-2 Conv1D [in, out]
    (r"(c_attn|c_fc)\.bias$", ("tensor",)),
    (r"c_proj\.weight$", ("tensor", "fsdp")),
    (r"wpe\.weight$", (None, "fsdp")),
)
# tensors some checkpoints carry that the forward pass recomputes
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over the first data·fsdp·tensor devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = data * fsdp * tensor
  if n > len(devices):
    raise KfuseError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices,"
                     f" {len(devices)} visible")
  return Mesh(np.array(devices[:n]).reshape(data, fsdp, tensor), MESH_AXES)


def _axis_size(mesh: Mesh, axis) -> int:
  return mesh.shape.get(axis, 1) if axis is not None else 1


def partition_spec(name: str, shape: tuple, mesh: Mesh, rules=RULES) -> P:
  """The rule's spec for tensor ``name``, each axis kept only where it divides the dimension
  (``rules``: ``((regex, axes), ...)``, HF names by default)."""
  for pattern, axes in rules:
    if re.search(pattern, name):
      spec = [a if a in mesh.shape and len(shape) > i and shape[i] % _axis_size(mesh, a) == 0
              and _axis_size(mesh, a) > 1 else None for i, a in enumerate(axes[:len(shape)])]
      return P(*spec)
  return P()


def check_mesh(cfg: config_lib.LMConfig, mesh: Optional[Mesh], where: str) -> None:
  """Tensor parallelism splits heads: ``tensor`` must divide the query and kv head counts."""
  t = _axis_size(mesh, "tensor") if mesh is not None else 1
  for field, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads",
                                                            cfg.num_kv_heads)):
    if n % t:
      raise KfuseError(f"{where}: mesh axis 'tensor' of size {t} does not divide {field} = {n}")


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
  """Token batches ``[B, T]``: B split over ``data`` x ``fsdp`` where it divides."""
  axes = tuple(a for a in ("data", "fsdp") if _axis_size(mesh, a) > 1)
  size = int(np.prod([_axis_size(mesh, a) for a in axes])) if axes else 1
  return NamedSharding(mesh, P(axes if axes and batch % size == 0 else None, None))


def _flatten(tree: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + "."))
    elif v is not None:
      out[name] = v
  return out


def _unflatten(flat: Mapping[str, Any], like: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in like.items():
    name = f"{prefix}{k}"
    out[k] = _unflatten(flat, v, name + ".") if isinstance(v, Mapping) else (
        None if v is None else flat[name])
  return out


def build(cfg: config_lib.LMConfig, dtype=jnp.float32) -> nnx.Module:
  """The family's module for ``cfg`` with zero parameters (tests, `nnx.eval_shape`)."""
  return FAMILIES[cfg.family](cfg, dtype)


def to_hf_dict(model: nnx.Module) -> dict[str, jax.Array]:
  """``{HF tensor name: array}`` of a loaded model (the pytree kfuse.merge takes)."""
  return _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def with_hf_dict(model: nnx.Module, tensors: Mapping[str, Any]) -> nnx.Module:
  """A new model of ``model``'s graph with parameters ``tensors`` (same names and shapes)."""
  graphdef, state = nnx.split(model)
  like = nnx.to_pure_dict(state)
  shapes = _flatten(like)
  names = set(shapes)
  missing = sorted(names - set(tensors))
  if missing:
    raise KfuseError(f"with_hf_dict: no tensor {missing[0]!r} ({len(missing)} missing)")
  for name in sorted(names):
    if tuple(np.shape(tensors[name])) != tuple(shapes[name].shape):
      raise KfuseError(f"with_hf_dict: tensor {name!r} has shape {tuple(np.shape(tensors[name]))},"
                       f" the model's is {tuple(shapes[name].shape)}")
  nnx.replace_by_pure_dict(state, _unflatten({k: jnp.asarray(v) for k, v in tensors.items()
                                              if k in names}, like))
  return nnx.merge(graphdef, state)


def _read_slice(m, name: str, shape: tuple, idx: tuple = ()) -> np.ndarray:
  """``tensor[idx]`` read with positional reads of only its rows ``idx[0]`` (no memory map,
  so the process holds the slice, never the file's pages)."""
  shape = tuple(shape)
  idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
  if not shape:
    return m.read_into(name, np.empty((), m.dtype(name)))
  rows = range(*idx[0].indices(shape[0]))
  lo, hi = (rows.start, rows.stop) if rows.step == 1 else (0, shape[0])
  buf = np.empty((max(hi - lo, 0), *shape[1:]), m.dtype(name))
  if buf.size:
    m.read_into(name, buf, start=lo * buf[:1].nbytes)
  first = slice(None) if rows.step == 1 else idx[0]
  return buf[(first, *idx[1:])]


def _read(m, name: str, shape, dtype, mesh: Optional[Mesh]) -> jax.Array:
  """One tensor cast to ``dtype``; on a mesh each device reads only the rows it holds.

  Loading 1.1B bf16 parameters into 8 fake CPU devices raised peak RSS by 1.04x the
  checkpoint this way, by 2.0x through the memory map (experiments/perf/hf_load_bench.py).
  """
  if mesh is None:   # one copy, from the memory map's (clean, reclaimable) file pages
    return jnp.asarray(np.asarray(m.view(name)).astype(dtype, copy=False))
  sharding = NamedSharding(mesh, partition_spec(name, shape, mesh))
  return jax.make_array_from_callback(
      tuple(shape), sharding,
      lambda idx: np.ascontiguousarray(_read_slice(m, name, shape, idx).astype(dtype, copy=False)))


def load(path: str | os.PathLike, mesh: Optional[Mesh] = None, dtype: Any = None) -> nnx.Module:
  """The NNX causal LM of an HF directory (Llama, Mistral, Qwen2, GPT-2).

  ``dtype``: parameter and compute dtype (None: each tensor keeps its stored dtype, so
  `save` writes it back bit for bit). ``mesh``: a
  `jax.sharding.Mesh` with axes among ``data``, ``fsdp``, ``tensor`` (`make_mesh`);
  parameters are placed by `RULES`. Errors name the file and tensor.
  """
  path = os.fspath(path)
  with open_hf_dir(path) as m:
    where = os.path.join(path, "config.json")
    if m.config is None:
      raise KfuseError(f"{where}: not found (an HF model directory needs its config.json)")
    cfg = config_lib.from_hf(m.config, where)
    check_mesh(cfg, mesh, where)
    dt = as_dtype(dtype)
    abstract = nnx.eval_shape(lambda: build(cfg, dt or np.float32))
    graphdef, state = nnx.split(abstract)
    like = nnx.to_pure_dict(state)
    expected = _flatten(like)
    _check_tensors(m, cfg, expected, path)
    flat = {name: _read(m, name, s.shape, dt or m.dtype(name), mesh)
            for name, s in expected.items()}
  nnx.replace_by_pure_dict(state, _unflatten(flat, like))
  return nnx.merge(graphdef, state)


def _check_tensors(m, cfg: config_lib.LMConfig, expected: Mapping, path: str) -> None:
  """Every expected tensor present with its shape; no weight the config does not describe."""
  where = os.path.join(path, "config.json")
  embed = "transformer.wte.weight" if cfg.family == "gpt2" else "model.embed_tokens.weight"
  if embed in m and m.shape(embed)[0] != cfg.vocab_size:
    raise KfuseError(f"{where}: vocab_size = {cfg.vocab_size} but {embed} has"
                     f" {m.shape(embed)[0]} rows")
  for name, s in expected.items():
    if name not in m:
      raise KfuseError(f"{path}: no tensor {name!r}, which config.json's {cfg.family} model"
                       f" needs{suggest(name, m.names)}")
    if tuple(m.shape(name)) != tuple(s.shape):
      raise KfuseError(f"{path}: tensor {name!r} has shape {tuple(m.shape(name))}, config.json"
                       f" implies {tuple(s.shape)}")
  extra = [n for n in m.names if n not in expected and not _BUFFERS.search(n)
           and not (cfg.tie_embeddings and n == "lm_head.weight")]
  if extra:
    raise KfuseError(f"{path}: tensor {extra[0]!r} ({len(extra)} unexpected) is not part of the"
                     f" {cfg.family} model config.json describes")


class _HostTensors(Mapping):
  """``{name: np.ndarray}`` gathered one tensor at a time (for the writer's loop)."""

  def __init__(self, tensors: Mapping[str, jax.Array]):
    self._t = tensors

  def __getitem__(self, name: str) -> np.ndarray:
    return np.asarray(jax.device_get(self._t[name]))

  def __iter__(self) -> Iterator[str]:
    return iter(self._t)

  def __len__(self) -> int:
    return len(self._t)


def save(model: nnx.Module, path: str | os.PathLike, overwrite: bool = False,
         max_shard_bytes: float = 5e9) -> list[str]:
  """Write ``model`` as an HF directory transformers loads (atomic); return the files.

  Tensors keep their names and dtypes; config.json is the source's with ``dtype``
  set to the parameters' dtype.
  """
  tensors = to_hf_dict(model)
  dtypes = {np.dtype(a.dtype) for a in tensors.values()}
  dtype = dtypes.pop() if len(dtypes) == 1 else None
  return write_hf_dir(path, _HostTensors(tensors), config=model.config.source_config,
                      dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
