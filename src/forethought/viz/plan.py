"""Present the "does it plan?" run: per corpus, the probe-vs-baselines table with intervals, the horizon curve, the
knockout and steering figures. Works from the JSON the probe and causal runs write (plain dicts), so a report can
be redrawn without rerunning anything."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

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


def _by_k(d: dict) -> dict[int, object]:
    return {int(k): v for k, v in d.items()}


def share_of_gap(per_probe: dict, per_causal: dict, k: int, n_boot: int, seed: int = 0) -> dict | None:
    """(probe - strongest baseline) / (model's k-step ceiling - strongest baseline) on the positions where the
    ceiling was measured, with a bootstrap over documents (ratio of resampled sums)."""
    name = f"ceiling@{k}"
    if name not in per_causal or f"probe@{k}" not in per_probe:
        return None
    ev = per_probe["evaluation"]
    pos = per_causal["positions"]
    at = np.searchsorted(ev, pos)
    ok = (at < len(ev)) & (ev[np.minimum(at, len(ev) - 1)] == pos)
    ceiling = per_causal[name]
    ok &= ~np.isnan(ceiling)
    if ok.sum() < 10:
        return None
    strongest = [key for key in per_probe if key.endswith(f"@{k}") and not key.startswith(("probe", "strongest"))]
    if not strongest:
        return None
    probe = per_probe[f"probe@{k}"][at[ok]]
    base = per_probe[strongest[0]][at[ok]]
    ceil = ceiling[ok]
    docs = per_causal["documents"][ok]
    _, idx = np.unique(docs, return_inverse=True)
    n_docs = idx.max() + 1
    num = np.bincount(idx, probe - base, n_docs)
    den = np.bincount(idx, ceil - base, n_docs)
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
        "probe_minus_strongest": float((probe - base).mean()),
        "ceiling_minus_strongest": float((ceil - base).mean()),
    }


def corpus_table(name: str, probe: dict, causal: dict | None, shares: dict[int, dict | None]) -> list[str]:
    ks = sorted(int(k) for k in probe["headline"])
    head = _by_k(probe["headline"])
    context = _by_k(probe["context"])
    lines = [
        f"### {name}",
        "",
        f"{probe['n_train']:,} training positions ({probe['n_val']:,} validation) · {probe['n_eval']:,} held-out "
        f"positions from {probe['n_eval_documents']} held-out documents · "
        f"{len(probe['near_duplicates_removed'])} near-duplicate test documents removed · layers {probe['layers']}",
        "",
        "Top-1 % with 95% interval (bootstrap over held-out documents).",
        "",
        "| predictor of x_{t+k} | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for b, label in BASELINE_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_iv(context[k].get(b)) for k in ks) + " |")
    lines.append(
        "| **ridge probe on h_t** (layer chosen on validation) | "
        + " | ".join(f"{_iv(head[k]['probe'])} (L{head[k]['layer']})" for k in ks)
        + " |"
    )
    lens_best = []
    for k in ks:
        cells = [c for c in probe["cells"] if c["offset"] == k]
        best = max(cells, key=lambda c: c["lens"]["top1"])
        lens_best.append(f"{100 * best['lens']['top1']:.1f} (L{best['layer']})")
    lines.append("| Future Lens linear map (best layer on test: optimistic) | " + " | ".join(lens_best) + " |")
    lines.append(
        "| **excess of the probe over the strongest baseline** (points) | "
        + " | ".join(f"**{_iv(head[k]['excess'])}** vs {head[k]['strongest']}" for k in ks)
        + " |"
    )
    if causal:
        ceiling = _by_k(causal.get("ceiling", {}))
        n_ceiling = causal["settings"].get("ceiling_positions") or causal["n_positions"]
        lines.append(
            f"| model's own k-step marginal (ceiling; its first {n_ceiling} positions, <= "
            f"{causal['settings'].get('max_prefix')} tokens into their window) | "
            + " | ".join(_iv(ceiling.get(k)) for k in ks)
            + " |"
        )

        def gap(sh: dict | None) -> str:
            if not sh:
                return "–"
            text = f"probe {100 * sh['probe_minus_strongest']:+.1f}, ceiling {100 * sh['ceiling_minus_strongest']:+.1f}"
            if sh["ceiling_minus_strongest"] > 0.01:
                text += f"; share {sh['estimate']:.2f} [{sh['low']:.2f}, {sh['high']:.2f}]"
            return text

        lines.append(
            "| on the ceiling's positions: probe and ceiling minus the strongest baseline (points); the share of that "
            "gap the probe closes, where the ceiling is above the baseline | "
            + " | ".join(gap(shares.get(k)) for k in ks)
            + " |"
        )
    lines.append("")
    return lines


def causal_lines(name: str, causal: dict) -> list[str]:
    s = causal["settings"]
    H = s["horizon"]
    lines = [
        f"#### {name}: knockout ({causal['n_positions']} positions, {causal['n_documents']} documents)",
        "",
        "Increase of the next-token loss (nats) of the prediction made at t+j, 95% interval.",
        "",
        "| condition | " + " | ".join(f"t+{j}" for j in range(1, H + 1)) + " |",
        "|---|" + "---|" * H,
    ]
    for cond, ivs in causal["knockout"].items():
        lines.append(f"| {cond} | " + " | ".join(_iv(iv, 1.0, 3) for iv in ivs) + " |")
    for cond, ivs in causal["knockout_vs_random"].items():
        lines.append(f"| {cond} minus knockout_random@0 | " + " | ".join(_iv(iv, 1.0, 3) for iv in ivs) + " |")
    lines += [
        "",
        f"#### {name}: steering (norm {s['steer_scale']} x the layer's typical distance from its mean)",
        "",
        "Change of log p(y), y = x_{t+k}, 95% interval.",
        "",
        "| layer | k | n | probe dir, at t+k | probe dir, at t+1 | random dir, at t+k | random dir, at t+1 "
        "| probe - random at t+k | (t+k) - (t+1), probe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in causal["steering"]:
        lines.append(
            f"| {row['layer']} | {row['offset']} | {row['n']} | "
            + " | ".join(
                _iv(row[key], 1.0, 3)
                for key in (
                    "probe_at_target",
                    "probe_at_next",
                    "random_at_target",
                    "random_at_next",
                    "probe_minus_random_at_target",
                    "target_minus_next",
                )
            )
            + " |"
        )
    lines.append("")
    return lines


def plot_horizon(
    probes: dict[str, dict], causals: dict[str, dict], path: Path, model_name: str = "SmolLM2-135M"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(probes)
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7.5), squeeze=False, layout="constrained")
    for col, name in enumerate(names):
        pr = probes[name]
        head = _by_k(pr["headline"])
        context = _by_k(pr["context"])
        ks = sorted(head)
        ax = axes[0, col]

        def band(ax, xs, ivs, label, color, style="-"):
            est = [100 * iv["estimate"] for iv in ivs]
            lo = [100 * iv["low"] for iv in ivs]
            hi = [100 * iv["high"] for iv in ivs]
            ax.plot(xs, est, style, color=color, label=label, marker="o", ms=3)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)

        band(ax, ks, [head[k]["probe"] for k in ks], "ridge probe on h_t (layer by validation)", "C0")
        band(ax, ks, [head[k]["strongest_top1"] for k in ks], "strongest context baseline", "C3")
        for i, b in enumerate(("ngram1", "ngram4", "copy")):
            ax.plot(ks, [100 * context[k][b]["estimate"] for k in ks], ":", color=f"C{4 + i}", label=b)
        causal = causals.get(name)
        if causal and causal.get("ceiling"):
            ceiling = _by_k(causal["ceiling"])
            cks = sorted(ceiling)
            n = causal["settings"].get("ceiling_positions") or causal["n_positions"]
            where = f"its {n} positions <= {causal['settings'].get('max_prefix')} into a window"
            band(ax, cks, [ceiling[k] for k in cks], f"model's own k-step marginal ({where})", "C2", "--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylabel("top-1 accuracy of x_{t+k} (%)")
        ax.set_title(f"{name}: {pr['n_eval_documents']} held-out documents", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax2 = axes[1, col]
        band(ax2, ks, [head[k]["excess"] for k in ks], "probe minus strongest baseline", "C0")
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(ks, [str(k) for k in ks])
        ax2.set_xlabel("offset k (tokens ahead)")
        ax2.set_ylabel("excess top-1 (points), 95% interval")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    fig.suptitle(f"{model_name}: what h_t says about x_{{t+k}},\nbeyond statistics of the same context", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_causal(causals: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in causals if causals[n]]
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False, layout="constrained")
    for row, name in enumerate(names):
        c = causals[name]
        H = c["settings"]["horizon"]
        js = np.arange(1, H + 1)
        ax = axes[row, 0]
        for i, (cond, ivs) in enumerate(c["knockout"].items()):
            est = np.array([iv["estimate"] for iv in ivs])
            err = np.array([[iv["estimate"] - iv["low"] for iv in ivs], [iv["high"] - iv["estimate"] for iv in ivs]])
            ax.errorbar(js + 0.06 * (i - 2), est, yerr=err, marker="o", ms=3, capsize=2, label=cond)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(js, [f"t+{j}" for j in js])
        ax.set_xlabel("position whose next-token loss is measured")
        ax.set_ylabel("loss increase (nats), 95% interval")
        ax.set_title(f"{name}: block later positions from reading t's K/V", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = axes[row, 1]
        labels, est, lo, hi, colors = [], [], [], [], []
        for s in c["steering"]:
            for key, color in (
                ("probe_at_target", "C0"),
                ("probe_at_next", "C9"),
                ("random_at_target", "C7"),
                ("random_at_next", "0.75"),
            ):
                iv = s[key]
                labels.append(f"L{s['layer']} k={s['offset']}\n{key.replace('_at_', ' @')}")
                est.append(iv["estimate"])
                lo.append(iv["estimate"] - iv["low"])
                hi.append(iv["high"] - iv["estimate"])
                colors.append(color)
        xs = np.arange(len(labels))
        ax.bar(xs, est, yerr=[lo, hi], color=colors, capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(xs, labels, fontsize=6, rotation=90)
        ax.set_ylabel("change of log p(y = x_{t+k}) (nats)")
        ax.set_title(f"{name}: add the probe's direction for y at h_t vs a random one", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_answer(
    out: Path, probes: dict[str, dict], causals: dict[str, dict], n_boot: int = 1000, model_name: str = "SmolLM2-135M"
) -> dict[str, Path]:
    """answer.md, plan_horizon.png, plan_causal.png under `out` (per-position arrays read from out/<corpus>/)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Does {model_name} plan?", ""]
    for name, probe in probes.items():
        causal = causals.get(name)
        shares: dict[int, dict | None] = {}
        pp, pc = out / name / "probes" / "per_position.npz", out / name / "causal_per_position.npz"
        if causal and pp.is_file() and pc.is_file():
            per_probe, per_causal = dict(np.load(pp)), dict(np.load(pc))
            for k in (int(k) for k in probe["headline"]):
                strongest = probe["headline"][str(k)]["strongest"] if str(k) in probe["headline"] else None
                wanted = ("evaluation", f"probe@{k}", f"{strongest}@{k}")
                keep = {key: v for key, v in per_probe.items() if key in wanted}
                shares[k] = share_of_gap(keep, per_causal, k, n_boot)
        lines += corpus_table(name, probe, causal, shares)
        if causal:
            lines += causal_lines(name, causal)
    paths = {"markdown": out / "answer.md"}
    paths["markdown"].write_text("\n".join(lines))
    paths["horizon"] = plot_horizon(probes, causals, out / "plan_horizon.png", model_name)
    if any(causals.values()):
        paths["causal"] = plot_causal(causals, out / "plan_causal.png")
    return paths
