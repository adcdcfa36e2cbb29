"""Session fixtures for peer-parity tests (tiny random Llama models)."""

import pytest

from .llama_fixtures import make_llama_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """Base + 3 fine-tune-like experts (4 layers, hidden 64), built once per session.

    Returns a dict with keys ``base``, ``expert1``, ``expert2``, ``expert3`` -> dir paths.
    """
    root = tmp_path_factory.mktemp("llama_family")
    return make_llama_family(root, n_experts=3, seed=1234, expert_scale=0.002)
