"""Data-parallel / FSDP / tensor-parallel placement of fusion training and scoring.

The mesh is kfuse's ``(data, fsdp, tensor)`` one (`kfuse.models.hf.make_mesh`, config
section ``mesh``: ``mesh.data``, ``mesh.fsdp``, ``mesh.tensor``, as lm_eval uses it). Zoo
GPT parameters are placed by `GPT_RULES` (regex on the '/'-joined Flax path, mesh axis per
dimension, through `kfuse.models.hf.partition_spec`: an axis that does not divide a dimension
leaves it whole); the optimizer state's moments carry their parameter's path as a suffix,
so the same rules place them. Batches are split along their batch axis over ``data`` x
``fsdp`` (`kfuse.models.hf.batch_sharding`). The jitted steps then run SPMD: XLA inserts
the all-gathers of FSDP and the gradient reductions of data parallelism.

    mesh = fusion.mesh.from_config(config.mesh)          # None for a 1-device mesh
    state = fusion.mesh.place(step.init(variables, x), mesh)
    state, m = step(state, fusion.mesh.place_batch(batch, mesh), key)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kfuse.errors import KfuseError
from kfuse.models.hf import loading as hf
from kfuse.tree import path_str

__all__ = ["GPT_RULES", "from_config", "place", "place_batch", "BATCH_AXIS"]

# zoo GPT (`kfuse.models.gpt`, Linen layouts): Megatron-style ``tensor`` over heads / MLP
# columns, ``fsdp`` over the model dimension
GPT_RULES = (
    (r"embed/embedding$", ("tensor", "fsdp")),                  # [V, D]
    (r"attn/(query|key|value)/kernel$", ("fsdp", "tensor")),    # [D, H, hd]
    (r"attn/(query|key|value)/bias$", ("tensor",)),             # [H, hd]
    (r"attn/out/kernel$", ("tensor", None, "fsdp")),            # [H, hd, D]
    (r"mlp/fc_in/kernel$", ("fsdp", "tensor")),                 # [D, F]
    (r"mlp/fc_in/bias$", ("tensor",)),
    (r"mlp/fc_out/kernel$", ("tensor", "fsdp")),                # [F, D]
    (r"head/kernel$", ("fsdp", "tensor")),                      # [D, V]
    (r"head/bias$", ("tensor",)),
    (r"pos_embed$", (None, None, "fsdp")),                      # [1, T, D]
)

# the batch axis of each fusion batch entry (``[S, B, ...]`` for the sources' targets)
BATCH_AXIS = {"topk_indices": 1, "topk_logits": 1, "topk_ce": 1}


def from_config(cfg: Optional[Mapping[str, Any]]) -> Optional[Mesh]:
  """The ``(data, fsdp, tensor)`` mesh of a ``mesh`` config section (None: one device)."""
  cfg = dict(cfg or {})
  unknown = sorted(set(cfg) - set(hf.MESH_AXES))
  if unknown:
    from kfuse.registry import suggest
    raise KfuseError(f"mesh.{unknown[0]}: unknown axis, expected {hf.MESH_AXES}"
                     f"{suggest(unknown[0], hf.MESH_AXES)}")
  sizes = {a: cfg.get(a, 1) for a in hf.MESH_AXES}
  for a, n in sizes.items():
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise KfuseError(f"mesh.{a}: must be an int >= 1, got {n!r}")
  if sizes["data"] * sizes["fsdp"] * sizes["tensor"] == 1:
    return None
  return hf.make_mesh(**sizes)


def place(tree: Any, mesh: Optional[Mesh], rules=GPT_RULES) -> Any:
  """Every array leaf of ``tree`` on ``mesh`` by ``rules`` on its path (unmatched: replicated)."""
  if mesh is None:
    return tree

  def put(path, x):
    if not hasattr(x, "shape"):
      return x
    spec = hf.partition_spec(path_str(path), tuple(x.shape), mesh, rules)
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(put, tree)


def place_batch(batch: Mapping[str, Any], mesh: Optional[Mesh]) -> dict:
  """Each entry split along its batch axis (`BATCH_AXIS`, else 0) over ``data`` x ``fsdp``."""
  if mesh is None:
    return dict(batch)
  out = {}
  for k, v in batch.items():
    ax = BATCH_AXIS.get(k, 0)
    if ax >= v.ndim:  # scalars and the like: replicated
      out[k] = jax.device_put(v, NamedSharding(mesh, P()))
      continue
    split = hf.batch_sharding(mesh, int(v.shape[ax])).spec[0]
    out[k] = jax.device_put(v, NamedSharding(mesh, P(*([None] * ax), split)))
  return out
