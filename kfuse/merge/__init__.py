"""Parameter-space merging: composable stages, named methods, tree-level API.

    from kfuse import merge
    merged = merge.merge("ties", experts, base, params={"density": 0.2})
    recipe = merge.chain(merge.stages.task_vectors(), merge.stages.trim_magnitude(), ...)

See `kfuse.merge.methods` for every registered method with its formula.
"""

from kfuse.merge import kernels, stages
from kfuse.merge import methods as _methods  # registers the methods
from kfuse.merge import essential as _essential  # noqa: F401  (registers esm)
from kfuse.merge.api import merge, merge_by_path, merge_tensor, path_key, resolve_values
from kfuse.merge.core import (CUTS, MERGEKIT, NATIVE, REQUIRED, Method, MergeState, Param,
                              PrepareContext, TensorInfo, chain, get_method, names, register,
                              registry)
from kfuse.merge.params import Gradient
from kfuse.merge.soups import greedy_soup, uniform_soup

__all__ = [
    "merge", "merge_by_path", "merge_tensor", "path_key", "resolve_values",
    "CUTS", "MERGEKIT", "NATIVE", "PrepareContext", "REQUIRED", "Method", "MergeState", "Param", "TensorInfo", "chain", "get_method",
    "names", "register", "registry", "Gradient", "greedy_soup", "uniform_soup",
    "kernels", "stages",
]
