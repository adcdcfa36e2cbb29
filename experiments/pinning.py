"""One core, one thread: the robust setting for the speed comparisons on a shared machine.

Call `pin_one_core()` before ``jax`` is imported (XLA reads ``XLA_FLAGS`` when its
backend starts); set ``torch.set_num_threads(1)`` on the PyTorch side as well.
"""

import os


def pin_one_core() -> None:
  """Single-threaded XLA:CPU, and this process pinned to its first allowed core."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
