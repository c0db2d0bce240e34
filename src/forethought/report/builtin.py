"""The sections for the experiments in this install. Each one calls the library's experiment function,
plots with the library's own plot function, and presents the result object as a Finding: no numbers are
computed here that the experiment does not already report (save the 95% intervals of accuracies)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from forethought.errors import ForethoughtError
from forethought.format import interval, number, percent, size
from forethought.report.context import ReportContext, q
from forethought.report.finding import Figure, Finding, Unavailable, is_value


def no_nan(numbers: dict) -> dict:
    """NaN (a quantity that is undefined here, e.g. a decay length where no exponential fits) as None: JSON null,
    and equal to itself when a cached report is compared with a fresh one."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in numbers.items()}


# ------------------------------------------------------------------------------------------------ equivalence


def equivalence(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.equivalence import equivalence as run
    from forethought.viz.claims import plot_equivalence

    s, lm = ctx.settings, ctx.lm()
    result = run(lm.model, lm.tokenizer.encode(s.prompt), s.equivalence_steps, lm.name)
    plot_equivalence(result, folder / "equivalence.png")
    m = result.summary()
    flops = m["flops_recompute_total"] / m["flops_cached_total"]
    seconds = m["seconds_recompute_total"] / max(m["seconds_cached_total"], 1e-12)
    same = "the same" if m["identical_tokens"] else "DIFFERENT"
    verdict = (
        f"{'Yes' if m['identical_tokens'] else 'No'}: generating {m['n_steps']} greedy tokens with the KV cache "
        f"and by recomputing the whole prefix gives "
        f"{same} tokens; the logits differ by at most {m['logits_max_abs']:.2g} (relative {m['logits_max_rel']:.1g}) "
        f"and the residual stream by {m['resid_max_abs']:.2g}, float rounding. The cache is only a saving: "
        f"recomputing costs {flops:.1f}x the FLOPs and took {seconds:.1f}x the time."
    )
    cmd = f"forethought equivalence {q(s.prompt)} -n {s.equivalence_steps}{ctx.model_flag()} --plot equivalence.png"
    return Finding(
        verdict,
        numbers=m | {"flops_ratio": flops, "time_ratio": seconds},
        figures=[Figure("equivalence.png", "Per step: max |cached - recomputed| and the cost of each way.", cmd)],
        commands=[cmd],
        data=result.to_dict(),
    )


# ------------------------------------------------------------------------------------------------- invariance

SHORT, LONGER = "Once upon a", "Once upon a time"


def invariance(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.invariance import extending_ids
    from forethought.experiments.invariance import invariance as run
    from forethought.viz.claims import plot_invariance

    lm = ctx.lm("float64")  # float32 rounding differs with sequence length; float64 separates it from a change
    try:
        short_ids, longer_ids = extending_ids(lm.tokenizer, SHORT, LONGER)
        causal = run(lm.model, short_ids, longer_ids, causal=True, model_name=lm.name)
        control = run(lm.model, short_ids, longer_ids, causal=False, model_name=lm.name)
    finally:
        ctx.release("float64")
    plot_invariance([causal, control], folder / "invariance.png")
    held = "unchanged" if causal.unchanged else "CHANGED"
    failed = "changes them" if not control.unchanged else "does NOT change them (the control did not fail)"
    verdict = (
        f"{'Yes' if causal.unchanged else 'No'}: appending tokens leaves the {causal.n_shared} earlier columns "
        f"{held} at every layer "
        f"(max |diff| {causal.worst_abs:.2g}, relative {causal.worst_rel:.1g}, in {causal.dtype}). The control, "
        f"the same model without its causal mask, {failed}: max |diff| {control.worst_abs:.3g}. So a token's "
        "column is computed once and never revised; anything 'carried' forward lives in those fixed columns."
    )
    cmd = f"forethought invariance {q(SHORT)} {q(LONGER)}{ctx.model_flag()} --plot invariance.png"
    return Finding(
        verdict,
        numbers={
            "causal_max_abs": causal.worst_abs,
            "causal_max_rel": causal.worst_rel,
            "causal_unchanged": causal.unchanged,
            "control_max_abs": control.worst_abs,
            "control_unchanged": control.unchanged,
            "shared_columns": causal.n_shared,
        },
        figures=[Figure("invariance.png", "Max |diff| of the earlier columns per layer: causal vs no mask.", cmd)],
        commands=[cmd, cmd.replace(" --plot invariance.png", " --bidirectional")],
        data={"causal": causal.to_dict(), "control": control.to_dict()},
    )


# ------------------------------------------------------------------------------------------------- state size


def state_size(ctx: ReportContext, folder: Path) -> Finding:
    import inspect
    import json as json_module

    from forethought.experiments.state_size import named_configs
    from forethought.experiments.state_size import state_size as run
    from forethought.viz.claims import plot_state_size

    s, lm = ctx.settings, ctx.lm()
    # The same real text as `forethought state-size`: the JSON decoder's source, repeated.
    ids = lm.tokenizer.encode(inspect.getsource(json_module.decoder))
    ids = (ids * (1 + 1024 // max(len(ids), 1)))[:1024]
    result = run(lm.model, ids, list(s.state_tokens), named_configs(None), lm.name)
    plot_state_size(result, folder / "state_size.png")
    c = result.loaded
    longest = result.tokens[-1]
    recurrent = max(c.recurrent_bytes.items(), key=lambda kv: kv[1])
    crossover = -(-recurrent[1] // c.bytes_per_token)
    verdict = (
        f"It grows linearly: {size(c.bytes_per_token)} of K and V per token ({c.n_layers} layers x "
        f"{c.n_kv_heads} KV heads x {c.head_dim} x 2, {result.dtype}), {size(c.kv_bytes[-1])} at {longest:,} "
        f"tokens; the measured cache {'matches' if result.measured_matches_formula else 'DIFFERS FROM'} that "
        f"formula. A recurrent state of the same width is fixed: the largest here, {recurrent[0]}, is "
        f"{size(recurrent[1])}, which the KV cache passes after {crossover:,} tokens."
    )
    tokens = ",".join(map(str, s.state_tokens))
    cmd = f"forethought state-size --tokens {tokens}{ctx.model_flag()} --plot state_size.png"
    return Finding(
        verdict,
        numbers={
            "bytes_per_token": c.bytes_per_token,
            f"kv_bytes_at_{longest}": c.kv_bytes[-1],
            "measured_matches_formula": result.measured_matches_formula,
            "largest_recurrent_bytes": recurrent[1],
            "crossover_tokens": crossover,
        },
        figures=[Figure("state_size.png", "KV-cache bytes vs tokens, against fixed recurrent states.", cmd)],
        commands=[cmd],
        data=result.to_dict(),
    )


# ------------------------------------------------------------------------------------------------------- lens


def logit_lens(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.lens import run_logit_lens as run
    from forethought.model.sampling import SamplingParams
    from forethought.viz.claims import plot_logit_lens

    s, lm = ctx.settings, ctx.lm()
    params = SamplingParams(temperature=0.0)
    result = run(lm.model, lm.tokenizer.encode(s.prompt), s.lens_steps, 5, params, lm.tokenizer.token_str, lm.name)
    plot_logit_lens(result, folder / "lens.png")
    # The first layer from which the lens's top-1 is the final layer's top-1 for good, per prompt position.
    n_layers, settle = len(result.layers), []
    for p in range(len(result.prompt_ids)):
        final = result.top_ids[-1][p][0]
        layer = n_layers - 1
        while layer > 0 and result.top_ids[layer - 1][p][0] == final:
            layer -= 1
        settle.append(layer)
    settle_median = sorted(settle)[len(settle) // 2]
    steps = result.steps
    chosen = sum(st.chosen_prob for st in steps) / max(len(steps), 1)
    runner_up = sum(st.top_probs[1] for st in steps if len(st.top_probs) > 1) / max(len(steps), 1)
    entropy = sum(st.entropy_bits for st in steps) / max(len(steps), 1)
    live = sum(1 for st in steps if len(st.top_probs) > 1 and st.top_probs[1] >= 0.1)
    verdict = (
        f"The logit lens shows the final prediction settling {'late' if settle_median > n_layers / 2 else 'early'}: "
        f"the last layer's top token becomes and stays "
        f"the top token from layer {settle_median} of {n_layers} (median over {len(settle)} prompt positions). "
        f"The text hides alternatives: over {len(steps)} greedy steps the chosen token had mean probability "
        f"{chosen:.2f}, the runner-up {runner_up:.2f} (>= 0.10 at {live} of {len(steps)} steps), and the model's "
        f"distribution {entropy:.2f} bits of entropy; a sampled text shows one of these per step."
    )
    cmd = f"forethought lens {q(s.prompt)} -n {s.lens_steps} --temperature 0{ctx.model_flag()} --plot lens.png"
    return Finding(
        verdict,
        numbers={
            "settle_layer_median": settle_median,
            "n_layers": n_layers,
            "chosen_prob_mean": chosen,
            "runner_up_prob_mean": runner_up,
            "steps_with_runner_up_ge_0.1": live,
            "entropy_bits_mean": entropy,
        },
        figures=[Figure("lens.png", "Logit lens per layer and position; the alternatives at each step.", cmd)],
        commands=[cmd],
        data=result.to_dict(),
    )


# ------------------------------------------------------------------------------------------------ future lens


def spaced_layers(n_layers: int, count: int) -> list[int]:
    """`count` evenly spaced block indices from 0 to the last."""
    if count >= n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)}) if count > 1 else [n_layers - 1]


def future_store(ctx: ReportContext):
    """The Future Lens activation store (extracted on first use, resumed or reused after): (store, layers, window,
    the shell command that makes it). The plan section probes the same store."""
    from forethought.data.store import ActivationStore
    from forethought.experiments.future import run_extract

    s, lm = ctx.settings, ctx.lm()
    layers = spaced_layers(lm.config.n_layers, s.future_layers)
    window = min(s.future_window, lm.config.context_length)
    # The store is an input, kept beside the result cache and keyed like it: a rerun resumes or reuses it.
    key = {"model": ctx.model_identity(), "corpus": ctx.corpus, "tokens": s.future_tokens, "layers": layers}
    key |= {"window": window, "doc_tokens": s.future_doc_tokens, "test_fraction": s.future_test_fraction}
    float16 = lm.model.family.residual_fits_float16  # half the disk where the values fit
    if not float16:
        key["float16"] = False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    store_dir = ctx.work_dir / "stores" / f"future-{digest}"
    run_extract(
        lm,
        ctx.corpus,
        store_dir,
        layers,
        tokens=s.future_tokens,
        window=window,
        float16=float16,
        max_doc_tokens=s.future_doc_tokens,
        test_fraction=s.future_test_fraction,
        progress=False,
    )
    layer_list = ",".join(map(str, layers))
    cmd = (
        f"forethought extract --corpus {q(ctx.corpus)} --tokens {s.future_tokens} --layers {layer_list} "
        f"--window {window} --max-doc-tokens {s.future_doc_tokens} --test-fraction {s.future_test_fraction}"
        f"{' --float16' if float16 else ''}{ctx.model_flag()} --out store/"
    )
    return ActivationStore(store_dir), layers, window, cmd


def points(iv, digits: int = 1) -> str:
    """An excess (a difference of top-1 rates) in percentage points with its interval: +1.2 [-0.3, +2.6]."""
    return interval(iv, digits, sign=True)


def pct_interval(iv) -> str:
    return interval(iv, unit="%")


def sign_words(iv) -> str:
    """Where a 95% interval lies against zero, in words."""
    if iv.low > 0:
        return "above zero"
    if iv.high < 0:
        return "below zero"
    return "consistent with zero"


def future_lens(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.probes import run_probes
    from forethought.viz.future import plot_heatmap

    s, lm = ctx.settings, ctx.lm()
    store, layers, window, extract_cmd = future_store(ctx)
    offsets = list(range(1, s.future_offsets + 1))
    result = run_probes(
        store, lm.model, offsets, layers, eval_tokens=s.future_eval_tokens, save_dir=None, progress=False
    )
    plot_heatmap(result, folder / "future_top1.png", "top1")
    k = 2 if 2 in offsets else offsets[-1]
    head = result.headline[k]  # the probe at the layer chosen on validation, against the strongest context baseline
    probe, base, excess = head["probe"], head["strongest_top1"], head["excess"]
    best_lens = max((c for c in result.cells if c.offset == k), key=lambda c: c.lens.top1)
    control = max(c.probe_control.top1 for c in result.cells if c.offset == k)
    verdict = (
        f"{'Yes, a little' if excess.low > 0 else 'Not beyond the context'}: a linear probe on layer {head['layer']}'s "
        f"state (chosen on validation documents) names the token {k} ahead {pct_interval(probe)} of the time, the "
        f"strongest baseline that sees the same context ({head['strongest']}) {pct_interval(base)}: an excess of "
        f"{points(excess)} points, {sign_words(excess)} (95% intervals from a bootstrap over "
        f"{result.n_eval_documents} held-out documents; {len(result.near_duplicates_removed)} near-copies of "
        f"training documents removed). The Future Lens map to the final state reaches {percent(best_lens.lens.top1)} "
        f"at its best layer ({best_lens.layer}, picked on the held-out tokens, so optimistic); the probe fitted on "
        f"shuffled targets (the control) {percent(control)}. Trained on {result.n_train:,} positions of {ctx.corpus}, "
        f"scored on {result.n_eval:,} held-out positions, layers {layers}, offsets {offsets}."
    )
    cmd = (
        f"{extract_cmd} && forethought probe --store store/ "
        f"--offsets 1-{offsets[-1]} --eval-tokens {s.future_eval_tokens} --plot future_top1.png"
    )
    numbers = {
        "offset": k,
        "layer_chosen_on_validation": head["layer"],
        "probe_top1": probe.estimate,
        "strongest_baseline": head["strongest"],
        "strongest_baseline_top1": base.estimate,
        "excess_top1": excess.estimate,
        "control_top1": control,
        "lens_top1_best_layer": best_lens.lens.top1,
        "n_train": result.n_train,
        "n_eval": result.n_eval,
        "n_eval_documents": result.n_eval_documents,
        "near_duplicates_removed": len(result.near_duplicates_removed),
    }
    intervals = {
        "probe_top1": [probe.low, probe.high],
        "strongest_baseline_top1": [base.low, base.high],
        "excess_top1": [excess.low, excess.high],
    }
    return Finding(
        verdict,
        numbers=numbers,
        intervals=intervals,
        figures=[Figure("future_top1.png", "Held-out top-1 per layer and offset: probe, lens, controls.", cmd)],
        commands=[cmd],
        data=result.to_dict(),
    )


# ---------------------------------------------------------------------------------------------------- anatomy


def anatomy(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.anatomy import anatomy as run
    from forethought.experiments.anatomy import corpus_documents, permuted_weights
    from forethought.viz.anatomy import plot_anatomy

    s, lm = ctx.settings, ctx.lm()
    length = min(s.anatomy_length, lm.config.context_length)
    docs, described = corpus_documents(lm.tokenizer, ctx.corpus, s.anatomy_docs, length)
    control = permuted_weights(lm.model)  # the real weights' scales, no learned arrangement (as the command does)
    result = run(lm.model, docs, None, 16, "unit", control, model_name=lm.name, corpus=described)
    paths = plot_anatomy(result, folder)
    cmd = f"forethought anatomy --corpus {q(ctx.corpus)} --docs {s.anatomy_docs} --length {length}"
    cmd += f"{ctx.model_flag()} --plot-dir anatomy/"
    captions = {
        "anatomy_shares.png": "Share of a column's variance: position, token, slow (neighbours), document.",
        "anatomy_cosine.png": "Cosine of states d positions apart, per layer; a decay length only where one fits.",
        "anatomy_pca.png": "Two principal components of one document's states at a few layers.",
    }
    summary = result.summary()
    slow = next(lay for lay in result.layers if lay.layer == summary["slow_share_max_layer"])
    numbers = summary | {
        "causal_slow_share_at_that_layer": slow.causal_slow_share,
        "decay_fit_r2_at_that_layer": slow.decay_fit_r2,
        "d_e_at_that_layer": slow.d_e,
    }
    data = result.to_dict()
    data.pop("pca", None)  # point clouds: in the figure, too bulky for report.json
    return Finding(
        _anatomy_words(result, summary, slow),
        numbers=no_nan(numbers),
        figures=[Figure(p.name, captions.get(p.name, p.stem), cmd) for p in paths],
        commands=[cmd],
        data=data,
    )


def _anatomy_words(result, s: dict, slow) -> str:
    """The experiment's own verdict, with the causal (past-only) slow part and the decay as measured."""
    from forethought.trace import split_name

    def where(name: str) -> str:
        return "the embedding" if name == "embed" else f"after block {split_name(name)[0]}"

    control = s.get("random_slow_share_at_that_layer")
    if not math.isnan(slow.tau):
        decay = (
            f"it decays like one exponential, tau ≈ {slow.tau:.0f} positions (fit R^2 {slow.decay_fit_r2:.2f}), "
            f"to a plateau of {slow.plateau:.2f}"
        )
    else:
        reach = f"first falls to 1/e at d = {slow.d_e}" if slow.d_e else f"stays above 1/e up to d = {len(slow.cosine)}"
        decay = f"no single exponential describes its decay (fit R^2 {slow.decay_fit_r2:.2f}); it {reach}"
    pos_layer, slow_layer = where(s["position_share_max_layer"]), where(s["slow_share_max_layer"])
    permuted = f", the model with permuted weights {control:.1%}" if control is not None else ""
    return (
        f"Position part: at most {s['position_share_max']:.1%} of the variance ({pos_layer}; "
        f"{s['position_shuffled_at_that_layer']:.1%} with positions shuffled, the control); per position it is "
        f"{s['position_profile_first_max']:.0%} of the variance at position 1 and a median "
        f"{s['position_profile_late_median']:.1%} at positions >= 16. Slow part: the neighbours within "
        f"±{result.window // 2} positions explain up to {s['slow_share_max']:.1%} ({slow_layer}; shuffled "
        f"{s['slow_shuffled_at_that_layer']:.1%}, whole-document mean {s['document_share_at_that_layer']:.1%}"
        f"{permuted}), and the {result.window} previous positions alone, what the past could carry, "
        f"{slow.causal_slow_share:.1%}. The cosine of states 1 apart is {s['cos1_at_that_layer']:.2f} there; "
        f"{decay}. Current token: {s['token_share_embed']:.0%} of the variance at the embedding, "
        f"{s['token_share_last']:.0%} at the last layer. Shares are out-of-sample R^2 over {result.n_docs} "
        f"documents x {result.length} tokens (position 0, an attention sink of norm {result.position0_norm:.3g} "
        f"vs {result.other_norm:.3g}, left out)."
    )


# ----------------------------------------------------------------------------------------------------- revise

OFF_PLAN = " dragon"
REVISE_AT = 3


def _revise_words(result, tok) -> str:
    s = result.summary()
    rejoin = (
        f"rejoins the original text at step {s['rejoin_step']} (shift {s['rejoin_shift']:+d})"
        if s["rejoined"]
        else f"does not rejoin the original within {result.n_after} steps"
    )
    return (
        f"after {tok.token_str(result.off_plan_id)!r} (p = {result.off_plan_prob:.2g}, instead of "
        f"{tok.token_str(result.greedy_id)!r}, p = {result.greedy_prob:.2g}) the continuation agrees with the "
        f"original's top-1 at {s['top1_agreement_after']:.0%} of steps (mean KL {s['kl_after_mean']:.2g} nats) and "
        f"{rejoin}; had the text gone on exactly as before with only that token swapped, the predictions would agree "
        f"at {s['top1_agreement_substituted_after']:.0%} of steps, KL {s['kl_substituted_first_after']:.2g} nats at "
        f"the first step and {s['kl_substituted_last_after']:.2g} at the last"
    )


def revise(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.experiments.revise import revise as run
    from forethought.experiments.revise import single_token
    from forethought.viz.anatomy import plot_revise

    s, lm = ctx.settings, ctx.lm()
    tok = lm.tokenizer
    ids = tok.encode(s.prompt)
    stops = (tok.eos_id,) if tok.eos_id is not None else ()
    base = f"forethought revise {q(s.prompt)} --at {REVISE_AT} -n {s.revise_steps}{ctx.model_flag()}"
    runs = []
    try:  # an implausible token, forced, vs a plausible one: the runner-up (cold sampling without the greedy token)
        forced = {"force_id": single_token(tok, OFF_PLAN)}
        runs.append(("implausible", forced, f"{base} --force {q(OFF_PLAN)}"))
    except ForethoughtError:  # the tokenizer splits it: sample one at temperature 1 instead
        runs.append(("implausible", {"temperature": 1.0, "seed": 0}, f"{base} --temperature 1 --seed 0"))
    runs.append(("plausible", {"temperature": 0.05, "seed": 0}, f"{base} --temperature 0.05 --seed 0"))
    results, figures = {}, []
    for name, how, cmd in runs:
        result = run(lm.model, ids, REVISE_AT, s.revise_steps, stop_ids=stops, model_name=lm.name, **how)
        cmd += f" --plot revise_{name}.png"
        plot_revise(result, folder / f"revise_{name}.png", tok.token_str)
        off = tok.token_str(result.off_plan_id)
        caption = f"Off-plan {off!r} ({name}): what changed, KL to the original and top-1 agreement per step."
        figures.append(Figure(f"revise_{name}.png", caption, cmd))
        results[name] = result
    first = next(iter(results.values()))
    causal = max(r.causal_max_diff for r in results.values())
    words = "; ".join(f"{name}: {_revise_words(r, tok)}" for name, r in results.items())
    verdict = (
        f"Nothing before the off-plan token can change (max |diff| of earlier columns {causal:.2g}); from it on, "
        f"the model continues from the text it now has: {words}. One prompt and one off-plan token per condition, "
        "so these are examples, without intervals."
    )
    numbers = {"causal_max_diff": causal, "at": first.at}
    for name, r in results.items():
        sm = r.summary()
        numbers |= {
            f"{name}_off_plan": tok.token_str(r.off_plan_id),
            f"{name}_top1_agreement_after": sm["top1_agreement_after"],
            f"{name}_kl_after_mean": sm["kl_after_mean"],
            f"{name}_rejoined": sm["rejoined"],
            f"{name}_rejoin_step": sm["rejoin_step"],
            f"{name}_off_plan_prob": r.off_plan_prob,
            f"{name}_top1_agreement_substituted_after": sm["top1_agreement_substituted_after"],
            f"{name}_kl_substituted_last_after": sm["kl_substituted_last_after"],
        }
    return Finding(
        verdict,
        numbers=numbers,
        figures=figures,
        commands=[f.command for f in figures],
        data={name: r.to_dict() for name, r in results.items()},
    )


# ------------------------------------------------------------------------------------------ a second model


def compare_file(ctx: ReportContext) -> Path:
    """The other report's report.json, checked to be one (`read_compare`)."""
    path = Path(ctx.compare)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise ForethoughtError(f"--compare {ctx.compare}: no report.json there (run forethought report on it first)")
    read_compare(path)
    return path


def read_compare(path: Path) -> dict:
    """Another model's report.json, with the fields the side-by-side reads checked: one line when it is not one."""

    def bad(what: str) -> ForethoughtError:
        return ForethoughtError(f"--compare {path}: not a forethought report.json ({what})")

    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise bad(f"unreadable JSON: {type(e).__name__}") from None
    meta = other.get("meta") if isinstance(other, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise bad("no meta.model object")
    if not isinstance(meta["model"].get("name"), str) or not meta["model"]["name"]:
        raise bad("meta.model.name is not a name")
    for key in ("mode", "started"):
        if not isinstance(meta.get(key), str):
            raise bad(f"meta.{key} is not a string")
    sections = other.get("sections")
    if not isinstance(sections, list):
        raise bad("'sections' is not a list")
    for i, section in enumerate(sections):
        if not isinstance(section, dict) or not isinstance(section.get("key"), str):
            raise bad(f"sections[{i}] has no string 'key'")
        numbers = {} if section.get("numbers") is None else section["numbers"]
        if not isinstance(numbers, dict) or not all(is_value(v) for v in numbers.values()):
            raise bad(f"sections[{i}] ({section['key']}): 'numbers' is not a map of numbers")
    return other


def second_model(ctx: ReportContext, folder: Path) -> Finding:
    """This report's numbers beside another model's report (`--compare`), section by section."""
    other = read_compare(compare_file(ctx))
    other_name = other["meta"]["model"]["name"]
    mine = {key: finding.numbers for key, finding in ctx.findings.items()}  # this run's sections so far
    numbers, both = {}, []
    for section in other["sections"]:
        theirs = section.get("numbers") or {}
        here = mine.get(section["key"], {})
        shared = [k for k in theirs if k in here]
        if shared:
            both.append(section["key"])
        for k in shared:
            numbers[f"{section['key']}.{k}"] = f"{number(here[k])} vs {number(theirs[k])}"
    if not both:
        raise Unavailable(f"{other_name}'s report shares no answered section with this one")
    verdict = (
        f"Side by side with {other_name} ({other['meta']['mode']} run, {other['meta']['started']}): "
        f"{len(both)} questions answered on both ({', '.join(both)}). Each row reads this model's value vs "
        f"{other_name}'s; its own report has the verdicts and figures."
    )
    return Finding(verdict, numbers=numbers, commands=[f"forethought report --model {q(other_name)} --out OTHER/"])
