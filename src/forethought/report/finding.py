"""What a report section hands back: a `Finding` (plain words, numbers, figures, the commands behind them).

This is the one interface between the report and the experiments. A section runs its experiment (or loads
another command's JSON result) and presents it as a Finding; the runner caches Findings, the writers render
them. A Finding is plain JSON both ways, so `<results>/<section>.json` written by any command can be one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


def wilson_interval(successes: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (successes may be a count or n * rate)."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]
