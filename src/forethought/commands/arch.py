"""`forethought arch train|compare`: the architectures lab (standard, feedback, myopic, recurrent)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from forethought.commands.common import JsonOpt, app, console, err_console, parse_int_list
from forethought.errors import ForethoughtError

arch_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Train and compare a standard decoder, the Feedback Transformer, a myopic decoder and an RNN.",
)
app.add_typer(arch_app, name="arch")


def _progress(total: int | None, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} · {task.fields[speed]:,.0f} tok/s"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )


@arch_app.command("train")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder (created; rerun to resume).")],
    arch: Annotated[str, typer.Option("--arch", help="standard, feedback, myopic or recurrent.")] = "standard",
    task_name: Annotated[str, typer.Option("--task", help="parity, sum-mod, perm, repeat, recall or text.")] = "parity",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 300,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup + cosine).")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed", help="Initial weights and batch order.")] = 0,
    layers: Annotated[int, typer.Option("--layers", help="Layers (GRU layers for recurrent).")] = 2,
    d_model: Annotated[int, typer.Option("--d-model", help="Width.")] = 32,
    heads: Annotated[int, typer.Option("--heads", help="Attention heads.")] = 4,
    d_ff: Annotated[int, typer.Option("--d-ff", help="MLP hidden size (SwiGLU).")] = 64,
    length: Annotated[int, typer.Option("--length", help="Sequence length (0: the task's default).")] = 0,
    positions: Annotated[
        str,
        typer.Option("--positions", help="rope, or none (no positional encoding: a length-generalisation control)."),
    ] = "rope",
    modulus: Annotated[int, typer.Option("--modulus", help="sum-mod: the modulus.")] = 5,
    elements: Annotated[int, typer.Option("--elements", help="perm: permutations of this many items.")] = 3,
    pairs: Annotated[int, typer.Option("--pairs", help="recall: key/value pairs per sequence.")] = 4,
    corpus: Annotated[str, typer.Option("--corpus", help="text: 'stdlib', a file, a folder or a .jsonl.")] = "stdlib",
    vocab: Annotated[int, typer.Option("--vocab", help="text: most frequent tokens kept (+1 <unk>).")] = 1024,
    eval_lengths: Annotated[
        str,
        typer.Option("--eval-lengths", help="Also evaluate at these sequence lengths, e.g. 8,16,64 (generalisation)."),
    ] = "",
    no_export: Annotated[bool, typer.Option("--no-export", help="Skip the engine folder (out/engine).")] = False,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (1 is kind to a shared machine).")] = 1,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Write a checkpoint every this many steps (and at the end).")
    ] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Train one architecture on one task; the trained model is also written as a model folder (--model)."""
    import torch

    from forethought.arch.budget import check_fits
    from forethought.arch.config import ArchConfig
    from forethought.arch.sweeps import check_lengths, evaluate_lengths, length_record
    from forethought.arch.tasks import build_task
    from forethought.arch.train import ENGINE, TrainSettings, check_resumable, train

    task = build_task(
        task_name,
        length or None,
        modulus=modulus,
        elements=elements,
        pairs=pairs,
        corpus=corpus,
        vocab=vocab,
        cache_dir=out / "data",
    )
    lengths = parse_int_list(eval_lengths, "eval-lengths", empty_ok=True)
    context = max(256, task.length)
    if lengths and task.name == "recall":
        raise ForethoughtError("--eval-lengths: recall sequences have one length (set by --pairs)")
    check_lengths(lengths, context)
    config = ArchConfig(
        arch, task.vocab_size, d_model, layers, heads, d_ff, context_length=context, positions=positions
    )
    _check_threads(threads)
    settings = TrainSettings(
        steps=steps,
        batch_size=batch,
        lr=lr,
        seed=seed,
        eval_every=max(1, steps // 5),
        checkpoint_every=checkpoint_every,
    )
    # Before any allocation: the memory a step needs, and that the task can hand out both splits at every length.
    check_fits(config, batch, max([task.length, *lengths]))
    task.check_buildable([task.length, *lengths])
    check_resumable(out, config, task)  # before the progress bar starts drawing
    torch.set_num_threads(threads)
    with _progress(steps, as_json) as progress:
        bar = progress.add_task(f"{arch} on {task.name}", total=steps, loss=float("nan"), speed=0.0)

        def on_step(step: int, loss: float, speed: float) -> None:
            progress.update(bar, completed=step, loss=loss, speed=speed)

        model, result = train(config, task, settings, out, on_step=on_step, export=not no_export)
    summary = result.to_dict()
    summary.pop("history")
    if lengths:
        summary["by_length"] = length_record(evaluate_lengths(model, task, lengths))
    if not no_export:
        summary["engine_folder"] = str(out / ENGINE)
    if as_json:
        print(json.dumps(summary, default=float))
        return
    f = result.final
    console.print(
        f"{arch} on {task.name}: held-out accuracy {100 * f.accuracy:.1f}% · loss {f.loss:.4f} · "
        f"{result.steps_done} steps · {result.train_tokens_per_second:,.0f} train tok/s · {model.n_params():,} params"
    )
    for n, at in summary.get("by_length", {}).items():
        console.print(
            f"  at length {n}: accuracy {100 * at['accuracy']:.1f}% · last quarter {100 * at['tail_accuracy']:.1f}%"
        )
    console.print(f"checkpoint: {out}")
    if "engine_folder" in summary:
        console.print(f"engine folder (load_model / --model): {summary['engine_folder']}")


def _check_threads(threads: int) -> None:
    import os

    most = 4 * (os.cpu_count() or 1)
    if not 1 <= threads <= most:
        raise ForethoughtError(f"--threads must lie in 1..{most} (four per core here), got {threads}")


@arch_app.command("compare")
def compare_command(
    out: Annotated[Path, typer.Option("--out", help="Results folder (runs resume from here).")] = Path("arch_results"),
    quick: Annotated[bool, typer.Option("--quick", help="The few-minute preset (2 seeds, short runs).")] = False,
    preset: Annotated[str, typer.Option("--preset", help="full, reduced or quick.")] = "full",
    archs: Annotated[str, typer.Option("--archs", help="Comma-separated subset of the architectures.")] = "",
    tasks: Annotated[
        str, typer.Option("--tasks", help="Comma-separated subset of the preset's tasks (parallel runs share --out).")
    ] = "",
    layers: Annotated[
        str, typer.Option("--layers", help="Comma-separated subset of the preset's depths (parallel runs share --out).")
    ] = "",
    plot_dir: Annotated[Path | None, typer.Option("--plot-dir", help="Where PNGs go (default: --out).")] = None,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (1 is kind to a shared machine).")] = 1,
    only_finished: Annotated[
        bool, typer.Option("--only-finished", help="Aggregate the runs already finished in --out; train nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every architecture x task x seed of a preset -> compare.md, compare.json and arch_*.png."""
    import torch

    from forethought.arch.checkpoint import write_atomic_text, writing
    from forethought.arch.compare import PRESETS, run_comparison
    from forethought.arch.config import ARCHS
    from forethought.viz.arch import markdown, plot_all

    name = "quick" if quick else preset
    if name not in PRESETS:
        raise ForethoughtError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})")
    chosen = tuple(a.strip() for a in archs.split(",") if a.strip()) or ARCHS
    unknown = [a for a in chosen if a not in ARCHS]
    if unknown:
        raise ForethoughtError(f"unknown architecture(s) {', '.join(unknown)} (one of {', '.join(ARCHS)})")
    _check_threads(threads)
    torch.set_num_threads(threads)
    p = PRESETS[name]
    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    known = [plan.task for plan in p.plans]
    if any(t not in known for t in wanted):
        raise ForethoughtError(f"--tasks {tasks!r}: preset {name!r} has {', '.join(known)}")
    if wanted:
        p = replace(p, plans=tuple(plan for plan in p.plans if plan.task in wanted))
    depths = set(parse_int_list(layers, "layers", empty_ok=True))
    if depths:
        plans = tuple(replace(plan, layers=tuple(n for n in plan.layers if n in depths)) for plan in p.plans)
        p = replace(p, plans=tuple(plan for plan in plans if plan.layers))
        if not p.plans:
            offered = sorted({n for plan in PRESETS[name].plans for n in plan.layers})
            raise ForethoughtError(f"--layers {layers!r}: preset {name!r} trains {', '.join(map(str, offered))} layers")
    total = p.seeds * len(chosen) * sum(len(plan.layers) for plan in p.plans)
    with _progress(total, as_json) as progress:
        runs = progress.add_task("runs", total=total, loss=float("nan"), speed=0.0)
        steps = progress.add_task("", total=None, loss=float("nan"), speed=0.0)
        done = [-1]

        def on_run(label: str) -> None:
            done[0] += 1
            progress.update(runs, completed=done[0])
            progress.reset(steps, description=label, loss=float("nan"), speed=0.0)

        def on_step(step: int, loss: float, speed: float) -> None:
            progress.update(steps, completed=step, loss=loss, speed=speed)

        result = run_comparison(p, out, chosen, on_run=on_run, on_step=on_step, train_missing=not only_finished)
        progress.update(runs, completed=total)
    if not result.runs:
        raise ForethoughtError(f"{out}: no finished runs of preset {name!r} to aggregate (drop --only-finished)")
    text = markdown(result)
    # Each file whole or not at all: a rerun must never read half a compare.json as a result.
    write_atomic_text(out / "compare.json", json.dumps(result.to_dict(), indent=1, default=float), "the comparison")
    write_atomic_text(out / "compare.md", text, "the comparison")
    with writing(plot_dir or out, "the plots"):
        pngs = plot_all(result, plot_dir or out)
    if as_json:
        print(json.dumps(result.to_dict() | {"pngs": [str(p) for p in pngs]}, default=float))
        return
    console.print(text, markup=False)
    console.print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {len(pngs)} PNGs in {plot_dir or out}")
