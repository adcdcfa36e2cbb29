"""Decode-time fusion: KV-cache generation, logits processors, proxy-tuning, DLF, ensembles.

    from kfuse import decode
    out = decode.generate([model], prompts, max_new_tokens=32)                 # greedy
    out = decode.generate([large, small, small_tuned], prompts, 32,
                          processor=decode.proxy_tune(alpha=1.0))              # proxy-tuning
    out = decode.generate([large, small, expert_a, expert_b], prompts, 32,
                          processor=decode.dlf(experts=2))                     # DLF
    logp = decode.score([large, small, small_tuned], ids, decode.proxy_tune()) # teacher-forced

`generate` and `score` are in `kfuse.decode.loop`; the processors are in `kfuse.decode.processors`.
"""

from kfuse.decode.loop import (Generation, check_models, generate, pad_prompts, score,
                                   stop_token_ids)
from kfuse.decode.processors import (ENSEMBLE_RULES, DLFState, Processor, chain, dlf,
                                     dlf_objective, dlf_weights, ensemble, identity,
                                     proxy_tune, temperature, top_k, top_p)

__all__ = ["Generation", "check_models", "generate", "pad_prompts", "score", "stop_token_ids",
           "ENSEMBLE_RULES", "DLFState", "Processor", "chain", "dlf", "dlf_objective",
           "dlf_weights", "ensemble", "identity", "proxy_tune", "temperature", "top_k", "top_p"]
