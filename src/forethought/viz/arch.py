"""Present an architectures-lab ComparisonResult: a markdown table, JSON, and PNGs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from forethought.arch.compare import ComparisonResult
from forethought.format import plus_minus, size

COLORS = {"standard": "tab:blue", "feedback": "tab:red", "myopic": "tab:green", "recurrent": "tab:purple"}


def markdown(result: ComparisonResult) -> str:
    lines = [
        f"### Architectures lab: preset `{result.preset}`, {result.seeds} seeds, {len(result.runs)} runs",
        "",
        f"Training time summed over runs: {sum(r.train_seconds for r in result.runs) / 60:.1f} min "
        "(one thread each, jobs sharing the CPU cores: compare speeds only within this table).",
        "Held-out accuracy (scored positions) and loss; mean ± 95% t-interval over seeds.",
        "",
        "| task | layers | arch | params | accuracy | loss | train tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.table:
        lines.append(
            f"| {row['task']} | {row['layers']} | {row['arch']} | {row['n_params']:,} | {plus_minus(row['accuracy'])} "
            f"| {plus_minus(row['loss'])} | {row['train_tokens_per_second']:,.0f} |"
        )
    lines += ["", "Myopia gap (myopic − standard, paired by seed; loss in nats, accuracy in points):", ""]
    lines += ["| task | layers | loss gap | accuracy gap |", "|---|---|---|---|"]
    for gap in result.myopia_gaps:
        lines.append(
            f"| {gap['task']} | {gap['layers']} | {plus_minus(gap['loss_gap'], digits=4)} "
            f"| {plus_minus(gap['accuracy_gap'], 100, 1)} |"
        )
    lines += _sweep_markdown(result)
    if result.equal_flops:
        flops = result.equal_flops[0]["flops"]
        lines += ["", f"Text, held-out loss at equal training FLOPs ({flops:.3g}):", ""]
        lines += ["| arch | loss |", "|---|---|"]
        lines += [f"| {e['arch']} | {plus_minus(e['loss'])} |" for e in result.equal_flops]
    lines += ["", "State carried between tokens and decode speed (batch 1, own cache, text shape):", ""]
    lines += ["| arch | params | state bytes/token | after 1,024 tokens | decode tok/s |", "|---|---|---|---|---|"]
    for arch, c in result.costs.items():
        c = c if isinstance(c, dict) else c.__dict__
        per_token = "0 (fixed)" if c["state_bytes_per_token"] == 0 else size(c["state_bytes_per_token"])
        total = c["state_bytes"].get(1024, c["state_bytes"].get("1024"))
        lines.append(
            f"| {arch} | {c['n_params']:,} | {per_token} | {size(total)} | {c['decode_tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n > 1 else ''}"


def _chance(result: ComparisonResult, task: str) -> float:
    """Accuracy of guessing the state: the targets of the state-tracking tasks are uniform over the vocabulary."""
    return 1.0 / result.tasks[task]["vocab_size"] if task in result.tasks else 0.5


def _sweep_markdown(result: ComparisonResult) -> list[str]:
    lines: list[str] = []
    for task in dict.fromkeys(d["task"] for d in result.depth_sweep):
        rows = [d for d in result.depth_sweep if d["task"] == task]
        depths = sorted({p["layers"] for d in rows for p in d["points"]})
        lines += ["", f"Accuracy vs number of layers: {task} at its training length {rows[0]['length']}:", ""]
        lines += ["| arch | " + " | ".join(_layers(n) for n in depths) + " |", "|---" * (len(depths) + 1) + "|"]
        for d in rows:
            at = {p["layers"]: plus_minus(p["accuracy"]) for p in d["points"]}
            lines.append(f"| {d['arch']} | " + " | ".join(at.get(n, "") for n in depths) + " |")
    for task in dict.fromkeys(s["task"] for s in result.length_sweep):
        rows = [s for s in result.length_sweep if s["task"] == task]
        lengths = sorted({p["length"] for s in rows for p in s["points"]})
        lines += [
            "",
            f"Length generalisation: {task} trained at length {rows[0]['train_length']}, evaluated at n; accuracy on "
            "the last quarter of each sequence (all positions in brackets):",
            "",
            "| layers | arch | " + " | ".join(f"n = {n}" for n in lengths) + " |",
            "|---|---" + "|---" * len(lengths) + "|",
        ]
        for s in sorted(rows, key=lambda s: s["layers"]):
            at = {p["length"]: f"{plus_minus(p['tail_accuracy'])} ({p['accuracy']['mean']:.3f})" for p in s["points"]}
            lines.append(f"| {s['layers']} | {s['arch']} | " + " | ".join(at.get(n, "") for n in lengths) + " |")
    return lines


def _bars(intervals: list[dict]) -> tuple[list[float], list[list[float]]]:
    """Means and asymmetric error bars of accuracy intervals, clipped to [0, 1] (no bar for a single seed)."""
    means = [iv["mean"] for iv in intervals]
    half = [0.0 if math.isnan(iv["ci95"]) else iv["ci95"] for iv in intervals]
    return means, [[min(h, m) for m, h in zip(means, half)], [min(h, 1 - m) for m, h in zip(means, half)]]


def _plot_positions(result: ComparisonResult, folder: Path, prefix: str, plt) -> list[Path]:
    """Accuracy at each position of sequences of the training length; a row per task, a column per depth."""
    rows = [r for r in result.table if r["task"] not in ("text", "recall")]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    depths = sorted({r["layers"] for r in rows})
    if not tasks:
        return []
    fig, axes = plt.subplots(
        len(tasks), len(depths), figsize=(3.6 * len(depths), 0.4 + 3.0 * len(tasks)), squeeze=False
    )
    for (i, task), (j, layers) in itertools.product(enumerate(tasks), enumerate(depths)):
        ax = axes[i][j]
        panel = [r for r in rows if (r["task"], r["layers"]) == (task, layers)]
        if not panel:
            ax.set_axis_off()
            continue
        for row in panel:
            acc = row["accuracy_by_position"]
            ax.plot(range(1, len(acc) + 1), acc, label=row["arch"], color=COLORS[row["arch"]])
        ax.set_title(f"{task}, {_layers(layers)}", fontsize=9)
        tracked = task != "repeat"  # state tracking: position t asks for the state after t symbols
        ax.set_xlabel("position t (symbols tracked so far)" if tracked else "position t")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 1.02)
        ax.axhline(_chance(result, task), color="grey", lw=0.5, ls=":")
        if j == 0:
            ax.set_ylabel(f"accuracy (mean of {result.seeds} seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Accuracy by position within one sequence of the training length", fontsize=10)
    fig.tight_layout()
    path = folder / f"{prefix}accuracy_by_position.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _plot_depth(result: ComparisonResult, folder: Path, prefix: str, plt) -> list[Path]:
    """Held-out accuracy at the training length vs number of layers, one line per architecture, 95% intervals."""
    tasks = list(dict.fromkeys(d["task"] for d in result.depth_sweep))
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [d for d in result.depth_sweep if d["task"] == task]
        for i, d in enumerate(rows):
            xs = [p["layers"] for p in d["points"]]
            nudge = 2 ** (0.05 * (i - (len(rows) - 1) / 2))  # side by side, so the intervals do not hide each other
            ys, errs = _bars([p["accuracy"] for p in d["points"]])
            ax.errorbar(
                [x * nudge for x in xs], ys, yerr=errs, marker="o", capsize=3, label=d["arch"], color=COLORS[d["arch"]]
            )
            length = d["length"]
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, 1.05)
        ax.axhline(_chance(result, task), color="grey", lw=0.5, ls=":")
        ax.set_xlabel("number of layers")
        ax.set_ylabel(f"held-out accuracy at the training length {length}")
        ax.set_title(f"{task}: accuracy vs depth (mean ± 95% CI, {result.seeds} seeds)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"{prefix}accuracy_vs_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _plot_lengths(result: ComparisonResult, folder: Path, prefix: str, plt) -> list[Path]:
    """Length generalisation: accuracy on each sequence's last quarter vs evaluation length; a row per task, a
    column per depth."""
    tasks = list(dict.fromkeys(s["task"] for s in result.length_sweep))
    depths = sorted({s["layers"] for s in result.length_sweep})
    if not tasks:
        return []
    fig, axes = plt.subplots(
        len(tasks), len(depths), figsize=(3.6 * len(depths), 0.4 + 3.2 * len(tasks)), squeeze=False
    )
    for (row, task), (col, layers) in itertools.product(enumerate(tasks), enumerate(depths)):
        ax = axes[row][col]
        if not any((s["task"], s["layers"]) == (task, layers) for s in result.length_sweep):
            ax.set_axis_off()
            continue
        lines = [s for s in result.length_sweep if (s["task"], s["layers"]) == (task, layers)]
        for i, s in enumerate(lines):
            xs = [p["length"] for p in s["points"]]
            nudge = 2 ** (0.04 * (i - (len(lines) - 1) / 2))  # side by side, so the intervals do not hide each other
            ys, errs = _bars([p["tail_accuracy"] for p in s["points"]])
            ax.errorbar(
                [x * nudge for x in xs],
                ys,
                yerr=errs,
                marker="o",
                ms=4,
                capsize=2,
                label=s["arch"],
                color=COLORS[s["arch"]],
            )
            trained = s["train_length"]
        ax.axvline(trained, color="k", lw=0.8, ls="--", label="training length")
        ax.axhline(_chance(result, task), color="grey", lw=0.5, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("evaluation length n (tokens)")
        ax.set_title(f"{task}, {_layers(layers)}", fontsize=9)
        if col == 0:
            ax.set_ylabel("accuracy on the last n/4 positions")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"Length generalisation: trained at one length, evaluated at others (mean ± 95% CI, {result.seeds} seeds)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07 / len(tasks), 1, 1))
    path = folder / f"{prefix}length_generalisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_json(result: ComparisonResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_dict(), indent=1, default=float))
    return path


def plot_all(result: ComparisonResult, folder: Path, prefix: str = "arch_") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    # 1. Accuracy vs position within one sequence of the training length (= symbols tracked so far).
    paths += _plot_positions(result, folder, prefix, plt)
    paths += _plot_depth(result, folder, prefix, plt)
    paths += _plot_lengths(result, folder, prefix, plt)

    # 2. Myopia gaps with intervals.
    if result.myopia_gaps:
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.5 * len(result.myopia_gaps)), 3.8))
        labels = [f"{g['task']}\n{g['layers']} layer{'s' if g['layers'] > 1 else ''}" for g in result.myopia_gaps]
        for ax, key, scale, title in (
            (axes[0], "loss_gap", 1.0, "loss gap (nats)"),
            (axes[1], "accuracy_gap", 100.0, "accuracy gap (points)"),
        ):
            means = [g[key]["mean"] * scale for g in result.myopia_gaps]
            errs = [0 if math.isnan(g[key]["ci95"]) else g[key]["ci95"] * scale for g in result.myopia_gaps]
            ax.bar(labels, means, yerr=errs, capsize=4, color="tab:green")
            for i, g in enumerate(result.myopia_gaps):
                ax.scatter([i] * len(g[key]["values"]), [v * scale for v in g[key]["values"]], color="k", s=8, zorder=3)
            ax.axhline(0, color="k", lw=0.7)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_title(f"myopic − standard: {title}")
        fig.tight_layout()
        paths.append(folder / f"{prefix}myopia_gap.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 3. State bytes vs tokens, and decode speed.
    if result.costs:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for arch, c in result.costs.items():
            c = c if isinstance(c, dict) else c.__dict__
            xs = sorted(int(n) for n in c["state_bytes"])
            ys = [max(1, c["state_bytes"].get(n, c["state_bytes"].get(str(n)))) for n in xs]
            if arch == "myopic" and "standard" in result.costs:
                continue  # the standard network at inference: one line, labelled for both
            label = "standard = myopic" if arch == "standard" and "myopic" in result.costs else arch
            axes[0].loglog(xs, ys, marker="o", label=label, color=COLORS[arch])
        axes[0].set_xlabel("tokens so far")
        axes[0].set_ylabel("bytes carried to the next token")
        axes[0].legend(fontsize=8)
        axes[0].set_title("state size vs tokens")
        archs = list(result.costs)
        speeds = [(result.costs[a] if isinstance(result.costs[a], dict) else result.costs[a].__dict__) for a in archs]
        axes[1].bar(archs, [s["decode_tokens_per_second"] for s in speeds], color=[COLORS[a] for a in archs])
        axes[1].set_ylabel("decode tokens/s (batch 1, own cache)")
        axes[1].set_title("decode speed (batch 1, median of 3 interleaved rounds)")
        fig.tight_layout()
        paths.append(folder / f"{prefix}state_and_speed.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 4. Text: held-out loss vs training FLOPs.
    text = [r for r in result.runs if r.task == "text" and r.evals]
    if text:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for arch in COLORS:
            for i, r in enumerate(run for run in text if run.arch == arch):
                xs = [e["flops"] for e in r.evals]
                ax.plot(xs, [e["loss"] for e in r.evals], color=COLORS[arch], alpha=0.8, label=arch if i == 0 else None)
        ax.set_xscale("log")
        # Less than a decade of FLOPs: label only a few minor ticks, or their labels run into each other.
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        for axis_format in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis_format(FuncFormatter(lambda x, _: f"{x:.0e}".replace("e+", "e")))
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title("natural text (stdlib), one line per seed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(folder / f"{prefix}text_loss_vs_flops.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
