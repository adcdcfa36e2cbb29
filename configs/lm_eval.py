"""Perplexity of an HF causal LM directory (Llama, Mistral, Qwen2, GPT-2) on a text file.

    python -m kfuse.main --config=configs/lm_eval.py:path/to/hf_dir --config.text_file=wiki.txt
    python -m kfuse.main --config=configs/lm_eval.py:path/to/hf_dir --config.text_file=t.txt \
        --config.dtype=bfloat16 --config.mesh.fsdp=2 --config.mesh.tensor=4

Windows of ``seq_len`` tokens, non-overlapping; perplexity = exp(mean NLL of every
predicted token) (kfuse/bench/lm_eval.py). Writes ``workdir/results.json``.
"""

import ml_collections

from kfuse.configs import parse_arg


def get_config(arg=None):
  """``arg``: the model directory (``model_dir=PATH``)."""
  model_dir = parse_arg(arg, model_dir="").model_dir
  config = ml_collections.ConfigDict()
  config.task = "lm_eval"
  config.model_dir = model_dir    # HF directory: config.json + safetensors
  config.text_file = ""           # UTF-8 text to score
  config.tokenizer = ""           # tokenizer.json or its directory; '' = model_dir
  config.seq_len = 512            # tokens per window (GPT-2: at most n_positions)
  config.eval_batch_size = 8      # windows per forward pass
  config.max_tokens = 0           # score only the first N tokens; 0 = all
  config.dtype = ""               # parameter / compute dtype (e.g. bfloat16); '' = checkpoint's
  config.mesh = dict(data=1, fsdp=1, tensor=1)   # device mesh axes (product ≤ devices)
  config.workdir = "workdirs/lm_eval"
  config.overwrite = False        # replace workdir's results.json
  config.progress = True          # one line per batch on stderr
  return config
