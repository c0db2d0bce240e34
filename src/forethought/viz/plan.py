"""Present the "does it plan?" run: per corpus, the discriminability line, what h_t adds beyond the baselines
(the stacked readout, its strata, beyond longer context), the probe alone, the ceiling, the context baselines, the
knockout and steering tables; the horizon, knockout and steering-dose figures. Works from the JSON the probe and
causal runs write (plain dicts), so a report can be redrawn without rerunning anything."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from forethought.experiments.baselines import minimum_detectable_effect

BASELINE_LABELS = {
    "unigram": "unigram (no context; not counted as a context baseline)",
    "ngram1": "backoff n-gram, context 1 (bigram)",
    "ngram2": "backoff n-gram, context 2",
    "ngram3": "backoff n-gram, context 3",
    "ngram4": "backoff n-gram, context 4",
    "copy": "in-window copy / induction",
    "copy+ngram": "copy, else the best n-gram",
}


def _iv(d: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not d or d.get("estimate") is None or math.isnan(d["estimate"]):
        return "–"
    f = f"{{:.{digits}f}}"
    return f"{f.format(scale * d['estimate'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]"


def mde(d: dict | None) -> float | None:
    """The minimum detectable effect of an interval {estimate, low, high} (same units), or None: every null in the
    answer carries it."""
    if not d or d.get("low") is None or d.get("high") is None:
        return None
    value = minimum_detectable_effect(d["low"], d["high"])
    return None if math.isnan(value) else value


def _mde_cell(d: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    m = mde(d)
    return "–" if m is None else f"{scale * m:.{digits}f}"


def _by_k(d: dict) -> dict[int, object]:
    return {int(k): v for k, v in d.items()}


def share_of_gap(
    per_probe: dict,
    per_causal: dict,
    k: int,
    n_boot: int,
    seed: int = 0,
    readout: str = "B+h",
    base: str = "B",
) -> dict | None:
    """(readout - base) / (model's k-step ceiling - base) on the positions where the ceiling was measured, with a
    bootstrap over documents (ratio of resampled sums). Default: what the stacked readout with h_t closes of the gap
    between the baselines' readout and the model's own foresight."""
    name = f"ceiling@{k}"
    if name not in per_causal or f"{readout}@{k}" not in per_probe or f"{base}@{k}" not in per_probe:
        return None
    ev = per_probe["evaluation"]
    pos = per_causal["positions"]
    at = np.searchsorted(ev, pos)
    ok = (at < len(ev)) & (ev[np.minimum(at, len(ev) - 1)] == pos)
    ceiling = per_causal[name]
    ok &= ~np.isnan(ceiling)
    if ok.sum() < 10:
        return None
    probe = per_probe[f"{readout}@{k}"][at[ok]]
    b = per_probe[f"{base}@{k}"][at[ok]]
    ceil = ceiling[ok]
    docs = per_causal["documents"][ok]
    _, idx = np.unique(docs, return_inverse=True)
    n_docs = idx.max() + 1
    num = np.bincount(idx, probe - b, n_docs)
    den = np.bincount(idx, ceil - b, n_docs)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_docs, (n_boot, n_docs))
    counts = np.zeros((n_boot, n_docs))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_docs), picks.ravel()), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (counts @ num) / (counts @ den)
        estimate = num.sum() / den.sum() if den.sum() != 0 else float("nan")
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return None
    return {
        "estimate": float(estimate),
        "low": float(np.quantile(ratios, 0.025)),
        "high": float(np.quantile(ratios, 0.975)),
        "n": int(ok.sum()),
        "probe_minus_strongest": float((probe - b).mean()),  # the readout minus the base, on these positions
        "ceiling_minus_strongest": float((ceil - b).mean()),
        "readout": readout,
        "base": base,
    }


def discriminability_line(probe: dict) -> str:
    d = probe.get("discriminability") or {}
    if not d:
        return ""
    return (
        f"**Discriminability** (k = 1, the same held-out positions): the model's own top-1 "
        f"{_iv(d['model_top1'])}% vs the strongest context baseline ({d['strongest']}) {_iv(d['strongest_top1'])}%: "
        f"**{_iv(d['model_minus_strongest'])} points** over {d['n_documents']} documents — {d['words']}."
    )


def _stk(head: dict, k: int, *path: str) -> dict | None:
    node = head[k].get("stacked")
    for p in path:
        if not node:
            return None
        node = node.get(p)
    return node


def corpus_table(name: str, probe: dict, causal: dict | None, shares: dict[int, dict | None]) -> list[str]:
    ks = sorted(int(k) for k in probe["headline"])
    head = _by_k(probe["headline"])
    context = _by_k(probe["context"])
    where = (
        f"held-out positions with >= {probe['min_context']} tokens of their own document before them"
        if probe.get("min_context")
        else "held-out positions"
    )
    lines = [
        f"### {name}",
        "",
        f"{probe['n_train']:,} training positions ({probe['n_val']:,} validation) · {probe['n_eval']:,} {where}, "
        f"from {probe['n_eval_documents']} held-out documents · {len(probe['near_duplicates_removed'])} near-duplicate "
        f"test documents removed · layers {probe['layers']}",
        "",
    ]
    if probe.get("discriminability"):
        lines += [discriminability_line(probe), ""]
    lines += [
        "What h_t adds: top-1 % of x_{t+k} (95% interval, bootstrap over held-out documents). B = a least-squares "
        "readout of the baseline features (x_t's k-step successors, backoff n-grams 1-4, copy, copy-else-n-gram; "
        "cross-fitted); B + h = the same plus a ridge map of h_t at the layer chosen on validation; B_long = B plus "
        "the model's own next token at t and the 4-gram read through it.",
        "",
        "| readout of x_{t+k} | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        "| strongest single context baseline | "
        + " | ".join(f"{_iv(head[k]['strongest_top1'])} {head[k]['strongest']}" for k in ks)
        + " |",
        "| B (baseline features) | " + " | ".join(_iv(_stk(head, k, "B")) for k in ks) + " |",
        "| B + h_t | " + " | ".join(f"{_iv(_stk(head, k, 'B+h'))} (L{head[k]['layer']})" for k in ks) + " |",
        "| **(B + h) − B** (points) | " + " | ".join(f"**{_iv(_stk(head, k, 'excess'))}**" for k in ks) + " |",
        "| smallest (B + h) − B this run could detect (points; 5% two-sided, 80% power) | "
        + " | ".join(_mde_cell(_stk(head, k, "excess")) for k in ks)
        + " |",
    ]
    for stratum, words in (("unseen", "4-gram context never seen in training"), ("seen", "4-gram context seen")):
        cells = []
        for k in ks:
            st = _stk(head, k, "strata", stratum)
            cells.append(f"{_iv(st['excess'])} ({100 * st['share']:.0f}%)" if st else "–")
        lines.append(f"| (B + h) − B where the {words} (share of positions) | " + " | ".join(cells) + " |")
    lines += [
        "| B_long (B + the model's next token + the 4-gram through it) | "
        + " | ".join(_iv(_stk(head, k, "Blong")) for k in ks)
        + " |",
        "| **(B_long + h) − B_long** (points): beyond longer context | "
        + " | ".join(f"**{_iv(_stk(head, k, 'excess_long'))}**" for k in ks)
        + " |",
        "| smallest (B_long + h) − B_long this run could detect (points) | "
        + " | ".join(_mde_cell(_stk(head, k, "excess_long")) for k in ks)
        + " |",
        "| ridge probe on h_t alone | "
        + " | ".join(f"{_iv(head[k]['probe'])} (L{head[k]['layer']})" for k in ks)
        + " |",
        "| probe alone − strongest baseline (points) | " + " | ".join(_iv(head[k]["excess"]) for k in ks) + " |",
    ]
    for stratum in ("unseen", "seen"):
        lines.append(
            f"| probe alone − strongest, 4-gram context {stratum} | "
            + " | ".join(_iv((_stk(head, k, "strata", stratum) or {}).get("probe_minus_strongest")) for k in ks)
            + " |"
        )
    if causal and causal.get("ceiling"):
        ceiling = _by_k(causal["ceiling"])
        n_ceiling = causal.get("n_ceiling_positions") or causal["n_positions"]
        lines.append(
            f"| model's own k-step foresight (ceiling; {n_ceiling} of these positions, "
            f"{causal['settings'].get('rollouts')} rollouts for k > 2) | "
            + " | ".join(_iv(ceiling.get(k)) for k in ks)
            + " |"
        )

        def gap(sh: dict | None) -> str:
            if not sh:
                return "–"
            text = (
                f"B+h−B {100 * sh['probe_minus_strongest']:+.1f}, ceiling−B {100 * sh['ceiling_minus_strongest']:+.1f}"
            )
            if sh["ceiling_minus_strongest"] > 0.01:
                text += f"; share {sh['estimate']:.2f} [{sh['low']:.2f}, {sh['high']:.2f}]"
            return text

        lines.append(
            "| on the ceiling's positions: share of the gap from B to the ceiling that h_t closes | "
            + " | ".join(gap(shares.get(k)) for k in ks)
            + " |"
        )
    lines += [
        "",
        "The single context baselines (top-1 %, same positions):",
        "",
        "| predictor of x_{t+k} | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for b, label in BASELINE_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_iv(context[k].get(b)) for k in ks) + " |")
    lens_best = []
    for k in ks:
        cells = [c for c in probe["cells"] if c["offset"] == k]
        best = max(cells, key=lambda c: c["lens"]["top1"])
        lens_best.append(f"{100 * best['lens']['top1']:.1f} (L{best['layer']})")
    lines.append("| Future Lens linear map (best layer on test: optimistic) | " + " | ".join(lens_best) + " |")
    lines.append("")
    return lines


def causal_lines(name: str, causal: dict) -> list[str]:
    s = causal["settings"]
    H = s["horizon"]
    sinks = causal.get("sinks") or {}
    lines = [
        f"#### {name}: knockout ({causal['n_positions']} positions, {causal['n_documents']} documents)",
        "",
        "Increase of the next-token loss (nats) of the prediction made at t+j when the positions after t cannot read "
        "one key/value from layer l up (t, t-1, t-2, or a random earlier key s = t-d, d in 3.."
        f"{s.get('max_distance')}), 95% interval. Random keys avoid attention sinks: {sinks.get('rule', '–')}; "
        f"{sinks.get('mean_excluded_per_position', 0):.2f} candidate keys per position excluded on average "
        f"({sinks.get('positions_with_a_sink_in_range', 0)} positions had one in range).",
        "",
        "| condition | " + " | ".join(f"t+{j}" for j in range(1, H + 1)) + " |",
        "|---|" + "---|" * H,
    ]
    for cond, ivs in causal["knockout"].items():
        lines.append(f"| {cond} | " + " | ".join(_iv(iv, 1.0, 3) for iv in ivs) + " |")
    for cond, ivs in causal["knockout_vs_random"].items():
        low = cond.split("@")[1]
        lines.append(f"| {cond} minus knockout_random@{low} | " + " | ".join(_iv(iv, 1.0, 3) for iv in ivs) + " |")
    for cond, ivs in causal["knockout_vs_random"].items():
        if cond.startswith("knockout_t@"):
            low = cond.split("@")[1]
            lines.append(
                f"| smallest {cond} minus knockout_random@{low} this run could detect (nats; 5% two-sided, 80% "
                "power) | " + " | ".join(_mde_cell(iv, 1.0, 3) for iv in ivs) + " |"
            )
    lines += [
        "",
        f"#### {name}: steering dose-response (added norm = scale x the layer's spread)",
        "",
        "Teacher-forced change of log p(y), y = x_{t+k}, at the prediction of x_{t+k} minus at the prediction of "
        "x_{t+1}, and the share of positions whose greedy token at t+k flips to y (of those where it was not y); "
        "95% intervals.",
        "",
        "| layer | k | scale | n | probe: Δ at t+k | probe: Δ at t+1 | probe: (t+k) − (t+1) | random: (t+k) − (t+1) "
        "| probe − random at t+k | smallest detectable probe − random | flips to y, probe | flips to y, random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in causal["steering"]:
        lines.append(
            f"| {row['layer']} | {row['offset']} | {row.get('scale', s.get('steer_scale', 1.0))} | {row['n']} | "
            + " | ".join(
                _iv(row.get(key), 1.0, 3)
                for key in (
                    "probe_at_target",
                    "probe_at_next",
                    "target_minus_next",
                    "random_target_minus_next",
                    "probe_minus_random_at_target",
                )
            )
            + f" | {_mde_cell(row.get('probe_minus_random_at_target'), 1.0, 3)}"
            + f" | {_iv(row.get('probe_flip'))}% | {_iv(row.get('random_flip'))}% |"
        )
    lines.append("")
    return lines


def _band(ax, xs, ivs, label, color, style="-"):
    pts = [(x, iv) for x, iv in zip(xs, ivs, strict=True) if iv and not math.isnan(iv["estimate"])]
    if not pts:
        return
    xs = [x for x, _ in pts]
    ax.plot(xs, [100 * iv["estimate"] for _, iv in pts], style, color=color, label=label, marker="o", ms=3)
    ax.fill_between(xs, [100 * iv["low"] for _, iv in pts], [100 * iv["high"] for _, iv in pts], color=color, alpha=0.2)


def plot_horizon(
    probes: dict[str, dict], causals: dict[str, dict], path: Path, model_name: str = "SmolLM2-135M"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(probes)
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8.5), squeeze=False, layout="constrained")
    for col, name in enumerate(names):
        pr = probes[name]
        head = _by_k(pr["headline"])
        ks = sorted(head)
        ax = axes[0, col]
        _band(ax, ks, [_stk(head, k, "B+h") for k in ks], "B + h_t (stacked readout)", "C0")
        _band(ax, ks, [_stk(head, k, "B") for k in ks], "B: baseline features alone", "C3")
        _band(ax, ks, [head[k]["probe"] for k in ks], "probe on h_t alone", "C1", ":")
        ax.plot(
            ks, [100 * head[k]["strongest_top1"]["estimate"] for k in ks], "--", color="C7", label="strongest baseline"
        )
        causal = causals.get(name)
        if causal and causal.get("ceiling"):
            ceiling = _by_k(causal["ceiling"])
            cks = sorted(ceiling)
            _band(ax, cks, [ceiling[k] for k in cks], "model's own k-step foresight (ceiling)", "C2", "--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylabel("top-1 accuracy of x_{t+k} (%)")
        d = pr.get("discriminability") or {}
        sub = ""
        if d:
            m = d["model_minus_strongest"]
            sub = "\nmodel − strongest at k=1: " + f"{100 * m['estimate']:+.1f} [{100 * m['low']:+.1f}, "
            sub += f"{100 * m['high']:+.1f}] points"
        ax.set_title(
            f"{name}: {pr['n_eval_documents']} held-out documents, >= {pr.get('min_context', 0)} tokens of context"
            + sub,
            fontsize=10,
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax2 = axes[1, col]
        _band(ax2, ks, [_stk(head, k, "excess") for k in ks], "(B + h) − B, all positions", "C0")
        _band(
            ax2, ks, [_stk(head, k, "strata", "unseen", "excess") for k in ks], "... 4-gram context unseen", "C4", ":"
        )
        _band(ax2, ks, [_stk(head, k, "strata", "seen", "excess") for k in ks], "... 4-gram context seen", "C5", ":")
        _band(ax2, ks, [_stk(head, k, "excess_long") for k in ks], "(B_long + h) − B_long: beyond longer context", "C2")
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(ks, [str(k) for k in ks])
        ax2.set_xlabel("offset k (tokens ahead)")
        ax2.set_ylabel("what h_t adds, top-1 points (95% interval)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.suptitle(f"{model_name}: what h_t says about x_{{t+k}} beyond statistics of its context", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


KNOCK_COLORS = {"t": "C0", "t-1": "C1", "t-2": "C2", "random": "C7"}


def plot_causal(causals: dict[str, dict], path: Path) -> Path:
    """Knockout: per layer l, the loss increase at t+1 and t+2 when t, t-1, t-2 or a random key is hidden from
    layer l up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in causals if causals[n] and causals[n].get("knockout")]
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False, layout="constrained")
    for row, name in enumerate(names):
        c = causals[name]
        lows = [int(x) for x in c["settings"]["from_layers"]]
        for col, j in enumerate((1, 2)):
            ax = axes[row, col]
            width = 0.8 / len(KNOCK_COLORS)
            for i, (label, color) in enumerate(KNOCK_COLORS.items()):
                est, lo, hi = [], [], []
                for low in lows:
                    iv = c["knockout"].get(f"knockout_{label}@{low}", [None] * 4)[j - 1]
                    ok = iv and not math.isnan(iv["estimate"])
                    est.append(iv["estimate"] if ok else np.nan)
                    lo.append(iv["estimate"] - iv["low"] if ok else 0)
                    hi.append(iv["high"] - iv["estimate"] if ok else 0)
                xs = np.arange(len(lows)) + (i - 1.5) * width
                ax.bar(xs, est, width, yerr=[lo, hi], color=color, capsize=2, label=f"hide key {label}")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(lows)), [f"from layer {low}" for low in lows])
            ax.set_ylabel(f"loss increase at t+{j} (nats), 95% interval")
            ax.set_title(
                f"{name}: later positions cannot read one key ({c['n_positions']} positions), loss at t+{j}",
                fontsize=10,
            )
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steering(causals: dict[str, dict], path: Path) -> Path:
    """Dose-response: per scale, Δ log p(x_{t+k}) at t+k minus at t+1, and the flip share, probe vs random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in causals if causals[n] and causals[n].get("steering")]
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 3.8 * len(names)), squeeze=False, layout="constrained")
    for row, name in enumerate(names):
        rows = causals[name]["steering"]
        groups = sorted({(r["layer"], r["offset"]) for r in rows})
        for layer, k in groups:
            rs = sorted((r for r in rows if r["layer"] == layer and r["offset"] == k), key=lambda r: r["scale"])
            xs = [r["scale"] for r in rs]
            panels = (
                (0, "probe_at_target", "random_at_target", f"Δ log p(x_(t+{k})) at t+{k} (nats)", 1.0),
                (1, "target_minus_next", "random_target_minus_next", f"Δ at t+{k} minus Δ at t+1 (nats)", 1.0),
                (2, "probe_flip", "random_flip", f"greedy token at t+{k} flips to x_(t+{k}) (%)", 100.0),
            )
            for col, pk, rk, ylabel, scale in panels:
                ax = axes[row, col]
                for key, color, label in ((pk, "C0", "probe direction"), (rk, "C7", "random direction")):
                    ivs = [r.get(key) for r in rs]
                    ok = [iv is not None and not math.isnan(iv["estimate"]) for iv in ivs]
                    x = [a for a, o in zip(xs, ok, strict=True) if o]
                    e = [scale * iv["estimate"] for iv, o in zip(ivs, ok, strict=True) if o]
                    lo = [scale * iv["low"] for iv, o in zip(ivs, ok, strict=True) if o]
                    hi = [scale * iv["high"] for iv, o in zip(ivs, ok, strict=True) if o]
                    ax.plot(x, e, "-o", ms=3, color=color, label=f"{label} (L{layer}, k={k})")
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2)
                ax.axhline(0, color="black", lw=0.8)
                ax.set_xscale("log")
                ax.set_xlabel("added norm / the layer's spread")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{name}: steering h_t at layer {layer}", fontsize=10)
                ax.legend(fontsize=8)
                ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gap_shares(out: Path, name: str, probe: dict, n_boot: int) -> dict[int, dict | None]:
    """The share of the B -> ceiling gap closed by h_t, per offset, from the per-position arrays under out/name."""
    pp, pc = out / name / "probes" / "per_position.npz", out / name / "causal_per_position.npz"
    shares: dict[int, dict | None] = {}
    if not (pp.is_file() and pc.is_file()):
        return shares
    per_probe, per_causal = dict(np.load(pp)), dict(np.load(pc))
    for k in (int(k) for k in probe["headline"]):
        shares[k] = share_of_gap(per_probe, per_causal, k, n_boot)
    return shares


def write_answer(
    out: Path, probes: dict[str, dict], causals: dict[str, dict], n_boot: int = 1000, model_name: str = "SmolLM2-135M"
) -> dict[str, Path]:
    """answer.md, plan_horizon.png, plan_causal.png, plan_steering.png under `out` (per-position arrays read from
    out/<corpus>/)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Does {model_name} plan?", ""]
    for name, probe in probes.items():
        causal = causals.get(name)
        shares = gap_shares(out, name, probe, n_boot) if causal else {}
        lines += corpus_table(name, probe, causal, shares)
        if causal:
            lines += causal_lines(name, causal)
    paths = {"markdown": out / "answer.md"}
    paths["markdown"].write_text("\n".join(lines))
    paths["horizon"] = plot_horizon(probes, causals, out / "plan_horizon.png", model_name)
    if any(c and c.get("knockout") for c in causals.values()):
        paths["causal"] = plot_causal(causals, out / "plan_causal.png")
    if any(c and c.get("steering") for c in causals.values()):
        paths["steering"] = plot_steering(causals, out / "plan_steering.png")
    return paths
