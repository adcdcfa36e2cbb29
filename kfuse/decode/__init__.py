"""Decode-time fusion: KV-cache generation, logits processors, proxy-tuning, DLF, ensembles.

    from kfuse import decode
    out = decode.generate([model], prompts, max_new_tokens=32)                 # greedy
    out = decode.generate([large, small, small_tuned], prompts, 32,
                          processor=decode.proxy_tune(alpha=1.0))              # proxy-tuning
    out = decode.generate([large, small, expert_a, expert_b], prompts, 32,
                          processor=decode.dlf(experts=2))                     # DLF
    logp = decode.score([large, small, small_tuned], ids, decode.proxy_tune()) # teacher-forced
    vocab = decode.CrossVocab([tok_a, tok_b], [a.config.vocab_size, b.config.vocab_size])
    out = decode.generate_cross([a, b], vocab, ["def f("], 32,
                                processor=decode.unite(vocab))                 # UniTE
    out = decode.generate_cross([a, b], vocab, ["def f("], 32,
                                processor=decode.deepen(vocab, [a, b]))        # DeePEn

`generate` and `score` are in `kfuse.decode.loop`; the processors are in `kfuse.decode.processors`;
models with different tokenizers: `kfuse.decode.crossvocab` (union string vocabulary,
`generate_cross`), `kfuse.decode.unite` (UniTE) and `kfuse.decode.deepen` (DeePEn).
"""

from kfuse.decode.loop import (Generation, check_models, generate, pad_prompts, score,
                                   stop_token_ids)
from kfuse.decode.processors import (ENSEMBLE_RULES, DLFState, Processor, chain, dlf,
                                     dlf_objective, dlf_weights, ensemble, identity,
                                     proxy_tune, temperature, top_k, top_p)
from kfuse.decode.crossvocab import CrossGeneration, CrossVocab, generate_cross
from kfuse.decode.deepen import deepen
from kfuse.decode.unite import unite

__all__ = ["CrossGeneration", "CrossVocab", "generate_cross", "deepen", "unite",
           "Generation", "check_models", "generate", "pad_prompts", "score", "stop_token_ids",
           "ENSEMBLE_RULES", "DLFState", "Processor", "chain", "dlf", "dlf_objective",
           "dlf_weights", "ensemble", "identity", "proxy_tune", "temperature", "top_k", "top_p"]
