"""The plan answer as a report section: does the state at t carry, and does the model use, information about
x_{t+k} beyond what the context already says?

The same library calls as `benchmarks/plan_answer.py`, on the Future Lens section's activation store (extracted
once, shared): `run_probes` (per offset, at the layer chosen on validation: the stacked readout of the baseline
features with and without h_t, cross-fitted, the excess with a 95% interval from a bootstrap over held-out
documents, its strata, beyond longer context; the probe alone; the discriminability line), on held-out positions
deep in their window where the store allows; then `run_causal` at those positions (knockout of t, t-1, t-2 and a
sink-free random key, layer-matched; steering as a dose-response; the model's own k-step ceiling), plotted with
`viz.plan`. Sizes follow `ctx.settings` (quick or full).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from forethought.errors import ForethoughtError
from forethought.report.builtin import future_store, no_nan, pct_interval, points, sign_words
from forethought.report.context import ReportContext, q
from forethought.report.finding import Figure, Finding

HORIZON = 4  # knockout losses at t+1 .. t+4 (the causal module's default)
DEEP = 128  # held-out positions with at least this many tokens of their own document before them


def _causal_layers(layers: list[int]) -> tuple[int, ...]:
    """Knockout from the first layer (all layers), from the middle stored layer and from a late one."""
    picks = {layers[0], layers[len(layers) // 2], layers[-2] if len(layers) > 2 else layers[-1]}
    return tuple(sorted(picks))


def plan_answer(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.causal import CausalSettings, run_causal
    from forethought.experiments.probe_file import load_probe_folder
    from forethought.experiments.probes import run_probes
    from forethought.viz.plan import plot_causal, plot_horizon, plot_steering, share_of_gap

    s, lm = ctx.settings, ctx.lm()
    store, layers, window, extract_cmd = future_store(ctx)
    offsets = sorted(k for k in s.plan_offsets if k < window - HORIZON - 2)
    with tempfile.TemporaryDirectory() as saved:  # the fitted maps: steering reads its directions from them

        def probes(min_context: int):
            return run_probes(
                store,
                lm.model,
                offsets,
                layers,
                eval_tokens=s.future_eval_tokens,
                lens_eval_tokens=min(256, s.future_eval_tokens),  # the lens is not this section's question
                control_eval_tokens=min(512, s.future_eval_tokens),
                save_dir=saved,
                progress=False,
                n_boot=s.plan_n_boot,
                min_context=min_context,
            )

        # held-out positions deep in their window (the model has read its context there); a store of short
        # documents has none, and then every held-out position counts (the discriminability line says what
        # that is worth)
        try:
            probe = probes(DEEP if window >= DEEP + 32 else 0)
        except ForethoughtError:
            probe = probes(0)
        maps = load_probe_folder(saved, lm.config.d_model)
        # steer at the layer the probe reads x_{t+2} best from (chosen on validation)
        steer_offsets = tuple(k for k in s.plan_steer_offsets if k in offsets and k <= HORIZON + 1)
        steer_layer = probe.headline[steer_offsets[0] if steer_offsets else offsets[0]]["layer"]
        if steer_layer == lm.config.n_layers - 1:  # the last block's output feeds no attention: nothing to steer
            steer_layer = max((lay for lay in layers if lay < steer_layer), default=steer_layer)
        max_prefix = window - HORIZON - 2
        evaluation = probe.per_position["evaluation"]
        usable = evaluation[(evaluation % window >= 3) & (evaluation % window <= max_prefix)]
        n_positions = max(s.plan_positions, s.plan_ceiling_positions or 0)
        positions = np.random.default_rng(0).permutation(usable)[:n_positions]
        settings = CausalSettings(
            horizon=HORIZON,
            from_layers=_causal_layers(layers),
            steer_layers=(steer_layer,),
            steer_offsets=steer_offsets[:1],
            ceiling_offsets=tuple(k for k in s.plan_ceiling_offsets if k in offsets),
            rollouts=s.plan_rollouts,
            max_prefix=max_prefix,
            ceiling_positions=s.plan_ceiling_positions,
            condition_positions=s.plan_positions,
            top_m=16,
        )
        causal = run_causal(lm.model, store, positions.tolist(), maps, settings, progress=False, n_boot=s.plan_n_boot)
    probe_d, causal_d = probe.to_dict(), causal.to_dict()
    name = Path(ctx.corpus).name or ctx.corpus
    plot_horizon({name: probe_d}, {name: causal_d}, folder / "plan_horizon.png", ctx.lm().name)
    figures_cmd = f"forethought report --sections plan --corpus {q(ctx.corpus)}{ctx.model_flag()}"
    figures_cmd += (" --quick" if s == type(s).quick() else "") + " --out report/"
    figures = [
        Figure(
            "plan_horizon.png",
            "Top-1 of x_{t+k} per offset k: the stacked readout of the baseline features with h_t (B + h) and without "
            "(B), the probe on h_t alone, the strongest single baseline, the model's own k-step foresight; below, "
            "what h_t adds ((B + h) - B, overall, by whether the 4-gram context was seen, and beyond longer context), "
            "95% bands over documents.",
            figures_cmd,
        )
    ]
    if causal.n_positions:
        plot_causal({name: causal_d}, folder / "plan_causal.png")
        figures.append(
            Figure(
                "plan_causal.png",
                "Knockout: loss increase at t+1 and t+2 when the positions after t cannot read one key (t, t-1, t-2 "
                "or a random sink-free earlier key) from layer l up.",
                figures_cmd,
            )
        )
    if causal.steering:
        plot_steering({name: causal_d}, folder / "plan_steering.png")
        figures.append(
            Figure(
                "plan_steering.png",
                "Steering h_t along the probe's direction for x_{t+k} vs a random direction, by added norm: the change "
                "of log p(x_{t+k}) at t+k, that change minus the one at t+1, and the share of greedy tokens at t+k "
                "that flip to x_{t+k}.",
                figures_cmd,
            )
        )
    shares = {
        k: share_of_gap(probe.per_position, causal.per_position, k, s.plan_n_boot) for k in settings.ceiling_offsets
    }
    numbers, intervals = _numbers(probe, causal, shares)
    verdict = _verdict(probe, causal, shares, ctx.corpus)
    return Finding(
        verdict,
        numbers=no_nan(numbers),
        intervals=intervals,
        figures=figures,
        commands=[
            figures_cmd,
            f"{extract_cmd}  # the store this section probes (shared with the Future Lens section)",
            "python -m benchmarks.plan_answer --quick  # the standalone answer run: both corpora, its own sizes",
        ],
        data={"probe": probe_d, "causal": causal_d, "share_of_gap": shares, "store_layers": layers},
    )


plan_answer.report_version = 2  # bump when the section's output changes (the cache key includes it)


def _numbers(probe, causal, shares) -> tuple[dict, dict]:
    numbers: dict = {
        "n_eval": probe.n_eval,
        "n_eval_documents": probe.n_eval_documents,
        "min_context": probe.min_context,
        "near_duplicates_removed": len(probe.near_duplicates_removed),
        "causal_positions": causal.n_positions,
        "causal_documents": causal.n_documents,
        "ceiling_positions": causal.n_ceiling_positions,
    }
    intervals: dict = {}

    def put(key: str, iv) -> None:
        numbers[key] = iv.estimate
        if iv.low == iv.low:  # NaN where nothing was resampled
            intervals[key] = [iv.low, iv.high]

    d = probe.discriminability
    if d:
        put("k1_model_top1", d["model_top1"])
        put("k1_model_minus_strongest", d["model_minus_strongest"])
    for k, head in probe.headline.items():
        numbers[f"k{k}_layer"] = head["layer"]
        numbers[f"k{k}_strongest_baseline"] = head["strongest"]
        put(f"k{k}_probe_top1", head["probe"])
        put(f"k{k}_strongest_top1", head["strongest_top1"])
        put(f"k{k}_probe_minus_strongest", head["excess"])
        st = head.get("stacked")
        if st:
            put(f"k{k}_B_top1", st["B"])
            put(f"k{k}_B_plus_h_top1", st["B+h"])
            put(f"k{k}_h_adds", st["excess"])
            put(f"k{k}_h_adds_beyond_long_context", st["excess_long"])
            for name, stratum in st["strata"].items():
                put(f"k{k}_h_adds_where_4gram_{name}", stratum["excess"])
                numbers[f"k{k}_share_4gram_{name}"] = stratum["share"]
    for k, iv in causal.ceiling.items():
        put(f"k{k}_ceiling_top1", iv)
    for k, sh in shares.items():
        if sh:
            numbers[f"k{k}_h_adds_on_ceiling_positions"] = sh["probe_minus_strongest"]
            numbers[f"k{k}_ceiling_minus_B_on_ceiling_positions"] = sh["ceiling_minus_strongest"]
    for cond, ivs in causal.knockout_vs_random.items():
        for j, iv in enumerate(ivs[:2], start=1):
            put(f"{cond}_minus_random_t+{j}", iv)
    for j, iv in enumerate(causal.knockout.get("embed_swap", [])[:2], start=1):
        put(f"embed_swap_t+{j}", iv)
    for row in causal.steering:
        at = f"steer_L{row['layer']}_k{row['offset']}_x{row['scale']:g}"
        put(f"{at}_probe_minus_random", row["probe_minus_random_at_target"])
        put(f"{at}_target_minus_next", row["target_minus_next"])
        put(f"{at}_flip", row["probe_flip"])
        put(f"{at}_random_flip", row["random_flip"])
    return numbers, intervals


def _verdict(probe, causal, shares, corpus: str) -> str:
    ks = sorted(probe.headline)
    ahead = [k for k in ks if k >= 2]
    stacked = {k: probe.headline[k]["stacked"] for k in ks if probe.headline[k].get("stacked")}
    parts = []
    d = probe.discriminability
    if d:
        parts.append(
            f"Setting: at k = 1 the model's own top-1 is {points(d['model_minus_strongest'])} points from the "
            f"strongest context baseline ({d['strongest']}) on these held-out positions: {d['words']}."
        )
    if stacked:
        above = [k for k in ahead if k in stacked and stacked[k]["excess"].low > 0]
        k0 = 2 if 2 in stacked else min(stacked)
        st = stacked[k0]
        tested = [k for k in ahead if k in stacked]
        if not above:
            carries = f"No measurable excess at any k >= 2 (k = {', '.join(map(str, tested))} tested)"
        else:
            carries = (
                f"Information beyond the context statistics at k = {', '.join(map(str, above))} (its interval "
                "excludes 0; a readout shows the information is present, not that the model uses it: see the "
                "causal tests below)"
            )
            if len(above) == 1 and len(tested) > 1 and above[0] != k0:
                # one interval of several at 95%, away from the offset asked about first: say it can be chance
                carries += (
                    f"; one of {len(tested)} offsets tested, each at 95%, so a lone interval above 0 can be chance"
                )
        parts.append(
            "Does h_t carry anything about later tokens beyond its context? "
            + carries
            + f". At k = {k0} a readout of the baseline features names x_(t+{k0}) {pct_interval(st['B'])} of the "
            f"time; adding h_t (layer {probe.headline[k0]['layer']}, chosen on validation) gives "
            f"{pct_interval(st['B+h'])}: h_t adds {points(st['excess'])} points ({sign_words(st['excess'])})"
            + "".join(
                f"; where the 4-gram context was {name} in training ({100 * v['share']:.0f}% of positions) "
                f"{points(v['excess'])}"
                for name, v in sorted(st["strata"].items(), reverse=True)
            )
            + f". Beyond longer context (the model's own next token and the 4-gram through it) h_t adds "
            f"{points(st['excess_long'])}. Over the horizon: "
            + "; ".join(f"k={k} {points(stacked[k]['excess'])}" for k in sorted(stacked))
            + f". The probe alone minus the strongest single baseline at k = {k0}: "
            f"{points(probe.headline[k0]['excess'])}. 95% intervals from a bootstrap over {probe.n_eval_documents} "
            f"held-out documents of {corpus} ({probe.n_eval:,} positions)."
        )
    if causal.ceiling:
        ceiling = "; ".join(f"k={k} {pct_interval(iv)}" for k, iv in sorted(causal.ceiling.items()))
        closes = [
            f"k={k} {sh['estimate']:.2f} [{sh['low']:.2f}, {sh['high']:.2f}]"
            for k, sh in sorted(shares.items())
            if sh and k >= 2 and sh["ceiling_minus_strongest"] > 0.01
        ]
        parts.append(
            f"The model's own k-step foresight (the ceiling, {causal.n_ceiling_positions} of these positions) "
            f"reaches {ceiling}"
            + (f"; the share of the gap from B to it that h_t closes: {'; '.join(closes)}" if closes else "")
            + "."
        )
    if causal.n_positions and causal.knockout_vs_random:
        lows = sorted({int(c.split("@")[1]) for c in causal.knockout_vs_random})
        words = []
        for low in lows:
            cells = []
            for label in ("t", "t-1", "t-2"):
                ivs = causal.knockout_vs_random.get(f"knockout_{label}@{low}")
                if ivs and len(ivs) > 1:
                    cells.append(f"{label} {ivs[1].estimate:+.3f} [{ivs[1].low:+.3f}, {ivs[1].high:+.3f}]")
            words.append(f"from layer {low}: " + ", ".join(cells))
        parts.append(
            "Used? Hiding one key from the positions after t, minus hiding a random sink-free earlier key at the same "
            f"layers, raises the loss at t+2 by (nats) {'; '.join(words)} ({causal.n_positions} positions, "
            f"{causal.n_documents} documents)."
        )
    if causal.steering:
        dose = []
        for row in sorted(causal.steering, key=lambda r: r["scale"]):
            tn, fl, rf = row["target_minus_next"], row["probe_flip"], row["random_flip"]
            dose.append(
                f"x{row['scale']:g}: {tn.estimate:+.3f} [{tn.low:+.3f}, {tn.high:+.3f}], flips "
                f"{100 * fl.estimate:.1f}% vs random {100 * rf.estimate:.1f}%"
            )
        row0 = causal.steering[0]
        parts.append(
            f"Steering h_t at layer {row0['layer']} along the probe's direction for y = x_(t+{row0['offset']}): the "
            f"change of log p(y) at t+{row0['offset']} minus the change at t+1, by dose (x the layer's spread): "
            + "; ".join(dose)
            + "."
        )
    return " ".join(parts)
