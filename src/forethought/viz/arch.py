"""Present an architectures-lab ComparisonResult: a markdown table, JSON, and PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from forethought.arch.compare import ComparisonResult

COLORS = {"standard": "tab:blue", "feedback": "tab:red", "myopic": "tab:green", "recurrent": "tab:purple"}


def _fmt(iv: dict, scale: float = 1.0, digits: int = 3) -> str:
    mean, half = iv["mean"] * scale, iv["ci95"] * scale
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def markdown(result: ComparisonResult) -> str:
    lines = [
        f"### Architectures lab: preset `{result.preset}`, {result.seeds} seeds, {len(result.runs)} runs",
        "",
        f"Training time summed over runs: {sum(r.train_seconds for r in result.runs) / 60:.1f} min "
        "(one thread each, on a shared, loaded 2-core CPU: compare speeds only within this table).",
        "Held-out accuracy (scored positions) and loss; mean ± 95% t-interval over seeds.",
        "",
        "| task | layers | arch | params | accuracy | loss | train tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.table:
        lines.append(
            f"| {row['task']} | {row['layers']} | {row['arch']} | {row['n_params']:,} | {_fmt(row['accuracy'])} "
            f"| {_fmt(row['loss'])} | {row['train_tokens_per_second']:,.0f} |"
        )
    lines += ["", "Myopia gap (myopic − standard, paired by seed; loss in nats, accuracy in points):", ""]
    lines += ["| task | layers | loss gap | accuracy gap |", "|---|---|---|---|"]
    for gap in result.myopia_gaps:
        lines.append(
            f"| {gap['task']} | {gap['layers']} | {_fmt(gap['loss_gap'], digits=4)} "
            f"| {_fmt(gap['accuracy_gap'], 100, 1)} |"
        )
    if result.equal_flops:
        flops = result.equal_flops[0]["flops"]
        lines += ["", f"Text, held-out loss at equal training FLOPs ({flops:.3g}):", ""]
        lines += ["| arch | loss |", "|---|---|"] + [f"| {e['arch']} | {_fmt(e['loss'])} |" for e in result.equal_flops]
    lines += ["", "State carried between tokens and decode speed (batch 1, own cache, text shape):", ""]
    lines += ["| arch | params | state bytes/token | after 1,024 tokens | decode tok/s |", "|---|---|---|---|---|"]
    for arch, c in result.costs.items():
        c = c if isinstance(c, dict) else c.__dict__
        per_token = "0 (fixed)" if c["state_bytes_per_token"] == 0 else _bytes(c["state_bytes_per_token"])
        total = c["state_bytes"].get(1024, c["state_bytes"].get("1024"))
        lines.append(
            f"| {arch} | {c['n_params']:,} | {per_token} | {_bytes(total)} | {c['decode_tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_json(result: ComparisonResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_dict(), indent=1, default=float))
    return path


def plot_all(result: ComparisonResult, folder: Path, prefix: str = "arch_") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    # 1. Accuracy vs position (= length of the prefix whose state is asked for), per state-tracking panel.
    panels = sorted({(r["task"], r["layers"]) for r in result.table if r["task"] not in ("text", "recall")})
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, (task, layers) in zip(axes[0], panels):
            for row in result.table:
                if (row["task"], row["layers"]) == (task, layers):
                    acc = row["accuracy_by_position"]
                    ax.plot(range(1, len(acc) + 1), acc, label=row["arch"], color=COLORS[row["arch"]])
            ax.set_title(f"{task}, {layers} layer{'s' if layers > 1 else ''}")
            ax.set_xlabel("position (symbols so far)")
            ax.set_ylim(0, 1.02)
            ax.axhline(0.5, color="grey", lw=0.5, ls=":")
        axes[0][0].set_ylabel(f"held-out accuracy (mean of {result.seeds} seeds)")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        paths.append(folder / f"{prefix}accuracy_vs_length.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 2. Myopia gaps with intervals.
    if result.myopia_gaps:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        labels = [f"{g['task']} L{g['layers']}" for g in result.myopia_gaps]
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
        axes[1].set_title("decode speed (shared, loaded CPU)")
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
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title("natural text (stdlib), one line per seed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(folder / f"{prefix}text_loss_vs_flops.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
