"""Parity of ``kfuse.mergekit_compat.run_yaml`` against mergekit 0.1.5 itself.

Every case is a mergekit YAML (paths substituted from the session fixture
``llama_family``). mergekit runs in-process on CPU (once per case per session,
cached); kfuse runs through ``run_yaml(yaml_path, out_dir)``.

* deterministic methods: same tensor names / shapes / dtypes and
  ``max|a-b| / max(max|b|, 1e-12) <= 1e-5`` per tensor (bf16 compute: 1e-2);
* DARE / DELLA (random): per-tensor statistics -- fraction of kept delta entries
  within +-0.05 of the density (single-expert cases) or of mergekit's fraction
  (multi-expert cases), and L1(merged - base) within 15% of mergekit's.
"""

from __future__ import annotations

import json
import os
import string
from typing import Dict

import numpy as np
import pytest

from .peer import require

require("mergekit")
torch = require("torch")

pytestmark = pytest.mark.peers

F32_RTOL = 1e-5
BF16_RTOL = 1e-2
STATS_MIN_NUMEL = 4096
STATS_FRAC_TOL = 0.05
STATS_NORM_TOL = 0.15


# --------------------------------------------------------------------------------------
# cases: id -> (yaml template using $base $e1 $e2 $e3, kind, extra)
#   kind: "exact" (float32 parity), "bf16" (bf16 compute parity), "stats" (random methods)
#   extra for stats: {"density": d} when there is exactly one expert (kept fraction ~ d)
# --------------------------------------------------------------------------------------

CASES: Dict[str, tuple] = {}


def _case(name, kind="exact", **extra):
    def deco(text):
        CASES[name] = (text, kind, extra)
        return text

    return deco


_case("linear")("""
merge_method: linear
models:
  - model: $e1
    parameters: {weight: 0.5}
  - model: $e2
    parameters: {weight: 0.3}
  - model: $e3
    parameters: {weight: 0.2}
dtype: float32
""")

_case("linear_no_normalize")("""
merge_method: linear
parameters:
  normalize: false
models:
  - model: $e1
    parameters: {weight: 0.7}
  - model: $e2
    parameters: {weight: 0.6}
""")

# base_model not listed -> mergekit appends it as an ordinary (weighted) input
_case("linear_base_appended")("""
merge_method: linear
base_model: $base
parameters:
  weight: 0.25
models:
  - model: $e1
    parameters: {weight: 1.0}
  - model: $e2
""")

_case("task_arithmetic")("""
merge_method: task_arithmetic
base_model: $base
parameters:
  lambda: 0.8
models:
  - model: $e1
    parameters: {weight: 0.6}
  - model: $e2
    parameters: {weight: 0.4}
  - model: $e3
    parameters: {weight: -0.3}
""")

_case("task_arithmetic_normalize")("""
merge_method: task_arithmetic
base_model: $base
parameters:
  normalize: true
models:
  - model: $base
  - model: $e1
    parameters: {weight: 0.6}
  - model: $e2
    parameters: {weight: 0.9}
""")

# weight gradient over layers (pre/post weights use t=0)
_case("task_arithmetic_weight_gradient")("""
merge_method: task_arithmetic
base_model: $base
models:
  - model: $e1
    parameters:
      weight: [1, 0.5, 0]
  - model: $e2
    parameters:
      weight: 0.5
""")

# conditional (filtered) per-model weights
_case("task_arithmetic_filtered_weight")("""
merge_method: task_arithmetic
base_model: $base
models:
  - model: $e1
    parameters:
      weight:
        - filter: self_attn
          value: 0.7
        - filter: mlp
          value: 0.2
        - value: 0.5
  - model: $e2
    parameters:
      weight: 0.4
""")

_case("ties")("""
merge_method: ties
base_model: $base
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.5}
  - model: $e2
    parameters: {weight: 0.7, density: 0.5}
  - model: $e3
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
""")

