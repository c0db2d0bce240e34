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

from forethought.errors import ForethoughtError


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
        """A Finding from JSON, every field's type checked (ValueError saying which field is wrong): the page
        shows these numbers, so nothing that merely looks like a finding is taken as one."""
        if not isinstance(d, dict) or not isinstance(d.get("verdict"), str):
            raise ValueError("a finding is a JSON object with at least a string 'verdict'")
        numbers = _present(d, "numbers", {})
        if not isinstance(numbers, dict) or not all(is_value(v) for v in numbers.values()):
            raise ValueError("'numbers' must map names to numbers, strings, booleans or lists of them")
        intervals = _present(d, "intervals", {})
        if not isinstance(intervals, dict) or not all(_is_interval(v) for v in intervals.values()):
            raise ValueError("'intervals' must map names to [low, high] pairs of numbers, low <= high")
        figures = _present(d, "figures", [])
        if not isinstance(figures, list) or not all(_is_figure(f) for f in figures):
            raise ValueError("'figures' must be a list of {file, caption, command} strings, file a relative path")
        commands = _present(d, "commands", [])
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise ValueError("'commands' must be a list of strings")
        data = _present(d, "data", {})
        if not isinstance(data, dict):
            raise ValueError("'data' must be an object")
        return cls(
            verdict=d["verdict"],
            numbers=dict(numbers),
            intervals={k: [float(v[0]), float(v[1])] for k, v in intervals.items()},
            figures=[Figure(f["file"], f["caption"], f["command"]) for f in figures],
            commands=list(commands),
            data=dict(data),
        )


def _present(d: dict, key: str, empty):
    """d[key], or `empty` when it is missing or null (an empty list where an object belongs is still wrong)."""
    value = d.get(key)
    return empty if value is None else value


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_value(v: object) -> bool:
    scalar = v is None or isinstance(v, bool | str) or _is_number(v)
    return scalar or (isinstance(v, list) and all(is_value(x) and not isinstance(x, list) for x in v))


def _is_interval(v: object) -> bool:
    # NaN (no interval) passes; a reversed pair does not
    return isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and not v[0] > v[1]


def _is_figure(f: object) -> bool:
    return (
        isinstance(f, dict)
        and set(f) == {"file", "caption", "command"}
        and all(isinstance(f[k], str) for k in f)
        and f["file"].strip() != ""
        and not f["file"].startswith(("/", "\\"))
        and ".." not in f["file"].replace("\\", "/").split("/")
    )


def read_finding(path: Path, folder: Path) -> Finding:
    """A Finding another run saved as JSON (`forethought report --results DIR`), schema-checked, its figures
    copied into `folder` from beside the JSON: one line naming the file when it is not a finding."""
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
