"""Future Lens commands: `extract` residual streams of a corpus into a store, then `probe` how far ahead they see."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from forethought.commands.common import (
    DEFAULT_MODEL,
    DeviceOpt,
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
from forethought.paths import output_dir, output_file, writing

RayOpt = Annotated[
    str | None,
    typer.Option("--ray", help="Run on Ray: a cluster ADDRESS, auto (the cluster this node joined), or local:N."),
]


@app.command()
def extract(
    out: Annotated[Path, typer.Option("--out", help="Store folder (created; rerun to resume).")],
    corpus: Annotated[
        str, typer.Option("--corpus", help="'stdlib' (code), 'pydocs' (prose), a text file, a folder or a .jsonl.")
    ] = "stdlib",
    layers: Annotated[
        str, typer.Option("--layers", help="all, or a list like 0,5,10 (the last is always kept).")
    ] = "all",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to extract, train + test.")] = 50_000,
    window: Annotated[int, typer.Option("--window", help="Tokens per packed window.")] = 256,
    batch: Annotated[int, typer.Option("--batch", help="Windows per forward pass.")] = 8,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of documents held out.")] = 0.1,
    shard_mb: Annotated[float, typer.Option("--shard-mb", help="Cap on one shard's activations, MB.")] = 256.0,
    max_doc_tokens: Annotated[
        int, typer.Option("--max-doc-tokens", help="Keep a document's first N tokens (0: all).")
    ] = 2048,
    float16: Annotated[bool, typer.Option("--float16", help="Store activations as float16.")] = False,
    ray: RayOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Run the model over a corpus and store chosen layers' resid_post, token ids and its own greedy predictions."""
    from forethought.data.corpus import load_corpus
    from forethought.experiments.future import run_extract

    documents = load_corpus(corpus)  # a bad corpus, path or cluster fails before the model loads
    output_dir(out, "--out")
    if ray is not None:  # the same run with its shards computed on Ray workers (forethought.distributed)
        from forethought.distributed.dispatch import extract_run

        run_extract = extract_run(ray, model, device)
    lm = load(model, device, "float32", quiet=as_json)
    layer_list = parse_int_list(layers, "layers", lm.config.n_layers)
    with progress_bar("extract", unit="tok", quiet=as_json) as progress:
        result = run_extract(
            lm,
            documents,
            out,
            layer_list,
            tokens=tokens,
            window=window,
            batch=batch,
            float16=float16,
            test_fraction=test_fraction,
            shard_mb=shard_mb,
            max_doc_tokens=max_doc_tokens,
            progress=progress,
        )
    summary = {
        "out": str(result.out),
        "shards": result.shards,
        "shards_skipped": result.shards_skipped,
        "tokens": result.tokens,
        "tokens_by_split": result.tokens_by_split,
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "corpus": result.manifest["corpus"],
        "layers": result.manifest["settings"]["layers"],
    }
    if ray is not None:
        summary["ray"] = result.ray  # per-worker throughput
    if as_json:
        print(json.dumps(summary))
        return
    c = summary["corpus"]
    console.print(
        f"{result.tokens:,} tokens ({result.tokens_by_split['train']:,} train, {result.tokens_by_split['test']:,} test)"
        f" in {result.shards} shards at {result.out} · {len(summary['layers'])} layers · "
        f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tok/s)"
        + (f" · resumed past {result.shards_skipped} shards" if result.shards_skipped else "")
    )
    if ray is not None:
        for worker, w in summary["ray"]["workers"].items():
            rate = w["tokens_per_second"]
            err_console.print(f"[dim]ray worker {worker}: {w['shards']} shards, {rate:,.0f} tok/s[/dim]")
    if c.get("skipped"):
        err_console.print(f"[dim]{c['skipped']} unreadable or non-UTF-8 files skipped[/dim]")
    if result.manifest.get("exhausted"):
        err_console.print("[yellow]the corpus ran out before --tokens[/yellow]")


@app.command()
def probe(
    store: Annotated[Path, typer.Option("--store", help="A folder written by forethought extract.")],
    offsets: Annotated[str, typer.Option("--offsets", help="Token offsets k to predict, e.g. 1-4.")] = "1-4",
    layers: Annotated[str, typer.Option("--layers", help="all (stored), or a list like 0,5,10.")] = "all",
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens scored per cell.")] = 4096,
    out: Annotated[Path | None, typer.Option("--out", help="Results and fitted probes (default STORE/probes).")] = None,
    plot: PlotOpt = None,
    ray: RayOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override the store's model.")] = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Linear probes and the Future Lens map from each layer's state to tokens 1..K ahead, on held-out documents."""
    from forethought.data.store import ActivationStore
    from forethought.experiments.probes import run_probes
    from forethought.viz.future import write_report

    activation_store = ActivationStore(store)
    offset_list = parse_int_list(offsets, "offsets")
    if min(offset_list) < 1 or max(offset_list) >= activation_store.window:
        raise ForethoughtError(f"--offsets must lie in 1..{activation_store.window - 1}")
    layer_list = activation_store.layers if layers == "all" else parse_int_list(layers, "layers")
    missing = sorted(set(layer_list) - set(activation_store.layers))
    if missing:
        raise ForethoughtError(f"layers {missing} are not in the store (stored: {activation_store.layers})")
    # Stores written before the "source" field name their model only (right for registry models).
    stored = activation_store.manifest["model"]
    model = model or stored.get("source") or stored["name"]
    out_dir = output_dir(out or (Path(store) / "probes"), "--out")  # paths checked before the model loads
    if plot is not None:
        output_file(plot, "--plot")
    lm = load(model, device, "float32", quiet=as_json)
    if ray is not None:  # layers fitted on Ray workers, merged in (layer, offset) order (forethought.distributed)
        from forethought.distributed.dispatch import probe_run

        run_probes = probe_run(ray, model, device)
    with progress_bar("probe layers", quiet=as_json) as progress:
        result = run_probes(
            activation_store,
            lm.model,
            offset_list,
            layer_list,
            eval_tokens=eval_tokens,
            save_dir=out_dir,
            progress=progress,
        )
    with writing(out_dir, "--out"):
        paths = write_report(result, out_dir, tokenizer=lm.tokenizer, heatmap=plot)
    warnings = probe_warnings(result)
    if as_json:
        print(json.dumps(result.to_dict() | {"files": {k: str(v) for k, v in paths.items()}, "warnings": warnings}))
        return
    print(paths["markdown"].read_text())  # plain: the table's brackets are not rich markup
    for line in warnings:
        err_console.print(f"[yellow]{line}[/yellow]")
    for kind, path in paths.items():
        err_console.print(f"[dim]{kind}: {path}[/dim]")


def probe_warnings(result) -> list[str]:
    """What a probe run's intervals are worth: too few held-out documents, a setting that cannot tell the model
    from its context statistics."""
    from forethought.experiments.probes import FEW_DOCUMENTS

    out = []
    if result.n_eval_documents < FEW_DOCUMENTS:
        out.append(
            f"only {result.n_eval_documents} held-out documents: too few for the 95% intervals (a bootstrap over "
            f"documents) to mean much; extract more --tokens (want >= {FEW_DOCUMENTS} held-out documents)"
        )
    d = result.discriminability
    if d and d["n_documents"] >= FEW_DOCUMENTS:
        m = d["model_minus_strongest"]
        out.append(
            f"discriminability: the model's own top-1 at k=1 minus the strongest context baseline ({d['strongest']}): "
            f"{100 * m.estimate:+.1f} [{100 * m.low:+.1f}, {100 * m.high:+.1f}] points: {d['words']}"
        )
    return out