_case("ties_no_normalize_lambda")("""
merge_method: ties
base_model: $base
parameters:
  normalize: false
  lambda: 1.2
  density: 0.3
models:
  - model: $e1
    parameters: {weight: 0.5}
  - model: $e2
    parameters: {weight: 0.5}
  - model: $e3
    parameters: {weight: 0.5}
""")

_case("ties_int8_mask")("""
merge_method: ties
base_model: $base
parameters:
  int8_mask: true
  normalize: true
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.5}
  - model: $e2
    parameters: {weight: 0.5, density: 0.3}
""")

_case("ties_rescale")("""
merge_method: ties
base_model: $base
parameters:
  rescale: true
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.3}
  - model: $e2
    parameters: {weight: 0.8, density: 0.3}
  - model: $e3
    parameters: {weight: 0.6, density: 0.3}
""")

# per-model parameters override top-level ones
_case("ties_precedence")("""
merge_method: ties
base_model: $base
parameters:
  weight: 0.5
  density: 0.5
models:
  - model: $e1
  - model: $e2
    parameters: {weight: 1.0, density: 0.3}
  - model: $e3
    parameters:
      density:
        - filter: mlp
          value: 0.2
""")

# density gradient (density 0 at the last layer -> expert dropped there)
_case("ties_density_gradient")("""
merge_method: ties
base_model: $base
models:
  - model: $e1
    parameters:
      weight: 1.0
      density: [1, 0.5, 0]
  - model: $e2
    parameters:
      weight: 0.5
      density: 0.5
""")

_case("breadcrumbs")("""
merge_method: breadcrumbs
base_model: $base
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.5, gamma: 0.05}
  - model: $e2
    parameters: {weight: 0.6, density: 0.5, gamma: 0.05}
""")

_case("breadcrumbs_ties")("""
merge_method: breadcrumbs_ties
base_model: $base
parameters:
  density: 0.3
  normalize: true
models:
  - model: $e1
    parameters: {weight: 1.0}
  - model: $e2
    parameters: {weight: 0.7, gamma: 0.02}
  - model: $e3
    parameters: {weight: 0.4}
""")

_case("slerp")("""
merge_method: slerp
base_model: $base
parameters:
  t: 0.3
models:
  - model: $base
  - model: $e1
""")

# the filter list from the brief, on a shared parameter
_case("slerp_filtered_t")("""
merge_method: slerp
base_model: $e2
parameters:
  t:
    - filter: self_attn
      value: 0.7
    - filter: mlp
      value: 0.2
    - value: 0.5
models:
  - model: $e1
  - model: $e2
""")

_case("slerp_t_gradient")("""
merge_method: slerp
base_model: $base
parameters:
  t: [0, 0.5, 1]
models:
  - model: $base
  - model: $e1
""")

# slerp over slices, slice-level t gradient overrides the top-level one
_case("slerp_slices_t_gradient")("""
merge_method: slerp
base_model: $base
parameters:
  t: 0.5
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $e1
        layer_range: [0, 2]
    parameters:
      t: [0.1, 0.9]
  - sources:
      - model: $base
        layer_range: [2, 4]
      - model: $e1
        layer_range: [2, 4]
""")

_case("nuslerp")("""
merge_method: nuslerp
base_model: $base
models:
  - model: $e1
    parameters: {weight: 0.3}
  - model: $e2
    parameters: {weight: 0.7}
""")

_case("nuslerp_row_wise_no_base")("""
merge_method: nuslerp
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
models:
  - model: $e1
    parameters: {weight: 0.4}
  - model: $e2
    parameters: {weight: 0.6}
""")

_case("nuslerp_last_dim")("""
merge_method: nuslerp
base_model: $base
parameters:
  nuslerp_flatten: false
models:
  - model: $e2
    parameters: {weight: 1.0}
  - model: $e3
    parameters: {weight: 2.0}
""")

