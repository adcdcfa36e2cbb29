"""Knowledge fusion of language models across tokenizers: FuseLLM and FuseChat.

* `align`: token alignment (character offsets; FuseLLM's DTW), vocabulary maps (MinED,
  FuseChat-2's MS statistics, cached per tokenizer pair), a source's top-K re-expressed at the
  target's positions and in its vocabulary.
* `representations`: sharded, resumable top-K log-prob + CE files (plain ``.npz``).
* `losses`: MinCE / AvgCE fusion over sparse targets, λ·CLM + (1−λ)·fusion objective.
* `bench`: the FuseLLM / FuseChat jobs (``configs/fusellm.py``, ``configs/fusechat.py``).

Wan et al., "Knowledge Fusion of Large Language Models" (ICLR 2024); Wan et al., "FuseChat:
Knowledge Fusion of Chat Models" (2024).
"""
