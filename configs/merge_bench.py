"""The multi-task model-merging benchmark on a pinned model pool (FusionBench-style).

    python -m kfuse.main --config=configs/merge_bench.py:8          # 8 tasks (the default variant)
    python -m kfuse.main --config=configs/merge_bench.py:14         # first 14 tasks
    python -m kfuse.main --config=configs/merge_bench.py:20         # all 20 tasks
    python -m kfuse.main --config=configs/merge_bench.py:negation   # task negation on the 8 tasks
    python -m kfuse.main --config=configs/merge_bench.py:quick      # == configs/default.py
    python -m kfuse.main --config=configs/merge_bench.py:8,model=mlp   # the MLP backbone
    python -m kfuse.main --config=configs/merge_bench.py:8,informed=no # data-free rows only
    python -m kfuse.main --config=configs/merge_bench.py:20,methods=task_arithmetic+ties  # some rows

The argument's keys: ``variant`` (8 | 14 | 20 | negation | quick), ``tasks`` (N: the
first N of `kfuse.data.image_tasks.TASK_NAMES`; 0 = the variant's), ``model``
('' = the pool recipe's backbone, or ``vit`` / ``mlp``), ``pool`` (a preset of
`kfuse.bench.pool.PRESETS`, e.g. ``tiny``; '' = the variant's recipe), ``informed``
(``no``: leave out the data-informed rows of `informed_methods`), ``methods``
(``LABEL+LABEL``: only these rows, in the table's order).

The job loads the pool at ``pool.path`` (building or resuming it first when it
is not complete), merges the experts' backbones with every ``methods.<label>``
(hyper-parameters chosen on validation from each ``grid``), runs task negation
when ``negation.enabled`` and writes results.json / results.md / merge_bench.png
(`kfuse.bench.merge_bench`). The 8 / 14 / 20 variants use the pool preset
``default`` (its recipe, the first N tasks) at ``workdirs/pools/<N>``; point
``--config.pool.path`` at a 20-task pool to run the 8- or 14-task protocol on it.
"""

import ml_collections

from kfuse.configs import one_of, parse_arg

TASK_NAMES = (  # kfuse.data.image_tasks.TASK_NAMES (configs stay JAX-free; tests check the copy)
    "sk_digits", "letters_sans", "grating_orientation", "shapes", "texture", "signal_process",
    "cellular_automata", "mnist1d_plot", "symbols", "glyph_digits", "shape_count",
    "grating_frequency", "font_style", "lissajous", "letters_serif", "case", "glyph_rotation",
    "shape_position", "symmetry", "spectral_slope")

# Methods left out, and why: `linear` (== simple_average), `task_negation` (the negation
# protocol, not multi-task), `slerp` / `nuslerp` / `nearswap` / `arcee_fusion` / `wise_ft` /
# `layer_swap` (exactly one or two models), `passthrough` (layer surgery).
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)   # Task Arithmetic paper: chosen on validation
TIES_LAMBDAS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5)      # disjoint *mean*: TIES paper range is ~1
# negation: lambda in {0, 0.05, ..., 1}, chosen on validation (0 = the pretrained model)
# SVC after TA / TIES: for task responses orthogonal along the merged matrix's singular
# directions SVC's γ_r = 1 / max(α, λ), so any λ ≥ α (0.1) gives back Σ τ_i at full scale and only
# λ < α scales the calibrated merge (experiments/merge_bench/svc_diagnosis.py); its grid starts there
SVC_LAMBDAS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)
NEGATION_LAMBDAS = tuple(round(0.05 * i, 2) for i in range(21))

MLP = dict(name="mlp", hidden=(256, 256), activation="gelu", dropout=0.0, layer_norm=False)
VIT = dict(name="vit", patch_size=4, dim=64, depth=4, num_heads=4)

# the quick run's own small pool: 4 of the 8 tasks, a small ViT, short training (<= 3 min)
QUICK_POOL = dict(
    preset="default",   # pool recipe under these fields (kfuse.bench.pool.PRESETS)
    seed=0,
    tasks=("sk_digits", "letters_sans", "grating_orientation", "cellular_automata"),
    data=dict(seed=0, sizes=(1000, 300, 500), pretrain_per_domain=300),
    model=dict(name="vit", patch_size=4, dim=32, depth=2, num_heads=4),
    pretrain=dict(steps=500, batch_size=128),
    probe=dict(steps=100, batch_size=128),
    finetune=dict(steps=200, batch_size=128),
)


