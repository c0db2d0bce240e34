"""The plan answer as a report section: does the state at t carry, and does the model use, information about
x_{t+k} beyond what the context already says?

The same library calls as `benchmarks/plan_answer.py`, on the Future Lens section's activation store (extracted
once, shared): `run_probes` (probes at every offset beside context-matched baselines; per offset the layer chosen
on validation and its excess over the strongest baseline, with a 95% interval from a bootstrap over held-out
documents), then `run_causal` at held-out positions early in their window (knockout of t's K/V against a random
earlier key, steering along the probe's direction against a random one, the model's own k-step ceiling), plotted
with `viz.plan`. Sizes follow `ctx.settings` (quick or full).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from forethought.report.builtin import future_store, no_nan, pct_interval, points, sign_words
from forethought.report.context import ReportContext, q
from forethought.report.finding import Figure, Finding

HORIZON = 4  # knockout losses at t+1 .. t+4 (the causal module's default)


def _causal_layers(layers: list[int]) -> tuple[int, ...]:
    """Knockout from the first layer (all layers), from the middle stored layer and from a late one."""
    picks = {layers[0], layers[len(layers) // 2], layers[-2] if len(layers) > 2 else layers[-1]}
    return tuple(sorted(picks))


def plan_answer(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.causal import CausalSettings, run_causal
    from forethought.experiments.probe_file import load_probe_folder
    from forethought.experiments.probes import run_probes
    from forethought.viz.plan import plot_causal, plot_horizon, share_of_gap

    s, lm = ctx.settings, ctx.lm()
    store, layers, window, extract_cmd = future_store(ctx)
    offsets = sorted(k for k in s.plan_offsets if k < window - HORIZON - 2)
    with tempfile.TemporaryDirectory() as saved:  # the fitted maps: steering reads its directions from them
        probe = run_probes(
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
        )
        maps = load_probe_folder(saved, lm.config.d_model)
        # steer at the layer the probe reads x_{t+2} best from (chosen on validation)
        steer_offsets = tuple(k for k in s.plan_steer_offsets if k in offsets and k <= HORIZON + 1)
        steer_layer = probe.headline[steer_offsets[0] if steer_offsets else offsets[0]]["layer"]
        if steer_layer == lm.config.n_layers - 1:  # the last block's output feeds no attention: nothing to steer
            steer_layer = max((lay for lay in layers if lay < steer_layer), default=steer_layer)
        max_prefix = min(s.plan_max_prefix, window - HORIZON - 2)
        evaluation = probe.per_position["evaluation"]
        early = evaluation[(evaluation % window >= 2) & (evaluation % window <= max_prefix)]
        positions = np.sort(np.random.default_rng(0).permutation(early)[: s.plan_positions])
        settings = CausalSettings(
            horizon=HORIZON,
            from_layers=_causal_layers(layers),
            steer_layers=(steer_layer,),
            steer_offsets=steer_offsets,
            ceiling_offsets=tuple(k for k in s.plan_ceiling_offsets if k in offsets),
            rollouts=s.plan_rollouts,
            max_prefix=max_prefix,
            ceiling_positions=s.plan_ceiling_positions,
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
            "Top-1 of x_{t+k} per offset k: the probe (layer chosen on validation), the strongest context baseline, "
            "the model's own k-step marginal; below, the probe's excess over the baseline, 95% bands over documents.",
            figures_cmd,
        )
    ]
    if causal.n_positions:
        plot_causal({name: causal_d}, folder / "plan_causal.png")
        figures.append(
            Figure(
                "plan_causal.png",
                "Knockout: loss increase at t+j when later positions cannot read t's K/V (from layer l up), vs a "
                "random earlier key and a swapped embedding. Steering: change of log p(x_{t+k}) along the probe's "
                "direction vs a random one of the same norm.",
                figures_cmd,
            )
        )
    shares = {}
    for k in settings.ceiling_offsets:
        head = probe.headline[k]
        wanted = ("evaluation", f"probe@{k}", f"{head['strongest']}@{k}")
        per_probe = {key: v for key, v in probe.per_position.items() if key in wanted}
        shares[k] = share_of_gap(per_probe, causal.per_position, k, s.plan_n_boot)
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


plan_answer.report_version = 1  # bump when the section's output changes (the cache key includes it)


def _numbers(probe, causal, shares) -> tuple[dict, dict]:
    numbers: dict = {
        "n_eval": probe.n_eval,
        "n_eval_documents": probe.n_eval_documents,
        "near_duplicates_removed": len(probe.near_duplicates_removed),
        "causal_positions": causal.n_positions,
        "causal_documents": causal.n_documents,
    }
    intervals: dict = {}

    def put(key: str, iv) -> None:
        numbers[key] = iv.estimate
        if iv.low == iv.low:  # NaN where nothing was resampled
            intervals[key] = [iv.low, iv.high]

    for k, head in probe.headline.items():
        numbers[f"k{k}_layer"] = head["layer"]
        numbers[f"k{k}_strongest_baseline"] = head["strongest"]
        put(f"k{k}_probe_top1", head["probe"])
        put(f"k{k}_strongest_top1", head["strongest_top1"])
        put(f"k{k}_excess_top1", head["excess"])
    for k, iv in causal.ceiling.items():
        put(f"k{k}_ceiling_top1", iv)
    for k, sh in shares.items():
        if sh:
            numbers[f"k{k}_probe_minus_strongest_on_ceiling_positions"] = sh["probe_minus_strongest"]
            numbers[f"k{k}_ceiling_minus_strongest_on_ceiling_positions"] = sh["ceiling_minus_strongest"]
    for cond, ivs in causal.knockout_vs_random.items():
        for j, iv in enumerate(ivs[:2], start=1):
            put(f"{cond}_minus_random_t+{j}", iv)
    for j, iv in enumerate(causal.knockout.get("embed_swap", [])[:2], start=1):
        put(f"embed_swap_t+{j}", iv)
    for row in causal.steering:
        at = f"steer_L{row['layer']}_k{row['offset']}"
        put(f"{at}_probe_minus_random", row["probe_minus_random_at_target"])
        put(f"{at}_target_minus_next", row["target_minus_next"])
    return numbers, intervals


def _verdict(probe, causal, shares, corpus: str) -> str:
    ks = sorted(probe.headline)
    ahead = [k for k in ks if k >= 2]
    above = [k for k in ahead if probe.headline[k]["excess"].low > 0]
    below = [k for k in ahead if probe.headline[k]["excess"].high < 0]
    k0 = 2 if 2 in probe.headline else ks[0]
    head = probe.headline[k0]
    carries = f"Yes, at k = {', '.join(map(str, above))}" if above else "No measurable excess at any k >= 2"
    parts = [
        f"Carries beyond the context? {carries}. At k = {k0} a linear probe on layer {head['layer']}'s state (chosen "
        f"on validation) names x_(t+{k0}) {pct_interval(head['probe'])} of the time, the strongest baseline that sees "
        f"the same context ({head['strongest']}) {pct_interval(head['strongest_top1'])}: an excess of "
        f"{points(head['excess'])} points, {sign_words(head['excess'])}. Over the horizon the excess is "
        + "; ".join(f"k={k} {points(probe.headline[k]['excess'])}" for k in ks)
        + f" ({len(below)} of {len(ahead)} offsets >= 2 below zero). 95% intervals from a bootstrap over "
        f"{probe.n_eval_documents} held-out documents of {corpus} ({probe.n_eval:,} positions; "
        f"{len(probe.near_duplicates_removed)} near-copies of training documents removed)."
    ]
    if causal.ceiling:
        ceiling = "; ".join(f"k={k} {pct_interval(iv)}" for k, iv in sorted(causal.ceiling.items()))
        n = causal.settings.get("ceiling_positions") or causal.n_positions
        parts.append(
            f"The model's own k-step prediction (the ceiling, on {min(n, causal.n_positions)} early positions) "
            f"reaches {ceiling}"
            + "".join(
                f"; there, at k={k}, the probe is {100 * sh['probe_minus_strongest']:+.1f} and the ceiling "
                f"{100 * sh['ceiling_minus_strongest']:+.1f} points from the strongest baseline"
                for k, sh in shares.items()
                if sh and k >= 2
            )
            + "."
        )
    if causal.n_positions:
        first = min(causal.knockout_vs_random, key=lambda c: int(c.split("@")[1]))
        ko = causal.knockout_vs_random[first]
        later = {c: ivs for c, ivs in causal.knockout_vs_random.items() if c != first and len(ivs) > 1}
        layered = [c.split("@")[1] for c, ivs in later.items() if ivs[1].low > 0]
        swap = causal.knockout.get("embed_swap")
        parts.append(
            f"Used? Blocking later positions from reading t's K/V at every layer raises their loss by "
            f"{ko[0].estimate:+.3f} [{ko[0].low:+.3f}, {ko[0].high:+.3f}] nats at t+1 and "
            f"{ko[1].estimate:+.3f} [{ko[1].low:+.3f}, {ko[1].high:+.3f}] at t+2 more than blocking a random earlier "
            f"key ({causal.n_positions} positions, {causal.n_documents} documents); blocked only from a later "
            "layer up, "
            + (
                f"the t+2 effect stays above zero from layer(s) {', '.join(layered)}"
                if layered
                else "the t+2 effect is not above zero"
            )
            + (_swap_words(swap[1], causal.knockout[first][1]) if swap and len(swap) > 1 else "")
            + "."
        )
    for row in causal.steering:
        pr, tn = row["probe_minus_random_at_target"], row["target_minus_next"]
        parts.append(
            f"Steering h_t at layer {row['layer']} along the probe's direction for y = x_(t+{row['offset']}) changes "
            f"log p(y) at t+{row['offset']} by {pr.estimate:+.3f} [{pr.low:+.3f}, {pr.high:+.3f}] nats more than a "
            f"random direction of the same norm ({sign_words(pr)}; n = {row['n']}), and by {tn.estimate:+.3f} "
            f"[{tn.low:+.3f}, {tn.high:+.3f}] more than at t+1."
        )
    steered = [row for row in causal.steering if row["probe_minus_random_at_target"].low > 0]
    parts.append(
        "In short: "
        + (
            f"h_t holds information about later tokens beyond its context at k = {', '.join(map(str, above))}"
            if above
            else "h_t holds no measurable information about tokens 2 or more ahead beyond what the strongest "
            "statistics of the same context get"
        )
        + "; "
        + (
            "adding the probe's direction moves the token k ahead more than a random direction does, so the model "
            "uses it"
            if steered
            else "no test here shows the model using a plan: steering along the probe's direction does not move the "
            "token k ahead more than a random direction"
            if causal.steering
            else "no steering was measured"
        )
        + "."
    )
    return " ".join(parts)


def _swap_words(swap, knockout) -> str:
    """The embedding-swap control against the full knockout at t+2: how much of what later positions read from t's
    column is the token itself."""
    text = (
        f". Keeping t's K/V but computing them from another token costs {swap.estimate:+.3f} "
        f"[{swap.low:+.3f}, {swap.high:+.3f}] at t+2, against {knockout.estimate:+.3f} for the full knockout"
    )
    if swap.low > 0 and swap.estimate >= 0.5 * knockout.estimate > 0:
        text += ": what later positions read there is largely the token itself, which the context baselines see too"
    return text
