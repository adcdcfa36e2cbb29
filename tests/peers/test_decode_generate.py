"""kfuse.decode.generate (KV cache, jitted loop) vs transformers' greedy `generate`."""

from __future__ import annotations

import numpy as np
import pytest

from .peer import require
from .test_hf_models import FAMILIES, _save

torch = require("torch")
transformers = require("transformers")

from kfuse import decode  # noqa: E402
from kfuse.models import hf  # noqa: E402

pytestmark = pytest.mark.peers
PROMPTS = [[5, 17, 3, 60, 11], [9, 1, 44, 2, 30, 7, 7, 12, 40], [33, 2]]
NEW = 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("decode_generate")


def _hf_greedy(path, prompts, new):
  """transformers' greedy generate, left-padded batch with an attention mask."""
  m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  n = max(len(p) for p in prompts)
  ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                     min_new_tokens=new, pad_token_id=0, eos_token_id=None)
  return out[:, n:].numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_matches_transformers(root, family):
  path = _save(root, family)
  ref = _hf_greedy(path, PROMPTS, NEW)
  got = decode.generate(hf.load(path), PROMPTS, NEW).tokens
  np.testing.assert_array_equal(got, ref)
