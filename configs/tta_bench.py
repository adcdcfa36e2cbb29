"""Test-time adaptation benchmark on MNIST-1D-C (CIFAR-10-C protocols at toy scale).

    python -m kfuse.main --config=configs/tta_bench.py           # full (~8 min on 2 idle CPU cores)
    python -m kfuse.main --config=configs/tta_bench.py:quick     # <= 3 min
    python -m kfuse.main --config=configs/tta_bench.py:images         # 16x16 glyphs, CIFAR-10-C corruptions, 3 seeds
    python -m kfuse.main --config=configs/tta_bench.py:images_quick   # the same, smaller
    python -m kfuse.main --config=configs/tta_bench.py:images_vit     # a ViT: CoTTA, ViDA, KFF (continual)

A BatchNorm ResNet-style 1-D CNN is trained on clean MNIST-1D; every method of
``config.methods`` then adapts online on the 15 corruptions at severity 5
(`kfuse.data.corruptions`), under the reset-per-shift and continual
protocols, and on a long continual stream (``config.long``). Writes
results.json, results.md, tta_bench.png and the source checkpoint under
``config.workdir`` (see `kfuse.bench.tta_bench`).

Method settings follow the papers' defaults (`kfuse.adapt.default_config`): Tent, CoTTA,
RoTTA as in their CIFAR-10 configs; EATA / ETA with the test-time-adaptation
benchmark's CIFAR-10 overrides (Adam 1e-3, fisher_alpha 1, d_margin 0.4);
SAR with its paper defaults (SGD 2.5e-4, momentum 0.9) and its top block
frozen — ``layers_1`` is this CNN's last stage, the analogue of ResNet's layer4.
One batch size (200, as Tent / CoTTA / the benchmark on CIFAR-10) for all.

Override from the command line, e.g. ``--config.batch_size=64
--config.methods.tent.optimizer.learning_rate=1e-4 --config.long.rounds=0``.
"""

import ml_collections

from kfuse.configs import one_of, parse_arg


def methods():
  adam = dict(name="adam", learning_rate=1e-3)
  return dict(
      source=dict(name="source", optimizer=None, params={}),
      bn_adapt=dict(name="bn_adapt", optimizer=None, params=dict(prior=0.0)),
      tent=dict(name="tent", optimizer=adam, params=dict(steps=1, episodic=False)),
      eta=dict(name="eta", optimizer=adam, params=dict(e_margin_scale=0.4, d_margin=0.4)),
      eata=dict(name="eata", optimizer=adam,
                params=dict(e_margin_scale=0.4, d_margin=0.4, fisher_alpha=1.0)),
      sar=dict(name="sar", optimizer=dict(name="sgd", learning_rate=2.5e-4,
                                           kwargs=dict(momentum=0.9)),
               params=dict(e_margin_scale=0.4, rho=0.05, reset_constant=0.2,
                           exclude=(r"backbone/layers_1/",))),
      cotta=dict(name="cotta", optimizer=adam,
                 params=dict(mt=0.999, rst=0.01, ap=0.92, n_augment=32)),
      rotta=dict(name="rotta", optimizer=adam,
                 params=dict(alpha=0.05, nu=0.001, capacity=64, update_frequency=64)),
      # ViDA (Yangsenqiao/vida, CIFAR-10 ViT config): adapters on the attention projections
      # of a ViT; on the CNNs, whose only Dense layer is the head, on the head
      vida=dict(name="vida", optimizer=dict(name="adam", learning_rate=1e-4),
                params=dict(adapter_optimizer=dict(name="adam", learning_rate=1e-5), rank1=1,
                            rank2=128, mt=0.999, mt_vida=0.999, rst=0.1, unc_thr=0.05,
                            n_augment=10, target="head")),
      # KFF (zhoujiahuan1991/NeurIPS2025-KFF, cfgs/cifar10.yaml + ours.yaml): prompts on a ViT.
      # γ_d is a Euclidean distance between [mean, std] keys of CLS features: the released 20 is
      # for ViT-B/16 (D = 768); scaled by sqrt(D / 768) for the D = 32 ViT here (20 · 0.204 = 4.1)
      kff=dict(name="kff", optimizer=dict(name="adamw", learning_rate=1e-3,
                                          kwargs=dict(weight_decay=0.01)),
               params=dict(domain_optimizer=dict(name="adamw", learning_rate=0.1,
                                                 kwargs=dict(weight_decay=0.01)),
                           n_prompts=8, e_ood=50, e_id=1, thr_d=4.0, tau=3.0, alpha_d=0.1,
                           n_d=20, thr_c=0.2, alpha_c=0.1, thr_ent=2.0, n_c=10)),
  )


