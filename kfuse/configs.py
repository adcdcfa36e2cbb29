"""Helpers for ``configs/*.py``: the one place a config may import from kfuse.

Configs are read at flag-parse time (``--help`` included), so this module and
everything a config imports stay JAX-free: ml_collections, the standard library,
`kfuse.errors` and `kfuse.merge_params` (a generated table). The vocabulary every
config uses (one field name per concept) is tabled in WORKSPACE.md; `RENAMED`
maps the old names to it for the CLI's ``(did you mean ...)`` hint.

``parse_arg`` follows big_vision's ``parse_arg`` (Beyer, Zhai, Kolesnikov et al.,
github.com/google-research/big_vision, ``configs/common.py``): the text after
``--config=FILE.py:`` is ``"a,key=value,flag"``, turned into a ConfigDict with the
typed defaults the config declares::

    def get_config(arg=None):
      arg = parse_arg(arg, variant=("full", one_of("full", "quick")))
      ...
"""

from __future__ import annotations

import ast
import fnmatch
from typing import Any, Callable, Optional

import ml_collections

from kfuse.errors import KfuseError

__all__ = ["parse_arg", "one_of", "get", "to_dict", "RENAMED", "renamed", "merge_method_params",
           "merge_param_docs"]

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _to_bool(text: str) -> bool:
  low = text.strip().lower()
  if low in _TRUE:
    return True
  if low in _FALSE:
    return False
  raise ValueError(f"not a boolean (use True or False): {text!r}")


def _literal(text: str) -> Any:
  """A Python literal when ``text`` is one (``3``, ``0.5``, ``(1, 2)``), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _converter(default: Any) -> Callable[[str], Any]:
  """The string -> value conversion implied by a default's type."""
  if isinstance(default, bool):
    return _to_bool
  if isinstance(default, (int, float)):
    return type(default)
  if isinstance(default, str) or default is None:
    return str
  return _literal   # tuples, lists, dicts: written as Python literals


def one_of(*choices: str) -> Callable[[str], str]:
  """A converter accepting only ``choices`` (for ``variant=("full", one_of(...))``)."""
  def convert(text: str) -> str:
    if text not in choices:
      raise ValueError(f"unknown value {text!r}; use {' or '.join(choices)}")
    return text
  convert.choices = choices
  return convert


def _items(arg: str) -> list[str]:
  """``arg`` split at the commas outside brackets and quotes (``w=(8, 16),q`` is two items)."""
  items, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(arg):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      items.append(arg[start:i])
      start = i + 1
  return items + [arg[start:]]


def _split(arg: str) -> list[tuple[Optional[str], str]]:
  """``"a,k=v"`` -> ``[(None, 'a'), ('k', 'v')]``."""
  out = []
  for item in _items(arg):
    if not item.strip():
      continue
    key, eq, value = item.partition("=")
    out.append((key.strip(), value.strip()) if eq else (None, item.strip()))
  return out


def parse_arg(arg: Optional[str], lazy: bool = False, **spec: Any) -> ml_collections.ConfigDict:
  """The config argument ``"value,key=value,flag"`` as a ConfigDict over ``spec``.

  ``spec`` maps each key to its default, or to ``(default, convert)`` where
  ``convert(text)`` parses the command-line text (else the default's type does:
  bool, int, float, str, or a Python literal). Items are ``key=value``; a bare
  item is ``True`` for a boolean key of that name, else the value of the first
  key of ``spec`` (so ``merge.py:ties`` sets ``method``). Unknown keys are an
  error unless ``lazy``, which keeps them with their literal type. Errors are one
  line naming the key (`KfuseError`).
  """
  from kfuse.registry import suggest   # JAX-free
  table = {k: (v if isinstance(v, tuple) and len(v) == 2 and callable(v[1])
               else (v, _converter(v))) for k, v in spec.items()}
  result = ml_collections.ConfigDict({k: d for k, (d, _) in table.items()}, type_safe=False)
  first = next(iter(table), None)
  seen_bare = False
  for key, text in _split(arg or ""):
    if key is None:
      if text in table and isinstance(table[text][0], bool):
        key, text = text, "True"
      elif first is not None and not seen_bare:
        key, seen_bare = first, True
      else:
        where = f"; keys: {', '.join(table)}" if table else "; this config takes no argument"
        raise KfuseError(f"--config argument {arg!r}: unexpected item {text!r}{where}")
    if key in table:
      try:
        result[key] = table[key][1](text)
      except (TypeError, ValueError) as e:
        raise KfuseError(f"--config argument {arg!r}: {key}: {e}") from None
    elif lazy:
      result[key] = _literal(text)
    else:
      raise KfuseError(f"--config argument {arg!r}: unknown key {key!r}{suggest(key, table)}"
                       f"; keys: {', '.join(table) or '(none)'}")
  return result