def methods(lambdas=LAMBDAS, ties_lambdas=TIES_LAMBDAS, densities=(0.2,), drop_densities=(0.5,)):
  """Every multi-model data-free method of `kfuse.merge`: label -> name, params, validation grid.

  A new method (a data-informed one registered with
  `kfuse.bench.merge_bench.register_merger`, or any `kfuse.merge` method) is
  one more entry ``label=dict(name=..., params={...}, grid={...})``.
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


def informed_methods(adamerging_steps=1000):
  """The data-informed rows (`kfuse.bench.informed_rows`): each uses the tasks' unlabeled test
  inputs (``data.unlabeled_per_task``) and the papers' / FusionBench's hyper-parameters (no grid):
  Fisher (own predictions as labels), RegMean / RegMean++ (alpha 0.95), ESM (32 inputs per
  task; lambda on validation, as its reference), AdaMerging (init 0.3,
  Adam 1e-3, 16 inputs per task per step; FusionBench runs 1000 steps), AdaRank on TA / CART /
  Iso-CTS (the same entropy and budget; its reference runs 10,000 steps)."""
  ada = dict(steps=adamerging_steps)
  return dict(
      fisher=dict(name="fisher", params={}, grid={}),
      regmean=dict(name="regmean", params={}, grid={}),
      regmean_plusplus=dict(name="regmean_plusplus", params={}, grid={}),
      esm=dict(name="esm", params={}, grid={"lambda": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0]}),
      expert_merging=dict(name="expert_merging", params={}, grid={}),
      adamerging_task=dict(name="adamerging_task", params=dict(ada), grid={}),
      adamerging_layer=dict(name="adamerging_layer", params=dict(ada), grid={}),
      adarank_ta=dict(name="adarank_ta", params=dict(ada), grid={}),
      adarank_cart=dict(name="adarank_cart", params=dict(ada), grid={}),
      adarank_iso_cts=dict(name="adarank_iso_cts", params=dict(ada), grid={}),
  )


def subspace_methods(lambdas=LAMBDAS):
  """The subspace and mask rows (`kfuse/merge/subspace.py`, `masks.py`), data-free: every scale λ
  chosen on validation from ``lambdas`` as the other rows (TSV, Iso and PCB pick α on validation
  in their papers; WUDI, MagMax, Consensus fix it, here searched too, λ = 1 / 0.5 / 0.3 included).
  `emr` is EMR's shared vector θ_b + τ_uni only, and `tall_mask` is left out: their per-task
  models (`emr_task`, `tall_mask`) are one model per task, which this one-model protocol does not
  evaluate."""
  g = lambda: {"lambda": list(lambdas)}
  return dict(
      tsv_m=dict(name="tsv_m", params={}, grid=g()),
      iso_c=dict(name="iso_c", params={}, grid=g()),
      iso_cts=dict(name="iso_cts", params={}, grid=g()),
      wudi=dict(name="wudi", params={}, grid=g()),                           # Adam, 300 steps
      wudi_closed_form=dict(name="wudi", params=dict(solver="closed_form"), grid=g()),
      task_arithmetic_svc=dict(name="task_arithmetic_svc", params={},
                               grid={"lambda": list(SVC_LAMBDAS)}),
      ties_svc=dict(name="ties_svc", params={}, grid={"lambda": list(SVC_LAMBDAS)}),
      tsv_m_svc=dict(name="tsv_m_svc", params={}, grid=g()),
      wudi_svc=dict(name="wudi_svc", params={}, grid=g()),
      emr=dict(name="emr", params={}, grid={}),
      consensus_ta=dict(name="consensus_ta", params={}, grid=g()),
      consensus_ties=dict(name="consensus_ties", params={}, grid=g()),
      magmax=dict(name="magmax", params={}, grid=g()),
      pcb=dict(name="pcb", params={}, grid=g()),
  )


QUICK_METHODS = ("simple_average", "task_arithmetic", "ties", "ties_paper", "dare_ties",
                 "model_stock")   # the quick run's subset: compiling each method's merge dominates


def _full_methods():
  """Wider grids for the 8 / 14 / 20-task runs (trim densities, DARE keep-rates)."""
  return {**methods(densities=(0.1, 0.2, 0.3, 0.5), drop_densities=(0.3, 0.5, 0.7)),
          **subspace_methods(), **informed_methods()}


def _num_tasks(text):
  n = int(text)
  if not 0 <= n <= len(TASK_NAMES):
    raise ValueError(f"expected 1..{len(TASK_NAMES)} (0: the variant's), got {n}")
  return n


def _labels(text):
  return tuple(t for t in text.split("+") if t)


def get_config(arg=None):
  """``arg``: ``variant`` (8 | 14 | 20 | negation | quick), ``tasks=N``, ``model=vit|mlp``, ``pool=PRESET``,
  ``informed=no``, ``methods=LABEL+LABEL`` (only these rows of the variant's table)."""
  arg_text, arg = arg, parse_arg(arg, variant=("8", one_of("8", "14", "20", "negation", "quick")),
                  tasks=(0, _num_tasks), model=("", one_of("", "vit", "mlp")), pool="",
                  informed=("yes", one_of("yes", "no")), methods=((), _labels))
  variant = arg.variant
  n = int(arg.tasks) or {"14": 14, "20": 20}.get(variant, 8)
  config = ml_collections.ConfigDict()
  config.task = "merge_bench"
  config.workdir = "workdirs/default" if variant == "quick" else f"workdirs/merge_bench_{variant}"
  config.overwrite = False      # replace the results of an earlier run in workdir
  config.seed = 0               # merge keys (DARE / DELLA masks); the pool has its own seed
  config.progress = True
  config.eval_batch_size = 500
  config.tasks = ()             # the benchmark's tasks ((): the pool config's); must be in the pool

  if variant == "quick" and not arg.pool:
    pool = dict(QUICK_POOL, path="")
    if arg.tasks:
      pool["tasks"] = TASK_NAMES[:n]
  else:
    preset = arg.pool or "default"
    pool = dict(path="", preset=preset)
    if not arg.pool or arg.tasks:   # a named preset keeps its own tasks unless tasks=N
      pool["tasks"] = TASK_NAMES[:n]
    if variant != "quick":
      pool["path"] = (f"workdirs/pools/{preset}" + (f"_{n}" if "tasks" in pool else "")
                      + (f"_{arg.model}" if arg.model else ""))
  if arg.model:
    pool["model"] = dict(MLP if arg.model == "mlp" else VIT)
  # pool.path: the pool directory ('' = <workdir>/pool); built (or resumed) there when it is not
  # complete, then loaded with its manifest / hash checks. pool.preset: the recipe
  # (kfuse.bench.pool.PRESETS) under the other pool fields (seed, tasks, data, model, ...).
  config.pool = pool

  config.data = dict(
      cache_dir="",             # generated-data cache ('' = $KFUSE_CACHE or ~/.cache/kfuse)
      unlabeled_per_task=200,   # test-time inputs without labels, per task (data-informed merges)
      val_per_task=64,          # labelled validation examples per task (data-informed merges)
  )
  full = variant in ("8", "14", "20")
  table = {} if variant == "negation" else _full_methods() if full else {
      k: v for k, v in methods().items() if k in QUICK_METHODS}
  if arg.informed == "no":   # the data-free rows only (the 5-minute budget of issue 12)
    table = {k: v for k, v in table.items() if k not in informed_methods()}
  if arg.methods:   # a subset of the rows (e.g. when a 20-task pass of every row costs too much)
    from kfuse.registry import suggest
    unknown = [m for m in arg.methods if m not in table]
    if unknown:
      from kfuse.errors import KfuseError
      raise KfuseError(f"--config argument {arg_text!r}: methods: {unknown[0]!r} is not a row of"
                       f" this variant{suggest(unknown[0], table)}; rows:"
                       f" {'+'.join(table) or '(none)'}")
    table = {k: v for k, v in table.items() if k in arg.methods}
  config.methods = ml_collections.ConfigDict(table, sort_keys=False)  # keep table order
  config.negation = dict(
      enabled=variant in ("negation", "quick"),   # quick: on its 4 tasks
      targets=(),               # target tasks ((): every task in turn); control = the others
      grid={"lambda": list(NEGATION_LAMBDAS)},
      control_threshold=0.95,   # control val accuracy >= this x the pretrained model's
  )
  config.sequential = dict(
      order=(),                 # continual merging: task order, one expert at a time ((): off)
      methods=(),               # labels of config.methods to run sequentially ((): all)
  )
  return config


def field_docs(arg=None):
  """``--help`` lines of the nested fields (`kfuse.main.field_docs`)."""
  del arg
  return {
      "tasks": "the benchmark's tasks ((): the pool config's); each must have an expert in the pool",
      "pool.path": "the pool directory ('' = <workdir>/pool); built or resumed when not complete,"
                   " then loaded with its manifest / hash checks",
      "pool.preset": "the pool recipe (kfuse.bench.pool.PRESETS) under the other pool.* fields",
      "pool.tasks": "the pool's tasks (first N of kfuse.data.image_tasks.TASK_NAMES)",
      "pool.model": "the backbone (model name + arguments); a pool built with another is refused",
      "data.cache_dir": "generated-data cache ('' = $KFUSE_CACHE or ~/.cache/kfuse)",
      "data.unlabeled_per_task": "test-time inputs without labels per task, for data-informed mergers",
      "data.val_per_task": "labelled validation examples per task, for data-informed mergers",
      "negation.enabled": "run task negation (theta0 - lambda * tau_target per target task)",
      "negation.targets": "target tasks ((): every task in turn); control = the other tasks",
      "negation.grid.lambda": "lambda candidates, chosen on validation",
      "negation.control_threshold": "control val accuracy must stay >= this x the pretrained model's",
      "sequential.order": "continual merging: merge the experts one at a time in this task order ((): off)",
      "sequential.methods": "labels of config.methods merged sequentially ((): all)",
      "methods": "label -> {name, params, grid}: a kfuse.merge or merge_bench.register_merger method",
  }
