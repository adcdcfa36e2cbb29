"""Hugging Face causal LMs as Flax NNX modules: Llama, Mistral, Qwen2, GPT-2.

    from kfuse.models import hf
    model = hf.load("path/to/hf_dir", mesh=hf.make_mesh(fsdp=2, tensor=4), dtype="bfloat16")
    logits = hf.forward(model, tokens)            # [B, T] int -> [B, T, vocab], jitted
    hf.save(model, "out_dir")                     # an HF directory transformers loads
    tok = hf.load_tokenizer("path/to/hf_dir")     # tokenizer.json; tok.encode(text).offsets

Parameter paths are the HF tensor names in HF layouts (`to_hf_dict`), so a
merge of two loaded models is ``kfuse.merge.merge(method, [hf.to_hf_dict(a),
hf.to_hf_dict(b)])`` and ``hf.with_hf_dict(a, merged)`` is the merged model.
The maths of each family is in one file: `llama` (Llama, Mistral, Qwen2) and `gpt2`.
"""

from __future__ import annotations

from flax import nnx

from kfuse.models.hf.config import ARCHITECTURES, LMConfig, from_hf
from kfuse.models.hf.loading import (FAMILIES, MESH_AXES, RULES, batch_sharding, build,
                                     check_mesh, load, make_mesh, partition_spec, save,
                                     to_hf_dict, with_hf_dict)
from kfuse.models.hf.tokenizer import Encoding, Tokenizer, load_tokenizer

__all__ = ["ARCHITECTURES", "LMConfig", "from_hf", "FAMILIES", "MESH_AXES", "RULES",
           "batch_sharding", "build", "check_mesh", "load", "make_mesh", "partition_spec",
           "save", "to_hf_dict", "with_hf_dict", "Encoding", "Tokenizer", "load_tokenizer",
           "forward"]


@nnx.jit
def forward(model: nnx.Module, ids):
  """Logits ``[B, T, vocab]`` of ``model`` on token ids ``[B, T]`` (jitted per shape)."""
  return model(ids)