# Retired field paths (``*`` = any label) -> the vocabulary's name for them (WORKSPACE.md,
# "Config vocabulary"); the CLI answers an override of one with "(did you mean 'new'? ...)".
def get(cfg: Any, field: str, default: Any = None) -> Any:
  """``cfg[field]`` for ConfigDicts and mappings, else the attribute; ``default`` if absent
  (or ``cfg`` is None). The one config reader of the library (optimizers, benchmarks)."""
  if cfg is None:
    return default
  try:
    return cfg[field] if field in cfg else default
  except TypeError:
    return getattr(cfg, field, default)


def to_dict(x: Any) -> dict:
  """A ConfigDict / mapping / None as a plain dict."""
  if x is None:
    return {}
  if hasattr(x, "to_dict"):
    return x.to_dict()
  return dict(x)


RENAMED = {
    "data.suite": "name",                          # merge_bench
    "methods.*.method": "name",                    # merge_bench, tta_bench
    "source.fisher_samples": "fisher",             # tta_bench: source.fisher.samples
    "source.fisher_batch_size": "fisher",          # tta_bench: source.fisher.batch_size
    "long.batch_size": "batch_size",               # tta_bench: the top-level batch_size
}


def renamed(path: str) -> Optional[str]:
  """The new name of the retired field ``path`` (``"data.suite"`` -> ``"name"``), else None."""
  for old, new in RENAMED.items():
    if fnmatch.fnmatchcase(path, old):
      return new
  return None


def _param_rows(method: str) -> tuple:
  """The method's parameter rows from the generated table `kfuse.merge_params`."""
  from kfuse import merge_params   # generated, JAX-free
  from kfuse.registry import suggest
  if method not in merge_params.PARAMS:
    known = sorted(merge_params.PARAMS)
    raise KfuseError(f"unknown merge method {method!r}{suggest(method, known)}; known: "
                     f"{', '.join(known)}")
  return merge_params.PARAMS[method]


def merge_method_params(method: str) -> ml_collections.ConfigDict:
  """``config.params`` for a merge method: every parameter with its default (required: None).

  Each field takes any literal (a number, a per-model list, a gradient, rules).
  """
  from ml_collections.config_dict import FieldReference
  params = ml_collections.ConfigDict()
  for row in _param_rows(method):
    params[_field(row["name"])] = FieldReference(None if row["required"] else row["default"],
                                                 field_type=object)
  return params


def merge_param_docs(method: str) -> dict[str, str]:
  """``params.NAME`` -> one help line (doc, required, per-model, kind)."""
  docs = {}
  for row in _param_rows(method):
    what = ("required; " if row["required"] else "") + (
        "one value per model, or one for all; " if row["per_model"] else "") + row["kind"]
    docs[f"params.{_field(row['name'])}"] = f"{row['doc']} ({what})" if row["doc"] else f"({what})"
  return docs


def _field(name: str) -> str:
  return "lambda_" if name == "lambda" else name   # `lambda` cannot be a flag path
