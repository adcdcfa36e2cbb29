"""FuseLLM: fuse several source LMs (different tokenizers) into a target (`kfuse.fusion.bench`).

    python -m kfuse.main --config=configs/fusellm.py          # the benchmark (bits per char)
    python -m kfuse.main --config=configs/fusellm.py:quick    # a smoke run (~minutes, tiny)

Sources: zoo GPTs, each with its own tokenizer (algorithm, vocabulary, training domains);
the target: a GPT with a BPE tokenizer on all domains, briefly pre-trained. The target is
continued on the same batches with CLM only (the control), single-source KD, and FuseLLM
MinCE / AvgCE over all sources (λ·CLM + (1−λ)·fusion, λ = 0.9). Bits per character on each
domain's test documents. Writes results.json and table.md to ``workdir``.
"""

import ml_collections

from kfuse.configs import one_of, parse_arg


def _model(tokenizer, vocab_size, domains, steps, dim=64, depth=2, num_heads=4):
  return dict(tokenizer=tokenizer, vocab_size=vocab_size, domains=domains, steps=steps,
              batch_size=12, learning_rate=3e-3, dim=dim, depth=depth, num_heads=num_heads)


def get_config(arg=None):
  """``arg``: ``quick`` (a smoke run) or nothing (the benchmark)."""
  variant = parse_arg(arg, variant=("full", one_of("full", "quick"))).variant
  quick = variant == "quick"
  c = ml_collections.ConfigDict()
  c.task = "fusion_bench"
  c.job = "fusellm"                # fusellm: all sources at once; fusechat: pairwise + merge
  c.seed = 0
  c.domains = ("shakespeare", "pydoc", "pysource")
  c.seq_len = 32 if quick else 48  # tokens per sequence (every model's context)
  c.target = _model("bpe", 2048, ("shakespeare", "pydoc", "pysource"), 20 if quick else 60)
  c.sources = dict(
      bard=_model("unigram", 1536, ("shakespeare",), 20 if quick else 120),
      coder=_model("wordpiece", 1536, ("pysource", "pydoc"), 20 if quick else 120),
  )
  # an HF causal-LM directory as a source (its tokenizer.json; `tokenizer`: another one):
  #   c.sources["hf"] = dict(model_dir="path/to/hf_dir", tokenizer="")
  c.fusion = dict(
      k=10,                         # top-K per position of each source
      vocab_map="mined",            # mined (exact, else min edit distance) | ms
      rules=("min_ce", "avg_ce"),   # FuseLLM fusion rules run
      lm_loss_weight=0.9,           # λ of λ·CLM + (1−λ)·fusion
      temperature=1.0,
      ce_unit="char",               # source CE for MinCE / AvgCE: token (FuseLLM) | char
      steps=10 if quick else 80,    # continued-training steps of every variant
      batch_size=12,
      learning_rate=1e-3,
      sequences_per_domain=16 if quick else 96,
  )
  c.merges = {}                     # fusechat only
  c.mesh = dict(data=1, fsdp=1, tensor=1)   # device mesh of fusion training and scoring
  c.eval_chars = 2000 if quick else 20000   # test characters per domain
  c.data = dict(cache_dir="")       # tokenizer / vocabulary-map cache ('' = $KFUSE_CACHE)
  c.workdir = f"workdirs/fusion_{variant}"  # shared with configs/fusechat.py
  c.overwrite = False
  c.progress = True
  return c
