"""kfuse command-line entry point.

    python -m kfuse.main --help                       # the configs and tasks
    python -m kfuse.main --config=configs/merge.py:ties --help   # that config's fields
    python -m kfuse.main --config=configs/default.py
    python -m kfuse.main --config=configs/mergekit.py:merge.yml --config.output_dir=OUT
    python -m kfuse.main --config=configs/merge.py:ties --config.models=a,b --config.base=c \
        --config.output_dir=OUT

This file only parses flags and dispatches on ``config.task``; the work lives
in importable libraries (see `kfuse.tasks`). Every user mistake (a missing
config file, an unknown config field, a bad value, an unwritable output) ends
in one line ``kfuse: error: ...`` and a non-zero exit.
"""

from __future__ import annotations

import gc
import sys

gc.disable()   # importing JAX makes ~10^6 objects; collecting during imports costs ~0.15 s

import ast
import glob
import importlib.util
import os
import re
from typing import Any, Callable, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from kfuse.errors import KfuseError

config_flags.DEFINE_config_file("config", None, "Job configuration (a configs/*.py file).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Overrides config.workdir where the job has one.")
FLAGS = flags.FLAGS

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort")
USAGE = """usage: python -m kfuse.main --config=CONFIG.py[:ARG] [--config.FIELD=VALUE ...] [--workdir=DIR]
       python -m kfuse.main --config=CONFIG.py[:ARG] --help     (the config's fields)
       python -m kfuse.shard FLAGS                              (every host of a multi-host run)"""
CONFIG_DIRS = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"),
               "configs")


class _Error(Exception):
  """A command-line mistake; its message is printed as one line."""


