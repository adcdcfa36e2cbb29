"""Pure-Python re-statements of FuseAI's alignment code, as test / benchmark references.

Not kfuse code. `dtw` follows ``FuseLLM/src/utils/others.py:dtw`` (itself after talcs/simpledtw)
line for line, with ``editdistance.eval`` replaced by a plain Levenshtein (`levenshtein`).
"""

import numpy as np


def levenshtein(a, b) -> int:
  """Unit-cost edit distance between two sequences (Wagner-Fischer, two rows)."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def dtw(series_1, series_2, norm_func):
  """FuseAI's DTW: returns (mappings_series_1, mappings_series_2) as lists of index lists."""
  matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
  matrix[0, :] = np.inf
  matrix[:, 0] = np.inf
  matrix[0, 0] = 0
  for i, vec1 in enumerate(series_1):
    for j, vec2 in enumerate(series_2):
      cost = norm_func(vec1, vec2)
      matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
  matrix = matrix[1:, 1:]
  i = matrix.shape[0] - 1
  j = matrix.shape[1] - 1
  m1 = [list() for _ in range(matrix.shape[0])]
  m2 = [list() for _ in range(matrix.shape[1])]
  while i > 0 or j > 0:
    m1[i].append(j)
    m2[j].append(i)
    option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
    option_up = matrix[i - 1, j] if i > 0 else np.inf
    option_left = matrix[i, j - 1] if j > 0 else np.inf
    move = np.argmin([option_diag, option_up, option_left])
    if move == 0:
      i -= 1
      j -= 1
    elif move == 1:
      i -= 1
    else:
      j -= 1
  m1[0].append(0)
  m2[0].append(0)
  for mp in m1:
    mp.reverse()
  for mp in m2:
    mp.reverse()
  return m1, m2


def fusellm_base_to_blending(base_strings, blend_strings):
  """FuseLLM's token alignment: DTW(blending, base) with edit-distance cost; base -> blending."""
  _, base_to_blend = dtw(blend_strings, base_strings, levenshtein)
  return base_to_blend


def nearest(query, candidates) -> int:
  """FuseLLM vocab_mapping's MinED: the first candidate at the minimum edit distance."""
  d = [levenshtein(query, c) for c in candidates]
  return int(np.argmin(d))
