"""`forethought plan-tasks`: where does a model plan? Every task (rhyme, answer, response, code, article) on every
model of the ladder: behaviour, the probe at the planning site against a prompt-text baseline, steering and
patching, the verdict and the smallest effect each null could have detected; the plan map (Markdown, JSON) and
the scale figure in --out. Each model x task folder is cached by the sha256 of its settings, so a cut or repeated
run redoes only what changed; `--ray` runs one model per Ray worker."""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from forethought.commands.common import DEFAULT_MODEL, DeviceOpt, DtypeOpt, JsonOpt, app, console, err_console
from forethought.errors import ForethoughtError

ModelsOpt = Annotated[
    list[str] | None,
    typer.Option("--model", "-m", help="Model name or path; repeat it or give a comma list for a ladder."),
]


def _models(given: list[str] | None) -> list[str]:
    models: list[str] = []
    for item in given or [DEFAULT_MODEL]:
        for name in (m.strip() for m in item.split(",")):
            if name and name not in models:
                models.append(name)
    if not models:
        raise ForethoughtError("--model is empty: name at least one model")
    return models


def _check_dtype(dtype: str) -> None:
    from forethought.weights.registry import DTYPES, INT8

    if dtype not in DTYPES and dtype != INT8:
        raise ForethoughtError(f"--dtype {dtype!r}: use one of {', '.join([*DTYPES, INT8])}")


# --causal: the analysis settings each choice sets
CAUSAL_CHOICES = {
    "all": {"causal": True, "causal_needs_excess": False},
    "where-excess": {"causal": True, "causal_needs_excess": True},
    "none": {"causal": False, "causal_needs_excess": False},
}


