"""Plot for `forethought revise-scale`: per off-plan bucket, rejoin rate, KL and state change with 95% intervals."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forethought.experiments.baselines import Interval  # noqa: E402
from forethought.experiments.revise_scale import ReviseScaleResult  # noqa: E402


def _bars(ax, x: np.ndarray, intervals: list[Interval], width: float, **style) -> None:
    est = np.array([iv.estimate for iv in intervals])
    err = np.array([[iv.estimate - iv.low for iv in intervals], [iv.high - iv.estimate for iv in intervals]])
    ax.bar(x, est, width, yerr=np.clip(err, 0, None), capsize=3, **style)


def plot_revise_scale(result: ReviseScaleResult, path: str | Path) -> Path:
    buckets = result.buckets
    labels = [f"{b.bucket}\nn={b.n}\nmedian p\n{b.median_prob:.1g}" for b in buckets]
    x = np.arange(len(buckets))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))

    _bars(axes[0], x, [b.rejoin_rate for b in buckets], 0.6, color="tab:green")
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("share of prompts")
    axes[0].set_title(
        f"greedy text rejoins the original within {result.n_after} steps\n"
        f"({result.rejoin_window} tokens in a row, shift <= {result.max_shift})"
    )

    _bars(axes[1], x, [b.kl_after_mean for b in buckets], 0.6, color="tab:purple")
    axes[1].set_ylabel("nats")
    axes[1].set_title("mean KL(original || revised) of next-token\ndistributions after the off-plan token")

    w = 0.2
    _bars(axes[2], x - 1.5 * w, [b.state_mid for b in buckets], w, color="tab:blue", label=f"{result.mid_layer}")
    _bars(axes[2], x - 0.5 * w, [b.state_last for b in buckets], w, color="tab:orange", label=f"{result.last_layer}")
    _bars(
        axes[2],
        x + 0.5 * w,
        [b.state_mid_swap for b in buckets],
        w,
        color="tab:blue",
        alpha=0.45,
        hatch="//",
        label=f"{result.mid_layer}, swap only",
    )
    _bars(
        axes[2],
        x + 1.5 * w,
        [b.state_last_swap for b in buckets],
        w,
        color="tab:orange",
        alpha=0.45,
        hatch="//",
        label=f"{result.last_layer}, swap only",
    )
    axes[2].set_ylabel("||h_orig - h_rev|| / ||h_orig||")
    axes[2].set_title("state change at later positions\n(swap only: original tokens, off-plan one swapped in)")
    axes[2].legend(fontsize=7)

    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{result.model}: off-plan token at step {result.at}, {len({t.prompt_index for t in result.trials})} prompts "
        f"({', '.join(result.corpora)}); bars: 95% bootstrap over prompts",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
