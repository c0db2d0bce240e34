"""`forethought report`: every experiment for one model, presented on one self-contained page."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from forethought.commands.common import DEFAULT_MODEL, DeviceOpt, JsonOpt, ModelOpt, app, console, err_console

DEFAULT_CACHE = Path.home() / ".cache" / "forethought" / "report"


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html, report.md, report.json, figures/.")],
    corpus: Annotated[str, typer.Option("--corpus", help="'stdlib', a text file, a folder or a .jsonl.")] = "stdlib",
    quick: Annotated[bool, typer.Option("--quick", help="Small budgets: minutes on a 2-core CPU.")] = False,
    sections: Annotated[
        str | None, typer.Option("--sections", help="Comma-separated section keys (default: all).")
    ] = None,
    results: Annotated[
        Path | None, typer.Option("--results", help="Folder with another run's second_model.json (a Finding).")
    ] = None,
    compare: Annotated[
        Path | None, typer.Option("--compare", help="Another model's report (folder or report.json), side by side.")
    ] = None,
    cache: Annotated[
        Path, typer.Option("--cache", help="Cached section results and activation stores.")
    ] = DEFAULT_CACHE,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute every section.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Answer the thread's questions for MODEL: index.html (one file), report.md and report.json."""
    from forethought.paths import output_dir
    from forethought.report import ReportContext, ReportSettings, run_report, select, write_report
    from forethought.report.finding import check_results_dir

    chosen = select([s.strip() for s in sections.split(",") if s.strip()] if sections else None)
    output_dir(out, "--out")  # a file there, a read-only or missing place: one line before minutes of work
    output_dir(cache, "--cache")
    if results is not None:
        check_results_dir(results, [s.key for s in chosen])
    ctx = ReportContext(
        model=model,
        corpus=corpus,
        settings=ReportSettings.quick() if quick else ReportSettings.full(),
        device=device,
        results_dir=results,
        compare=compare,
    )
    if compare is not None:
        from forethought.report.builtin import compare_file

        compare_file(ctx)  # a wrong path is the user's error, before minutes of work
    started = time.perf_counter()
    command = "forethought " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    result = run_report(
        ctx, chosen, cache, use_cache=not no_cache, console=None if as_json else err_console, command=command
    )
    paths = write_report(result, out)
    wall = time.perf_counter() - started
    if as_json:
        print(json.dumps({"files": {k: str(v) for k, v in paths.items()}, "wall_seconds": wall} | result.to_dict()))
        return
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("ok", "failed", "unavailable")}
    console.print(
        f"{counts['ok']} sections answered, {counts['failed']} failed, {counts['unavailable']} not available · "
        f"{'quick' if quick else 'full'} run in {wall:.1f} s · {paths['html']}"
    )
