"""The plan map of `forethought plan-tasks`: one table (task x target x model -> behaviour, probe excess, causal
effects, verdict, smallest detectable excess) as Markdown, and the scale figure (the verdict grid beside the
excess of every target against the model's parameter count, log x). Both read `plan_map.json` (what
`map_summary` makes), so the report section and the command draw the same thing."""

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


TEXT_DECIDES = 0.98  # B's accuracy from which the prompt text alone settles the target (analysis.verdict says so)


def verdict_text(r: dict) -> str:
    """The verdict, saying where "not found" only means the setting cannot discriminate: the prompt text alone
    reads the target, so nothing is left for the state to add (the model does the task the text dictates)."""
    b = r.get("baseline_acc")
    if r.get("verdict") == "not found" and _ok(b) and b["estimate"] >= TEXT_DECIDES:
        return f"not found: the text decides (B {100 * b['estimate']:.0f}%)"
    return r.get("verdict", "")


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
                        verdict_text(r),
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


VERDICT_COLOURS = {
    "planned": "#3a9d5d",
    "encoded, not shown used": "#e8b04a",
    "not found": "#d9d9d9",
    "the text decides": "#c9d7ea",
    "task not done": "#ffffff",
}


def _short(iv: dict | None) -> str:
    return f"{100 * iv['estimate']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]" if _ok(iv) else ""


def _cell_text(r: dict) -> str:
    """What a grid cell says: the excess with its interval, and the causal effects where they ran."""
    if r.get("verdict") == "task not done":
        return f"task not done\n(behaviour {100 * r['behaviour_rate']['estimate']:.0f}%)"
    if verdict_text(r) != r.get("verdict"):
        return verdict_text(r).replace(": ", "\n", 1)
    lines = [f"excess {_short(r.get('excess'))}" if _ok(r.get("excess")) else "excess n/a"]
    for name, key in (("steer", "steering"), ("patch", "patching")):
        test = r.get(key)
        if test and _ok(test.get("effect")):
            e = test["effect"]
            if e["low"] == e["high"] == 0:  # no prompt moved in either arm (see paired_effect_text)
                lines.append(f"{name}: no prompt of {test.get('n', '?')} moved")
            else:
                lines.append(f"{name} {100 * e['estimate']:+.0f} [{100 * e['low']:+.0f}, {100 * e['high']:+.0f}]")
    return "\n".join(lines)


def _size_axis(ax, params: dict[str, int]) -> None:
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    sizes = sorted({n for n in params.values() if n > 0})
    if sizes:
        ax.set_xticks(sizes, [_params(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlim(sizes[0] / 1.4, sizes[-1] * 1.4)
    ax.set_xlabel("parameters")


def plot_plan_scale(summary: dict, path: str | Path) -> Path:
    """The map as a picture: left, the verdict grid (task / target x model, coloured by verdict, each cell with
    its excess and causal effects in points); right, the excess of every target a model does against parameters
    (log x), one line per task / target, so a trend with scale shows where it is, and below it the causal effects
    where they ran."""
    models = summary["models"]
    params = {m["model"]: m["n_params"] for m in models}
    outcomes = {(o["model"], o["task"]): o for o in summary.get("outcomes", [])}
    rows: list[tuple[str, str]] = []
    for task in summary["tasks"]:
        targets: list[str] = []
        for m in models:
            o = outcomes.get((m["model"], task))
            targets += [r["target"] for r in (o["results"] if o else []) if r["target"] not in targets]
        rows += [(task, t) for t in targets] or [(task, "(all)")]
    result = {
        (o["model"], o["task"], r["target"]): r for o in summary.get("outcomes", []) for r in o["results"]
    }  # fmt: skip
    fig = plt.figure(figsize=(7 + 3.1 * len(models), 1.6 + 0.62 * len(rows)))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.35 * len(models), 4.5), height_ratios=(1.6, 1), wspace=0.28)
    ax = fig.add_subplot(grid[:, 0])
    for i, (task, target) in enumerate(rows):
        for j, m in enumerate(models):
            r = result.get((m["model"], task, target))
            kind = "the text decides" if r and verdict_text(r) != r["verdict"] else (r or {}).get("verdict")
            colour = VERDICT_COLOURS.get(kind, "#ffffff") if r else "#f4f4f4"
            hatch = "//" if r is None or r.get("verdict") == "task not done" else None
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=colour, edgecolor="#888888", hatch=hatch, lw=0.6))
            ax.text(j + 0.5, i + 0.5, _cell_text(r) if r else "not run", ha="center", va="center", fontsize=6.8)
    ax.set_xlim(0, len(models))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([j + 0.5 for j in range(len(models))], [f"{m['model']}\n{_params(m['n_params'])}" for m in models])
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(len(rows))], [f"{task} · {target}" for task, target in rows], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="#888888") for c in VERDICT_COLOURS.values()]
    ax.legend(handles, list(VERDICT_COLOURS), loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=7.5)
    ax.set_title("verdict; probe excess (B+h) - B and causal effects, points [95%]", fontsize=9, pad=28)

    ax = fig.add_subplot(grid[0, 1])
    colours = {task: f"C{i}" for i, task in enumerate(summary["tasks"])}
    styles = ("-", "--", ":", "-.")
    for task, target in rows:
        pts = []
        for m in models:
            r = result.get((m["model"], task, target))
            if r and r.get("verdict") != "task not done" and _ok(r.get("excess")):
                pts.append((params[m["model"]], r["excess"]))
        if not pts:
            continue
        k = [t for t2, t in rows if t2 == task].index(target)
        nudge = 1.03 ** (rows.index((task, target)) - (len(rows) - 1) / 2)  # bars side by side
        x = [n * nudge for n, _ in pts]
        y = [100 * iv["estimate"] for _, iv in pts]
        err = [
            [100 * max(0.0, iv["estimate"] - iv["low"]) for _, iv in pts],
            [100 * max(0.0, iv["high"] - iv["estimate"]) for _, iv in pts],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, lw=1, color=colours[task],
                    ls=styles[k % len(styles)], label=f"{task} · {target}")  # fmt: skip
    _size_axis(ax, params)
    ax.set_ylabel("probe excess (B+h) - B, accuracy points (95%)")
    ax.set_title("what the site's state adds to the prompt text, by size\n(targets a model does; interval above 0:"
                 " the state holds more than the text)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=6.5, loc="upper left", ncol=2)

    ax = fig.add_subplot(grid[1, 1])
    for (model, task, target), r in result.items():
        for key, marker in (("steering", "o"), ("patching", "^")):
            test = r.get(key)
            if not (test and _ok(test.get("effect"))):
                continue
            e = test["effect"]
            nudge = 1.05 if key == "patching" else 1 / 1.05
            ax.errorbar([params[model] * nudge], [100 * e["estimate"]], marker=marker, ms=5, capsize=2,
                        yerr=[[100 * (e["estimate"] - e["low"])], [100 * (e["high"] - e["estimate"])]],
                        color=colours[task], ls="none", label=f"{key}: {task} · {target}")  # fmt: skip
    _size_axis(ax, params)
    ax.set_ylabel("causal effect, points (95%)")
    ax.set_title("where the state adds: does the output follow it? (o steering, ^ patching, each minus its control)",
                 fontsize=9)  # fmt: skip
    legend = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per test x task / target
    if legend:
        ax.legend(list(legend.values()), list(legend), fontsize=6.5, loc="best")
    fig.suptitle("Where does it plan? Tasks with a known future, on every model of the ladder", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
