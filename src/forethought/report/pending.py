"""Sections whose experiments live in other parts of the project: the plan answer, the architectures lab,
speculative decoding, a second model family. Each is answered by the first of:

1. a provider registered with `register_provider(key, fn)` (see `providers.py`): `fn(ctx, folder) -> Finding`
   runs the experiment in-process, writes its PNGs into `folder` and presents its result (set
   `fn.report_version = 2`, 3, ... when its output changes, so cached results are not reused);
2. `<results>/<key>.json` (`forethought report --results DIR`): a Finding as JSON -- `verdict`, `numbers`,
   `intervals`, `figures` ([{file, caption, command}], files beside the JSON), `commands`, `data`;
3. otherwise the page says "not available in this install: <reason>".
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forethought.errors import ForethoughtError
from forethought.report.context import ReportContext
from forethought.report.finding import Finding, Unavailable

Provider = Callable[[ReportContext, Path], Finding]
PROVIDERS: dict[str, Provider] = {}


def register_provider(key: str, fn: Provider) -> None:
    """Answer the pending section `key` by calling `fn(ctx, folder)`."""
    PROVIDERS[key] = fn


@dataclass(frozen=True)
class Pending:
    key: str
    needs: str  # what this install lacks while the section is unavailable

    def results_file(self, ctx: ReportContext) -> Path | None:
        if ctx.results_dir is None:
            return None
        path = Path(ctx.results_dir) / f"{self.key}.json"
        return path if path.is_file() else None

    def inputs(self, ctx: ReportContext) -> dict:
        """What keys the cache: the provider's name, or the results file's bytes."""
        if self.key in PROVIDERS:
            fn = PROVIDERS[self.key]
            provider = f"{fn.__module__}.{fn.__qualname__}"
            version = getattr(fn, "report_version", 1)  # a provider bumps it when its output changes
            return {"provider": provider, "version": version, "settings": ctx.settings.to_dict(), "corpus": ctx.corpus}
        path = self.results_file(ctx)
        if path is not None:
            return {"results_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return {}

    def run(self, ctx: ReportContext, folder: Path) -> Finding:
        if self.key in PROVIDERS:
            return PROVIDERS[self.key](ctx, folder)
        path = self.results_file(ctx)
        if path is None:
            where = f"no {Path(ctx.results_dir) / (self.key + '.json')}" if ctx.results_dir else "no --results DIR"
            raise Unavailable(f"{self.needs} (no provider registered for {self.key!r}, {where})")
        finding = read_results_file(path)
        for figure in finding.figures:
            shutil.copy2(path.parent / figure.file, folder / Path(figure.file).name)
            figure.file = Path(figure.file).name
        return finding


def read_results_file(path: Path) -> Finding:
    """A `--results` Finding, schema-checked, its figures beside it: one line naming the file when it is not."""
    try:
        finding = Finding.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError) as e:
        raise ForethoughtError(f"--results {path}: unreadable ({type(e).__name__})") from None
    except ValueError as e:  # JSON syntax, or a field of the wrong type
        raise ForethoughtError(f"--results {path}: not a finding ({str(e).splitlines()[0]})") from None
    for figure in finding.figures:
        if not (path.parent / figure.file).is_file():
            raise ForethoughtError(f"--results {path} names the figure {figure.file}, which is not beside it")
    return finding


def check_results_dir(results_dir: Path, keys: list[str]) -> None:
    """Before any work: the folder exists, and each `<key>.json` there for a chosen section is a finding."""
    if not results_dir.is_dir():
        what = "is a file" if results_dir.exists() else "does not exist"
        raise ForethoughtError(f"--results {results_dir} {what}: give the folder holding <section>.json files")
    for key in keys:
        path = results_dir / f"{key}.json"
        if path.exists():
            read_results_file(path)
