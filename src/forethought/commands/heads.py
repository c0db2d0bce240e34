"""`forethought heads train`: draft heads for speculative decoding, learnt from the model's own continuations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from forethought.commands.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    app,
    console,
    err_console,
    load,
    parse_int_list,
)
from forethought.errors import ForethoughtError
from forethought.paths import output_file

heads_app = typer.Typer(no_args_is_help=True, help="Draft heads for `generate --speculative heads`.")
app.add_typer(heads_app, name="heads")


def _progress(total: int, what: str, quiet: bool):
    """A Rich bar with throughput, or nothing when quiet; returns (advance, stop)."""
    if quiet:
        return (lambda n: None), (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:,.0f} positions/s")

    bar = Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    task = bar.add_task(what, total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar.stop


def _cached_data(path: Path):
    """The kept continuations, or None when there are none or they do not read back whole (a damaged cache is
    recomputed, never trained on)."""
    from forethought.heads.training import HeadsData

    if not path.is_file():
        return None
    try:
        data = HeadsData(**torch.load(path, weights_only=True))
        ok = data.targets.dim() == 2 and data.rows.shape[0] == data.targets.shape[0]
        return data if ok and all(s.shape[0] == data.rows.shape[0] for s in data.states.values()) else None
    except Exception:  # noqa: BLE001 -- any unreadable cache entry is recomputed
        return None


def _save_data(data, path: Path) -> None:
    """Whole or not at all: a run killed while saving leaves no file a rerun would read as the continuations."""
    import io

    from forethought.paths import atomic_write_bytes

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(dataclasses.asdict(data), buffer)
        atomic_write_bytes(path, buffer.getvalue(), "the heads-data cache")
    except (OSError, ForethoughtError) as e:  # only a cache: the run goes on without it
        err_console.print(f"[dim]not kept: {e}[/dim]", soft_wrap=True)


@heads_app.command("train")
def train(
    out: Annotated[
        Path | None, typer.Option("--out", help="Heads file to write (default: the one shipped for the model).")
    ] = None,
    n_heads: Annotated[int, typer.Option("--heads", help="Heads: offsets 2..K+1 tokens ahead.")] = 4,
    new_tokens: Annotated[int, typer.Option("--tokens", help="Greedy tokens generated per prompt.")] = 96,
    vocab: Annotated[int, typer.Option("--vocab", help="Drafter vocabulary: the most frequent target tokens.")] = 4096,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training positions.")] = 4,
    layers: Annotated[
        str, typer.Option("--layers", help="Also train on these layers, to report accuracy per layer (e.g. 9,19).")
    ] = "",
    analysis_epochs: Annotated[int, typer.Option("--analysis-epochs", help="Epochs for the --layers heads.")] = 2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Generate the model's own greedy continuations, train heads on its last block's output to forecast them,
    report held-out accuracy per head (and per layer with --layers), and save the heads."""
    from forethought.heads.training import (
        choose_vocab,
        make_training_data,
        seed_prompts,
        train_heads,
    )
    from forethought.model.heads import shipped_path
    from forethought.model.kernels import cache_dir

    if not 1 <= n_heads <= 15:
        raise ForethoughtError(f"--heads must be in 1..15, got {n_heads}")
    if new_tokens < n_heads + 2:
        raise ForethoughtError(f"--tokens must be at least --heads + 2, got {new_tokens}")
    if vocab < 16 or epochs < 1:
        raise ForethoughtError("--vocab must be >= 16 and --epochs >= 1")
    if out is not None:
        output_file(out, "--out")  # before the model loads: a bad path fails in milliseconds
    lm = load(model, device, "float32", quiet=as_json)
    last = lm.config.n_layers - 1
    extra = parse_int_list(layers, "layers", lm.config.n_layers) if layers else []
    used = sorted({*extra, last})
    out = output_file(out or shipped_path(lm.model), "--out")  # a bad path fails before minutes of work

    prompts = seed_prompts(lm.tokenizer, seed=seed)
    # The continuations are most of the cost (minutes): kept, keyed by everything they depend on, so a
    # rerun with other training settings starts at once.
    key = hashlib.sha256(json.dumps([lm.config.name, prompts, new_tokens, n_heads, used]).encode()).hexdigest()[:16]
    data_file = cache_dir().parent / "heads-data" / f"{key}.pt"
    data = _cached_data(data_file)
    if data is None:
        advance, stop = _progress(len(prompts) * (new_tokens - 1), "generating", as_json)
        try:
            data = make_training_data(lm.model, prompts, new_tokens, n_heads, used, lm.tokenizer.eos_id, advance)
        finally:
            stop()
        _save_data(data, data_file)
    always = [lm.tokenizer.eos_id] if lm.tokenizer.eos_id is not None else []
    chosen = choose_vocab(data.targets, vocab, always)
    valid = data.targets[data.targets >= 0]
    coverage = float(torch.isin(valid, chosen).float().mean())

    accuracy: dict[int, list[float]] = {}
    seconds = {"generate": round(data.seconds, 1)}
    shipped = None
    for layer in used:
        n_epochs = epochs if layer == last else analysis_epochs
        started = time.perf_counter()
        advance, stop = _progress(n_epochs * len(data.rows), f"training layer {layer}", as_json)
        try:
            heads, acc = train_heads(lm.model, data, layer, chosen, epochs=n_epochs, seed=seed, progress=advance)
        finally:
            stop()
        seconds[f"train_layer_{layer}"] = round(time.perf_counter() - started, 1)
        accuracy[layer] = acc
        if layer == last:
            shipped = heads
    shipped.meta = {
        "prompts": len(prompts),
        "tokens_per_prompt": new_tokens,
        "positions": len(data.rows),
        "vocab": len(chosen),
        "coverage": coverage,
        "epochs": epochs,
        "seed": seed,
        "heldout_accuracy": accuracy[last],
        "command": "forethought heads train" + (f" --out {out}" if out != shipped_path(lm.model) else ""),
    }
    path = shipped.save(out, lm.model)
    summary = {
        "out": str(path),
        "bytes": path.stat().st_size,
        "heads": n_heads,
        "offsets": [k + 1 for k in range(1, n_heads + 1)],
        "vocab": len(chosen),
        "coverage": coverage,
        "positions": len(data.rows),
        "tokens_generated": data.tokens_generated,
        "accuracy_by_layer": {str(k): v for k, v in accuracy.items()},
        "seconds": seconds,
    }
    if as_json:
        print(json.dumps(summary))
        return
    console.print(
        f"heads: {path} ({summary['bytes'] / 1e6:.1f} MB), {len(chosen)}-token vocabulary covering "
        f"{coverage:.1%} of the model's tokens, {len(data.rows)} positions"
    )
    console.print("held-out top-1 accuracy, by layer read and by how far ahead of the state (t+1 = next token):")
    console.print("layer  " + "  ".join(f"t+{k + 1:<4}" for k in range(1, n_heads + 1)))
    for layer, acc in accuracy.items():
        console.print(f"{layer:<6} " + "  ".join(f"{a:6.1%}" for a in acc))
