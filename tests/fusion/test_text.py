"""Tests for kfuse.data.text: offline corpora, deterministic splits, offline tokenizer training."""

import hashlib
import os
import sysconfig

import pytest

from kfuse.data import text
from kfuse.errors import KfuseError

HARD = "Ligne 1\r\n\tdef f(x):  # tab\té 😀 e\u0301 — ok\n\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("kfuse_text_cache"))


@pytest.mark.parametrize("domain", text.DOMAINS)
def test_splits_partition_the_documents_by_name_hash(domain):
  docs = text.documents(domain)
  c = text.split(domain)
  names = [n for part in (c.train, c.val, c.test) for n, _ in part]
  assert sorted(names) == sorted(n for n, _ in docs) and len(set(names)) == len(names)
  assert all(t.strip() for _, t in docs)
  n = len(docs)
  assert c.sizes()["val"] == max(1, round(0.1 * n)) and c.sizes()["test"] == max(1, round(0.1 * n))
  # Independent recomputation of the rule: order by sha256("domain/name"), cut 80/10/10.
  rank = sorted(names, key=lambda s: hashlib.sha256(f"{domain}/{s}".encode()).hexdigest())
  n_tr = n - c.sizes()["val"] - c.sizes()["test"]
  assert sorted(rank[:n_tr]) == [s for s, _ in c.train]
  assert sorted(rank[n - c.sizes()["test"]:]) == [s for s, _ in c.test]


def test_domains_come_from_the_installed_sources():
  from pydoc_data.topics import topics
  pydoc = dict(text.documents("pydoc"))
  assert pydoc["assert"] == topics["assert"]
  src = dict(text.documents("pysource"))
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as f:
    assert src["argparse.py"] == f.read()
  assert set(src) <= {m + ".py" for m in text.PYSOURCE_MODULES} and len(src) > 60
  shk = text.documents("shakespeare")
  assert len(shk) > 500 and all("**" not in t for _, t in shk)
  hamlet = [t for n, t in shk if n.startswith("hamlet/")]
  assert any("To be, or not to be" in t for t in hamlet)


def test_fingerprint_changes_with_the_split_and_domains():
  a = text.fingerprint(["pydoc"])
  assert a == text.fingerprint(["pydoc"])
  assert a != text.fingerprint(["pydoc"], "val") and a != text.fingerprint(["pydoc", "pysource"])


def test_bad_domain_and_split_are_one_line_errors():
  with pytest.raises(KfuseError, match="did you mean 'pydoc'"):
    text.split("pydocs")
  with pytest.raises(KfuseError, match="did you mean 'test'"):
    text.split("pydoc").get("tset")
  with pytest.raises(KfuseError, match="fractions"):
    text.split("pydoc", (0.5, 0.5, 0.5))


def test_training_texts_cut_every_document_proportionally():
  full = [t for _, t in text.split("pydoc").train]
  cut = text.training_texts(["pydoc"], max_chars=10_000)
  assert len(cut) == len(full) and all(f.startswith(c) and c for f, c in zip(full, cut))
  assert 10_000 <= sum(map(len, cut)) <= 10_000 + len(full)
  assert text.training_texts(["pydoc"], max_chars=0) == full


@pytest.mark.parametrize("kind,byte_level", [("bpe", True), ("bpe", False), ("wordpiece", True),
                                             ("unigram", True)])
def test_train_tokenizer_offsets_index_the_text_and_cache(cache, kind, byte_level):
  kw = dict(domains=("pydoc",), max_chars=20_000, cache_dir=cache)
  tok = text.train_tokenizer(kind, 400, byte_level, **kw)
  path = text.tokenizer_path(kind, 400, byte_level, **kw)
  assert tok.path == path and os.path.isfile(path)
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]
  assert 300 <= tok.vocab_size <= 400
  enc = tok.encode(HARD)
  starts, ends = enc.offsets[:, 0], enc.offsets[:, 1]
  assert (starts <= ends).all() and (ends <= len(HARD)).all() and (starts[1:] >= starts[:-1]).all()
  if byte_level and kind == "bpe":  # every character is covered and decoding is exact
    assert tok.decode(enc.ids) == HARD
    covered = set()
    for s, e in enc.offsets:
      covered.update(range(s, e))
    assert covered == set(range(len(HARD)))
  # cached: the second call reads the same file, does not retrain
  mtime = os.stat(path).st_mtime_ns
  again = text.train_tokenizer(kind, 400, byte_level, **kw)
  assert os.stat(path).st_mtime_ns == mtime and list(again.encode(HARD).ids) == list(enc.ids)


def test_tokenizers_differ_by_kind_and_key(cache):
  kw = dict(domains=("pydoc",), max_chars=20_000, cache_dir=cache)
  a = text.train_tokenizer("bpe", 400, True, **kw)
  b = text.train_tokenizer("wordpiece", 400, True, **kw)
  assert list(a.encode(HARD).ids) != list(b.encode(HARD).ids)
  assert text.tokenizer_path("bpe", 400, **kw) != text.tokenizer_path("bpe", 500, **kw)
  assert text.tokenizer_path("bpe", 400, **kw) != text.tokenizer_path("bpe", 400, False, **kw)


def test_bad_tokenizer_arguments(cache):
  with pytest.raises(KfuseError, match="did you mean 'unigram'"):
    text.train_tokenizer("unigam", 400, cache_dir=cache)
  with pytest.raises(KfuseError, match="vocab_size"):
    text.train_tokenizer("bpe", 10, cache_dir=cache)
  with pytest.raises(KfuseError, match="did you mean 'pysource'"):
    text.train_tokenizer("bpe", 400, domains=("pysorce",), cache_dir=cache)
