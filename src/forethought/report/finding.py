"""What a report section hands back: a `Finding` (plain words, numbers, figures, the commands behind them).

This is the one interface between the report and the experiments. A section runs its experiment (or loads
another command's JSON result) and presents it as a Finding; the runner caches Findings, the writers render
them. A Finding is plain JSON both ways, so `<results>/<section>.json` written by any command can be one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class Unavailable(Exception):
    """The section's experiment is not part of this install (or its inputs are missing): not a failure."""


@dataclass
class Figure:
    file: str  # PNG file name, inside the section's own folder
    caption: str
    command: str  # the exact shell command that regenerates this figure


@dataclass
class Finding:
    verdict: str  # the answer in plain words, with its numbers
    numbers: dict[str, Any] = field(default_factory=dict)  # name -> number (or short string / bool)
    intervals: dict[str, list[float]] = field(default_factory=dict)  # name in `numbers` -> [low, high] (95%)
    figures: list[Figure] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # commands that reproduce the numbers
    data: dict[str, Any] = field(default_factory=dict)  # the experiment's full result (report.json only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        if not isinstance(d, dict) or not isinstance(d.get("verdict"), str):
            raise ValueError("a finding is a JSON object with at least a string 'verdict'")
        return cls(
            verdict=d["verdict"],
            numbers=dict(d.get("numbers") or {}),
            intervals={k: [float(v[0]), float(v[1])] for k, v in (d.get("intervals") or {}).items()},
            figures=[Figure(**f) for f in d.get("figures") or []],
            commands=list(d.get("commands") or []),
            data=dict(d.get("data") or {}),
        )


def read_finding(path: Path, folder: Path) -> Finding:
    """A Finding another run saved as JSON (`forethought report --results DIR`), its figures copied into
    `folder` from beside the JSON."""
    finding = Finding.from_dict(json.loads(path.read_text()))
    for figure in finding.figures:
        source = path.parent / figure.file
        if not source.is_file():
            raise FileNotFoundError(f"{path} names the figure {figure.file}, which is not beside it")
        shutil.copy2(source, folder / Path(figure.file).name)
        figure.file = Path(figure.file).name
    return finding
