"""Plots of the thread's claims, each drawn from one experiment's result object (nothing recomputed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from forethought.experiments.equivalence import EquivalenceResult  # noqa: E402
from forethought.experiments.invariance import InvarianceResult  # noqa: E402
from forethought.experiments.lens import LogitLensResult  # noqa: E402
from forethought.experiments.state_size import StateSizeResult  # noqa: E402
from forethought.format import short_token, size
from forethought.trace import layer_label  # noqa: E402

CACHED, RECOMPUTE = "tab:blue", "tab:orange"
# Exact zeros cannot sit on a log axis; they are drawn at a floor and marked as exact.
LOG_FLOOR = 1e-18


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_equivalence(result: EquivalenceResult, path: str | Path) -> Path:
    steps = result.steps
    pos = [s.position for s in steps]
    fig, (ax_f, ax_t, ax_d) = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    ax_f.plot(pos, [s.flops_cached / 1e9 for s in steps], "o-", ms=3, color=CACHED, label="KV cache (1 new token)")
    ax_f.plot(pos, [s.flops_recompute / 1e9 for s in steps], "o-", ms=3, color=RECOMPUTE, label="recompute prefix")
    ax_f.set(xlabel="position of the step's last token", ylabel="GFLOPs per step (analytic)", title="Compute")
    ax_f.set_ylim(bottom=0)
    ax_f.legend(fontsize=8)
    ax_t.plot(pos, [s.seconds_cached * 1e3 for s in steps], "o-", ms=3, color=CACHED, label="KV cache")
    ax_t.plot(pos, [s.seconds_recompute * 1e3 for s in steps], "o-", ms=3, color=RECOMPUTE, label="recompute")
    ax_t.set(xlabel="position of the step's last token", ylabel="ms per step (measured)", title="Wall time")
    ax_t.set_ylim(bottom=0)
    ax_t.legend(fontsize=8)
    ax_t.annotate("step 0 = prefill (both ways)", (pos[0], 0), xytext=(4, 4), textcoords="offset points", fontsize=7)
    # Step 0 is the prompt's prefill, one and the same full pass both ways: drawn only if it differs.
    shown = [s for s in steps if s.step > 0 or s.logits_abs > 0] or steps
    series = [("logits", "o-", [s.logits_rel for s in shown])]
    series.append(("resid_post, worst layer", "s-", [max(s.resid_rel) for s in shown]))
    nonzero = [v for _, _, values in series for v in values if v > 0]
    floor = min(nonzero, default=1.0) / 30
    for label, style, values in series:
        ax_d.semilogy([s.position for s in shown], [max(v, floor) for v in values], style, ms=3, label=label)
    eps = {"float32": 2**-23, "float64": 2**-52, "bfloat16": 2**-7, "float16": 2**-10}.get(result.dtype)
    if eps:
        ax_d.axhline(eps, color="gray", ls="--", lw=1, label=f"{result.dtype} machine epsilon")
    ax_d.set(xlabel="position of the step's last token", ylabel="max |Δ| / max |value|")
    s = result.summary()
    verdict = "identical tokens" if result.identical else "TOKENS DIFFER"
    ax_d.set_title(f"Difference: {verdict}; logits max |diff| {s['logits_max_abs']:.1e}", fontsize=10)
    ax_d.legend(fontsize=8)
    fig.suptitle(
        f"KV cache vs full recompute, {result.model} ({result.dtype}), {len(steps)} greedy steps: "
        f"{s['flops_recompute_total'] / s['flops_cached_total']:.1f}x the FLOPs, "
        f"{s['seconds_recompute_total'] / max(s['seconds_cached_total'], 1e-12):.1f}x the time without the cache"
    )
    return _save(fig, path)


def plot_invariance(results: list[InvarianceResult], path: str | Path) -> Path:
    """Per-layer max |diff| of SHORT's columns, one line per run (causal, and the bidirectional control)."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    first = results[0]
    x = range(len(first.layers))
    nonzero = [v for r in results for v in r.max_abs if v > 0]
    floor = min(nonzero, default=1.0) / 30  # exact zeros are drawn here, as crosses
    any_zero = False
    for r in results:
        label = f"{'causal' if r.causal else 'bidirectional (control)'}, {r.dtype}"
        line = ax.semilogy(x, [max(v, floor) for v in r.max_abs], "o-", ms=4, label=label)[0]
        zeros = [i for i, v in enumerate(r.max_abs) if v == 0]
        if zeros:
            any_zero = True
            ax.semilogy(zeros, [floor] * len(zeros), "x", ms=9, mew=2, color=line.get_color())
    ax.axhline(1e-5, color="green", ls="--", lw=1, label="1e-5: causal must stay below")
    ax.axhline(1e-2, color="red", ls=":", lw=1, label="1e-2: control must exceed")
    if any_zero:
        ax.plot([], [], "x", color="gray", mew=2, label="exactly 0")
    ticks = [layer_label(n) for n in first.layers]
    ax.set_xticks(list(x), ticks, fontsize=7)
    ax.set(xlabel="layer (resid_post)", ylabel="max |diff| over the earlier columns")
    ax.set_ylim(floor / 5, None)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    n_new = len(first.longer_ids) - len(first.short_ids)
    ax.set_title(
        f"Appending {n_new} token{'s' if n_new > 1 else ''} to a {len(first.short_ids)}-token prompt: "
        f"do the earlier columns change? ({first.model})"
    )
    return _save(fig, path)


