"""One table of average / normalised test accuracy per row across 8, 14 and 20 tasks.

Reads merge_bench ``results.json`` files (several per task count are merged; a row found twice
keeps the first) and prints a Markdown table: per row and task count, ``avg (norm.)`` in %,
and each row's gain over task arithmetic, so the spread between methods can be read as the
number of tasks grows (the literature: it grows; Wang et al. 2024, "Localizing Task
Information for Improved Model Merging and Compression", and the TSV / Iso papers report
8 / 14 / 20 tasks).

  python experiments/merge_bench/across_tasks.py [--common] 8=a.json,b.json 14=c.json 20=d.json
"""

from __future__ import annotations

import json
import sys


def rows_by_name(paths: list[str]) -> tuple[list[str], dict]:
  """Row names in first-seen order and ``{name: row}`` over the results files ``paths``."""
  order, rows, tasks = [], {}, None
  for p in paths:
    with open(p, encoding="utf-8") as f:
      res = json.load(f)
    if tasks is None:
      tasks = res["tasks"]
    elif res["tasks"] != tasks:
      raise SystemExit(f"{p}: tasks {res['tasks']} differ from the first file's {tasks}")
    for r in res["rows"]:
      if r["name"] not in rows:
        order.append(r["name"])
        rows[r["name"]] = r
  return order, rows


def table(groups: dict[int, list[str]], common: bool = False) -> str:
  """The Markdown table; ``common``: only the rows measured at every task count."""
  counts = sorted(groups)
  data = {n: rows_by_name(groups[n]) for n in counts}
  names: list[str] = []
  for n in counts:
    names += [m for m in data[n][0] if m not in names]
  if common:
    names = [m for m in names if all(m in data[n][1] for n in counts)]
  head = ["Method"] + [f"{n} tasks: avg (norm.)" for n in counts] + [f"{n}: − TA" for n in counts]
  lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (2 * len(counts))]
  for m in names:
    cells, gains = [m], []
    for n in counts:
      r = data[n][1].get(m)
      ta = data[n][1].get("task_arithmetic")
      cells.append(f"{100 * r['test_avg']:.1f} ({100 * r['normalized_avg']:.1f})" if r else "")
      gains.append(f"{100 * (r['test_avg'] - ta['test_avg']):+.1f}" if r and ta and r.get("method")
                   else "")
    lines.append("| " + " | ".join(cells + gains) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  groups, common = {}, "--common" in argv
  for a in (a for a in argv if a != "--common"):
    n, _, files = a.partition("=")
    groups[int(n)] = [f for f in files.split(",") if f]
  print(table(groups, common))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
