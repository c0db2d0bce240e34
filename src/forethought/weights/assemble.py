"""A model file shipped as numbered data files spread over several PyPI packages (PyPI's size limit),
joined once into the user cache and checked against a pinned size and sha256 before it is ever used.

The packages are only ever *located* (importlib.util.find_spec finds a top-level package's folder
without running its __init__); their data files are read as bytes, their code is never imported.
The joined file is written under a temporary name and renamed into place only once its sha256
matched, so a crash or a full disk never leaves a half file where a whole one is expected. A small
stamp beside it records the size, mtime and inode that were verified, so later uses check the file
by `stat` instead of re-hashing a gigabyte; any change to the file makes it be hashed again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from forethought.errors import ForethoughtError

CHUNK = 8 << 20


def cache_root() -> Path:
    """~/.cache/forethought, or $FORETHOUGHT_CACHE (the same root the compiled-kernel cache uses)."""
    return Path(os.environ.get("FORETHOUGHT_CACHE", Path.home() / ".cache" / "forethought"))


@dataclass(frozen=True)
class SplitFile:
    """Where the pieces live and what the joined file must be."""

    filename: str  # the joined file's name under <cache>/models/
    packages: tuple[str, ...]  # import names, in the order their data files are concatenated
    size: int
    sha256: str
    install: str  # the one command that installs every package

    @property
    def target(self) -> Path:
        return cache_root() / "models" / self.filename

    def pieces(self) -> list[Path]:
        """The data file of every package, in order; a clear error naming what is missing otherwise."""
        missing, found = [], []
        for package in self.packages:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                missing.append(package)
                continue
            files = sorted(
                path for folder in spec.submodule_search_locations for path in (Path(folder) / "data").glob("part*.bin")
            )
            if len(files) != 1:
                raise ForethoughtError(
                    f"package {package} should hold one data/part*.bin file, it holds {len(files)}; "
                    f"reinstall with: {self.install}"
                )
            found.append(files[0])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ForethoughtError(
                f"{self.filename}: {len(missing)} of its {len(self.packages)} packages are not installed ({shown}); "
                f"install them with: {self.install}"
            )
        total = sum(path.stat().st_size for path in found)
        if total != self.size:
            raise ForethoughtError(
                f"{self.filename}: its {len(found)} pieces hold {total:,} bytes, the model has {self.size:,}; "
                f"reinstall with: {self.install}"
            )
        return found

    def locate(self) -> Path:
        """The joined, verified file; joined now if this is its first use (or the copy there is bad)."""
        target = self.target
        if target.is_file() and self._stamp_matches(target):
            return target
        if target.is_file():  # no stamp or a changed file: hash what is there before trusting it
            if target.stat().st_size == self.size and _sha256(target) == self.sha256:
                self._write_stamp(target)
                return target
            target.unlink()
        self._join(self.pieces(), target)
        return target

    # ----------------------------------------------------------------------------------------- helpers

    def _stamp_path(self, target: Path) -> Path:
        return target.with_name(target.name + ".verified.json")

    def _identity(self, target: Path) -> dict:
        st = target.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": self.sha256}

    def _stamp_matches(self, target: Path) -> bool:
        try:
            return json.loads(self._stamp_path(target).read_text()) == self._identity(target)
        except (OSError, ValueError):
            return False

    def _write_stamp(self, target: Path) -> None:
        stamp = self._stamp_path(target)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._identity(target)))
        os.replace(tmp, stamp)

    def _join(self, pieces: list[Path], target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < self.size:
            raise ForethoughtError(
                f"{self.filename}: joining it needs {self.size / 1e9:.2f} GB in {target.parent}, "
                f"only {free / 1e9:.2f} GB are free"
            )
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as out:
                for piece in pieces:
                    with piece.open("rb") as src:
                        while block := src.read(CHUNK):
                            digest.update(block)
                            out.write(block)
            written = tmp.stat().st_size
            if written != self.size or digest.hexdigest() != self.sha256:
                raise ForethoughtError(
                    f"{self.filename}: the joined pieces ({written:,} bytes, sha256 {digest.hexdigest()[:16]}...) "
                    f"are not the pinned file ({self.size:,} bytes, sha256 {self.sha256[:16]}...); "
                    f"reinstall with: {self.install}"
                )
            os.replace(tmp, target)  # atomic: a reader sees no file or the whole verified one
        except OSError as e:
            raise ForethoughtError(f"{self.filename}: joining its pieces into {target} failed ({e})") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._write_stamp(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
