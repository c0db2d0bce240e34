"""The thread's claims, measured: equivalence, invariance, state-size, lens, trace.

Each command loads the model, calls one experiment and presents its result: a Rich table for people,
one JSON object with --json, a PNG with --plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from forethought.commands.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PlotOpt,
    app,
    check_plot,
    console,
    emit_json,
    load,
    plotted,
    prompt_ids,
)
from forethought.errors import ForethoughtError
from forethought.format import size
from forethought.paths import output_file, writing
from forethought.trace import layer_label as _layer_label


@app.command()
def equivalence(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    n: Annotated[int, typer.Option("-n", "--max-new-tokens", help="Greedy tokens to generate both ways.")] = 32,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """Generate with the KV cache and by full recompute: same tokens, same activations, different cost."""
    from forethought.experiments.equivalence import equivalence as run

    check_plot(plot)
    lm = load(model, device, dtype, quiet=as_json)
    result = run(lm.model, prompt_ids(lm, prompt), n, lm.name)
    if plot is not None:
        from forethought.viz.claims import plot_equivalence

        with writing(plot, "--plot"):
            plot_equivalence(result, plot)
    if as_json:
        emit_json(result.to_dict() | {"prompt": prompt, "text": lm.tokenizer.decode(result.cached_ids)})
        return
    table = Table(
        title=f"KV cache (c) vs full recompute (f), {lm.name} ({result.dtype}); Δ = max |c - f|",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("step", "token", "logits Δ", "rel", "resid Δ", "rel", "GFLOP c/f", "ms c/f"):
        table.add_column(col, justify="left" if col == "token" else "right", no_wrap=col != "token", min_width=4)
    for s in result.steps:
        token = escape(repr(lm.tokenizer.token_str(s.token_cached)))
        if s.token_cached != s.token_recompute:
            token = f"[red]{token} ≠ {escape(repr(lm.tokenizer.token_str(s.token_recompute)))}[/red]"
        table.add_row(
            str(s.step),
            token,
            f"{s.logits_abs:.1e}",
            f"{s.logits_rel:.0e}",
            f"{max(s.resid_abs):.1e}",
            f"{max(s.resid_rel):.0e}",
            f"{s.flops_cached / 1e9:.2f}/{s.flops_recompute / 1e9:.2f}",
            f"{s.seconds_cached * 1e3:.0f}/{s.seconds_recompute * 1e3:.0f}",
        )
    console.print(table)
    s = result.summary()
    verdict = "[green]identical[/green]" if result.identical else "[red]DIFFERENT[/red]"
    console.print(
        f"greedy tokens: {verdict} over {s['n_steps']} steps · logits max |Δ| {s['logits_max_abs']:.2e} "
        f"(rel {s['logits_max_rel']:.1e}) · resid_post max |Δ| {s['resid_max_abs']:.2e} (rel {s['resid_max_rel']:.1e})"
    )
    console.print(
        f"cost without the cache: {s['flops_recompute_total'] / s['flops_cached_total']:.1f}x the FLOPs, "
        f"{s['seconds_recompute_total'] / max(s['seconds_cached_total'], 1e-12):.1f}x the time"
    )
    console.print(f"text: {lm.tokenizer.decode(result.cached_ids)!r}", markup=False)
    if plot is not None:
        plotted(plot)


@app.command()
def invariance(
    short: Annotated[str, typer.Argument(help="A prompt.")],
    longer: Annotated[str, typer.Argument(help="The same prompt with tokens appended.")],
    bidirectional: Annotated[
        bool, typer.Option("--bidirectional", help="Control: remove the causal mask, so earlier columns must change.")
    ] = False,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str, typer.Option("--dtype", help="float64 by default: float32 rounding differs with sequence length.")
    ] = "float64",
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """Appending tokens leaves the earlier columns unchanged (causal), and changes them (bidirectional)."""
    from forethought.experiments.invariance import extending_ids
    from forethought.experiments.invariance import invariance as run

    check_plot(plot)
    lm = load(model, device, dtype, quiet=as_json)
    short_ids, longer_ids = extending_ids(lm.tokenizer, short, longer)
    result = run(lm.model, short_ids, longer_ids, causal=not bidirectional, model_name=lm.name)
    if plot is not None:
        from forethought.viz.claims import plot_invariance

        other = run(lm.model, short_ids, longer_ids, causal=bidirectional, model_name=lm.name)
        with writing(plot, "--plot"):
            plot_invariance(sorted([result, other], key=lambda r: not r.causal), plot)
    if as_json:
        emit_json(result.to_dict() | {"short": short, "longer": longer})
        return
    mode = "causal" if result.causal else "bidirectional (control)"
    table = Table(title=escape(f"{short!r} inside {longer!r}, {lm.name}, {mode}, {result.dtype}"))
    for col in ("layer", "max |Δ| earlier cols", "rel", "max |value|", "appended ‖col‖", "appended to nearest"):
        table.add_column(col, justify="right")
    for i, name in enumerate(result.layers):
        table.add_row(
            _layer_label(name),
            f"{result.max_abs[i]:.2e}",
            f"{result.max_rel[i]:.1e}",
            f"{result.value_scale[i]:.3g}",
            f"{result.appended_norm[i]:.3g}",
            f"{result.appended_nearest[i]:.3g}",
        )
    console.print(table)
    appended = [lm.tokenizer.token_str(i) for i in longer_ids[len(short_ids) :]]
    verdict = "[green]unchanged[/green]" if result.unchanged else "[red]CHANGED[/red]"
    console.print(
        f"{len(short_ids)} earlier columns {verdict}: max |Δ| {result.worst_abs:.2e}, rel {result.worst_rel:.1e} "
        f"(tolerance rel {result.rel_tolerance:.0e} for {result.dtype}); appended {escape(str(appended))} "
        f"are new columns (distance to the nearest earlier column at the last layer: {result.appended_nearest[-1]:.3g})"
    )
    if plot is not None:
        plotted(plot)


@app.command("state-size")
def state_size(
    tokens: Annotated[str, typer.Option("--tokens", help="Comma-separated token counts.")] = "1,10,100,1000,8192",
    config: Annotated[
        str | None,
        typer.Option(
            "--config", help="Named configs to compare, comma-separated (gpt2-small, llama-3-8b, llama-3-70b)."
        ),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """KV-cache bytes vs tokens (measured and by formula) against a fixed recurrent state."""
    import inspect
    import json as json_module

    from forethought.experiments.state_size import named_configs, parse_tokens
    from forethought.experiments.state_size import state_size as run

    check_plot(plot)
    counts = parse_tokens(tokens)
    configs = named_configs(config)
    lm = load(model, device, dtype, quiet=as_json)
    # Real text to prefill with: the standard library's JSON decoder, repeated to the longest prefill.
    text = inspect.getsource(json_module.decoder)
    ids = lm.tokenizer.encode(text)
    ids = (ids * (1 + 1024 // max(len(ids), 1)))[:1024]
    result = run(lm.model, ids, counts, configs, lm.name)
    if plot is not None:
        from forethought.viz.claims import plot_state_size

        with writing(plot, "--plot"):
            plot_state_size(result, plot)
    if as_json:
        emit_json(result.to_dict())
        return
    loaded = result.loaded
    unit = f"{result.dtype}, {result.element_bytes} B per number"
    table = Table(title=f"KV-cache bytes by tokens in context ({unit})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("tokens", justify="right")
    table.add_column(f"{loaded.key} measured", justify="right", min_width=12)
    for c in result.configs:
        table.add_column(f"{c.key} formula", justify="right", min_width=len(c.key) if len(c.key) < 13 else 9)
    for i, t in enumerate(counts):
        measured = loaded.measured_nbytes[i] if loaded.prefilled[i] else loaded.measured_allocated[i]
        note = "" if loaded.prefilled[i] else " (alloc)" if measured is not None else ""
        table.add_row(str(t), size(measured) + note, *[size(c.kv_bytes[i]) for c in result.configs])
    console.print(table)
    states = Table(
        title=f"Per token vs fixed recurrent states of the same width ({unit})", box=box.SIMPLE_HEAD, pad_edge=False
    )
    states.add_column("config", no_wrap=True)
    states.add_column("L×kv×hd", justify="right", no_wrap=True)
    states.add_column("KV per token", justify="right")
    for name in loaded.recurrent_bytes:
        states.add_column(name.replace(" (", "\n("), justify="right", no_wrap=True)
    for c in result.configs:
        states.add_row(
            escape(c.key),
            f"{c.n_layers}×{c.n_kv_heads}×{c.head_dim}",
            size(c.bytes_per_token),
            *map(size, c.recurrent_bytes.values()),
        )
    console.print(states)
    console.print(
        "[dim]measured: KVCache.nbytes after prefilling real tokens; (alloc): k.nbytes + v.nbytes of a cache "
        "allocated for that many tokens, without running the model; –: formula only (beyond the context, "
        "or more than half the available memory)[/dim]"
    )
    match = "[green]matches[/green]" if result.measured_matches_formula else "[red]DIFFERS FROM[/red]"
    formula = {
        "feedback": "2·kv_heads·head_dim·bytes·tokens (one memory K and V per token, not per layer)",
        "recurrent": "layers·d_model·bytes (a fixed state, whatever the tokens)",
    }.get(lm.config.family, "2·layers·kv_heads·head_dim·bytes·tokens")
    console.print(f"measured state of {loaded.key} {match} the formula {formula}")
    if plot is not None:
        plotted(plot)


@app.command()
def lens(
    prompt: Annotated[str, typer.Argument(help="Text to read through the logit lens, then continue.")],
    n: Annotated[int, typer.Option("-n", "--max-new-tokens", help="Tokens to generate after the prompt.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Alternatives to show per cell and per step.")] = 5,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.8,
    sampler_top_k: Annotated[int, typer.Option("--sampler-top-k", help="The sampler's own top-k (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="The sampler's top-p (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same tokens.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """The logit lens at every layer x position, and the alternatives the sampler did not show."""
    from forethought.experiments.lens import run_logit_lens as run
    from forethought.model.sampling import SamplingParams

    check_plot(plot)
    if top_k < 1:
        raise ForethoughtError(f"--top-k must be >= 1, got {top_k}")
    params = SamplingParams(temperature=temperature, top_k=sampler_top_k, top_p=top_p, seed=seed)
    lm = load(model, device, dtype, quiet=as_json)
    result = run(lm.model, prompt_ids(lm, prompt), n, top_k, params, lm.tokenizer.token_str, lm.name)
    if plot is not None:
        from forethought.viz.claims import plot_logit_lens

        with writing(plot, "--plot"):
            plot_logit_lens(result, plot)
    if as_json:
        emit_json(result.to_dict() | {"prompt": prompt})
        return
    table = Table(title=f"Logit lens, {lm.name}: top-1 token (probability) per layer, at each prompt position")
    table.add_column("layer", justify="right")
    for t in result.prompt_tokens:
        table.add_column(escape(repr(t)), justify="left")
    for i in range(len(result.layers) - 1, -1, -1):
        cells = [escape(f"{tok[0]!r} {p[0]:.2f}") for tok, p in zip(result.top_tokens[i], result.top_probs[i])]
        table.add_row(_layer_label(result.layers[i]), *cells)
    console.print(table)
    if result.steps:
        steps = Table(title=f"Generated tokens (temperature {params.temperature}) and the alternatives not shown")
        for col in ("step", "chosen", "rank", "p model", "p sampler", "entropy bits", f"top-{top_k} (model, T=1)"):
            steps.add_column(col, justify="left" if col in ("chosen",) or col.startswith("top") else "right")
        for s in result.steps:
            alts = escape("  ".join(f"{t!r} {p:.2f}" for t, p in zip(s.top_tokens, s.top_probs)))
            steps.add_row(
                str(s.step),
                escape(repr(s.chosen_token)),
                str(s.chosen_rank),
                f"{s.chosen_prob:.3f}",
                f"{s.sampling_prob:.3f}",
                f"{s.entropy_bits:.2f}",
                alts,
            )
        console.print(steps)
    if plot is not None:
        plotted(plot)


@app.command()
def trace(
    prompt: Annotated[str, typer.Argument(help="Text to run.")],
    save: Annotated[Path, typer.Option("--save", help="Safetensors file to write the trace to.")],
    names: Annotated[
        str, typer.Option("--names", help="Activations to capture: names, globs or bare points, comma-separated.")
    ] = "resid_post",
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Run PROMPT once, capturing the named activations, and save them (safetensors + JSON metadata)."""
    from forethought.trace import resolve_names
    from forethought.trace import trace as run_trace

    output_file(save, "--save")  # before the model loads: a bad path fails in milliseconds
    lm = load(model, device, dtype, quiet=as_json)
    chosen = resolve_names(lm.config, names)
    ids = prompt_ids(lm, prompt)
    captured = run_trace(lm.model, ids, chosen)
    path = captured.save(save, model=lm.name, text=prompt, dtype=dtype, names=names)
    rows = [
        {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "bytes": t.nbytes}
        for name, t in captured.tensors.items()
    ]
    total = sum(r["bytes"] for r in rows)
    if as_json:
        emit_json(
            {"path": str(path), "model": lm.name, "token_ids": ids, "text": prompt, "tensors": rows, "bytes": total}
        )
        return
    table = Table(title=f"Trace of {len(ids)} tokens, {lm.name}")
    for col in ("name", "shape", "dtype", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for r in rows:
        table.add_row(escape(r["name"]), "×".join(map(str, r["shape"])), r["dtype"], size(r["bytes"]))
    table.add_row("[bold]total[/bold]", f"{len(rows)} tensors", "", f"[bold]{size(total)}[/bold]")
    console.print(table)
    console.print(f"saved to {path} ({size(path.stat().st_size)} on disk)")
