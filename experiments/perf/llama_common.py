"""The prelude shared by hf_bench.py and train_bench.py: one random HF Llama in both frameworks.

`parse_args` reads the Llama shape (hidden, layers, heads, kv_heads, mlp, vocab), the batch,
the repeats and the output paths; `llama_dir` writes the random Llama with transformers
(``torch.manual_seed(0)``, untied embeddings, float32) once under ``--root`` and returns its
directory; `environment` and `append_row` are the fields and the JSON-lines file of a result row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform


def parse_args(batch: int, seq: int, root: str, out: str) -> argparse.Namespace:
  """The command line of both benchmarks; ``batch`` / ``seq`` / ``root`` / ``out`` are its defaults."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--kv_heads", type=int, default=12)
  ap.add_argument("--mlp", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, default=batch)
  ap.add_argument("--seq", type=int, default=seq)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--root", default=root)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), out))
  return ap.parse_args()


def llama_dir(a: argparse.Namespace) -> str:
  """The random Llama of shape ``a`` saved with ``save_pretrained`` under ``a.root`` (once)."""
  import torch
  import transformers
  cfg = transformers.LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers,
                                 num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                                 intermediate_size=a.mlp, vocab_size=a.vocab,
                                 max_position_embeddings=max(2048, a.seq),
                                 tie_word_embeddings=False)
  path = os.path.join(a.root, f"llama_h{a.hidden}_l{a.layers}_v{a.vocab}")
  if not os.path.isdir(path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path


def shape(a: argparse.Namespace) -> dict:
  """The row fields naming the model and batch shape."""
  return dict(batch=a.batch, seq=a.seq, hidden=a.hidden, layers=a.layers, heads=a.heads,
              kv_heads=a.kv_heads, vocab=a.vocab)


def environment(tm) -> dict:
  """The row fields naming the software and machine (``tm``: the transformers model)."""
  import jax
  import torch
  import transformers
  return dict(torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), jax=jax.__version__,
              torch=torch.__version__, transformers=transformers.__version__,
              attn=tm.config._attn_implementation, machine=platform.machine())


def append_row(row: dict, out: str) -> None:
  """Print ``row`` as JSON and append it as one line to ``out``."""
  print(json.dumps(row))
  with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
