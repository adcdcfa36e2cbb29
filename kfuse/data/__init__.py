"""Offline datasets (`sources`) and multi-task suites (`tasks`)."""

from kfuse.data.sources import (KNOWN_DATASETS, Dataset, cache_dir, iterate, load,
                                num_batches, standardize)
from kfuse.data.tasks import SUITES, TRANSFORMS, Task, make_suite, pretrain_task, suite_names

__all__ = [
    "KNOWN_DATASETS", "Dataset", "cache_dir", "iterate", "load", "num_batches", "standardize",
    "SUITES", "TRANSFORMS", "Task", "make_suite", "pretrain_task", "suite_names",
]
