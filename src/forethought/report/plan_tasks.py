"""'Where it plans' as a report section: the plan map a `forethought plan-tasks` run wrote (task x target x model
-> behaviour, probe excess, causal effects, verdict, the smallest detectable effect) and its scale figure, read
from the results folder (`--results DIR` holding `plan_map.json`, or `DIR/plan_map/plan_map.json`). The map covers
the whole ladder it was run on, so the section is the same for every report model; its own model's rows lead."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from forethought.report.context import ReportContext
from forethought.report.finding import Figure, Finding, Unavailable

COMMAND = "forethought plan-tasks --model smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b --out plan_map"


def plan_map_path(ctx: ReportContext) -> Path | None:
    if ctx.results_dir is None:
        return None
    for path in (Path(ctx.results_dir) / "plan_map.json", Path(ctx.results_dir) / "plan_map" / "plan_map.json"):
        if path.is_file():
            return path
    return None


def plan_map_inputs(ctx: ReportContext) -> dict:
    path = plan_map_path(ctx)
    return {"plan_map_sha256": hashlib.sha256(path.read_bytes()).hexdigest()} if path else {}


def _pts(iv: dict | None) -> str | None:
    keys = ("estimate", "low", "high")
    if not iv or not all(isinstance(iv.get(k), int | float) and math.isfinite(iv[k]) for k in keys):
        return None
    return f"{100 * iv['estimate']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"


RANK = {"planned": 0, "encoded, not shown used": 1, "not found": 2, "task not done": 3}


def _strongest(results: list[dict]) -> dict | None:
    """The target with the most evidence of a plan (planned, then encoded, ...; then the largest excess): what a
    task says for one model in a line."""

    def key(r: dict) -> tuple:
        value = (r.get("excess") or {}).get("estimate")
        size = value if isinstance(value, int | float) and math.isfinite(value) else -1.0
        return RANK.get(r.get("verdict"), 4), -size

    return min(results, key=key) if results else None


def where_it_plans(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.viz.plan_map import plot_plan_scale, verdict_text

    path = plan_map_path(ctx)
    if path is None:
        where = f"no plan_map.json in {ctx.results_dir}" if ctx.results_dir else "no --results DIR"
        raise Unavailable(f"no plan map to show ({where}); make one with: {COMMAND}, then --results plan_map")
    try:
        summary = json.loads(path.read_text())
        outcomes, tasks = summary["outcomes"], summary["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Unavailable(f"{path} is not a plan map ({type(e).__name__}: {e})") from None
    from forethought.weights.registry import REGISTRY

    mine = ctx.model if ctx.model in REGISTRY else Path(ctx.model).name.removesuffix(".gguf")
    numbers: dict = {}
    intervals: dict = {}
    said = []
    for task in tasks:
        parts = []
        ordered = sorted((o for o in outcomes if o["task"] == task), key=lambda o: (o["model"] != mine, o["n_params"]))
        for o in ordered:
            for r in o["results"]:
                key = f"{task}_{r['target']}_{o['model']}"
                numbers[f"{key}_verdict"] = r["verdict"]
                numbers[f"{key}_behaviour"] = 100 * r["behaviour_rate"]["estimate"]
                excess = _pts(r["excess"])
                if excess is not None:
                    numbers[f"{key}_excess_points"] = 100 * r["excess"]["estimate"]
                    intervals[f"{key}_excess_points"] = [100 * r["excess"]["low"], 100 * r["excess"]["high"]]
                if isinstance(r.get("mde"), int | float) and math.isfinite(r["mde"]):
                    numbers[f"{key}_mde_points"] = 100 * r["mde"]
            head = _strongest(o["results"])
            if head is not None:
                excess = _pts(head["excess"]) or "not measured"
                parts.append(
                    f"{o['model']} {verdict_text(head)} ({head['target']}: behaviour "
                    f"{100 * head['behaviour_rate']['estimate']:.0f}%, excess {excess} points)"
                )
        if parts:
            said.append(f"{task}: " + "; ".join(parts))
    figures = []
    if outcomes:
        plot_plan_scale(summary, folder / "plan_scale.png")
        figures.append(
            Figure(
                "plan_scale.png",
                "The plan map: each task / target x model coloured by its verdict, with the probe's excess over "
                "the prompt-text baseline and the steering and patching effects (points, 95% intervals); beside it "
                "the excess of every target a model does against model size.",
                summary.get("command") or COMMAND,
            )
        )
    verdict = (
        "Per task, each model's strongest target (planned: the state adds to the prompt text and a causal test "
        "moves the output; encoded: it adds, no causal effect shown; not found: nothing beyond the text, the MDE "
        "says how small an effect could have been missed; the text decides: the prompt alone reads the target, "
        "the setting cannot discriminate). " + " · ".join(said)
        if said
        else "The plan map holds no measured task."
    )
    return Finding(
        verdict,
        numbers=numbers,
        intervals=intervals,
        figures=figures,
        commands=[summary.get("command") or COMMAND],
        data={"plan_map": summary},
    )
