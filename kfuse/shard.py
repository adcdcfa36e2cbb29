"""Sharding for checkpoint merges: a 1-D device mesh, one tensor slice per device.

    mesh = shard.make_mesh(8)                  # jax.devices()[:8], axis "x"
    s = shard.tensor_sharding(mesh, (4096, 4096))          # rows split 8 ways
    x = shard.read_global((4096, 4096), np.float32, s, read_rows)

Every tensor is split along its first axis when that axis divides evenly over
the mesh and the tensor has at least two dimensions (its rows stay whole, so
row-wise rules never reduce over the sharded axis); everything else (norms,
biases) is replicated. Stacked expert tensors ``[N, ...]`` are split along
axis 1 the same way. Merge kernels are ordinary jitted functions of such
arrays: XLA partitions their elementwise maths and the integer histograms of
`kfuse.merge.select`, so a sharded merge gives the same bits as an unsharded
one (tests/merge/test_sharding.py).

Multi-host (`initialize`): every process runs the same command; the mesh
spans all processes' devices and each process reads from disk only the rows
its own devices hold (`read_global`). Results are gathered to process 0,
which alone writes the output. See WORKSPACE.md, "Scale".
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kfuse.tree import KfuseError

AXIS = "x"

__all__ = ["AXIS", "make_mesh", "tensor_sharding", "stacked_sharding", "replicated",
           "put_replicated",
           "read_global", "to_host", "initialize", "is_writer"]


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Join a multi-host run (`jax.distributed.initialize`) before any device use.

  Empty arguments let JAX discover them (TPU pods, SLURM, or the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
  environment variables).
  """
  try:   # CPU processes need a collectives backend to compute together (tests, laptops)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # noqa: BLE001 — older/newer JAX without the option
    pass
  kw = {}
  if coordinator:
    kw["coordinator_address"] = coordinator
  if num_processes > 0:
    kw["num_processes"] = num_processes
  if process_id >= 0:
    kw["process_id"] = process_id
  try:
    jax.distributed.initialize(**kw)
  except Exception as e:  # noqa: BLE001 — one line for the user
    raise KfuseError(f"jax.distributed.initialize({kw}) failed: {str(e).splitlines()[0]}") from e


def make_mesh(num_devices: int) -> Optional[Mesh]:
  """A 1-D mesh over the first ``num_devices`` devices (None for 0 or 1 device)."""
  if num_devices is None or num_devices <= 1:
    return None
  devs = jax.devices()
  if num_devices > len(devs):
    hint = ("" if jax.default_backend() != "cpu" else
            "; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts")
    raise KfuseError(f"config.num_devices={num_devices} but only {len(devs)} device(s) are"
                     f" visible ({jax.default_backend()}){hint}")
  return Mesh(np.array(devs[:num_devices]), (AXIS,))


def _split_axis(mesh: Mesh, shape: tuple, axis: int) -> bool:
  return len(shape) > axis + 1 and shape[axis] % mesh.size == 0 and shape[axis] > 0


def tensor_sharding(mesh: Mesh, shape: tuple) -> NamedSharding:
  """Rows (axis 0) split over the mesh when they divide evenly; else replicated."""
  shape = tuple(shape)
  if _split_axis(mesh, shape, 0):
    return NamedSharding(mesh, P(AXIS, *([None] * (len(shape) - 1))))
  return NamedSharding(mesh, P())


def stacked_sharding(mesh: Mesh, shape: tuple) -> NamedSharding:
  """`tensor_sharding` for ``[N, *shape]`` stacks of expert tensors."""
  shape = tuple(shape)
  if _split_axis(mesh, shape, 0):
    return NamedSharding(mesh, P(None, AXIS, *([None] * (len(shape) - 1))))
  return NamedSharding(mesh, P())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` (the same value on every process) replicated over ``mesh``.

  `jax.device_put` only reaches this process's devices; with several
  processes each builds its local copies (`jax.make_array_from_callback`).
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      raw = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
      return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

  return jax.tree_util.tree_map(put, tree)


def read_global(shape: tuple, dtype: Any, sharding: NamedSharding,
                read: Callable[[tuple], np.ndarray]) -> jax.Array:
  """A global array whose device slices come from ``read(index)``.

  ``read`` gets a tuple of slices (one per dimension) and returns that block
  as numpy. It runs only for this process's devices, once per distinct block.
  """
  cache: dict = {}

  def block(index):
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      cache[key] = np.asarray(read(index), dtype=dtype)
    return cache[key]

  return jax.make_array_from_callback(tuple(shape), sharding, block)


def tree_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """Σ along ``axis`` as a fixed pairwise tree of elementwise adds.

  XLA is free to reorder a reduction (vector lanes, per-device partial sums),
  and does so differently in a sharded and an unsharded program. Adding
  halves elementwise fixes the order completely, so every placement of the
  data gives the same bits. About one extra pass over the data.
  """
  axis = axis % x.ndim
  n = x.shape[axis]
  width = 1
  while width < n:
    width *= 2
  if width != n:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - n)
    x = jnp.pad(x, pad)
  while width > 1:
    width //= 2
    x = (lax.slice_in_dim(x, 0, width, axis=axis)
         + lax.slice_in_dim(x, width, 2 * width, axis=axis))
  return x if keepdims else jnp.squeeze(x, axis)


def tensor_sum(x: jax.Array) -> jax.Array:
  """Σ of all entries of ``x``, with the same bits whether ``x`` is sharded or not.

  Each row (axis 0, the axis `tensor_sharding` splits) is summed where it
  lives (`tree_sum`); the row sums are then replicated (under `jax.set_mesh`)
  and summed the same way on every device.
  """
  if x.ndim == 0:
    return x
  # an explicit row width: reshape(0, -1) is ambiguous for a zero-size tensor
  width = int(np.prod(x.shape[1:], dtype=np.int64))
  rows = tree_sum(x.reshape(x.shape[0], width), axis=1) if x.ndim >= 2 else x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    rows = jax.lax.with_sharding_constraint(rows, P())
  return tree_sum(rows, axis=0)


def tensor_norm(x: jax.Array) -> jax.Array:
  """‖x‖₂ over all entries via `tensor_sum` (sharding-independent bits)."""
  return jnp.sqrt(tensor_sum(jnp.square(x)))


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of ``x`` as numpy on this process (gathered across processes)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
  """Whether this process writes outputs (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def rows_of(index: tuple, shape: tuple) -> tuple:
  """(first row, last row + 1) of a block index along axis 0 (whole tensor: 0, rows)."""
  if not index or not shape:
    return 0, (shape[0] if shape else 1)
  s = index[0]
  start = 0 if s.start is None else s.start
  stop = shape[0] if s.stop is None else s.stop
  return start, stop


def main() -> None:
  """``python -m kfuse.shard FLAGS``: `kfuse.main` on every host of a multi-host run.

  Parses the same flags as `python -m kfuse.main` (one-line errors), joins the
  run (`initialize`, from the environment: a TPU pod, SLURM, or
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), then runs the job.
  """
  from kfuse import main as kfuse_main
  kfuse_main.cli(setup=lambda: initialize(
      os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
      int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0),
      int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)))


if __name__ == "__main__":
  main()
