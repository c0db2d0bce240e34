"""The plan map of `forethought plan-tasks`: one table (task x target x model -> behaviour, probe excess, causal
effects, verdict, smallest detectable excess) as Markdown, and the scale figure (excess and causal effect against
the model's parameter count, log x, one line per task). Both read `plan_map.json` (what `map_summary` makes), so
the report section and the command draw the same thing."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from forethought.experiments.plan_tasks.types import paired_effect_text  # noqa: E402


def _ok(iv: dict | None) -> bool:
    return bool(iv) and all(
        isinstance(iv.get(k), int | float) and math.isfinite(iv[k]) for k in ("estimate", "low", "high")
    )


def points(iv: dict | None, why: str = "not measured") -> str:
    """An interval in accuracy points: '+3.1 [-0.4, +6.5]' (or why there is none)."""
    if not _ok(iv):
        return why
    return f"{100 * iv['estimate']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"


def share(iv: dict | None) -> str:
    if not _ok(iv):
        return "not measured"
    return f"{100 * iv['estimate']:.0f}% [{100 * iv['low']:.0f}, {100 * iv['high']:.0f}]"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _causal(result: dict, name: str) -> str:
    test = result.get(name)
    if test:
        effect = test.get("effect")
        if not _ok(effect):
            return "no effect measured"
        return paired_effect_text(effect["estimate"], effect["low"], effect["high"], int(test.get("n") or 0))
    if result.get("verdict") == "task not done":
        return "not run (task not done)"
    if result.get("verdict") == "not found":
        return "not run (no excess to test)"
    return "not run"


def table_rows(summary: dict) -> list[list[str]]:
    """One row per task x target x model, in the order of the tasks and models asked for; a model x task that
    did not run says why in every cell."""
    rows = []
    outcomes = {(o["model"], o["task"]): o for o in summary.get("outcomes", [])}
    missing = {(m["model"], m["task"]): m["why"] for m in summary.get("missing", [])}
    for task in summary["tasks"]:
        for model in summary["models"]:
            o = outcomes.get((model["model"], task))
            if o is None:
                why = missing.get((model["model"], task), "not run")
                rows.append([task, "(all)", model["model"], why, why, why, why, why, why])
                continue
            for r in o["results"]:
                mde, excess = r.get("mde"), r.get("excess")
                if isinstance(mde, int | float) and math.isfinite(mde):
                    detectable = f"{100 * mde:.1f}"
                elif _ok(excess) and excess["low"] == excess["high"] == 0 and r.get("n_usable"):
                    # no prompt differed between B and B + h: the n prompts bound the effect (rule of three)
                    detectable = f"< {300 / r['n_usable']:.1f} (no prompt differed)"
                else:
                    detectable = "n/a"
                rows.append(
                    [
                        task,
                        r["target"],
                        model["model"],
                        share(r["behaviour_rate"]),
                        points(r["excess"], "not measured (" + (r.get("why") or "too few labels") + ")"),
                        _causal(r, "steering"),
                        _causal(r, "patching"),
                        r["verdict"],
                        detectable,
                    ]
                )
    return rows


HEADER = [
    "task",
    "target",
    "model",
    "behaviour",
    "probe excess (B+h)-B, points [95%]",
    "steering effect [95%]",
    "patching effect [95%]",
    "verdict",
    "MDE (points)",
]


def plan_map_markdown(summary: dict) -> str:
    models = ", ".join(f"{m['model']} ({_params(m['n_params'])})" for m in summary["models"])
    lines = [
        "# Where does it plan? The plan map",
        "",
        f"Models: {models}. Prompts per task: {summary['settings']['prompts']} (seed {summary['settings']['seed']}).",
        "",
        "Behaviour: share of prompts where the model did the task (rhymed, answered right, followed the request), 95%"
        " interval. Probe excess: a readout of the prompt-text baseline B plus the site's state h against B alone,"
        " cross-fitted over prompt groups, accuracy points with a 95% bootstrap over prompts. Steering: share of"
        " outputs changed to the steered target minus a random direction of the same norm. Patching: share that"
        " follows a donor prompt's state. MDE: the smallest excess this run could have detected (5%, power 80%).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table_rows(summary)]
    whys = [
        f"- {o['task']} / {r['target']} / {o['model']}: {r['verdict']}. {r.get('why', '')}"
        for o in summary.get("outcomes", [])
        for r in o["results"]
        if r.get("why")
    ]
    if whys:
        lines += ["", "## Why each verdict", "", *whys]
    if summary.get("command"):
        lines += ["", f"Made by: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def _headline(outcome: dict, key: str) -> dict | None:
    """The task's first target's interval `key` (its main target: the rhyme family, the answer, the article...);
    None where the model did not do the task (there is nothing to plot but a placeholder)."""
    r = outcome["results"][0] if outcome["results"] else {}
    if r.get("verdict") == "task not done":
        return None
    if key == "excess":
        return r.get("excess")
    test = r.get(key)
    return test.get("effect") if test else None


def plot_plan_scale(summary: dict, path: str | Path) -> Path:
    """Excess and steering / patching effect of each task's main target against parameters (log x)."""
    params = {m["model"]: m["n_params"] for m in summary["models"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    titles = {
        "excess": "probe excess (B+h) - B at the site",
        "steering": "steering effect (target - random direction)",
        "patching": "patching effect (follows the donor)",
    }
    colors = {task: f"C{i}" for i, task in enumerate(summary["tasks"])}  # one colour per task in every panel
    for ax, key in zip(axes, titles):
        for task in summary["tasks"]:
            pts = []
            for o in summary.get("outcomes", []):
                iv = _headline(o, key) if o["task"] == task else None
                if _ok(iv):
                    pts.append((params[o["model"]], iv))
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            nudge = 1.04 ** (summary["tasks"].index(task) - (len(summary["tasks"]) - 1) / 2)  # bars side by side
            x = [p[0] * nudge for p in pts]
            y = [100 * p[1]["estimate"] for p in pts]
            err = [
                [100 * max(0.0, p[1]["estimate"] - p[1]["low"]) for p in pts],
                [100 * max(0.0, p[1]["high"] - p[1]["estimate"]) for p in pts],
            ]
            main = next((o["results"][0]["target"] for o in summary["outcomes"] if o["task"] == task), "")
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[task], label=f"{task} ({main})")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        sizes = sorted({n for n in params.values() if n > 0})
        if sizes:
            ax.set_xticks(sizes, [_params(n) for n in sizes])
            ax.minorticks_off()
            ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
        ax.set_xlabel("parameters")
        ax.set_title(titles[key], fontsize=10)
    axes[0].set_ylabel("accuracy / share points (95% interval)")
    seen: dict = {}
    for ax in axes:  # a task may have points in one panel only
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    handles, labels = list(seen.values()), list(seen)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Where does it plan? Each task's main target against model size (a task not done: no point)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
