"""Run the sections, each isolated (a failure is reported, not raised) and cached by model + corpus + settings."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from forethought.report.cache import folder_intact, read_json, seal_folder, write_json
from forethought.report.context import ReportContext
from forethought.report.finding import Finding, Unavailable
from forethought.report.machine import machine, versions
from forethought.report.sections import Section

FINDING = "finding.json"


@dataclass
class Outcome:
    key: str
    title: str
    question: str
    status: str  # ok | failed | unavailable
    seconds: float
    cached: bool = False
    computed_seconds: float | None = None  # the run that made a cached result took this long
    finding: Finding | None = None
    reason: str | None = None  # why it failed or is unavailable
    folder: Path | None = None  # where its figures are (in the cache)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("finding", "folder")}
        return d | (self.finding.to_dict() if self.finding else {})


@dataclass
class Report:
    outcomes: list[Outcome]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "sections": [o.to_dict() for o in self.outcomes]}


def cache_key(section: Section, ctx: ReportContext, model: dict) -> str:
    spec = {"section": section.key, "version": section.version, "model": model, "inputs": section.inputs(ctx)}
    spec["device"] = ctx.device
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_section(section: Section, ctx: ReportContext, model: dict, cache_dir: Path, use_cache: bool) -> Outcome:
    """Run one section into `cache_dir/<key>-<hash>/` (or reuse it); never raises for the section's own errors."""
    started = time.perf_counter()
    outcome = Outcome(section.key, section.title, section.question, "ok", 0.0)
    try:
        folder = cache_dir / f"{section.key}-{cache_key(section, ctx, model)}"
        if use_cache and section.cache and folder.is_dir():
            cached = _cached_finding(folder)
            if cached is not None:
                outcome.finding, outcome.computed_seconds = cached
                outcome.folder, outcome.cached = folder, True
                outcome.seconds = time.perf_counter() - started
                return outcome
            # Damaged (a changed byte, a cut file, a missing figure): recomputed below, never shown.
            outcome.reason = "cached result was damaged (sha256 mismatch): recomputed"
        scratch = folder.with_name(folder.name + ".partial")  # a killed run leaves no half result behind
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        finding = section.run(ctx, scratch)
        outcome.computed_seconds = time.perf_counter() - started
        saved = finding.to_dict() | {"seconds": outcome.computed_seconds}
        (scratch / FINDING).write_text(json.dumps(saved, default=str))
        seal_folder(scratch)  # the hashes last: a folder without them is never read as a result
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
        outcome.finding, outcome.folder = finding, folder
    except Unavailable as e:
        outcome.status, outcome.reason = "unavailable", str(e)
    except Exception as e:  # one section's failure must not take the page down
        outcome.status = "failed"
        where = traceback.extract_tb(e.__traceback__)[-1]
        outcome.reason = f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
    outcome.seconds = time.perf_counter() - started
    return outcome


def _cached_finding(folder: Path) -> tuple[Finding, float | None] | None:
    """(the cached Finding in `folder`, the seconds it took) when every file matches its recorded sha256 and
    it parses; else None."""
    if not folder_intact(folder):
        return None
    try:
        saved = json.loads((folder / FINDING).read_text())
        seconds = saved.get("seconds")
        return Finding.from_dict(saved), seconds if isinstance(seconds, int | float) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def describe_model(ctx: ReportContext, identity: dict, cache_dir: Path) -> dict:
    """The model's architecture and size; loads it only when no section did and no earlier run saved it."""
    saved = cache_dir / f"model-{identity['fingerprint']}.json"
    lm = ctx.loaded_any
    if lm is None and (kept := read_json(saved)) is not None:  # a damaged description is rebuilt, not shown
        return kept
    lm = lm or ctx.lm()
    described = lm.describe() | {"n_params": lm.config.n_params()}
    described["dtype"] = "float32"  # the sections' working dtype (invariance alone runs in float64)
    write_json(saved, described)
    return json.loads(json.dumps(described, default=str))


def run_report(
    ctx: ReportContext,
    sections: list[Section],
    cache_dir: Path,
    use_cache: bool = True,
    console: Console | None = None,
    command: str = "",
) -> Report:
    """Every section in order, with a Rich progress line per section when `console` is given."""
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    ctx.work_dir = cache_dir
    identity = ctx.model_identity()  # a missing model is the user's error: raised before any work
    meta = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": identity,
        "corpus": ctx.corpus,
        "mode": {ctx.settings.quick(): "quick", ctx.settings.full(): "full"}.get(ctx.settings, "custom"),
        "settings": ctx.settings.to_dict(),
        "machine": machine(),
        "versions": versions(),
    }
    outcomes = []
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} sections"),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    with progress:
        task = progress.add_task("report", total=len(sections))
        for section in sections:
            progress.update(task, description=f"{section.key} …")
            outcome = run_section(section, ctx, identity, cache_dir, use_cache)
            outcomes.append(outcome)
            if outcome.finding is not None:
                ctx.findings[section.key] = outcome.finding
            progress.advance(task)
            if console is not None:
                mark = {"ok": "[green]ok[/green]", "failed": "[red]failed[/red]"}.get(outcome.status, "[dim]n/a[/dim]")
                note = f" (cached; computed in {outcome.computed_seconds or 0:.1f} s)" if outcome.cached else ""
                reason = f" [dim]{outcome.reason}[/dim]" if outcome.reason else ""
                progress.console.print(f"{mark} {section.key}: {outcome.seconds:.1f} s{note}{reason}", soft_wrap=True)
    try:
        meta["model"] |= {"description": describe_model(ctx, identity, cache_dir)}
    except Exception as e:  # the sections already say why the model did not load
        meta["model"] |= {"description": {"error": f"{type(e).__name__}: {e}"}}
    meta["wall_seconds"] = time.perf_counter() - started
    # what the sections cost when they were computed (this run or the cached runs): the cold run's time
    meta["computed_seconds"] = sum(o.computed_seconds or o.seconds for o in outcomes)
    return Report(outcomes, meta)
