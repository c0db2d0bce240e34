"""The report cache's entries, each carrying the sha256 of its own contents.

A section's entry is a folder (finding.json and its figures) with `sha256.json` listing every file's hash,
written into a scratch folder that is renamed into place whole. Reading one checks every hash: a changed digit in
finding.json, a truncated figure, a missing file all read as "no entry", so the section is recomputed and the
damaged numbers are never shown. A single cached JSON file (the model's description) keeps its hash inside.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from forethought.paths import atomic_write_text

HASHES = "sha256.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal_folder(folder: Path) -> None:
    """Record the hash of every file in `folder` (call last, before the folder is renamed into place)."""
    hashes = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != HASHES}
    atomic_write_text(folder / HASHES, json.dumps(hashes, indent=1), "the report cache")


def folder_intact(folder: Path) -> bool:
    """Whether every file `sha256.json` lists is there with its hash, and nothing else is claimed."""
    try:
        hashes = json.loads((folder / HASHES).read_text())
        if not isinstance(hashes, dict) or not hashes:
            return False
        return all(isinstance(h, str) and _sha256(folder / name) == h for name, h in hashes.items())
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


def write_json(path: Path, obj: dict) -> None:
    """`obj` with its own sha256 inside, written whole or not at all."""
    body = json.loads(_canonical(obj))  # what reading it back gives (default=str applied)
    atomic_write_text(path, json.dumps({"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}))


def read_json(path: Path) -> dict | None:
    """What `write_json` wrote, or None when the file is missing, unreadable or not what its hash says."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("body"), dict):
        return None
    if hashlib.sha256(_canonical(saved["body"])).hexdigest() != saved.get("sha256"):
        return None
    return saved["body"]
