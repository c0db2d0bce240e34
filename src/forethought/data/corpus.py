"""Corpora for probing: the standard library's own source by default, or the user's text files, folders or JSONL.

A corpus is a list of documents, each with a stable ID (a path relative to the corpus root, or `file:line` for
JSONL). Everything downstream depends only on those IDs, so the train/test split is BY DOCUMENT and comes from a
hash of the ID: the same file is on the same side of the split on every machine and every run, and no window ever
mixes the two sides. Documents are read in the order of another hash of their ID, so that taking the first N
tokens samples the whole library instead of the modules whose names start with "a".
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forethought.errors import ForethoughtError

DEFAULT_CORPUS = "stdlib"
PROSE_CORPUS = "pydocs"  # the Python documentation's reStructuredText sources (Debian's python3.X-doc)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".c", ".h", ".html", ".csv", ".toml", ".yaml", ".yml")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass
class Corpus:
    """Documents in reading order, plus what could not be read (counted, never fatal)."""

    spec: str  # what the user asked for ("stdlib", or a path)
    root: str  # the resolved location
    kind: str  # stdlib | file | folder | jsonl
    documents: list[Document]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "root": self.root,
            "kind": self.kind,
            "documents": len(self.documents),
            "characters": sum(len(d.text) for d in self.documents),
            "skipped": self.skipped,
        }


def _hash_unit(doc_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the ID: sha1, not Python's salted hash(), so it is stable across runs."""
    digest = hashlib.sha1(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, test_fraction: float = 0.1) -> str:
    """'train' or 'test', by document."""
    return "test" if _hash_unit(doc_id, "split") < test_fraction else "train"


def is_validation(doc_id: str, fraction: float = 0.1) -> bool:
    """A slice of the training documents held back to choose hyperparameters (ridge lambda, smoothing)."""
    return _hash_unit(doc_id, "validation") < fraction


def pydocs_root() -> Path | None:
    """Where Debian's python3.X-doc put the documentation's text sources (English prose), if installed."""
    major, minor = sysconfig.get_python_version().split(".")[:2]
    for version in (f"{major}.{minor}", major):
        root = Path(f"/usr/share/doc/python{version}/html/_sources")
        if root.is_dir():
            return root
    return None


def load_corpus(spec: str = DEFAULT_CORPUS) -> Corpus:
    """'stdlib' (code), 'pydocs' (prose), a text file, a folder (recursive), or a .jsonl with a "text" per line."""
    if spec == DEFAULT_CORPUS:
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
        corpus = _read_files(spec, root, paths, "stdlib")
    elif spec == PROSE_CORPUS:
        found = pydocs_root()
        if found is None:
            raise ForethoughtError(
                "corpus 'pydocs' needs the Python documentation's sources: apt-get install python3-doc "
                "(or give a folder of your own text)"
            )
        corpus = _read_files(spec, found, sorted(found.rglob("*.txt")), "pydocs")
    else:
        root = Path(spec).expanduser()
        if not root.exists():
            raise ForethoughtError(f"corpus {spec!r} does not exist (give 'stdlib', a text file, a folder or a .jsonl)")
        if root.is_dir():
            paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            corpus = _read_files(spec, root, paths, "folder")
        elif root.suffix.lower() == ".jsonl":
            corpus = _read_jsonl(spec, root)
        else:
            corpus = _read_files(spec, root.parent, [root], "file")
    if not corpus.documents:
        why = f" ({corpus.skipped} unreadable or non-UTF-8 files skipped)" if corpus.skipped else ""
        raise ForethoughtError(f"corpus {spec!r} yields no text{why}")
    corpus.documents.sort(key=lambda d: (_hash_unit(d.doc_id, "order"), d.doc_id))
    return corpus


def _read_files(spec: str, root: Path, paths: list[Path], kind: str) -> Corpus:
    corpus = Corpus(spec, str(root), kind, [])
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            corpus.skipped += 1
            if len(corpus.skipped_examples) < 5:
                corpus.skipped_examples.append(str(path))
            continue
        if text.strip():
            corpus.documents.append(Document(path.relative_to(root).as_posix(), text))
    return corpus


def _read_jsonl(spec: str, path: Path) -> Corpus:
    corpus = Corpus(spec, str(path), "jsonl", [])
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ForethoughtError(f"corpus {spec!r}: cannot read ({e.strerror})") from None
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            record = json.loads(line.decode("utf-8"))
            text = record["text"]
            if not isinstance(text, str):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            if line.strip():
                corpus.skipped += 1
            continue
        if text.strip():
            doc_id = str(record.get("id", f"{path.name}:{number}"))
            corpus.documents.append(Document(doc_id, text))
    return corpus


def iter_token_documents(corpus: Corpus, encode) -> Iterator[tuple[int, list[int]]]:
    """(document index, token ids), lazily: extraction tokenizes only as far as it needs."""
    for index, document in enumerate(corpus.documents):
        ids = encode(document.text)
        if ids:
            yield index, ids


def balanced_order(
    corpus: Corpus,
    encode,
    test_fraction: float,
    val_fraction: float = 0.1,
    max_doc_tokens: int | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Like `iter_token_documents`, but interleaving test, validation and training documents so that each side's
    share of the tokens read so far stays near its target share: whatever --tokens a user asks for, the first
    windows already hold all three. (Read in plain hash order, a small budget can fill with training files
    before a single test window completes.)"""
    shares = [(1 - test_fraction) * (1 - val_fraction), (1 - test_fraction) * val_fraction, test_fraction]
    pools: list[list[int]] = [[], [], []]
    for index, document in enumerate(corpus.documents):
        if split_of(document.doc_id, test_fraction) == "test":
            pools[2].append(index)
        else:
            pools[1 if is_validation(document.doc_id, val_fraction) else 0].append(index)
    next_of = [0, 0, 0]
    have = [0, 0, 0]
    total = 0
    while True:
        open_pools = [p for p in range(3) if next_of[p] < len(pools[p])]
        if not open_pools:
            return
        pool = max(open_pools, key=lambda p: (shares[p] * (total + 1) - have[p], -p))
        index = pools[pool][next_of[pool]]
        next_of[pool] += 1
        ids = encode(corpus.documents[index].text)
        if not ids:
            continue
        n = (min(len(ids), max_doc_tokens) if max_doc_tokens else len(ids)) + 1  # + the separator
        have[pool] += n
        total += n
        yield index, ids


def shingles(ids, n: int = 8):
    """Hashes of every run of n consecutive token ids (a document's fingerprint for near-duplicate search)."""
    import numpy as np

    x = np.asarray(ids, dtype=np.int64)
    n = min(n, len(x))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    h = np.zeros(len(x) - n + 1, dtype=np.int64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * np.int64(1_000_003) + x[i : len(x) - n + 1 + i]
    return np.unique(h)


def near_duplicates(train: dict, test: dict, n: int = 8, threshold: float = 0.5) -> dict:
    """Test documents whose token n-gram shingles are mostly (> threshold) found in the training documents.

    `train` / `test` map a document key to its token ids; returns {test key: overlap share} of those removed.
    Catches copied files (a codec table generated from the same template, a vendored module) that would let a
    memorising probe look like a predicting one.
    """
    import numpy as np

    if not train:
        return {}
    seen = np.unique(np.concatenate([shingles(ids, n) for ids in train.values()]))
    removed = {}
    for key, ids in test.items():
        own = shingles(ids, n)
        if len(own) == 0:
            continue
        share = float(np.isin(own, seen, assume_unique=True).mean())
        if share > threshold:
            removed[key] = share
    return removed
