"""Tiny random HF-Llama-shaped model directories for parity tests against peers.

``make_llama_dir`` writes ``config.json`` + ``model.safetensors`` (torch layout,
``[out_features, in_features]``) with the standard Llama tensor names.

With ``perturb_from=<base dir>`` the new model is ``base + delta`` where the
delta ("task vector") is heavy-tailed (Student-t with a per-tensor degree of
freedom), has a per-tensor and per-row scale, shares a component with every
other model perturbed from the same base (so task vectors are correlated, as
real fine-tunes are), and -- crucially for top-k / sort based methods -- the
float32 difference ``expert - base`` has pairwise distinct magnitudes inside
every tensor, so magnitude rankings are unambiguous.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, Optional

import numpy as np

__all__ = ["make_llama_dir", "llama_tensor_shapes", "load_dir", "make_llama_family"]


def llama_tensor_shapes(
    *, num_layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int
) -> Dict[str, tuple]:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _name_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def _heavy_tailed(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    """Student-t noise with per-tensor df in [2.5, 6] and a per-row log-normal scale."""
    df = rng.uniform(2.5, 6.0)
    x = rng.standard_t(df, size=shape)
    x /= np.sqrt(df / (df - 2.0))  # unit variance
    x *= scale * np.exp(rng.normal(0.0, 0.35))  # per-tensor scale
    if len(shape) >= 2:
        x *= np.exp(rng.normal(0.0, 0.3, size=(shape[0],) + (1,) * (len(shape) - 1)))
    return x


def _distinct_delta(base: np.ndarray, expert: np.ndarray, max_iter: int = 64) -> np.ndarray:
    """Nudge ``expert`` by ulps until |float32(expert - base)| is tie-free and nonzero."""
    base = base.astype(np.float32)
    expert = expert.astype(np.float32).copy()
    flat_b = base.reshape(-1)
    flat_e = expert.reshape(-1)
    for _ in range(max_iter):
        mag = np.abs(flat_e - flat_b)  # float32 arithmetic, as torch / jax do it
        order = np.argsort(mag, kind="stable")
        sm = mag[order]
        dup = np.zeros_like(sm, dtype=bool)
        dup[1:] = sm[1:] == sm[:-1]
        dup |= sm == 0
        if not dup.any():
            return expert
        idx = order[dup]
        # push the later duplicate further from the base by one ulp of the larger operand
        # (a ulp of a tiny expert value may not move the float32 difference at all)
        sign = np.where(flat_e[idx] >= flat_b[idx], np.float32(1), np.float32(-1))
        step = np.spacing(np.maximum(np.abs(flat_e[idx]), np.abs(flat_b[idx])))
        flat_e[idx] = (flat_e[idx] + sign * step).astype(np.float32)
    raise RuntimeError("could not make task-vector magnitudes distinct")


def load_dir(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a model dir (single file or sharded), as float32/bf16-upcast numpy."""
    from safetensors.numpy import load_file

    out = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for f in files:
        try:
            out.update(load_file(os.path.join(path, f)))
        except Exception:  # bf16 is not a numpy dtype: go through torch
            from safetensors.torch import load_file as tload

            for k, v in tload(os.path.join(path, f)).items():
                out[k] = v.float().numpy()
    return out


def make_llama_dir(
    path,
    seed: int,
    *,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: str = "float32",
    perturb_from: Optional[str] = None,
    scale: float = 0.02,
) -> str:
    """Write a random Llama-shaped HF model directory and return its path.

    Without ``perturb_from`` weights are N(0, scale^2) (norm weights 1 + N(0, (scale)^2)).
    With ``perturb_from`` the model is the base plus a heavy-tailed delta of
    typical size ``scale`` (pass e.g. scale=0.002 for fine-tune-like deltas);
    the architecture sizes are then taken from the base's config.json.
    """
    import torch
    from safetensors.torch import save_file

    path = str(path)
    os.makedirs(path, exist_ok=True)
    base_tensors = None
    shared_seed = None
    if perturb_from is not None:
        with open(os.path.join(perturb_from, "config.json")) as fp:
            bcfg = json.load(fp)
        num_layers = bcfg["num_hidden_layers"]
        hidden = bcfg["hidden_size"]
        intermediate = bcfg["intermediate_size"]
        vocab = bcfg["vocab_size"]
        heads = bcfg["num_attention_heads"]
        kv_heads = bcfg["num_key_value_heads"]
        shared_seed = int(bcfg.get("kfuse_fixture_seed", 0)) + 7919
        base_tensors = load_dir(perturb_from)

    shapes = llama_tensor_shapes(
        num_layers=num_layers,
        hidden=hidden,
        intermediate=intermediate,
        vocab=vocab,
        heads=heads,
        kv_heads=kv_heads,
    )
    tensors = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng(_name_seed(seed, name))
        if base_tensors is None:
            if _is_norm(name):
                arr = 1.0 + scale * rng.standard_normal(shape)
            else:
                arr = scale * rng.standard_normal(shape)
            arr = arr.astype(np.float32)
        else:
            base = base_tensors[name].astype(np.float32)
            own = _heavy_tailed(rng, shape, scale)
            srng = np.random.default_rng(_name_seed(shared_seed, name))
            shared = _heavy_tailed(srng, shape, scale)
            mix = rng.uniform(0.3, 0.7)  # how much of the shared direction
            delta = mix * shared + (1.0 - mix) * own
            arr = _distinct_delta(base, base + delta.astype(np.float32))
        tensors[name] = arr

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(v)).to(tdtype) for k, v in tensors.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "kfuse_fixture_seed": int(seed),
    }
    with open(os.path.join(path, "config.json"), "w") as fp:
        json.dump(config, fp, indent=2)
    return path


def make_llama_family(root, *, n_experts: int = 3, seed: int = 0, expert_scale: float = 0.002, **sizes):
    """Base + ``n_experts`` fine-tune-like experts under ``root``; returns dict of paths."""
    root = str(root)
    paths = {"base": make_llama_dir(os.path.join(root, "base"), seed, **sizes)}
    for i in range(n_experts):
        name = f"expert{i + 1}"
        paths[name] = make_llama_dir(
            os.path.join(root, name),
            seed + 100 * (i + 1),
            perturb_from=paths["base"],
            scale=expert_scale,
        )
    return paths
