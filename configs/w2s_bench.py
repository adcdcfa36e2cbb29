"""Weak-to-strong decoding benchmark: proxy-tuning and Dynamic Logit Fusion in bits per character.

    python -m kfuse.main --config=configs/w2s_bench.py          # the measured run
    python -m kfuse.main --config=configs/w2s_bench.py:quick    # a smoke run (tiny models)

A larger and a smaller Llama-shaped LM are pre-trained on ``general`` text (a mixture of
`kfuse.data.text` domains, weights), the small one is fine-tuned on each of ``domains``,
the large one on ``domains[0]`` and on all of them (the upper bounds); every model and
fusion is scored on the test splits (see `kfuse.decode.w2s_bench`). Writes results.json
and results.md to ``workdir``.
"""

import ml_collections

from kfuse.configs import one_of, parse_arg


def get_config(arg=None):
  """``arg``: None / 'full' or 'quick'."""
  variant = parse_arg(arg, variant=("full", one_of("full", "quick"))).variant
  quick = variant == "quick"
  config = ml_collections.ConfigDict()
  config.task = "w2s_bench"
  config.workdir = f"workdirs/w2s_bench_{variant}"
  config.overwrite = False          # replace the results of an earlier run in workdir
  config.progress = True            # training progress lines on stderr
  config.seed = 0
  config.general = dict(shakespeare=0.45, pydoc=0.45, pysource=0.1)   # pre-training mixture
  config.domains = ("pysource", "pydoc")   # experts; the first is the single-task domain
  config.vocab_size = 512 if quick else 1024   # byte-level BPE shared by every model
  config.seq_len = 64 if quick else 128     # tokens per training / scoring window
  config.batch_size = 8 if quick else 16    # training windows per step
  config.large = (dict(dim=32, layers=1, heads=2, ffn=64) if quick else
                  dict(dim=128, layers=4, heads=4, ffn=384))    # the strong model
  config.small = (dict(dim=16, layers=1, heads=2, ffn=32) if quick else
                  dict(dim=64, layers=2, heads=4, ffn=192))     # the weak models
  config.pretrain_steps = 20 if quick else 300   # optimizer steps on the general mixture
  config.pretrain_lr = 3e-3
  config.finetune_steps = 10 if quick else 100   # optimizer steps on a domain
  config.finetune_lr = 1e-3
  config.alpha = 1.0                 # proxy-tuning's α (every expert)
  config.dlf = dict(lo=0.0, hi=2.0, grid=21, newton_steps=10)   # DLF's box and solver
  config.eval_windows = 4 if quick else 64    # test windows scored per domain
  config.eval_batch_size = 4 if quick else 16
  return config
