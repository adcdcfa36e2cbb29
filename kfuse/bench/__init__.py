"""Benchmarks: end-to-end pipelines run by ``python -m kfuse.main`` (see `kfuse.tasks`)."""