_case("multislerp")("""
merge_method: multislerp
base_model: $base
models:
  - model: $e1
    parameters: {weight: 0.5}
  - model: $e2
    parameters: {weight: 0.3}
  - model: $e3
    parameters: {weight: 0.2}
""")

_case("multislerp_no_base")("""
merge_method: multislerp
models:
  - model: $e1
    parameters: {weight: 1.0}
  - model: $e2
    parameters: {weight: 2.0}
  - model: $e3
    parameters: {weight: 3.0}
""")

_case("karcher")("""
merge_method: karcher
models:
  - model: $e1
  - model: $e2
  - model: $e3
""")

# base_model for karcher = just one more equal member
_case("karcher_with_base")("""
merge_method: karcher
base_model: $base
parameters:
  max_iter: 20
  tol: 1.0e-6
models:
  - model: $e1
  - model: $e2
""")

_case("model_stock")("""
merge_method: model_stock
base_model: $base
models:
  - model: $e1
  - model: $e2
  - model: $e3
""")

_case("model_stock_filter_wise")("""
merge_method: model_stock
base_model: $base
parameters:
  filter_wise: true
models:
  - model: $e1
  - model: $e2
  - model: $e3
""")

_case("sce")("""
merge_method: sce
base_model: $base
parameters:
  select_topk: 0.5
models:
  - model: $e1
  - model: $e2
  - model: $e3
""")

_case("sce_no_topk")("""
merge_method: sce
base_model: $base
models:
  - model: $e1
  - model: $e2
""")

# fixture deltas are ~1e-3, so epsilon=1e-3 makes unique/overlap sets non-trivial
_case("ram")("""
merge_method: ram
base_model: $base
parameters:
  epsilon: 0.001
models:
  - model: $e1
  - model: $e2
  - model: $e3
""")

_case("ramplus_tl")("""
merge_method: ramplus_tl
base_model: $base
parameters:
  epsilon: 0.001
  r: 0.3
  alpha: 0.5
models:
  - model: $e1
  - model: $e2
  - model: $e3
""")

_case("nearswap")("""
merge_method: nearswap
base_model: $base
parameters:
  t: 0.001
models:
  - model: $e1
""")

_case("passthrough")("""
merge_method: passthrough
models:
  - model: $e1
""")

_case("passthrough_scale")("""
merge_method: passthrough
models:
  - model: $e2
    parameters:
      scale:
        - filter: o_proj
          value: 0.5
        - value: 1.0
""")

# frankenmerge: layers [0,3) of e1 + [1,4) of e2 -> 6 layers
_case("passthrough_frankenmerge")("""
merge_method: passthrough
dtype: float32
slices:
  - sources:
      - model: $e1
        layer_range: [0, 3]
  - sources:
      - model: $e2
        layer_range: [1, 4]
""")

# arcee_fusion runs on the "wide" pair: with ~1e-3 deltas its softmax-KL importance is
# dominated by float32 rounding (mergekit f32 vs f64 differ by ~1e-1), see conftest.py
_case("arcee_fusion")("""
merge_method: arcee_fusion
base_model: $wbase
models:
  - model: $wbase
  - model: $wexp
""")

_case("linear_bf16_out_f32", kind="bf16")("""
merge_method: linear
dtype: bfloat16
out_dtype: float32
models:
  - model: $e1
    parameters: {weight: 0.5}
  - model: $e2
    parameters: {weight: 0.3}
""")

_case("task_arithmetic_bf16_out_f32", kind="bf16")("""
merge_method: task_arithmetic
base_model: $base
dtype: bfloat16
out_dtype: float32
models:
  - model: $e1
    parameters: {weight: 0.7}
  - model: $e2
    parameters: {weight: 0.4}
""")

# ---- random methods: statistics only ----
_case("dare_linear_single", kind="stats", density=0.5)("""
merge_method: dare_linear
base_model: $base
models:
  - model: $e1
    parameters: {weight: 0.8, density: 0.5}
""")

_case("dare_ties_single", kind="stats", density=0.3)("""
merge_method: dare_ties
base_model: $base
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.3}
""")

