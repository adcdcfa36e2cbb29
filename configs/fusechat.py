"""FuseChat: pairwise fusion of each source into a copy of the target, then merge the fused
targets with `kfuse.merge` (VaRM, SCE, task arithmetic, TIES) (`kfuse.fusion.bench`).

    python -m kfuse.main --config=configs/fusechat.py          # the benchmark (bits per char)
    python -m kfuse.main --config=configs/fusechat.py:quick    # a smoke run

Same models, corpus and evaluation as `configs/fusellm.py`; the pairwise fusion uses MinCE
between the target's own distribution and the source's (FuseChat's ``fuse_with_ref_model``).
"""

import ml_collections

from kfuse.configs import one_of, parse_arg


def get_config(arg=None):
  """``arg``: ``quick`` (a smoke run) or nothing (the benchmark)."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "fusellm_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusellm.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  variant = parse_arg(arg, variant=("full", one_of("full", "quick"))).variant
  c = base.get_config(variant)
  c.job = "fusechat"
  c.merges = ml_collections.ConfigDict(dict(
      varm=dict(name="varm", params={}),
      sce=dict(name="sce", params=dict(select_topk=0.1)),
      task_arithmetic=dict(name="task_arithmetic", params=dict(weight=0.5)),
      ties=dict(name="ties", params=dict(density=0.6, weight=0.5)),
  ))
  return c
