"""The one place that writes files a user asked for: paths checked before any work, writes that cannot half-exist.

Every output (`trace --save`, `report --out`, `extract --out`, `--plot`, `--plot-dir`, `heads train --out`) goes
through here, so a file onto a folder, a folder that is a file, a read-only or full filesystem is one line naming
the path and the reason (ENOSPC, EROFS, EACCES, ENOTDIR, EISDIR), and a failed write leaves the old file, or none,
never a half one a rerun would take as complete (temp file in the same folder + fsync + rename).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forethought.errors import ForethoughtError

# What a write can fail with that is the user's or the machine's doing, not ours: one line each.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT, errno.EFBIG,
     errno.ENAMETOOLONG, errno.ENOENT, errno.EEXIST, errno.ELOOP}
)  # fmt: skip


def reason(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the words and the errno's name, which a user can search for."""
    name = errno.errorcode.get(exc.errno or 0, "")
    words = exc.strerror or str(exc)
    return f"{words} ({name})" if name else words


def write_error(path: str | Path, flag: str, exc: OSError) -> ForethoughtError:
    return ForethoughtError(f"{flag} {path}: cannot write: {reason(exc)}")


def _check_writable_dir(folder: Path, flag: str, path: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only(folder) else errno.EACCES
        raise write_error(path, flag, OSError(code, os.strerror(code)))


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def output_file(path: str | Path, flag: str = "the output") -> Path:
    """`path` as a file we may create or replace: its folder must exist (we never create folders the user did
    not ask for: a typo would scatter them) and be writable, and it must not itself be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ForethoughtError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'trace.safetensors'}")
    parent = path.parent
    for above in (parent, *parent.parents):  # a file where a folder should be: ENOTDIR, named
        if above.exists() and not above.is_dir():
            raise write_error(path, flag, OSError(errno.ENOTDIR, f"{above} is a file, not a folder"))
    if not parent.is_dir():
        raise ForethoughtError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    _check_writable_dir(parent, flag, path)
    return path


def output_dir(path: str | Path, flag: str = "the output folder") -> Path:
    """`path` as a folder we write into, created (with its parents) if missing; a file there is an error."""
    path = Path(path).expanduser()
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            what = f"{above} is a file" if above == path else f"{above} is a file, not a folder"
            raise write_error(path, flag, OSError(errno.ENOTDIR, what))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, flag, e) from None
    _check_writable_dir(path, flag, path)
    return path


@contextmanager
def writing(path: str | Path, flag: str) -> Iterator[None]:
    """For writers we do not own (matplotlib's savefig): an OSError inside is one line naming `path`. A cut PNG
    is harmless (no rerun reads one back), so these are not made atomic."""
    try:
        yield
    except OSError as e:
        raise write_error(path, flag, e) from None


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, flag: str = "the output") -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` only when the block ends without an
    error, removed otherwise. OSErrors (full disk, read-only, permissions) become one-line errors naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # what the writer left in the page cache is on disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, flag, e) from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # pragma: no cover - the folder itself went away
            pass


def atomic_write_bytes(path: str | Path, data: bytes, flag: str = "the output") -> Path:
    """`data` at `path`, all of it or (on any error) none of it."""
    with atomic_path(path, flag) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
    return Path(path)


def atomic_write_text(path: str | Path, text: str, flag: str = "the output") -> Path:
    return atomic_write_bytes(path, text.encode(), flag)
