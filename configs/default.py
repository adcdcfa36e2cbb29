"""Quick multi-task model-merging benchmark (4 MNIST-1D tasks, ~2-3 min on 2 CPU cores).

    python -m kfuse.main --config=configs/default.py

Pretrains a small MLP on 20,000 extra generated MNIST-1D signals, fine-tunes
one expert per task (each task is a fixed input transformation + relabelling,
see `kfuse.data.tasks`), merges the experts' backbones with every
multi-model data-free kfuse method of ``config.methods``
(hyper-parameters chosen on validation from each ``grid``) and writes
results.json, results.md, merge_bench.png and Orbax checkpoints under
``config.workdir``. The full benchmark is ``configs/merge_bench.py``;
``configs/merge_bench.py:quick`` is this config.

Override anything from the command line, e.g.
``--config.data.num_tasks=6 --config.methods.ties.params.density=0.3``.
"""

import ml_collections

from kfuse.configs import parse_arg


def _optimizer(learning_rate, warmup_steps, weight_decay=0.0):
  """AdamW with warmup + cosine decay and gradient clipping."""
  return dict(name="adamw", learning_rate=learning_rate, schedule="cosine",
              warmup_steps=warmup_steps, clip_norm=1.0, kwargs=dict(weight_decay=weight_decay))


# Methods left out, and why: `linear` (== simple_average with weights), `task_negation`
# (forgetting, not multi-task), `slerp` / `nuslerp` / `nearswap` / `arcee_fusion` /
# `wise_ft` (exactly one or two models), `passthrough` / `layer_swap` (layer surgery).
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)   # Task Arithmetic paper: chosen on validation
TIES_LAMBDAS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5)      # disjoint *mean*: TIES paper range is ~1


def methods(lambdas=LAMBDAS, ties_lambdas=TIES_LAMBDAS, densities=(0.2,), drop_densities=(0.5,)):
  """Every multi-model data-free method of `kfuse.merge`: label -> name, params, validation grid.

  Each method's hyper-parameters are chosen on the tasks' validation splits
  (average accuracy) from its ``grid``, as in the papers.
  """
  lam = lambda: list(lambdas)
  return dict(
      simple_average=dict(name="simple_average", params={}, grid={}),
      task_arithmetic=dict(name="task_arithmetic", params=dict(weight=1.0),
                           grid={"lambda": lam()}),
      ties=dict(name="ties", params=dict(weight=1.0),                     # mergekit: mean
                grid={"density": list(densities), "lambda": list(ties_lambdas)}),
      ties_paper=dict(name="ties_paper", params=dict(disjoint="sum"),     # paper / FusionBench
                      grid={"k": list(densities), "lambda": lam()}),
      dare_linear=dict(name="dare_linear", params=dict(weight=1.0),
                       grid={"density": list(drop_densities), "lambda": lam()}),
      dare_ties=dict(name="dare_ties", params=dict(weight=1.0),
                     grid={"density": list(drop_densities), "lambda": lam()}),
      breadcrumbs=dict(name="breadcrumbs", params=dict(weight=1.0, density=0.9, gamma=0.01),
                       grid={"lambda": lam()}),
      breadcrumbs_ties=dict(name="breadcrumbs_ties",
                            params=dict(weight=1.0, density=0.9, gamma=0.01),
                            grid={"lambda": lam()}),
      della=dict(name="della", params=dict(weight=1.0, epsilon=0.1),
                 grid={"density": list(drop_densities), "lambda": list(ties_lambdas)}),
      della_linear=dict(name="della_linear", params=dict(weight=1.0, epsilon=0.1),
                        grid={"density": list(drop_densities), "lambda": lam()}),
      model_stock=dict(name="model_stock", params={}, grid={}),
      karcher=dict(name="karcher", params={}, grid={}),
      multislerp=dict(name="multislerp", params={}, grid={}),
      sce=dict(name="sce", params={}, grid={"select_topk": [0.1, 0.2, 0.5, 1.0]}),
      varm=dict(name="varm", params={}, grid={}),
      ram=dict(name="ram", params={}, grid={}),
      ramplus_tl=dict(name="ramplus_tl", params={}, grid={}),
  )


def get_config(arg=None):
  """The quick benchmark; takes no argument (the full one is ``configs/merge_bench.py``)."""
  parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.task = "merge_bench"
  config.workdir = "workdirs/default"
  config.overwrite = False      # replace the results of an earlier run in workdir
  config.seed = 0
  config.progress = True
  config.eval_batch_size = 500
  config.resume = True          # resume interrupted training phases from <workdir>/train_state
  config.checkpoint_every = 500  # steps between train-state checkpoints (0: end of each phase)

  config.data = dict(
      name="mnist1d",        # mnist1d | digits (the task suite's base dataset)
      num_tasks=4,           # first N transforms of the suite (see kfuse.data.tasks.SUITES)
      tasks=(),              # or explicit transform names, e.g. ("reverse", "permute")
      val_fraction=0.1,
      relabel=True,          # per-task fixed class permutation
      cache_dir="",          # default: $KFUSE_CACHE or ~/.cache/kfuse
      pretrain_samples=20000,  # pretrain on 20k extra generated signals (0: the base split)
  )
  config.model = dict(name="mlp", hidden=(512, 512), activation="gelu", dropout=0.2,
                      layer_norm=False)
  config.pretrain = dict(steps=3000, batch_size=128, log_every=100,
                         optimizer=_optimizer(2e-3, 100, 1e-4))
  config.finetune = dict(
      probe_steps=200,              # linear probe of a fresh head on the frozen backbone
      probe_learning_rate=1e-2,
      steps=1000,                   # then fine-tune
      trainable="all",              # all | backbone (FusionBench-style frozen head)
      batch_size=128, log_every=100,
      optimizer=_optimizer(3e-4, 50, 1e-4))
  config.methods = ml_collections.ConfigDict(methods(), sort_keys=False)  # keep table order
  return config
