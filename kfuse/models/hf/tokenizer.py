"""``tokenizer.json`` (the `tokenizers` library's format) read offline, with character offsets."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from kfuse.errors import KfuseError

__all__ = ["Tokenizer", "Encoding", "load_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Encoding:
  """Token ids ``[N]`` (int32) and character offsets ``[N, 2]`` (start, end) into the text."""
  ids: np.ndarray
  offsets: np.ndarray


class Tokenizer:
  """A `tokenizers.Tokenizer` loaded from a file; `encode` returns ids and offsets."""

  def __init__(self, tok, path: str):
    self._tok, self.path = tok, path

  @property
  def vocab_size(self) -> int:
    """Token ids in use, added tokens included."""
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
    enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
    return Encoding(np.asarray(enc.ids, np.int32),
                    np.asarray(enc.offsets, np.int64).reshape(-1, 2))

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])

  def check_model(self, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that produces ids the model's embedding does not have."""
    if self.vocab_size > vocab_size:
      raise KfuseError(f"{self.path}: tokenizer has {self.vocab_size} tokens but {where} has"
                       f" vocab_size = {vocab_size}: not this model's tokenizer")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Load ``path``/tokenizer.json (or a .json file); no network access."""
  from tokenizers import Tokenizer as _Tok
  p = os.fspath(path)
  f = os.path.join(p, TOKENIZER_FILE) if os.path.isdir(p) else p
  if not os.path.isfile(f):
    raise KfuseError(f"{f}: no tokenizer.json (kfuse reads the `tokenizers` format only)")
  try:
    return Tokenizer(_Tok.from_file(f), f)
  except Exception as e:  # noqa: BLE001 — the library's parse errors, one line
    raise KfuseError(f"{f}: cannot read tokenizer: {str(e).splitlines()[0]}") from None