def get_config(arg=None):
  """``arg``: None / 'full' (the measured benchmark), 'quick' (a <= 3 min smoke run), 'images'
  (typeset digits 16x16, the 15 CIFAR-10-C corruptions, a 2-D BatchNorm ResNet, 3 seeds) or
  'images_quick' (the same, smaller) or 'images_vit' (a ViT source model, continual protocol:
  CoTTA, ViDA and KFF, 3 seeds)."""
  variant = parse_arg(arg, variant=("full", one_of("full", "quick", "images", "images_quick",
                                                              "images_vit"))).variant
  config = ml_collections.ConfigDict()
  config.task = "tta_bench"
  config.workdir = f"workdirs/tta_bench_{variant}"
  config.overwrite = False          # replace the results of an earlier run in workdir
  config.seed = 0
  config.seeds = ()                 # non-empty: repeat the benchmark per seed, report mean ± std
  config.progress = True
  config.batch_size = 200           # test batch of every adaptation stream (long one included)
  config.protocols = ("reset_per_shift", "continual")
  config.source_checkpoint = ""     # an Orbax checkpoint of the source variables skips training

  config.data = dict(
      name="mnist1d",
      pool="fresh",                 # fresh: pool_size new generator signals; test: the 1000-signal split
      pool_size=10_000,
      pool_seed=1,
      severity=5,
      corruptions=(),               # () = the 15 of kfuse.data.corruptions.CORRUPTIONS, in order
      cache_dir="",                 # default: $KFUSE_CACHE or ~/.cache/kfuse
  )
  config.model = dict(name="cnn1d", widths=(32, 64), blocks_per_stage=1, kernel_size=5,
                      pool="avg", bn_momentum=0.9)
  config.source = dict(
      steps=3000, batch_size=128, log_every=500,
      optimizer=dict(name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=100,
                     kwargs=dict(weight_decay=1e-4)),
      fisher=dict(samples=2000, batch_size=64))   # EATA's Fisher: clean training samples
  config.methods = ml_collections.ConfigDict(
      {k: v for k, v in methods().items() if k not in ("vida", "kff")}, sort_keys=False)   # ViT ones: images_vit
  config.long = dict(rounds=10, samples_per_domain=2000,
                     methods=("source", "bn_adapt", "tent", "eata", "sar", "cotta", "rotta"))

  if variant.startswith("images"):
    # Design (issue 19, experiments/tta_bench/README.md): 50 adaptation steps per corruption as
    # on CIFAR-10-C (2,500 images at batch 50; CIFAR: 10,000 at 200); :images_quick is a
    # one-seed smoke run at 10 steps per corruption.
    quick = variant == "images_quick"
    config.seeds = (0,) if quick else (0, 1, 2)
    config.batch_size = 100 if quick else 50
    config.data = dict(
        name="glyph_digits",        # a kfuse.data.image_tasks task: typeset digits, 16x16
        data_seed=0,                # the task's images (the run seed draws the corruptions)
        sizes=(2000, 300, 1000) if quick else (2000, 300, 2500),   # train, val, test (= pool)
        severity=5,
        corruptions=(),             # () = the 15 of kfuse.data.image_corruptions, CIFAR-10-C order
        cache_dir="")
    config.model = dict(name="cnn2d", widths=(16, 32), blocks_per_stage=1, kernel_size=3,
                        pool="avg", bn_momentum=0.9)
    config.source.steps = 600
    config.source.fisher = dict(samples=1000, batch_size=64)
    config.long = dict(rounds=2 if quick else 3, samples_per_domain=200 if quick else 500,
                       methods=("bn_adapt", "tent") if quick
                       else ("bn_adapt", "tent", "eata", "cotta"))
    keep = ("source", "bn_adapt", "tent", "eata") + (() if quick else ("cotta",))
    config.methods = ml_collections.ConfigDict({k: methods()[k] for k in keep}, sort_keys=False)
  if variant == "images_vit":
    # Issue 19: the continual-TTA methods built for ViTs (ViDA, KFF) beside CoTTA. The ViT
    # overfits the 2,000 training glyphs (79 % clean accuracy), so it gets 8,000; 10 steps
    # per corruption (1,000 images at batch 100) as :images_quick.
    config.data.sizes = (8000, 300, 1000)
    config.batch_size = 100
    config.model = dict(name="vit", patch_size=4, dim=32, depth=2, num_heads=2)
    config.source.steps = 2000
    config.protocols = ("continual",)
    config.long = dict(rounds=0, samples_per_domain=0, methods=())
    keep = ("source", "tent", "cotta", "vida", "kff")
    config.methods = ml_collections.ConfigDict({k: methods()[k] for k in keep}, sort_keys=False)
    config.methods.vida.params.target = r"(^|/)attn/"     # as released: the attention projections
  if variant == "quick":
    config.data.pool = "test"       # 1000 signals per corruption
    config.source.steps = 800
    config.long = dict(rounds=3, samples_per_domain=200,
                       methods=("bn_adapt", "tent", "cotta", "rotta"))
  return config