@app.command("plan-tasks")
def plan_tasks(
    out: Annotated[Path, typer.Option("--out", help="Folder for plan_map.md/.json, plan_scale.png, MODEL/TASK/.")],
    model: ModelsOpt = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma list of tasks (default all).")] = ("all"),
    prompts: Annotated[int | None, typer.Option("--prompts", help="Prompts per task (default 200; 120 --quick).")] = (
        None
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Fewer prompts, doses and draws: minutes.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Which prompts are drawn from each task's pool.")] = 0,
    causal: Annotated[
        str | None,
        typer.Option(
            "--causal",
            help="Causal tests for every target (all), only where the probe adds to the prompt text (where-excess:"
            " elsewhere the verdict is 'not found' whatever they say; the budget choice for large models), or none."
            " Default: all (where-excess with --quick).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoded together (same output).")] = 16,
    ray: Annotated[
        str | None, typer.Option("--ray", help="auto, local:N or a cluster address: one model per Ray worker.")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Redo every model x task, even when saved.")] = False,
    saved_only: Annotated[
        bool,
        typer.Option(
            "--saved-only", help="Only draw the map from what is saved (a ladder cut short): the rest says not run."
        ),
    ] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Where does MODEL plan? Tasks with a known future, probes against the prompt text, causal tests."""
    from forethought.experiments.plan_tasks.pipeline import PlanSettings, model_identity
    from forethought.experiments.plan_tasks.tasks import TASKS, task_names
    from forethought.paths import output_dir

    models = _models(model)
    names = task_names(tasks)
    _check_dtype(dtype)
    if batch_size < 1:
        raise ForethoughtError(f"--batch-size must be at least 1, not {batch_size}")
    smallest = min(TASKS[t].pool_size() for t in names)
    if prompts is not None and not 1 <= prompts <= smallest:
        raise ForethoughtError(f"--prompts must lie in 1..{smallest} (the smallest chosen task's pool), not {prompts}")
    if causal is not None and causal not in CAUSAL_CHOICES:
        raise ForethoughtError(f"--causal {causal!r}: use one of {', '.join(CAUSAL_CHOICES)}")
    base = PlanSettings.quick() if quick else PlanSettings()
    changes = {"seed": seed, "batch_size": batch_size, "dtype": dtype, "device": device}
    if causal is not None:
        from forethought.experiments.plan_tasks.analysis import AnalysisSettings

        # only what differs from the defaults, so that asking for the default keeps the saved results' key
        asked = base.analysis | CAUSAL_CHOICES[causal]
        changes["analysis"] = {k: v for k, v in asked.items() if getattr(AnalysisSettings(), k) != v}
    settings = PlanSettings(**(base.to_dict() | changes | ({"prompts": prompts} if prompts else {})))
    identities = {m: model_identity(m) for m in models}  # an unknown model: one line, before any work
    out = output_dir(out, "--out")
    if ray is not None:
        from forethought.distributed.dispatch import checked_spec

        checked_spec(ray)
    command = "forethought " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    started = time.perf_counter()
    if saved_only and (no_cache or ray is not None):
        raise ForethoughtError("--saved-only draws the map from saved results: not with --no-cache or --ray")
    if ray is None:
        outcomes, missing = _run_local(models, names, settings, identities, out, no_cache, as_json, saved_only)
    else:
        outcomes, missing = _run_ray(ray, models, names, settings, identities, out, no_cache)
    summary = map_summary(models, names, outcomes, missing, settings, command)
    files = write_map(summary, out)
    wall = time.perf_counter() - started
    if as_json:
        print(json.dumps({"files": {k: str(v) for k, v in files.items()}, "wall_seconds": wall} | summary))
        return
    for o in outcomes:
        verdicts = ", ".join(f"{r.target}: {r.verdict}" for r in o.results)
        rate = ""
        if o.run is not None and o.collect_seconds:
            rate = f"{len(o.run) / o.collect_seconds:.1f} prompts/s, {o.new_tokens / o.collect_seconds:.0f} new tok/s, "
        how = "cached" if o.cached else f"{rate}collect {o.collect_seconds:.0f} s, analysis {o.analysis_seconds:.0f} s"
        console.print(f"{o.model} · {o.task}: behaviour {o.behaviour:.0%} · {verdicts} · {how}", markup=False)
    for m in missing:
        console.print(f"{m['model']} · {m['task']}: not run ({m['why']})", markup=False)
    console.print(f"plan map in {wall:.0f} s: {files['md']} · {files['png']}", markup=False)


def _run_local(models, names, settings, identities, out: Path, no_cache: bool, quiet: bool, saved_only: bool = False):
    from forethought.experiments.plan_tasks.pipeline import model_slug, read_outcome, result_key, run_task

    outcomes, missing = [], []
    for model in models:
        lm = None
        for task in names:
            folder = out / model_slug(model) / task
            saved = None if no_cache else read_outcome(folder, result_key(identities[model], task, settings))
            if saved is not None:
                outcomes.append(saved)
                continue
            if saved_only:
                why = "not run yet: no saved result for these settings (--saved-only)"
                missing.append({"model": model_slug(model), "task": task, "why": why})
                continue
            if lm is None:
                from forethought.commands.common import load

                lm = load(model, settings.device, settings.dtype, quiet=quiet)
            if no_cache:
                _forget(folder)
            try:
                with task_bars(f"{task} · {model_slug(model)}", quiet) as (prompts_bar, targets_bar):
                    outcomes.append(run_task(lm, task, settings, identities[model], folder, prompts_bar, targets_bar))
            except ForethoughtError as e:  # one task this model cannot run (e.g. no chat template): the map says so
                missing.append({"model": model_slug(model), "task": task, "why": str(e)})
        del lm  # the next model's weights replace this one's
    return outcomes, missing


@contextmanager
def task_bars(label: str, quiet: bool):
    """One display, two rows: the prompts decoded (with prompts/s) and the targets analysed."""
    if quiet:
        yield None, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            unit = task.fields.get("unit", "")
            return Text(f"{task.completed / task.elapsed:,.1f} {unit}/s" if task.elapsed and unit else "")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn()]
    with Progress(*columns, console=err_console) as bar:
        rows = [bar.add_task(f"{label}: decoding", total=None, unit="prompts")]
        rows.append(bar.add_task(f"{label}: analysing targets", total=None, start=False, unit=""))

        def updater(row: int):
            def update(done: int, total: int) -> None:
                bar.start_task(rows[row])
                bar.update(rows[row], completed=done, total=total)
                if row == 0 and done >= total:  # the analysis starts now: its clock with it
                    bar.start_task(rows[1])

            return update

        yield updater(0), updater(1)


def _forget(folder: Path) -> None:
    """--no-cache: the saved collection's key goes, so it is collected again."""
    (folder / "collect_key.json").unlink(missing_ok=True)


def _run_ray(ray: str, models, names, settings, identities, out: Path, no_cache: bool):
    from forethought.distributed.plan_tasks import run_models_on_ray
    from forethought.experiments.plan_tasks.pipeline import (
        ModelJob,
        collect_key,
        model_slug,
        read_outcome,
        result_key,
        save_outcome,
        save_run,
    )

    outcomes, jobs = [], []
    for model in models:
        todo = []
        for task in names:
            saved = None
            if not no_cache:
                saved = read_outcome(out / model_slug(model) / task, result_key(identities[model], task, settings))
            if saved is not None:
                outcomes.append(saved)
            else:
                todo.append(task)
        if todo:
            jobs.append(ModelJob(model, tuple(todo), settings))
    for job, done in zip(jobs, run_models_on_ray(ray, jobs)):
        for outcome in done:
            folder = out / model_slug(job.model) / outcome.task
            if outcome.run is not None:
                save_run(outcome.run, folder, collect_key(identities[job.model], outcome.task, settings))
            save_outcome(outcome, folder)
            outcomes.append(outcome)
    return outcomes, []


def map_summary(models, names, outcomes, missing, settings, command: str) -> dict:
    """plan_map.json: the models (with their sizes), the tasks, every outcome's targets, what did not run."""
    from forethought.experiments.plan_tasks.pipeline import model_slug

    sizes = {o.model: (o.n_params, o.n_layers) for o in outcomes}
    listed = []
    for m in models:
        slug = model_slug(m)
        n_params, n_layers = sizes.get(slug, (0, 0))
        listed.append({"model": slug, "source": m, "n_params": n_params, "n_layers": n_layers})
    return {
        "models": listed,
        "tasks": list(names),
        "settings": settings.to_dict(),
        "outcomes": [o.summary() for o in outcomes],
        "missing": missing,
        "command": command,
    }


def write_map(summary: dict, out: Path) -> dict[str, Path]:
    from forethought.paths import atomic_write_text
    from forethought.viz.plan_map import plan_map_markdown, plot_plan_scale

    files = {
        "json": atomic_write_text(out / "plan_map.json", json.dumps(summary, indent=1, default=float), "--out"),
        "md": atomic_write_text(out / "plan_map.md", plan_map_markdown(summary), "--out"),
    }
    files["png"] = plot_plan_scale(summary, out / "plan_scale.png")
    return files
