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
        finding = Finding.from_dict(json.loads(path.read_text()))
        for figure in finding.figures:
            source = path.parent / figure.file
            if not source.is_file():
                raise FileNotFoundError(f"{path} names the figure {figure.file}, which is not beside it")
            shutil.copy2(source, folder / Path(figure.file).name)
            figure.file = Path(figure.file).name
        return finding
