"""Plots for `anatomy` (what a column is made of) and `revise` (what an off-plan token changes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forethought.experiments.anatomy import AnatomyResult, LayerAnatomy  # noqa: E402
from forethought.experiments.revise import ReviseResult  # noqa: E402
from forethought.trace import layer_label  # noqa: E402


def _x(layers: list[LayerAnatomy]) -> tuple[np.ndarray, list[str]]:
    names = [layer_label(l.layer) for l in layers]
    return np.arange(len(layers)), names


def _layer_ticks(ax, names: list[str], every: int | None = None) -> None:
    every = every or max(1, len(names) // 10)
    ticks = list(range(0, len(names), every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks])


def plot_anatomy(result: AnatomyResult, folder: str | Path) -> list[Path]:
    """anatomy_shares.png, anatomy_cosine.png, anatomy_pca.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        _plot_shares(result, folder / "anatomy_shares.png"),
        _plot_cosine(result, folder / "anatomy_cosine.png"),
    ] + ([_plot_pca(result, folder / "anatomy_pca.png")] if result.pca else [])


def _plot_shares(result: AnatomyResult, path: Path) -> Path:
    layers = result.layers
    x, names = _x(layers)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    series = [
        ("token identity (held-out docs)", "token_share", "tab:green", "-"),
        (f"slow part: neighbours within ±{result.window // 2}", "slow_share", "tab:red", "-"),
        ("document mean (whole window)", "document_share", "tab:orange", "-"),
        ("position (mean over docs at t)", "position_share", "tab:blue", "-"),
        ("position, positions shuffled (control)", "position_shuffled", "tab:blue", ":"),
    ]
    for label, key, colour, style in series:
        ax.plot(x, [getattr(l, key) for l in layers], style, color=colour, lw=2.2, marker="o", ms=3, label=label)
    if result.random:
        for label, key, colour in (("token", "token_share", "tab:green"), ("slow", "slow_share", "tab:red")):
            ax.plot(
                x,
                [getattr(l, key) for l in result.random],
                "--",
                color=colour,
                lw=1.2,
                alpha=0.6,
                label=f"{label}, permuted-weight model",
            )
        ax.plot(
            x,
            [l.position_share for l in result.random],
            "--",
            color="tab:blue",
            lw=1.2,
            alpha=0.6,
            label="position, permuted-weight model",
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.02)
    _layer_ticks(ax, names)
    ax.set_xlabel("layer (emb = token embedding, n = after block n)")
    ax.set_ylabel("share of the states' variance explained (R²)")
    ax.set_title("What explains a column's state, layer by layer")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.grid(alpha=0.3)

    # Where does the position part live? Per position, the share of the variance there that it explains.
    profile = np.array([l.position_profile for l in layers])  # [layer, position]; row j is position j + 1
    shown = min(profile.shape[1], 64)
    vmax = max(0.05, float(np.nanmax(profile[:, :shown])))
    y_edges = np.arange(1, shown + 2) - 0.5
    y_edges[0] = 0.75  # on the log axis a full half-position below 1 would make row 1 look three times as tall
    mesh = ax2.pcolormesh(
        np.arange(len(layers) + 1) - 0.5, y_edges, profile[:, :shown].T, cmap="Blues", vmin=0, vmax=vmax
    )
    ax2.set_yscale("log")
    ax2.set_ylim(0.75, shown + 0.5)
    ax2.set_yticks([1, 2, 4, 8, 16, 32, 64][: 1 + int(np.log2(shown))])
    ax2.set_yticklabels([str(t) for t in [1, 2, 4, 8, 16, 32, 64][: 1 + int(np.log2(shown))]])
    _layer_ticks(ax2, names)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("position (log scale; position 0 left out)")
    ax2.set_title("Where the position part lives: its share of the variance at each position")
    fig.colorbar(mesh, ax=ax2, label="share (bias-corrected)")
    fig.suptitle(
        f"{result.model}: {result.n_docs} documents × {result.length} tokens, states {result.normalize}-normalised; "
        f"position 0 left out (median norm {result.position0_norm:.0f} vs {result.other_norm:.0f})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_cosine(result: AnatomyResult, path: Path) -> Path:
    layers = result.layers
    x, names = _x(layers)
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    picks = sorted({0, len(layers) // 4, len(layers) // 2, 3 * len(layers) // 4, len(layers) - 1})
    cmap = plt.get_cmap("viridis")

    ax = axes[0, 0]
    for j, i in enumerate(picks):
        l = layers[i]
        d = np.arange(1, len(l.cosine) + 1)
        colour = cmap(j / max(1, len(picks) - 1))
        label = f"layer {layer_label(l.layer)}: tau {l.tau:.1f}, A {l.amplitude:.2f}, B {l.plateau:.2f}"
        ax.plot(d, l.cosine, color=colour, lw=2, label=label)
        if np.isfinite(l.tau):  # the fit only where one exponential describes the measured curve
            ax.plot(d, l.amplitude * np.exp(-d / l.tau) + l.plateau, ":", color=colour, lw=1.5)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("distance d (positions, log scale)")
    ax.set_ylabel("mean cosine of centred states d apart")
    ax.set_title("Similarity of a document's states vs distance (dotted: fit A·exp(-d/tau) + B)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    ax.plot(x, [l.cosine[0] for l in layers], "-o", ms=3, color="tab:purple", lw=2, label="cosine at d = 1")
    ax.plot(x, [l.plateau for l in layers], "-o", ms=3, color="tab:orange", lw=2, label="plateau B of the fit")
    ax.plot(
        x,
        [l.slow_share for l in layers],
        "-o",
        ms=3,
        color="tab:red",
        lw=2,
        label=f"slow share (±{result.window // 2})",
    )
    if result.random:
        ax.plot(
            x,
            [l.cosine[0] for l in result.random],
            "--",
            color="tab:purple",
            alpha=0.7,
            label="cosine at d = 1, random model",
        )
        ax.plot(
            x, [l.plateau for l in result.random], "--", color="tab:orange", alpha=0.7, label="plateau, random model"
        )
        ax.plot(
            x, [l.slow_share for l in result.random], "--", color="tab:red", alpha=0.7, label="slow share, random model"
        )
    ax.axhline(1 / np.e, color="grey", ls=":", lw=1)
    ax.text(0, 1 / np.e, " 1/e", va="bottom", color="grey", fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    _layer_ticks(ax, names)
    ax.set_xlabel("layer")
    ax.set_title("How much a state shares with its neighbours (solid: real, dashed: random weights)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    ax.plot(x, [l.tau for l in layers], "-s", ms=4, color="black", lw=2, label="real model")
    if result.random:
        ax.plot(x, [l.tau for l in result.random], "--s", ms=3, color="grey", lw=1.2, label="permuted-weight model")
    ax.set_yscale("log")
    _layer_ticks(ax, names)
    ax.set_xlabel("layer")
    ax.set_ylabel("decay length tau (positions, log)")
    ax.set_title("Time constant of the similarity's decay (only where one exponential fits, R^2 >= 0.9)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1, 1]
    windows = sorted({w for l in layers for w in l.slow_by_window})
    for j, i in enumerate(picks):
        l = layers[i]
        ws = [w for w in windows if w in l.slow_by_window]
        ys = [l.slow_by_window[w] for w in ws]
        ax.plot(
            ws + [result.length],
            ys + [l.document_share],
            "-o",
            ms=4,
            color=cmap(j / max(1, len(picks) - 1)),
            label=f"layer {layer_label(l.layer)}",
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(result.window, color="tab:red", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("low-pass window w in positions (neighbours ±w/2, itself left out; last point = whole document)")
    ax.set_ylabel("share of variance explained by the neighbours' mean")
    ax.set_title("On what time scale is the shared (memory) part?")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pca(result: AnatomyResult, path: Path) -> Path:
    views = result.pca
    fig, axes = plt.subplots(1, len(views), figsize=(3.6 * len(views) + 1, 3.9), squeeze=False)
    scatter = None
    for ax, view in zip(axes[0], views):
        xy = np.array(view.xy)
        ax.plot(xy[:, 0], xy[:, 1], color="lightgrey", lw=0.6, zorder=1)
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=view.positions, cmap="viridis", s=12, zorder=2)
        ax.set_title(
            f"layer {layer_label(view.layer)}\nPC1 {view.explained[0]:.0%}, PC2 {view.explained[1]:.0%}", fontsize=9
        )
        ax.set_xticks([])
        ax.set_yticks([])
    if scatter is not None:
        fig.colorbar(scatter, ax=list(axes[0]), label="position", fraction=0.02)
    fig.suptitle(
        "One document's states, 2-D PCA per layer, coloured by position (grey line joins neighbours)",
        fontsize=10,
        y=1.06,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_revise(result: ReviseResult, path: str | Path, token_text: Callable[[int], str] | None = None) -> Path:
    """KL per step, a token/top-1 agreement strip, and the per-position state change (layer × position) for
    the revised run and for the run that only swaps the off-plan token in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = result.steps
    s = np.array([st.step for st in steps])
    fig, axes = plt.subplots(
        4, 1, figsize=(max(11, 0.32 * len(steps) + 5), 14), gridspec_kw={"height_ratios": [2.2, 1.2, 2.2, 2.2]}
    )
    ax = axes[0]
    kl = np.array([st.kl for st in steps])
    kl_sub = np.array([st.kl_substituted for st in steps])
    ax.plot(s, kl_sub, "--s", ms=6, color="tab:blue", label="original's tokens with only the off-plan one swapped in")
    ax.plot(s, kl, "-o", ms=4, color="tab:red", label="revised run (greedy after the off-plan token)", zorder=3)
    ax.axvline(result.at, color="black", ls="--", lw=1)
    ax.text(result.at + 0.15, 0.97, "off-plan token", transform=ax.get_xaxis_transform(), va="top", fontsize=9)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("KL(original ‖ other), nats\n(symlog: linear below 0.01)")
    ax.set_xlim(s.min() - 0.5, s.max() + 0.5)
    ax.set_xlabel("new-token step")
    ax.set_title(
        f"Step {result.at}: {result.how} off-plan token (model p = {result.off_plan_prob:.2g}) instead of the greedy "
        f"one (p = {result.greedy_prob:.2g})\nKL of the next-token distributions at aligned steps"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    ax.grid(alpha=0.3)

    ax = axes[1]
    rows = [
        [st.original_id == st.revised_id for st in steps],
        [st.top1_agree for st in steps],
        [st.top1_agree_substituted for st in steps],
    ]
    ax.imshow(
        np.array(rows, dtype=float),
        aspect="auto",
        cmap="RdYlGn",
        vmin=0,
        vmax=1,
        extent=(s.min() - 0.5, s.max() + 0.5, 2.5, -0.5),
    )
    ax.set_yticks([0, 1, 2])
    ax.set_yticklabels(["same token", "same top-1", "same top-1\n(swap only)"], fontsize=8)
    ax.axvline(result.at - 0.5, color="black", ls="--", lw=1)
    if result.rejoin is not None:
        ax.axvline(result.rejoin.step - 0.5, color="tab:blue", lw=2.5)
        rejoin = (
            f"; blue line: the revised text rejoins the original at step {result.rejoin.step} "
            f"(shift {result.rejoin.shift:+d}, {result.rejoin.matched_after} tokens match)"
        )
    else:
        rejoin = f"; the revised text does not rejoin the original within {result.n_after} steps"
    if token_text is not None and len(steps) <= 48:
        ax.set_xticks(s)
        labels = [f"{token_text(st.original_id)!r}\n{token_text(st.revised_id)!r}" for st in steps]
        ax.set_xticklabels([lab.replace("'", "") for lab in labels], rotation=90, fontsize=7)
        ax.set_xlabel("new-token step (tick labels: original token above, revised token below)")
    else:
        ax.set_xlabel("new-token step")
    ax.set_title(f"Agreement strip (green = same, red = different){rejoin}", fontsize=10)

    im = None
    for ax, rel_rows, what in (
        (axes[2], result.state_rel_diff, "revised run"),
        (axes[3], result.substituted_rel_diff, "swap only"),
    ):
        rel = np.array(rel_rows)  # [layer, position]
        if rel.size == 0:
            ax.set_axis_off()
            continue
        logs = np.where(rel > 0, np.log10(np.maximum(rel, 1e-30)), np.nan)
        im = ax.imshow(
            logs,
            aspect="auto",
            origin="lower",
            cmap="magma",
            vmin=-3,
            vmax=0.5,
            extent=(-0.5, rel.shape[1] - 0.5, -0.5, rel.shape[0] - 0.5),
        )
        ax.set_facecolor("#dff0df")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.axvline(result.off_plan_position - 0.5, color="tab:cyan", lw=1.5)
        ax.axvline(result.prompt_length - 0.5, color="grey", lw=1, ls=":")
        ax.set_ylabel("layer (0 = embedding)")
        ax.set_title(
            f"{what}: state change per position, max |diff| / max |state| (green = exactly 0); before the "
            f"off-plan token max |diff| = {_max_before(rel_rows, result.off_plan_position):.3g}",
            fontsize=10,
        )
        fig.colorbar(im, ax=ax, label="log10 relative change", fraction=0.03, pad=0.01)
    axes[3].set_xlabel("position (grey dotted: end of prompt; cyan: off-plan token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _max_before(rel_rows: list[list[float]], first: int) -> float:
    return max((v for row in rel_rows for v in row[:first]), default=0.0)
