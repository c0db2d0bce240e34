"""Length generalisation without positional encoding: does the Feedback Transformer's state survive 4x its
training length once RoPE positions it never saw are out of the way?

    python -m benchmarks.arch_nope [--seeds 5] [--out arch_nope] [--plot-dir docs/results]

The full comparison's parity runs (one layer, length 16) fall from ~100% to chance at 4x the training length for
the feedback model, which mixes two causes: the state may be lost, or the RoPE angles of positions 17..64 were
never trained. Here the standard decoder and the Feedback Transformer are trained twice on the same parity plan as
`benchmarks.arch_compare`'s full preset -- with RoPE, and with no positional encoding at all (NoPE: the causal mask,
and for feedback its memory recurrence, still order the tokens) -- and every checkpoint is evaluated at 8, 16, 32
and 64 symbols (accuracy on the last quarter of each sequence). Runs resume from --out.
Writes arch_nope.json, arch_nope.md, arch_nope.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from forethought.arch.compare import PRESETS, run_config
from forethought.arch.stats import interval
from forethought.arch.sweeps import evaluate_lengths, length_record
from forethought.arch.tasks import build_task
from forethought.arch.train import TrainSettings, train

ARCHS = ("standard", "feedback")
POSITIONS = ("rope", "none")
LENGTHS = (8, 16, 32, 64)
COLORS = {"standard": "tab:blue", "feedback": "tab:red"}


def run(out: Path, seeds: int) -> dict:
    plan = next(p for p in PRESETS["full"].plans if p.task == "parity")
    task = build_task("parity", plan.length)
    rows = {}
    for arch in ARCHS:
        for positions in POSITIONS:
            tails = {n: [] for n in LENGTHS}
            for seed in range(seeds):
                config = replace(run_config(task, plan, 1, arch), positions=positions)
                settings = TrainSettings(steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr, seed=seed)
                folder = out / f"parity-L1-{arch}-{positions}-s{seed}"
                started = time.perf_counter()
                model, _ = train(config, task, settings, folder, export=False)
                record = length_record(evaluate_lengths(model.eval(), task, LENGTHS))
                for n in LENGTHS:
                    tails[n].append(record[n]["tail_accuracy"])
                print(
                    f"{arch:8s} {positions:4s} seed {seed}: last quarter at 16/64 = "
                    f"{record[16]['tail_accuracy']:.3f} / {record[64]['tail_accuracy']:.3f} "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
            rows[f"{arch} {positions}"] = {str(n): interval(v) for n, v in tails.items()}
    return {"plan": {"task": "parity", "length": plan.length, "layers": 1, "steps": plan.steps}, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"### Parity, 1 layer, trained at length {result['plan']['length']}: RoPE vs no positional encoding",
        "",
        "Accuracy on the last quarter of each sequence at evaluation length n; mean ± 95% t-interval over seeds.",
        "",
        "| model | " + " | ".join(f"n = {n}" for n in LENGTHS) + " |",
        "|---|" + "---|" * len(LENGTHS),
    ]
    for name, row in result["rows"].items():
        cells = [f"{100 * row[str(n)]['mean']:.1f} ± {100 * row[str(n)]['ci95']:.1f}%" for n in LENGTHS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.4))
    for i, (name, row) in enumerate(result["rows"].items()):
        arch, positions = name.split()
        xs = [n * (1 + 0.03 * (i - 1.5)) for n in LENGTHS]
        ys = [row[str(n)]["mean"] for n in LENGTHS]
        errs = [0 if row[str(n)]["ci95"] != row[str(n)]["ci95"] else row[str(n)]["ci95"] for n in LENGTHS]
        style = "-" if positions == "rope" else "--"
        ax.errorbar(xs, ys, yerr=errs, fmt="o" + style, capsize=3, color=COLORS[arch], label=f"{arch}, {positions}")
    ax.axvline(result["plan"]["length"], color="k", ls=":", lw=1, label="training length")
    ax.axhline(0.5, color="grey", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
    ax.set_ylim(0.3, 1.05)
    ax.set_xlabel("evaluation length n (symbols)")
    ax.set_ylabel("accuracy on the last n/4 positions")
    ax.set_title("Parity, 1 layer: RoPE (solid) vs no positions (dashed)")
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("arch_nope"))
    parser.add_argument("--plot-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run(args.out, args.seeds)
    result["seconds"] = time.perf_counter() - started
    folder = args.plot_dir or args.out
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arch_nope.json").write_text(json.dumps(result, indent=1, default=float))
    (folder / "arch_nope.md").write_text(markdown(result))
    plot(result, folder / "arch_nope.png")
    print(markdown(result))
    print(f"{result['seconds'] / 60:.1f} min · {folder}/arch_nope.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
