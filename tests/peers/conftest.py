"""Session fixtures for peer-parity tests (tiny random Llama models)."""

import os

import pytest

from .llama_fixtures import make_llama_dir, make_llama_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """Tiny Llama models (4 layers, hidden 64, vocab 256), built once per session.

    Keys -> model dirs:
      ``base``, ``expert1..3``: N(0, 0.02) base + fine-tune-like heavy-tailed deltas (~2e-3).
      ``wide_base``, ``wide_expert``: N(0, 1) base + deltas of ~0.5.  Used for
      arcee_fusion, whose row-wise softmax-KL importance is numerically ill-conditioned
      in float32 when logits differ by only ~1e-3 (f32 vs f64 already disagree there).
    """
    root = str(tmp_path_factory.mktemp("llama_family"))
    fam = make_llama_family(root, n_experts=3, seed=1234, expert_scale=0.002)
    fam["wide_base"] = make_llama_dir(os.path.join(root, "wide_base"), 4321, scale=1.0)
    fam["wide_expert"] = make_llama_dir(
        os.path.join(root, "wide_expert"), 4322, perturb_from=fam["wide_base"], scale=0.5
    )
    return fam