_case("della_single", kind="stats", density=0.5)("""
merge_method: della
base_model: $base
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
""")

_case("della_linear_single", kind="stats", density=0.3)("""
merge_method: della_linear
base_model: $base
models:
  - model: $e2
    parameters: {weight: 0.7, density: 0.3, epsilon: 0.15}
""")

_case("dare_ties_multi", kind="stats")("""
merge_method: dare_ties
base_model: $base
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.5}
  - model: $e2
    parameters: {weight: 0.7, density: 0.5}
  - model: $e3
    parameters: {weight: 0.5, density: 0.5}
""")

_case("della_multi", kind="stats")("""
merge_method: della
base_model: $base
parameters:
  epsilon: 0.1
models:
  - model: $e1
    parameters: {weight: 1.0, density: 0.4}
  - model: $e2
    parameters: {weight: 0.6, density: 0.4}
""")

EXACT_CASES = sorted(k for k, v in CASES.items() if v[1] in ("exact", "bf16"))
STATS_CASES = sorted(k for k, v in CASES.items() if v[1] == "stats")


# --------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------


def render(template: str, family: Dict[str, str]) -> str:
    return string.Template(template).substitute(
        base=family["base"],
        e1=family["expert1"],
        e2=family["expert2"],
        e3=family["expert3"],
        wbase=family.get("wide_base", ""),
        wexp=family.get("wide_expert", ""),
    )


def run_mergekit(yaml_text: str, out_dir, *, seed: int = 0) -> str:
    """Run mergekit in-process on CPU (no tokenizer copy, no model card)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out_dir = str(out_dir)
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    options = MergeOptions(
        device="cpu",
        copy_tokenizer=False,
        write_model_card=False,
        quiet=True,
        random_seed=seed,
    )
    run_merge(config, out_dir, options=options)
    return out_dir


def run_kfuse(yaml_text: str, out_dir) -> str:
    """Run kfuse's mergekit-compatible entry point on the same YAML."""
    from kfuse.mergekit_compat import run_yaml

    out_dir = str(out_dir)
    yaml_path = out_dir.rstrip("/") + ".yml"
    with open(yaml_path, "w") as fp:
        fp.write(yaml_text)
    run_yaml(yaml_path, out_dir)
    return out_dir


def load_tensors(path: str) -> Dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert files, f"no .safetensors written in {path}: {os.listdir(path)}"
    out = {}
    for f in files:
        part = load_file(os.path.join(path, f))
        dup = set(out) & set(part)
        assert not dup, f"tensor(s) in more than one shard: {sorted(dup)[:5]}"
        out.update(part)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fp:
            weight_map = json.load(fp)["weight_map"]
        assert set(weight_map) == set(out), "index.json weight_map != tensors on disk"
    return out


@pytest.fixture(scope="session")
def mergekit_outputs(llama_family, tmp_path_factory):
    """Lazily computed, session-cached mergekit output dir per case id."""
    root = tmp_path_factory.mktemp("mergekit_out")
    cache: Dict[str, str] = {}

    def get(case_id: str) -> str:
        if case_id not in cache:
            text = render(CASES[case_id][0], llama_family)
            cache[case_id] = run_mergekit(text, root / case_id)
        return cache[case_id]

    return get


