"""Lab checkpoints that cannot half-exist, and folders that are written whole or not at all.

A checkpoint is a folder `out/ckpt-<step>-<nonce>/` holding the weights, the optimizer (with the RNG state) and the
run's state. It is written completely and fsynced first; only then does `out/checkpoint.json` -- the one file that
says which folder is current, with the sha256 of every file in it -- replace the previous pointer in one atomic
rename. A kill anywhere leaves either the old pointer (and the old, intact folder) or the new one, never a mix of a
new model with an old optimizer. Reading verifies every hash, so a flipped byte, a truncated or missing file is
refused in one line instead of resumed from. Folders no pointer names are leftovers of an interrupted write and are
removed on the next write.

Writing errors (a full disk, a read-only filesystem, --out onto a file) become one `ForethoughtError` line naming
the path and the reason, and leave nothing that a rerun would take as complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from forethought.errors import ForethoughtError
from forethought.weights.validate import MANIFEST, sha256, verify_files

POINTER = "checkpoint.json"
FORMAT = 1
PREFIX = "ckpt-"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn the OS's refusal to write (ENOSPC, EROFS, EACCES, a file where a folder belongs) into one line."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        where = e.filename or path
        raise ForethoughtError(f"{where}: cannot write {what} ({e.strerror or e})") from None
    except SafetensorError as e:  # safetensors reports a failed write as its own error type
        raise ForethoughtError(f"{path}: cannot write {what} ({e})") from None


def write_atomic_text(path: Path, text: str, what: str) -> None:
    """`path` holds `text` entirely or keeps what it held: written to a sibling, fsynced, renamed over."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    with writing(path, what):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# --- checkpoints -----------------------------------------------------------------------------------------------


def save(out: Path, fill: Callable[[Path], None], step: int) -> Path:
    """Write a new checkpoint: `fill(folder)` writes its files into a fresh folder under `out`, then the pointer
    makes it current. Returns the folder."""
    with writing(out, "the checkpoint"):
        out.mkdir(parents=True, exist_ok=True)
    folder = out / f"{PREFIX}{step:08d}-{secrets.token_hex(4)}"
    try:
        with writing(folder, "the checkpoint"):
            folder.mkdir()
            fill(folder)
            _fsync_files(folder)
            files = {p.name: sha256(p) for p in sorted(folder.iterdir())}
        pointer = {"format": FORMAT, "folder": folder.name, "step": step, "files": files}
        write_atomic_text(out / POINTER, json.dumps(pointer, indent=1), "the checkpoint")
    except BaseException:
        if not _names(out / POINTER, folder.name):  # never current: nothing points at it
            _remove_quietly(folder)
        raise
    for stale in out.glob(PREFIX + "*"):
        if stale.name != folder.name:
            _remove_quietly(stale)
    return folder


def _names(pointer: Path, folder: str) -> bool:
    """Whether the pointer file names `folder` (a failure after the pointer's rename must not delete it)."""
    try:
        return json.loads(pointer.read_text()).get("folder") == folder
    except (OSError, ValueError, AttributeError):
        return False


def current(out: Path) -> Path | None:
    """The verified current checkpoint folder under `out`, or None when there is none; anything that does not
    match its pointer is refused in one line."""
    pointer_path = out / POINTER
    if not pointer_path.exists():
        if (out / "state.json").is_file():  # written before checkpoints had pointers, and not verifiable
            raise ForethoughtError(f"{out} holds an unverifiable checkpoint of an older layout; choose a new --out")
        return None
    pointer = read_json(pointer_path, "checkpoint pointer")
    folder_name, files = pointer.get("folder"), pointer.get("files")
    if (
        pointer.get("format") != FORMAT
        or not isinstance(folder_name, str)
        or not folder_name.startswith(PREFIX)
        or "/" in folder_name
        or not isinstance(files, dict)
        or not files
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    ):
        raise ForethoughtError(f"{pointer_path}: not a checkpoint pointer this version writes")
    folder = out / folder_name
    verify_files(folder, files, "checkpoint")
    return folder


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ForethoughtError(f"{path}: unreadable {what} ({e.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise ForethoughtError(f"{path}: the {what} must be a JSON object")
    return value


def _no_constant(name: str) -> float:
    # json writes NaN for a missing per-position accuracy; Infinity is never written
    if name == "NaN":
        return math.nan
    raise ValueError(f"{name} is not allowed")


# --- whole folders (the exported model) --------------------------------------------------------------------------


def replace_folder(target: Path, fill: Callable[[Path], None], what: str) -> Path:
    """Write a folder through `fill(tmp)` next to `target`, add a manifest of sha256s, fsync, and put it in place.

    A kill leaves either the old folder, no folder, or the new one -- each complete -- plus at most a
    `.tmp-`/`.old-` sibling that the next write removes."""
    nonce = secrets.token_hex(4)
    tmp = target.with_name(f"{target.name}.tmp-{nonce}")
    old = target.with_name(f"{target.name}.old-{nonce}")
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        _remove_quietly(stale)
    for stale in target.parent.glob(f"{target.name}.old-*"):
        _remove_quietly(stale)
    try:
        with writing(target, what):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            fill(tmp)
            files = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1))
            _fsync_files(tmp)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        _remove_quietly(tmp)
        if old.exists() and not target.exists():  # failed between the two renames: the old folder goes back
            with contextlib.suppress(OSError):
                os.replace(old, target)
        raise
    _remove_quietly(old)
    return target
