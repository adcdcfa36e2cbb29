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


# ------------------------------------------- the streaming merge of HF directories


def _experts(tmp_path_factory, family: str):
  cls, cfg = _FAMILIES[family]()
  root = tmp_path_factory.mktemp(f"{family}_experts")
  dirs, stats, rng = [], [], np.random.default_rng(7)
  for i in range(2):
    torch.manual_seed(10 + i)
    m = cls(cfg)
    with torch.no_grad():
      for p in m.parameters():
        p.normal_(0.0, 0.2)
    d = str(root / f"e{i}")
    m.save_pretrained(d, safe_serialization=True)
    st = H.collect(hf.load(d), H.token_batches(rng.integers(0, 61, 150), 16, 4),
                   fisher_mode="batch")
    stats.append(ST.save(str(root / f"s{i}"), st))
    dirs.append(d)
  return dirs, stats


@pytest.fixture(scope="module", params=sorted(_FAMILIES))
def experts(request, tmp_path_factory):
  return (request.param,) + _experts(tmp_path_factory, request.param)


def _reference(method, dirs, stats, alpha=0.95, eps=1e-6):
  """float64 NumPy RegMean / Fisher merge of the experts' tensors (read by safetensors)."""
  from safetensors.numpy import load_file
  ws = [load_file(f"{d}/model.safetensors") for d in dirs]
  sts = [ST.load(s) for s in stats]
  out = {}
  if method == "fisher":
    norms = [np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in s.fisher.values()))
             for s in sts]
    c = 1 / (np.array(norms) + eps)
    c = c / c.sum()
  for k in ws[0]:
    w = [np.asarray(x[k], np.float64) for x in ws]
    if method == "fisher":
      f = [np.asarray(s.fisher[k], np.float64) + eps for s in sts]
      out[k] = sum(ci * fi * wi for ci, fi, wi in zip(c, f, w)) / sum(ci * fi for ci, fi in zip(c, f))
    elif k in sts[0].gram:
      conv1d = any(k.endswith(f"{n}.weight") for n in ("c_attn", "c_fc", "c_proj"))
      g = [np.asarray(s.gram[k], np.float64) for s in sts]
      g = [alpha * gi + (1 - alpha) * np.diag(np.diag(gi)) for gi in g]
      x = [wi if conv1d else wi.T for wi in w]        # [in, out]
      sol = np.linalg.solve(sum(g), sum(gi @ xi for gi, xi in zip(g, x)))
      out[k] = sol if conv1d else sol.T
    else:
      out[k] = np.mean(w, axis=0)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_streamed_merge_equals_float64_reference(experts, method, tmp_path):
  from kfuse.merge import runner
  family, dirs, stats = experts
  out = str(tmp_path / "merged")
  res = runner.merge_checkpoints(method, dirs, None, out, statistics=stats, progress=False)
  assert res["format"] == "safetensors"
  want = _reference(method, dirs, stats)
  got = hf.to_hf_dict(hf.load(out))
  assert set(got) == set(want)
  for k, w in want.items():   # float32 solves; GPT-2's c_proj Grams (150 tokens, 128
    # inputs) are near-singular, shrunk only by α: measured 2e-4 of the tensor's max there
    np.testing.assert_allclose(np.asarray(got[k], np.float64), w, rtol=0,
                               atol=5e-4 * np.abs(w).max(), err_msg=k)
  # transformers loads it, and its logits are kfuse's on the merged weights
  ids = np.random.default_rng(1).integers(0, 61, (2, 9))
  cls, _ = _FAMILIES[family]()
  with torch.no_grad():
    t = cls.from_pretrained(out).eval()(torch.tensor(ids)).logits.numpy()
  k = np.asarray(hf.forward(hf.load(out), ids))
  assert np.max(np.abs(k - t)) <= 1e-4 * np.max(np.abs(t))


@pytest.mark.slow
def test_streamed_merge_bad_statistics(experts, tmp_path, tmp_path_factory, capfd):
  from kfuse.merge import runner
  family, dirs, stats = experts
  other = "gpt2" if family == "llama" else "llama"
  _, other_stats = _experts(tmp_path_factory, other)
  with pytest.raises(KfuseError, match="statistics of another model") as e:
    runner.merge_checkpoints("regmean", dirs, None, str(tmp_path / "a"), statistics=other_stats,
                             progress=False)
  assert "\n" not in str(e.value)
  with pytest.raises(KfuseError, match="one per model"):
    runner.merge_checkpoints("regmean", dirs, None, str(tmp_path / "b"), statistics=stats[:1],
                             progress=False)
  st = ST.load(stats[1])
  k = sorted(st.gram)[0]
  bad = dict(st.gram)
  bad[k] = np.where(np.eye(len(bad[k])) > 0, np.nan, bad[k]).astype(np.float32)
  nan_path = ST.save(str(tmp_path / "nan"), ST.Statistics(bad, st.tokens, st.fisher, st.examples))
  with pytest.raises(KfuseError, match="NaN") as e:
    runner.merge_checkpoints("regmean", dirs, None, str(tmp_path / "c"),
                             statistics=[stats[0], nan_path], progress=False)
  assert str(tmp_path / "nan") in str(e.value) and k in str(e.value)
  assert not (tmp_path / "c").exists()
  capfd.readouterr()
  # 20 tokens < d_in = hidden (32): said so; α's shrink makes the solve work, α = 1 cannot
  few = H.grams(hf.load(dirs[0]), H.token_batches(np.arange(20) % 61, 10, 2))
  few_path = ST.save(str(tmp_path / "few"), few)
  runner.merge_checkpoints("regmean", dirs, None, str(tmp_path / "d"),
                           statistics=[few_path, stats[1]], progress=False)
  assert "fewer tokens than inputs" in capfd.readouterr().err
  with pytest.raises(KfuseError, match="rank-deficient"):
    runner.merge_checkpoints("regmean", dirs, None, str(tmp_path / "e"),
                             statistics=[few_path, stats[1]], params={"alpha": 1.0},
                             progress=False)
