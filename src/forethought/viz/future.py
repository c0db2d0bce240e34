"""Present a Future Lens ProbeResult: layer x offset heatmaps (with baselines and control), a markdown table, JSON."""

from __future__ import annotations

import json
from pathlib import Path

from forethought.experiments.probes import ProbeResult
from forethought.format import interval, percent

READOUTS = {"probe": "token probe (linear, ridge)", "lens": "Future Lens (linear map to final state)"}


def _baseline_rows(result: ProbeResult, metric: str) -> tuple[list[str], list[list[float]]]:
    """Rows under each heatmap: baselines per offset and the shuffled control (best layer)."""
    nan = float("nan")
    names = ["bigram", "unigram", "model (k=1)"]
    rows = [
        [getattr(result.baselines[k]["bigram"], metric) or nan for k in result.offsets],
        [getattr(result.baselines[k]["unigram"], metric) or nan for k in result.offsets],
        [
            (getattr(result.baselines[k]["model"], metric) if "model" in result.baselines[k] else None) or nan
            for k in result.offsets
        ],
    ]
    return names, rows


def plot_heatmap(result: ProbeResult, path: str | Path, metric: str = "top1") -> Path:
    """Two panels (token probe, Future Lens): layers down, offsets across, the value in each cell; beneath each,
    the baselines and the best shuffled-target control on the same colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    grids = {r: np.array(result.grid(r, metric), dtype=float) for r in READOUTS}
    controls = {r: np.nanmax(np.array(result.grid(f"{r}_control", metric), dtype=float), axis=0) for r in READOUTS}
    names, base = _baseline_rows(result, metric)
    if metric == "agreement":  # agreement with the model: the model row is 1 by definition, drop it
        names, base = names[:2], base[:2]
    # Cells or baselines can all be NaN on a tiny store (nothing held out for them): scale by what exists.
    finite = [a[np.isfinite(a)] for a in (*grids.values(), np.array(base, dtype=float))]
    vmax = max([1e-3, *(float(a.max()) for a in finite if a.size)])
    n_layers, n_off = len(result.layers), len(result.offsets)
    n_extra = len(names) + 1
    height = 1.2 + 0.24 * (n_layers + n_extra)
    fig = plt.figure(figsize=(4.2 + 1.1 * n_off, max(height, 4.0)), layout="constrained")
    spec = fig.add_gridspec(2, 2, height_ratios=[n_layers, n_extra], width_ratios=[1, 1])
    cmap = plt.get_cmap("viridis")
    label = {"top1": "top-1 accuracy (%)", "agreement": "agreement with the model (%)"}[metric]

    def draw(ax, values, ylabels, show_y):
        im = ax.imshow(100 * values, aspect="auto", cmap=cmap, vmin=0, vmax=100 * vmax, interpolation="nearest")
        for (i, j), v in np.ndenumerate(values):
            if np.isnan(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=7, color="0.5")
                continue
            ax.text(
                j,
                i,
                f"{100 * v:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v > 0.6 * vmax else "white",
            )
        ax.set_xticks(range(n_off), [f"k={k}" for k in result.offsets])
        ax.set_yticks(range(len(ylabels)), ylabels if show_y else [""] * len(ylabels), fontsize=7)
        ax.tick_params(length=0)
        return im

    im = None
    for col, (readout, title) in enumerate(READOUTS.items()):
        top = fig.add_subplot(spec[0, col])
        im = draw(top, grids[readout], [f"L{layer}" for layer in result.layers], col == 0)
        top.set_title(title, fontsize=9)
        top.xaxis.tick_top()
        if col == 0:
            top.set_ylabel("layer (resid_post)")
        bottom = fig.add_subplot(spec[1, col])
        rows = np.array(base + [controls[readout]], dtype=float)
        draw(bottom, rows, names + ["shuffled ctrl (max)"], col == 0)
        bottom.set_xticks(range(n_off), [""] * n_off)
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label=label)
    fig.suptitle(
        f"{result.model}: does layer l at position t know token t+k?  {label}\n"
        f"train {result.n_train:,} tokens · held-out {result.n_eval:,} (lens {result.n_eval_lens:,}) tokens",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def markdown(result: ProbeResult) -> str:
    ks = result.offsets
    lines = [
        f"# Future Lens: {result.model}",
        "",
        f"Store `{result.store}` · {result.n_train:,} training tokens ({result.n_val:,} of them validation) · "
        f"{result.n_eval:,} held-out tokens per cell "
        f"(lens {result.n_eval_lens:,}, control {result.n_eval_control:,}) · "
        f"probe vocabulary {result.probe_vocab:,} tokens · {result.seconds:.0f} s",
        "",
        "## Top-1 accuracy (%), token probe / Future Lens, [shuffled-target control probe / lens]",
        "",
        "| layer | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for layer in result.layers:
        cells = [result.cell(layer, k) for k in ks]
        lines.append(
            f"| {layer} | "
            + " | ".join(
                f"{percent(c.probe.top1, unit='')} / {percent(c.lens.top1, unit='')} "
                f"[{percent(c.probe_control.top1, unit='')} / {percent(c.lens_control.top1, unit='')}]"
                for c in cells
            )
            + " |"
        )
    if result.headline:
        lines += ["", "## Beyond the context: the probe against context-matched baselines", ""]
        lines += [
            f"{result.n_eval_documents} held-out documents ({len(result.near_duplicates_removed)} near-duplicates of "
            "training documents removed); top-1 %, 95% interval from a bootstrap over documents; the probe's layer "
            "is chosen on validation positions.",
            "",
            "| k | " + " | ".join(result.context[ks[0]]) + " | probe (layer) | excess over the strongest |",
            "|---|" + "---|" * (len(result.context[ks[0]]) + 2),
        ]
        for k in ks:
            h = result.headline[k]
            lines.append(
                f"| {k} | "
                + " | ".join(interval(iv) for iv in result.context[k].values())
                + f" | {interval(h['probe'])} (L{h['layer']}) | **{interval(h['excess'])}** vs {h['strongest']} |"
            )
    lines += ["", "## Best layer per offset (held out)", ""]
    lines += ["| k | readout | layer | top-1 | top-5 | CE (nats) | agreement |", "|---|---|---|---|---|---|---|"]
    for k in ks:
        for readout in READOUTS:
            best = max((result.cell(layer, k) for layer in result.layers), key=lambda c: getattr(c, readout).top1)
            m = getattr(best, readout)
            lines.append(
                f"| {k} | {readout} | {best.layer} | {percent(m.top1, unit='')} | {percent(m.top5, unit='')} "
                f"| {m.ce:.2f} "
                f"| {percent(m.agreement, unit='')} |"
            )
    lines += ["", "## Baselines (same held-out tokens)", ""]
    lines += ["| k | baseline | top-1 | top-5 | CE (nats) | agreement |", "|---|---|---|---|---|---|"]
    for k in ks:
        for name, m in result.baselines[k].items():
            ce = "–" if m.ce is None else f"{m.ce:.2f}"
            cells = [percent(m.top1, unit=""), percent(m.top5, unit=""), ce, percent(m.agreement, unit="")]
            lines.append(f"| {k} | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Agreement = top-1 equals the model's own greedy prediction of token t+k (made at position t+k-1). "
        "The control is the same probe fitted on shuffled targets; it should sit at the unigram baseline.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    result: ProbeResult, out: str | Path, tokenizer=None, heatmap: str | Path | None = None
) -> dict[str, Path]:
    """results.json, results.md, future_top1.png and future_agreement.png under `out` (`heatmap` moves the first).

    `tokenizer` is accepted for callers that have one; the report names no token strings yet."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "heatmap_top1": Path(heatmap or out / "future_top1.png"),
        "heatmap_agreement": out / "future_agreement.png",
    }
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1))
    paths["markdown"].write_text(markdown(result))
    plot_heatmap(result, paths["heatmap_top1"], "top1")
    plot_heatmap(result, paths["heatmap_agreement"], "agreement")
    return paths
