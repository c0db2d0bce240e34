"""A Report as report.json, report.md (figures beside it) and index.html (one file, figures embedded)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from jinja2 import Environment

from forethought.format import bounds, number
from forethought.paths import atomic_write_text, output_dir, write_error
from forethought.report.runner import Outcome, Report
from forethought.report.template import PAGE

STATUS_WORDS = {"ok": "answered", "failed": "failed", "unavailable": "not available in this install"}


def figure_path(outcome: Outcome, file: str) -> str:
    return f"figures/{outcome.key}/{file}"


def copy_figures(report: Report, out: Path) -> None:
    shutil.rmtree(out / "figures", ignore_errors=True)  # ours alone: a figure a section no longer makes must go
    for o in report.outcomes:
        if o.finding is None or o.folder is None:
            continue
        for f in o.finding.figures:
            target = out / figure_path(o, f.file)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(o.folder / f.file, target)


def write_json(report: Report, path: Path) -> None:
    d = report.to_dict()
    for section, o in zip(d["sections"], report.outcomes):
        for f in section.get("figures", []):
            f["file"] = figure_path(o, f["file"])
    atomic_write_text(path, json.dumps(d, indent=1, default=str), "--out")


def _model_line(meta: dict) -> str:
    m = meta["model"]
    desc = m.get("description", {})
    config = desc.get("config", {})
    n = desc.get("n_params")
    parts = [m["name"], None if not n else f"{n / 1e6:.0f}M parameters" if n >= 1e6 else f"{n:,} parameters"]
    if config:
        parts.append(f"{config.get('n_layers')} layers, d_model {config.get('d_model')}")
        parts.append(config.get("arch") or config.get("architecture"))
    return " · ".join(str(p) for p in parts if p)


def write_markdown(report: Report, path: Path) -> None:
    meta = report.meta
    lines = [
        f"# What {meta['model']['name']} carries from one token to the next",
        "",
        f"Model: {_model_line(meta)} (`{meta['model']['path']}`) · corpus `{meta['corpus']}` · {meta['mode']} run · "
        f"{meta['wall_seconds']:.0f} s wall (sections computed in {meta['computed_seconds']:.0f} s) · "
        f"{meta['started']}",
        "",
        f"Regenerate: `{meta['command']}`",
        "",
        "| question | answer | time |",
        "|---|---|---|",
    ]
    for o in report.outcomes:
        state = STATUS_WORDS[o.status] + (" (cached)" if o.cached else "")
        lines.append(f"| [{o.title}](#{o.key}) | {state} | {_seconds(o)} |")
    for o in report.outcomes:
        lines += ["", f'<a id="{o.key}"></a>', f"## {o.title}", "", f"*{o.question}*", ""]
        if o.finding is None:
            lines += [f"**{STATUS_WORDS[o.status]}**: {o.reason}", ""]
            continue
        f = o.finding
        lines += [f.verdict, "", "| number | value | 95% interval |", "|---|---|---|"]
        lines += [f"| {k} | {number(v)} | {bounds(f.intervals.get(k))} |" for k, v in f.numbers.items()]
        for fig in f.figures:
            lines += ["", f"![{fig.caption}]({figure_path(o, fig.file)})", "", f"{fig.caption}", "", "```bash"]
            lines += [fig.command, "```"]
        others = [c for c in f.commands if c not in {fig.command for fig in f.figures}]
        if others:
            lines += ["", "Numbers from:", "", "```bash", *others, "```"]
        lines += ["", f"_{_seconds(o)}_"]
    lines += ["", "## Machine and versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["machine"].items()]
    lines += [f"| {k} | {v} |" for k, v in meta["versions"].items()]
    atomic_write_text(path, "\n".join(lines) + "\n", "--out")


def _seconds(o: Outcome) -> str:
    if o.cached and o.computed_seconds is not None:
        return f"{o.seconds:.1f} s (cached; computed in {o.computed_seconds:.1f} s)"
    return f"{o.seconds:.1f} s"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_html(report: Report, path: Path) -> None:
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = number
    env.filters["interval"] = bounds
    sections = []
    for o in report.outcomes:
        figures = []
        if o.finding is not None:
            figures = [{"src": _data_uri(o.folder / f.file), "figure": f} for f in o.finding.figures]
        sections.append({"o": o, "figures": figures, "status": STATUS_WORDS[o.status], "time": _seconds(o)})
    html = env.from_string(PAGE).render(
        meta=report.meta, model_line=_model_line(report.meta), sections=sections, total=report.meta["wall_seconds"]
    )
    atomic_write_text(path, html, "--out")


def write_report(report: Report, out: Path) -> dict[str, Path]:
    """index.html, report.md, report.json and figures/ under `out`, each file whole or not at all (report.json
    last: a folder where it is missing or older than index.html was not written to the end)."""
    output_dir(out, "--out")
    paths = {"html": out / "index.html", "markdown": out / "report.md", "json": out / "report.json"}
    try:
        copy_figures(report, out)
    except OSError as e:
        raise write_error(out / "figures", "--out", e) from None
    write_html(report, paths["html"])
    write_markdown(report, paths["markdown"])
    write_json(report, paths["json"])
    return paths
