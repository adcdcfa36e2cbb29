"""Model soups that need an evaluation callable (Wortsman et al., ICML 2022)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from kfuse.tree import KfuseError, check_same_structure

PyTree = Any


def uniform_soup(models: Sequence[PyTree]) -> PyTree:
  """(1/N) Σ θ_i, float32 arithmetic, input dtypes kept."""
  if not models:
    raise KfuseError("uniform_soup: empty model list")
  check_same_structure(models)
  n = len(models)
  return jax.tree.map(
      lambda *xs: (sum(x.astype(jnp.float32) for x in xs) / n).astype(xs[0].dtype), *models)


def greedy_soup(models: Sequence[PyTree], evaluate: Callable[[PyTree], float],
                *, scores: Sequence[float] | None = None) -> tuple[PyTree, list[int], float]:
  """Greedy soup: sort by held-out score, add a model if the averaged soup improves.

  Args:
    models: candidate fine-tuned models (same structure).
    evaluate: held-out metric, higher is better (e.g. validation accuracy).
    scores: the models' individual scores, if already known.
  Returns:
    (soup params, indices of the models in the soup, the soup's score).
  """
  if not models:
    raise KfuseError("greedy_soup: empty model list")
  check_same_structure(models)
  scores = [float(evaluate(m)) for m in models] if scores is None else list(scores)
  if len(scores) != len(models):
    raise KfuseError(f"greedy_soup: {len(scores)} scores for {len(models)} models")
  order = sorted(range(len(models)), key=lambda i: -scores[i])
  chosen = [order[0]]
  best = scores[order[0]]
  soup = models[order[0]]
  for i in order[1:]:
    cand = uniform_soup([models[j] for j in chosen + [i]])
    s = float(evaluate(cand))
    if s >= best:
      chosen.append(i)
      best, soup = s, cand
  return soup, chosen, best