def plot_state_size(result: StateSizeResult, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 6))
    tokens = result.tokens
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(result.configs):
        color = colors[i % len(colors)]
        ax.loglog(tokens, c.kv_bytes, "-", color=color, label=f"KV cache: {c.name}")
        measured = [(t, m) for t, m in zip(tokens, c.measured_allocated) if m is not None]
        if measured:
            ax.loglog(*zip(*measured), "o", color=color, mfc="none", ms=9, label="  measured KVCache (k+v bytes)")
        filled = [(t, m) for t, m in zip(tokens, c.measured_nbytes) if m is not None]
        if filled:
            ax.loglog(*zip(*filled), "x", color=color, ms=7, label="  measured .nbytes after prefill")
        if c.kv_bytes_local:  # sliding-window layers: their share saturates at the window
            n_global = c.n_layers - c.n_local_layers
            ax.loglog(tokens, c.kv_bytes_global, "--", color=color, lw=1, label=f"  {n_global} global layers")
            local_label = f"  {c.n_local_layers} sliding-window layers (saturate at {c.sliding_window} tokens)"
            ax.loglog(tokens, c.kv_bytes_local, ":", color=color, lw=1.5, label=local_label)
    loaded = result.loaded
    styles = ["-.", ":", "--", (0, (1, 4))]
    for (name, n_bytes), style in zip(loaded.recurrent_bytes.items(), styles):
        ax.axhline(n_bytes, color="dimgray", ls=style, lw=1.2)
        ax.annotate(
            f"fixed recurrent state, {name}: {size(n_bytes)}",
            (1, n_bytes),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color="dimgray",
        )
    ax.set(xlabel="tokens in context", ylabel=f"bytes ({result.dtype}, {result.element_bytes} B per number)")
    ax.set_title(
        "State carried between tokens: the KV cache grows with every token; a recurrent state does not\n"
        f"(fixed states drawn for {loaded.key}'s width: d={loaded.d_model}, L={loaded.n_layers})",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_logit_lens(result: LogitLensResult, path: str | Path) -> Path:
    import numpy as np

    n_layers, n_pos = len(result.layers), len(result.prompt_ids)
    top1 = np.array([[pos[0] for pos in layer] for layer in result.top_probs])
    steps = result.steps
    width = max(8.0, 0.9 * n_pos + 2.5)
    height = 0.28 * n_layers + 2.5 + (2.2 if steps else 0)
    ratios = [0.28 * n_layers + 1.5] + ([2.0] if steps else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(width, height), height_ratios=ratios, squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(top1, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for layer in range(n_layers):
        for p in range(n_pos):
            color = "black" if top1[layer, p] > 0.6 else "white"
            token = short_token(result.top_tokens[layer][p][0])
            ax.text(p, layer, token, ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(n_pos), [short_token(t, 10) for t in result.prompt_tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_layers), [layer_label(n) for n in result.layers], fontsize=6)
    ax.set(xlabel="prompt position (input token)", ylabel="layer (resid_post)")
    ax.set_title(f"Logit lens, {result.model}: top-1 token and its probability at every layer x position")
    fig.colorbar(im, ax=ax, label="top-1 probability", fraction=0.03, pad=0.01)
    if steps:
        ax2 = axes[1, 0]
        x = range(len(steps))
        ax2.bar(x, [s.entropy_bits for s in steps], color="tab:purple", alpha=0.7, label="entropy (bits), T=1")
        ax2.plot(x, [s.sampling_entropy_bits for s in steps], "k_", ms=14, mew=2, label="entropy sampled from")
        for i, s in enumerate(steps):
            ax2.text(i, s.entropy_bits, f"rank {s.chosen_rank}\np={s.chosen_prob:.2f}", ha="center", va="bottom",
                     fontsize=7)  # fmt: skip
        ax2.set_xticks(list(x), [short_token(s.chosen_token, 10) for s in steps], rotation=45, ha="right", fontsize=8)
        ax2.set_ylim(0, max(s.entropy_bits for s in steps) * 1.45 + 0.1)
        ax2.set(xlabel="generated token", ylabel="bits")
        ax2.set_title(
            f"Generated steps (temperature {result.temperature}): entropy the text hides, chosen token's rank",
            fontsize=10,
        )
        ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)