@pytest.fixture(scope="session")
def kfuse_outputs(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("kfuse_out")
    cache: Dict[str, str] = {}

    def get(case_id: str) -> str:
        if case_id not in cache:
            text = render(CASES[case_id][0], llama_family)
            cache[case_id] = run_kfuse(text, root / case_id)
        return cache[case_id]

    return get


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------


def _num_layers(path: str):
    with open(os.path.join(path, "config.json")) as fp:
        return json.load(fp).get("num_hidden_layers")


def assert_same_tensors(got: Dict, ref: Dict, rtol: float, label: str = ""):
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    assert not missing and not extra, f"{label}: missing={missing[:8]} extra={extra[:8]}"
    failures = []
    for name in sorted(ref):
        a, b = got[name], ref[name]
        if tuple(a.shape) != tuple(b.shape):
            failures.append(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
            continue
        if a.dtype != b.dtype:
            failures.append(f"{name}: dtype {a.dtype} != {b.dtype}")
            continue
        a64 = a.to(torch.float64)
        b64 = b.to(torch.float64)
        if not torch.isfinite(a64).all():
            failures.append(f"{name}: non-finite values in kfuse output")
            continue
        denom = max(float(b64.abs().max()) if b64.numel() else 0.0, 1e-12)
        err = float((a64 - b64).abs().max()) / denom if b64.numel() else 0.0
        if err > rtol:
            failures.append(f"{name}: rel err {err:.3e} > {rtol:g}")
    assert not failures, f"{label}: {len(failures)} tensor(s) differ:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("case_id", EXACT_CASES)
def test_mergekit_parity_exact(case_id, mergekit_outputs, kfuse_outputs):
    kind = CASES[case_id][1]
    ref_dir = mergekit_outputs(case_id)
    got_dir = kfuse_outputs(case_id)
    ref = load_tensors(ref_dir)
    got = load_tensors(got_dir)
    assert_same_tensors(got, ref, BF16_RTOL if kind == "bf16" else F32_RTOL, case_id)
    assert _num_layers(got_dir) == _num_layers(ref_dir), "config.json num_hidden_layers differs"


def _delta_stats(merged: Dict, base: Dict):
    """name -> (kept fraction, L1 norm) of merged - base, for tensors >= STATS_MIN_NUMEL."""
    out = {}
    for name, m in merged.items():
        if m.numel() < STATS_MIN_NUMEL:
            continue
        d = m.to(torch.float64) - base[name].to(torch.float64)
        out[name] = (float((d != 0).double().mean()), float(d.abs().sum()))
    return out


def assert_same_stats(got: Dict, ref: Dict, base: Dict, density, label: str = ""):
    """Random methods: kept fraction within STATS_FRAC_TOL of ``density`` (or of mergekit's
    fraction when None) and L1(merged - base) within STATS_NORM_TOL of mergekit's."""
    ref_stats = _delta_stats(ref, base)
    assert ref_stats, "no tensor large enough for statistics"
    if density is not None:  # harness sanity: mergekit itself keeps ~density
        for name, (frac, _) in ref_stats.items():
            assert abs(frac - density) <= STATS_FRAC_TOL, f"mergekit {name}: kept {frac:.3f} vs {density}"
    assert set(got) == set(ref), f"tensor names differ: {sorted(set(got) ^ set(ref))[:8]}"
    for name in ref:
        assert tuple(got[name].shape) == tuple(ref[name].shape), name
        assert got[name].dtype == ref[name].dtype, name
        assert torch.isfinite(got[name].to(torch.float64)).all(), name
    got_stats = _delta_stats(got, base)
    failures = []
    for name, (rfrac, rl1) in ref_stats.items():
        gfrac, gl1 = got_stats[name]
        target = density if density is not None else rfrac
        if abs(gfrac - target) > STATS_FRAC_TOL:
            failures.append(f"{name}: kept fraction {gfrac:.3f} vs {target:.3f}")
        if not (abs(gl1 / max(rl1, 1e-30) - 1.0) <= STATS_NORM_TOL):
            failures.append(f"{name}: L1(merged-base) ratio kfuse/mergekit {gl1 / max(rl1, 1e-30):.3f}")
    assert not failures, f"{label}:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("case_id", STATS_CASES)
def test_mergekit_parity_stats(case_id, llama_family, mergekit_outputs, kfuse_outputs):
    density = CASES[case_id][2].get("density")
    base = load_tensors(llama_family["base"])
    ref = load_tensors(mergekit_outputs(case_id))
    got = load_tensors(kfuse_outputs(case_id))
    assert_same_stats(got, ref, base, density, case_id)