def _die(msg: str) -> None:
  print(f"kfuse: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _flag_value(argv: list[str], name: str) -> Optional[str]:
  """The last ``--name=V`` / ``--name V`` in ``argv`` (None when absent)."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _doc_line(path: str) -> str:
  try:
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError, ValueError):
    return ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def config_files() -> list[str]:
  """``configs/*.py`` next to the package (else in the working directory)."""
  for d in CONFIG_DIRS:
    found = sorted(glob.glob(os.path.join(d, "*.py")))
    if found:
      return [f for f in found if not os.path.basename(f).startswith("_")]
  return []


def load_config(spec: str) -> tuple[Any, Any, str]:
  """(module, config, path) for ``PATH.py[:ARG]``, as `config_flags` will load it."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    from kfuse.registry import suggest   # JAX-free, like everything flag parsing imports
    names = [os.path.relpath(f) for f in config_files()]
    raise _Error(f"--config: config file {path} does not exist{suggest(path, names)}")
  mod_spec = importlib.util.spec_from_file_location("_kfuse_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise _Error(f"--config: {path} defines no get_config()")
  config = module.get_config(arg) if sep else module.get_config()
  return module, config, path


def _children(node: Any) -> Optional[dict]:
  if hasattr(node, "items") and callable(node.items):
    return dict(node.items())
  return None


def _hint(path: str, known: list[str]) -> str:
  """`` (did you mean 'x'?)`` for a retired name (`kfuse.configs.RENAMED`) or a typo of the
  last part of ``path``, else the fields."""
  from kfuse.configs import renamed
  from kfuse.registry import suggest
  new = renamed(path)
  if new in known:
    return f" (did you mean {new!r}? renamed, see WORKSPACE.md \"Config vocabulary\")"
  part = path.rsplit(".", 1)[-1]
  return suggest(part, known) or (f" (fields: {', '.join(known)})" if known else "")


def check_overrides(argv: list[str], config: Any, path: str) -> None:
  """Every ``--config.A.B=V`` names an existing field (else: the closest one)."""
  for a in argv:
    m = re.match(r"--(?:no)?config\.([^=]+)", a)
    if not m:
      continue
    node, walked = config, []
    for part in m.group(1).split("."):
      kids = _children(node)
      if kids is None or part not in kids:
        known = sorted(kids or {})
        hint = _hint(".".join(walked + [part]), known)
        where = ".".join(["config"] + walked)
        raise _Error(f"--config.{m.group(1)}: {where} in {path} has no field {part!r}{hint}")
      node, walked = kids[part], walked + [part]


_COMMENT = re.compile(r"^\s*[A-Za-z_]\w*((?:\.\w+)+)\s*=[^#]*#\s*(.+?)\s*$")


def field_docs(module: Any, path: str, arg: str) -> dict[str, str]:
  """Field -> one-line doc: trailing comments of ``x.field = ...`` lines, then the
  config module's own ``field_docs(arg)`` (or ``FIELD_DOCS``) where it has one."""
  docs = {}
  with open(path) as f:
    for line in f:
      m = _COMMENT.match(line)
      if m:
        docs.setdefault(m.group(1)[1:], m.group(2))
  extra = getattr(module, "field_docs", None) or getattr(module, "FIELD_DOCS", None)
  if callable(extra):
    extra = extra(arg or None)
  docs.update(extra or {})
  return docs


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
  kids = _children(node)
  if kids is None or (prefix and not kids):
    return [(prefix, node)]
  out = []
  for k, v in kids.items():
    out += _leaves(v, f"{prefix}.{k}" if prefix else k)
  return out


def _doc_for(name: str, docs: dict[str, str]) -> str:
  if name in docs:
    return docs[name]
  tails = [k for k in docs if name.endswith("." + k)]   # comments on nested dicts
  return docs[max(tails, key=len)] if tails else ""


def help_text(spec: Optional[str]) -> str:
  """``--help``: the configs and tasks, or (with ``--config``) that config's fields."""
  if not spec:
    from kfuse.tasks import TASKS
    lines = [USAGE, "", "configs (--config=PATH[:ARG]):"]
    files = config_files()
    width = max([len(os.path.relpath(f)) for f in files] + [0])
    lines += [f"  {os.path.relpath(f):<{width}}  {_doc_line(f)}" for f in files]
    lines += ["", "tasks (config.task):"]
    width = max(len(t) for t in TASKS)
    lines += [f"  {t:<{width}}  {TASKS.get(t).doc}" for t in TASKS.names()]
    lines += ["", "flags:", "  --config=PATH[:ARG]  the job (a configs/*.py file and its argument)",
              "  --config.FIELD=VALUE  override a field of the config",
              "  --workdir=DIR  overrides config.workdir where the job has one"]
    return "\n".join(lines)
  module, config, path = load_config(spec)
  arg = spec.partition(":")[2]
  docs = field_docs(module, path, arg)
  lines = [USAGE, "", f"{spec}: {_doc_line(path)}", "",
           "fields (--config.FIELD=VALUE; values are Python literals):"]
  rows = [(name, repr(value), _doc_for(name, docs)) for name, value in _leaves(config)]
  width = max([len(f"{n} = {v}") for n, v, _ in rows] + [0])
  lines += [f"  {f'{n} = {v}':<{width}}  {d}".rstrip() for n, v, d in rows]
  return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """absl ``flags_parser``: ``--help`` (exit 0) and one-line errors for bad flags."""
  try:
    spec = _flag_value(argv[1:], "config")
    if any(a in HELP_FLAGS for a in argv[1:]):
      print(help_text(spec))
      sys.exit(0)
    if spec:
      _, config, path = load_config(spec)
      check_overrides(argv[1:], config, path)
    return FLAGS(argv)
  except SystemExit:
    raise
  except flags.Error as e:
    _die(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
  except Exception as e:  # noqa: BLE001 — KfuseError, _Error, a config file's own error
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    _die(first if isinstance(e, (_Error, KfuseError))
         else f"--config={spec}: {type(e).__name__}: {first}")
  return []


def _process_options(config: Any) -> None:
  """Process-wide settings a job's config names: ``compile_cache`` turns on JAX's
  persistent compilation cache for this process (`kfuse.merge.engine.compile_cache`).
  Only the command line does this; library calls leave JAX's configuration alone."""
  from kfuse import configs
  setting = configs.get(config, "compile_cache")
  if setting is not None:
    from kfuse.merge.engine import compile_cache
    compile_cache.enable(setting)


def main(argv, setup: Optional[Callable[[], None]] = None):
  if len(argv) > 1:
    _die(f"unexpected arguments: {' '.join(argv[1:])} (see --help)")
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep runs readable
    logging.set_verbosity(logging.WARNING)
  from kfuse import tasks
  try:
    if setup is not None:
      setup()                           # e.g. joining a multi-host run (kfuse.shard)
    import jax
    logging.info("JAX devices: %s", jax.devices())
    tasks.entry(FLAGS.config)           # imports the task's module (with GC still off)
    _process_options(FLAGS.config)
    gc.freeze()                         # long-lived import-time objects: never rescanned
    gc.enable()
    tasks.run(FLAGS.config, FLAGS.workdir)
  except KfuseError as e:
    _die(str(e))
  except OSError as e:                  # an unwritable output, a vanished input, ...
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    _die(f"{e.strerror or e}{where}")


def cli(setup: Optional[Callable[[], None]] = None) -> None:
  """Parse the flags (one-line errors), then run the job; ``setup`` runs first."""
  flags.mark_flag_as_required("config")
  app.run(lambda argv: main(argv, setup), flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
