"""kfuse.merge.hf_statistics against PyTorch forward hooks / autograd on the same HF models.

Tiny random Llama (untied, GQA) and GPT-2 (tied, Conv1D) are built by transformers;
the references take every nn.Linear / Conv1D input with a forward hook, mask the
padded tokens and form the Grams in float64 NumPy; the Fisher reference is torch
autograd of the same label-free score per window, squared and averaged in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from .peer import require

torch = require("torch")
transformers = require("transformers")

from kfuse.merge import hf_statistics as H  # noqa: E402
from kfuse.merge import statistics as ST  # noqa: E402
from kfuse.models import hf  # noqa: E402
from kfuse.tree import KfuseError  # noqa: E402

pytestmark = pytest.mark.peers

_FAMILIES = {
    "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=61, tie_word_embeddings=False)),
    "gpt2": lambda: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=61, n_positions=64, bos_token_id=0,
        eos_token_id=0)),
}


@pytest.fixture(scope="module", params=sorted(_FAMILIES))
def family(request, tmp_path_factory):
  cls, cfg = _FAMILIES[request.param]()
  torch.manual_seed(3)
  m = cls(cfg)
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0.0, 0.2)
  d = str(tmp_path_factory.mktemp(request.param))
  m.save_pretrained(d, safe_serialization=True)
  return request.param, m.eval(), d


def _batches():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 61, size=37)           # 37 tokens: windows of 8, last one padded
  return H.token_batches(ids, seq_len=8, batch_size=3)


def _torch_grams(m, batches):
  """{weight name: Σ_t m_t x_t x_tᵀ / n} in float64 from forward hooks."""
  conv1d = transformers.pytorch_utils.Conv1D
  sums, handles = {}, []
  mask = [None]
  for name, mod in m.named_modules():
    if isinstance(mod, (torch.nn.Linear, conv1d)):
      def hook(mod, args, out, name=name):
        x = args[0].detach().double().numpy().reshape(-1, args[0].shape[-1])
        x = x[mask[0].reshape(-1)]
        g, n = sums.get(name + ".weight", (0.0, 0))
        sums[name + ".weight"] = (g + x.T @ x, n + len(x))
      handles.append(mod.register_forward_hook(hook))
  with torch.no_grad():
    for b in batches:
      x = b["x"]
      mask[0] = x >= 0
      m(torch.tensor(np.where(x >= 0, x, 0), dtype=torch.long))
  for h in handles:
    h.remove()
  return {k: g / n for k, (g, n) in sums.items()}, {k: n for k, (g, n) in sums.items()}


def _torch_fisher(m, batches):
  acc, n = {}, 0
  for b in batches:
    for row in b["x"]:
      keep = row >= 0
      if not keep.any():
        continue
      m.zero_grad()
      logits = m(torch.tensor(np.where(keep, row, 0)[None], dtype=torch.long)).logits[0]
      logp = torch.log_softmax(logits.float(), -1)[torch.tensor(keep)]
      (torch.sqrt(torch.exp(logp)).detach() * logp).sum().backward()
      for name, p in m.named_parameters():
        acc[name] = acc.get(name, 0.0) + p.grad.double().numpy() ** 2
      n += 1
  return {k: v / n for k, v in acc.items()}, n


def test_grams_match_torch_hooks(family):
  name, m, d = family
  batches = _batches()
  want, counts = _torch_grams(m, batches)
  if m.config.tie_word_embeddings:   # a tied head is the embedding: no tensor of its own
    want.pop("lm_head.weight")
  st = H.grams(hf.load(d), batches)
  assert set(st.gram) == set(want)
  if name == "gpt2":   # Conv1D [in, out]: the Gram is over the input rows
    assert st.gram["transformer.h.0.mlp.c_proj.weight"].shape == (128, 128)
  for k, g in want.items():
    assert st.tokens[k] == counts[k] == 37
    np.testing.assert_allclose(np.asarray(st.gram[k]), g, rtol=2e-5,
                               atol=2e-5 * np.abs(g).max(), err_msg=k)
  assert st.examples == 5


def test_fisher_matches_torch_autograd(family):
  name, m, d = family
  batches = _batches()
  want, n = _torch_fisher(m, batches)
  f = H.fisher(hf.load(d), batches)
  assert f.examples == n == 5
  assert set(f.fisher) == set(want)
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(f.fisher[k]), v, rtol=1e-3, atol=1e-5 * v.max(),
                               err_msg=k)


def test_round_trip_and_bad_input(family, tmp_path):
  name, m, d = family
  model = hf.load(d)
  st = H.collect(model, _batches(), fisher_mode="batch")
  back = ST.load(ST.save(str(tmp_path / "st"), st))
  assert set(back.gram) == set(st.gram) and set(back.fisher) == set(st.fisher)
  for k in st.gram:
    np.testing.assert_array_equal(np.asarray(back.gram[k]), np.asarray(st.gram[k]))
    assert back.tokens[k] == st.tokens[k]
  with pytest.raises(KfuseError, match="pad on the right"):
    H.grams(model, [{"x": np.array([[-1, 3, 4]])}])
  with pytest.raises(KfuseError, match="no tokens"):
    H.grams(model, [{"x": np.full((2, 4), -1)}])
