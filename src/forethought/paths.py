"""Checking a file path a user asked us to write, before any work is done for it."""

from __future__ import annotations

from pathlib import Path

from forethought.errors import ForethoughtError


def output_file(path: str | Path, flag: str = "the output") -> Path:
    """`path` as a file we may create or replace: its folder must exist (we never create folders the user did
    not ask for: a typo would scatter them) and it must not itself be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ForethoughtError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'trace.safetensors'}")
    if not path.parent.is_dir():
        raise ForethoughtError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    return path
