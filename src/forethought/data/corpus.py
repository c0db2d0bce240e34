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


def load_corpus(spec: str = DEFAULT_CORPUS) -> Corpus:
    """'stdlib', a text file, a folder (recursive), or a .jsonl file with a "text" field per line."""
    if spec == DEFAULT_CORPUS:
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
        corpus = _read_files(spec, root, paths, "stdlib")
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
