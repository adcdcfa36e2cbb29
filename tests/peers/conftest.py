"""Session fixtures for peer-parity tests (tiny random Llama models)."""

import importlib.util
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


# ------------------------------------------------------------------ skip -> fail
#
# With the `peers` extra installed (CI installs it) a skipped parity test is a parity test that
# did not run: report it as a failure, whether the skip happened in a test or while importing the
# module (a module-level skip would otherwise collapse the whole file into one "skipped").


def _peers_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "mergekit"))


def _fail_skip(report, when: str) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and _peers_installed():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"tests/peers {when} was skipped although torch and mergekit are installed "
            f"(a skipped parity check is a failure here): {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result(), f"test {item.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result(), f"module {collector.nodeid}")
