"""kfuse: knowledge fusion in JAX.

Submodules load on first use, so ``import kfuse`` is cheap and does not import JAX:

    import kfuse
    kfuse.merge.merge("ties", experts, base, params={"density": 0.2})
    kfuse.distill, kfuse.adapt, kfuse.io, kfuse.train, kfuse.models, kfuse.data, kfuse.registry
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("adapt", "bench", "configs", "data", "distill", "errors", "io", "merge",
               "mergekit_compat", "models", "protocol", "registry", "shard", "tasks", "train", "tree")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    module = importlib.import_module(f"kfuse.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'kfuse' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(__all__)
