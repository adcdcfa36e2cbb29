"""Tests for kfuse.registry (the one registry shape)."""

import pytest

from kfuse.registry import Registry, suggest
from kfuse.tree import KfuseError


def test_register_get_defaults_names():
  r = Registry("thing")

  @r.register("b", defaults={"x": [1, 2]})
  def b(x):
    """B: y = x."""
    return x

  def a(u, v=3, *, w="k"):
    """A's maths."""
    return u + v

  r.register("a", a)
  assert r.names() == ["a", "b"]
  assert r.get("a").defaults == {"v": 3, "w": "k"}
  assert r.get("b").doc == "B: y = x."
  d = r.defaults("b")
  d["x"].append(9)                      # a copy: the declared defaults do not change
  assert r.defaults("b") == {"x": [1, 2]}
  assert r.get("a")(1) == 4 and "a" in r and len(r) == 2


def test_unknown_name_suggests_and_duplicates_refused():
  r = Registry("merge method")
  r.register("ties", lambda: 0)
  with pytest.raises(KfuseError, match=r"unknown merge method 'tie' \(did you mean 'ties'\?\)"):
    r.get("tie")
  with pytest.raises(ValueError, match="registered twice"):
    r.register("ties", lambda: 1)
  assert suggest("zzzz", ["ties"]) == ""
