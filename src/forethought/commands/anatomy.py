"""`forethought anatomy` (position part vs slowly evolving memory) and `forethought revise` (plan revision
after an off-plan token)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from forethought.commands.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PlotOpt,
    app,
    console,
    err_console,
    load,
    parse_int_list,
    progress_bar,
)
from forethought.errors import ForethoughtError
from forethought.format import percent
from forethought.paths import output_dir, output_file, writing


@app.command()
def anatomy(
    corpus: Annotated[
        str, typer.Option("--corpus", help="'stdlib', a text file, a folder, or a .jsonl file.")
    ] = "stdlib",
    docs: Annotated[int, typer.Option("--docs", help="Documents to analyse.")] = 64,
    length: Annotated[int, typer.Option("--length", help="First tokens of each document.")] = 128,
    layers: Annotated[str | None, typer.Option("--layers", help="Block indices, e.g. 0,5,10 (default: all).")] = None,
    window: Annotated[int, typer.Option("--window", help="Low-pass window in positions (neighbours ±window/2).")] = 16,
    normalize: Annotated[str, typer.Option("--normalize", help="unit (each state to norm 1) or none.")] = "unit",
    random_control: Annotated[
        bool,
        typer.Option(
            "--random-control/--no-random-control", help="Also analyse the model with its block weights permuted."
        ),
    ] = True,
    plot_dir: Annotated[Path | None, typer.Option("--plot-dir", help="Write PNG plots into this folder.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Is a column a position part that changes a lot plus a memory part that changes slowly?"""
    from forethought.experiments.anatomy import anatomy as run_anatomy
    from forethought.experiments.anatomy import corpus_documents, permuted_weights

    if docs < 4:
        raise ForethoughtError(f"--docs must be >= 4 (two per half), got {docs}")
    chosen = parse_int_list(layers, "layers") if layers else None
    if plot_dir is not None:
        output_dir(plot_dir, "--plot-dir")  # before the model loads
    lm = load(model, device, dtype, quiet=as_json)
    token_docs, described = corpus_documents(lm.tokenizer, corpus, docs, length)
    # the control keeps the real weights' scales (a fresh random init's states are far smaller)
    control = permuted_weights(lm.model) if random_control else None
    if as_json:
        result = run_anatomy(
            lm.model, token_docs, chosen, window, normalize, control, model_name=lm.name, corpus=described
        )
    else:
        with err_console.status(f"tracing {len(token_docs)} documents × {length} tokens …"):
            result = run_anatomy(
                lm.model, token_docs, chosen, window, normalize, control, model_name=lm.name, corpus=described
            )
    plots = []
    if plot_dir is not None:
        from forethought.viz.anatomy import plot_anatomy

        with writing(plot_dir, "--plot-dir"):
            plots = [str(p) for p in plot_anatomy(result, plot_dir)]
    if as_json:
        print(json.dumps(result.to_dict() | {"plots": plots}))
        return

    table = Table(
        title=f"Anatomy of a column: {result.model}, {result.n_docs} docs × {result.length} tokens, % of variance",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    columns = ["layer", "pos", "shuf", "pos@1", "token", f"slow{window // 2}", "doc", "cos1", "tau"]
    if result.random:
        columns += ["r.pos", "r.slow"]
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    random_by_name = {l.layer: l for l in result.random}
    for l in result.layers:
        row = [
            "emb" if l.layer == "embed" else str(_split_name(l.layer)[0]),
            percent(l.position_share, unit=""),
            percent(l.position_shuffled, unit=""),
            percent(l.position_profile[0] if l.position_profile else None, unit=""),
            percent(l.token_share, unit=""),
            percent(l.slow_share, unit=""),
            percent(l.document_share, unit=""),
            f"{l.cosine[0]:.2f}",
            f"{l.tau:.0f}",
        ]
        if result.random:
            r = random_by_name[l.layer]
            row += [percent(r.position_share, unit=""), percent(r.slow_share, unit="")]
        table.add_row(*row)
    console.print(table)
    console.print(
        f"pos: mean state at each position (adjusted R²); shuf: the same with positions shuffled in each document; "
        f"pos@1: position part's share at position 1 (position 0 is left out: median norm {result.position0_norm:.0f} "
        f"vs {result.other_norm:.0f}); token: mean state per token id, fit on the other half of the documents "
        f"(on the {result.token_coverage:.0%} of tokens it saw); slow{window // 2}: mean of the neighbours "
        f"t-{window // 2}..t+{window // 2} without t; doc: mean of the rest of the document; cos1: cosine of "
        f"centred states 1 apart; tau: decay length of that cosine (positions); r.*: permuted-weight model. "
        f"States {result.normalize}-normalised."
    )
    console.print(result.verdict())
    for p in plots:
        console.print(f"[dim]plot: {p}[/dim]")
    err_console.print(f"[dim]{result.seconds:.1f} s[/dim]")


@app.command()
def revise(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    at: Annotated[int, typer.Option("--at", help="New-token step (0-based) that gets the off-plan token.")],
    force: Annotated[str | None, typer.Option("--force", help="Off-plan token text (exactly one token).")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="Sample the off-plan token (greedy excluded).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for the sampled off-plan token.")] = None,
    n: Annotated[int, typer.Option("-n", help="Steps to compare after the off-plan token.")] = 16,
    probes: Annotated[Path | None, typer.Option("--probes", help="Folder of future-token probes (from probe).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    plot: PlotOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Greedy run vs the same run with an off-plan token at --at: what changes, what cannot, does it rejoin?"""
    from forethought.experiments.revise import revise as run_revise
    from forethought.experiments.revise import single_token

    if (force is None) == (temperature is None):
        raise ForethoughtError("give exactly one of --force TOKEN or --temperature T (with --seed S)")
    if not prompt:
        raise ForethoughtError("the prompt is empty: give at least one token of text")
    if plot is not None:
        output_file(plot, "--plot")  # before the model loads
    lm = load(model, device, dtype, quiet=as_json)
    tok = lm.tokenizer
    text = tok.apply_chat_template(prompt) if chat else prompt
    force_id = single_token(tok, force) if force is not None else None
    stops = (tok.eos_id,) if tok.eos_id is not None else ()
    result = run_revise(
        lm.model,
        tok.encode(text),
        at,
        n,
        force_id=force_id,
        temperature=temperature,
        seed=seed,
        stop_ids=stops,
        probes_dir=probes,
        model_name=lm.name,
    )
    if plot is not None:
        from forethought.viz.anatomy import plot_revise

        with writing(plot, "--plot"):
            plot_revise(result, plot, tok.token_str)
    original_text = tok.decode(result.original_ids[: result.at + 1 + result.n_after])
    revised_text = tok.decode(result.revised_ids)
    if as_json:
        print(
            json.dumps(
                result.to_dict()
                | {
                    "prompt": text,
                    "original_text": original_text,
                    "revised_text": revised_text,
                    "off_plan_text": tok.token_str(result.off_plan_id),
                    "greedy_text": tok.token_str(result.greedy_id),
                    "plot": str(plot) if plot else None,
                }
            )
        )
        return
    _print_revise(result, tok, text)
    if result.probes is not None:
        _print_probes(result.probes)
    if plot is not None:
        console.print(f"[dim]plot: {plot}[/dim]")


def _print_revise(result, tok, text: str) -> None:
    """The two runs side by side, the per-step table and the summary lines of `forethought revise`."""
    shared = tok.decode(result.original_ids[: result.at])
    console.print(f"[bold]prompt[/bold]   {text!r}")
    console.print(
        f"[bold]original[/bold] {shared!r} + [green]{tok.token_str(result.greedy_id)!r}[/green] + "
        f"{tok.decode(result.original_ids[result.at + 1 : result.at + 1 + result.n_after])!r}"
    )
    console.print(
        f"[bold]revised[/bold]  {shared!r} + [red]{tok.token_str(result.off_plan_id)!r}[/red] + "
        f"{tok.decode(result.revised_ids[result.at + 1 :])!r}"
    )
    table = Table(
        title=f"Off-plan token at step {result.at} (position {result.off_plan_position}): KL(original ‖ run) per step",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("step", "pos", "original", "revised", "KL", "top-1", "KL swap", "top-1 swap"):
        table.add_column(col, justify="right", no_wrap=True, max_width=14 if col in ("original", "revised") else None)
    for st in result.steps:
        mark = "[red]" if st.original_id != st.revised_id else ""
        table.add_row(
            str(st.step),
            str(st.position),
            repr(tok.token_str(st.original_id)),
            f"{mark}{tok.token_str(st.revised_id)!r}",
            f"{st.kl:.3g}",
            "yes" if st.top1_agree else "[red]no[/red]",
            f"{st.kl_substituted:.3g}",
            "yes" if st.top1_agree_substituted else "[red]no[/red]",
        )
    console.print(table)
    s = result.summary()
    first = result.off_plan_position
    later = ", ".join(f"{d:.3g}" for d in result.position_max_diff[first:][:8])
    more = " …" if s["compared_positions_after"] > 8 else ""
    console.print(
        f"earlier columns (positions < {first}, every layer): max |diff| = {s['causal_max_diff']:.3g}  ·  later "
        f"positions changed: {s['changed_positions']}/{s['compared_positions_after']} (max |diff| per position: "
        f"{later}{more})"
    )
    console.print(
        f"after the off-plan token: mean KL {s['kl_after_mean']:.3g} nats, top-1 agreement "
        f"{s['top1_agreement_after']:.0%}; with only the token swapped: KL {s['kl_substituted_first_after']:.3g} → "
        f"{s['kl_substituted_last_after']:.3g}, top-1 agreement {s['top1_agreement_substituted_after']:.0%}"
    )
    if result.rejoin is None:
        console.print(f"the revised text does not rejoin the original's tokens within {result.n_after} steps")
    else:
        r = result.rejoin
        console.print(
            f"the revised text rejoins the original at step {r.step} (original step {r.original_step}, shift "
            f"{r.shift:+d}); {r.matched_after} tokens match from there"
        )
    console.print("[dim]KL swap / top-1 swap: the original's tokens with only the off-plan one swapped in[/dim]")


def _print_probes(probes: dict) -> None:
    if "skipped" in probes:
        console.print(f"probes skipped: {probes['skipped']}")
        return
    table = Table(
        title="Future-token probes, positions from the off-plan token on",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("layer", "k", "top-1 changed", "KL", "rev→orig", "rev→rev", "orig→orig", "changed before"):
        table.add_column(col, justify="right", no_wrap=True)
    for c in probes["cells"]:
        table.add_row(
            str(c["layer"]),
            str(c["offset"]),
            f"{c['changed']:.0%}",
            f"{c['kl']:.3g}",
            f"{c['revised_reads_original']:.0%}",
            f"{c['revised_reads_revised']:.0%}",
            f"{c['original_reads_original']:.0%}",
            f"{c['changed_before']:.0%}",
        )
    console.print(table)
    console.print(
        "[dim]rev→orig / rev→rev: the probe on the revised run's state names the original's / the revised run's "
        "actual token k ahead; orig→orig: the probe on the original's state names its own token k ahead[/dim]"
    )


def _split_name(name: str) -> tuple[int | None, str]:
    from forethought.trace import split_name  # imported on use: the CLI starts without torch

    return split_name(name)


@app.command("revise-scale")
def revise_scale(
    prompts: Annotated[int, typer.Option("--prompts", help="Prompts drawn from the corpora (round-robin).")] = 50,
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            help="stdlib, pydocs, a file, folder or .jsonl; repeat for several. "
            "Default: stdlib, plus pydocs when installed.",
        ),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Tokens per prompt.")] = 24,
    at: Annotated[int, typer.Option("--at", help="New-token step (0-based) that gets the off-plan token.")] = 2,
    n: Annotated[int, typer.Option("-n", help="Steps to compare after the off-plan token.")] = 12,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="Temperature of the sampled bucket (greedy excluded).")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for prompt offsets, p<1e-6 picks and samples.")] = 0,
    plot: PlotOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """`revise` over many corpus prompts, off-plan tokens in rank buckets: rejoin rate, KL, state change, 95% CIs."""

    from forethought.data.corpus import DEFAULT_CORPUS, PROSE_CORPUS, load_corpus, pydocs_root
    from forethought.experiments.revise_scale import RANK_BUCKETS, draw_prompts, revise_at_scale

    specs = corpus or ([DEFAULT_CORPUS] + ([PROSE_CORPUS] if pydocs_root() is not None else []))
    if plot is not None:
        output_file(plot, "--plot")  # before the model loads
    lm = load(model, device, dtype, quiet=as_json)
    tok = lm.tokenizer

    def encode(text: str) -> list[int]:
        ids = tok.encode(text)
        return ids[1:] if tok.add_bos and ids and ids[0] == tok.bos_id else ids

    drawn = draw_prompts([load_corpus(s) for s in specs], encode, prompts, prompt_tokens, seed)
    if tok.add_bos and tok.bos_id is not None:
        for p in drawn:
            p.ids = [tok.bos_id] + p.ids
    stops = (tok.eos_id,) if tok.eos_id is not None else ()
    total = len(drawn) * (len(RANK_BUCKETS) + 2)
    with progress_bar("revise", unit="run", quiet=as_json) as progress:
        runs = itertools.count(1)

        def tick() -> None:
            if progress is not None:
                progress(next(runs), total)

        result = revise_at_scale(
            lm.model, drawn, at, n, temperature, seed, stop_ids=stops, model_name=lm.name, on_trial=tick
        )
    if not result.trials:
        raise ForethoughtError("no prompt could be used: " + "; ".join(result.skipped[:3]))
    if plot is not None:
        from forethought.viz.revise_scale import plot_revise_scale

        with writing(plot, "--plot"):
            plot_revise_scale(result, plot)
    if as_json:
        print(json.dumps(result.to_dict()))
        return

    def ci(iv, fmt: str = "{:.3g}") -> str:
        return f"{fmt.format(iv.estimate)} [{fmt.format(iv.low)}, {fmt.format(iv.high)}]"

    table = Table(
        title=f"{result.model}: off-plan token at step {result.at} of {result.n_prompts} prompts "
        f"({', '.join(result.corpora)}), 95% bootstrap over prompts",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("bucket", "n", "median p", "rejoin", "KL after", "state mid", "state last", "mid swap", "last swap"):
        table.add_column(col, justify="right", no_wrap=True)
    for b in result.buckets:
        table.add_row(
            b.bucket,
            str(b.n),
            f"{b.median_prob:.2g}",
            ci(b.rejoin_rate, "{:.0%}"),
            ci(b.kl_after_mean),
            ci(b.state_mid),
            ci(b.state_last),
            ci(b.state_mid_swap),
            ci(b.state_last_swap),
        )
    console.print(table)
    console.print(
        f"[dim]rejoin: greedy text back on the original's tokens ({result.rejoin_window} in a row, shift <= "
        f"{result.max_shift}) within {result.n_after} steps; KL(original || revised) per step after the off-plan "
        f"token, nats; state: ||h_orig - h_rev|| / ||h_orig|| at {result.mid_layer} / {result.last_layer}, mean over "
        "later positions; swap: only the off-plan token swapped into the original's tokens[/dim]"
    )
    for why in result.skipped:
        err_console.print(f"[dim]skipped {why}[/dim]")
    err_console.print(f"[dim]{result.seconds:.1f} s[/dim]")
