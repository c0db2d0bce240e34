"""The plan question asked of every architecture the lab trained on text: does a state carry information about
token t+k beyond what the context already gives? The project's probe (`forethought extract` + `forethought
probe`: a linear map from a layer's state to x_{t+k}, the layer chosen on validation, against n-gram and copy
baselines fitted on the same text, 95% bootstrap over held-out documents) run on each trained model's folder.

    python -m benchmarks.arch_probe [--results arch_results] [--seed 0] [--tokens 40000] [--offsets 1-4]
                                    [--plot-dir docs/results]

Reads the text runs of a finished comparison (`python -m benchmarks.arch_compare`): runs/text-L*-{arch}-s{seed}/
engine, the model folder every run exports. The lab models were trained on stdlib documents of the same
document split (`forethought.data.corpus.split_of`), so the probe's held-out documents are ones no model saw.
Writes arch_probe.json, arch_probe.md and arch_probe.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ARCHS = ("standard", "feedback", "myopic", "recurrent")
COLORS = {"standard": "tab:blue", "feedback": "tab:red", "myopic": "tab:green", "recurrent": "tab:purple"}


def engine_folder(results: Path, arch: str, seed: int) -> Path | None:
    """The deepest text run of `arch` and `seed` that exported a model folder."""

    def depth(folder: Path) -> int:
        return int(folder.parent.name.split("-")[1].removeprefix("L"))

    return max(results.glob(f"runs/text-L*-{arch}-s{seed}/engine"), key=depth, default=None)


def probe_one(folder: Path, out: Path, tokens: int, offsets: list[int]) -> dict:
    from forethought.data.store import ActivationStore
    from forethought.experiments.future import run_extract
    from forethought.experiments.probes import run_probes
    from forethought.weights import load_model

    lm = load_model(str(folder))
    store = out / "store"
    # Documents cut to their first 128 tokens, so that the held-out tenth is many documents (the bootstrap
    # resamples documents) rather than a few long files.
    layers = list(range(lm.config.n_layers))
    run_extract(lm, "stdlib", store, layers, tokens, window=64, batch=16, max_doc_tokens=128)  # resumes
    result = run_probes(ActivationStore(store), lm.model, offsets, eval_tokens=4096, save_dir=out / "probes")
    data = json.loads(json.dumps(result.to_dict(), default=float))  # offsets become string keys
    # At k = 1 the logit lens of the last layer is the model's own next-token prediction: the ceiling there.
    own = next(c["lens"]["top1"] for c in data["cells"] if c["offset"] == 1 and c["layer"] == layers[-1])
    return {
        "folder": str(folder),
        "n_eval_documents": data["n_eval_documents"],
        "model_top1_k1": own if 1 in offsets else None,
        "headline": data["headline"],
    }


def markdown(results: dict, offsets: list[int]) -> str:
    lines = [
        "### Does a state carry x_{t+k} beyond its context? Every lab architecture trained on text",
        "",
        "Top-1 % on held-out stdlib documents; probe = the layer chosen on validation; strongest = the best of the "
        "n-gram (context 1-4) and copy baselines fitted on the same text; excess = probe − strongest, "
        "95% bootstrap over documents.",
        "",
        "| k | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for k in offsets:
        cells = []
        for r in results.values():
            h = r["headline"][str(k)]
            e = h["excess"]
            cells.append(
                f"{100 * h['probe']['estimate']:.1f} (L{h['layer']}) vs {h['strongest']} "
                f"{100 * h['strongest_top1']['estimate']:.1f}: **{100 * e['estimate']:+.1f}** "
                f"[{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if all(r.get("model_top1_k1") is not None for r in results.values()):
        own = " | ".join(f"{100 * r['model_top1_k1']:.1f}" for r in results.values())
        lines.append(f"| model's own next token (k = 1) | {own} |")
    docs = ", ".join(f"{arch} {r['n_eval_documents']}" for arch, r in results.items())
    lines += ["", f"Held-out documents: {docs}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, offsets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(results)
    for i, (arch, r) in enumerate(results.items()):
        xs, ys, lo, hi = [], [], [], []
        for k in offsets:
            e = r["headline"][str(k)]["excess"]
            xs.append(k + (i - (len(results) - 1) / 2) * width)
            ys.append(100 * e["estimate"])
            lo.append(100 * (e["estimate"] - e["low"]))
            hi.append(100 * (e["high"] - e["estimate"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=COLORS.get(arch), label=arch)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(offsets)
    ax.set_xlabel("k (predict token t+k from the state at t)")
    ax.set_ylabel("probe − strongest context baseline\n(top-1 points, 95% CI over documents)")
    ax.set_title("Beyond-context information about future tokens, per architecture")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("arch_results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--offsets", default="1-4")
    parser.add_argument("--plot-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from forethought.commands.common import parse_int_list

    offsets = parse_int_list(args.offsets, "offsets")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {}
    for arch in ARCHS:
        folder = engine_folder(args.results, arch, args.seed)
        if folder is None:
            print(f"{arch}: no text run with a model folder under {args.results}/runs; skipped", file=sys.stderr)
            continue
        results[arch] = probe_one(folder, args.results / "probe" / arch, args.tokens, offsets)
    if not results:
        print(f"error: no text runs under {args.results}/runs (run python -m benchmarks.arch_compare)", file=sys.stderr)
        return 2
    out = args.plot_dir or args.results
    out.mkdir(parents=True, exist_ok=True)
    payload = {"offsets": offsets, "tokens": args.tokens, "seed": args.seed, "archs": results}
    payload["seconds"] = time.perf_counter() - started
    (out / "arch_probe.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / "arch_probe.md").write_text(markdown(results, offsets))
    plot(results, offsets, out / "arch_probe.png")
    print(markdown(results, offsets))
    print(f"{payload['seconds'] / 60:.1f} min · {out}/arch_probe.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
