"""The comparison: every architecture on every task over several seeds, as one plain result object.

Each run trains into its own folder under `out/runs/` and is skipped when already finished there, so an interrupted
comparison resumes where it stopped. Myopia gaps are paired by seed: the myopic and standard runs of one seed share
the initial weights and the batches, and differ only in where the gradient flows.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forethought.arch.config import ARCHS, ArchConfig
from forethought.arch.measure import Costs, costs, decode_speeds
from forethought.arch.models import ArchModel, build_model
from forethought.arch.stats import interval
from forethought.arch.sweeps import (
    cached_lengths,
    depth_sweep,
    evaluate_lengths,
    length_record,
    length_sweep,
    sweep_lengths,
)
from forethought.arch.tasks import Task, build_task
from forethought.arch.train import TrainSettings, check_resumable, load_checkpoint, read_state, train
from forethought.errors import ForethoughtError


@dataclass(frozen=True)
class Plan:
    """One task's part of the comparison: its shape, its training budget, and the depths to try."""

    task: str
    layers: tuple[int, ...]
    d_model: int
    n_heads: int
    d_ff: int
    steps: int
    batch_size: int
    lr: float
    length: int | None = None
    eval_every: int = 0
    options: dict = field(default_factory=dict)
    # Length generalisation: every checkpoint is also evaluated at these multiples of its training length.
    eval_lengths: tuple[float, ...] = ()

    def context_length(self, task: Task) -> int:
        """The models' context: room for the task and for the longest evaluation length."""
        return max(256, task.length, *sweep_lengths(task.length, self.eval_lengths or (1,)))


@dataclass(frozen=True)
class Preset:
    name: str
    seeds: int
    plans: tuple[Plan, ...]


# "full" is sized for an idle 2-core CPU run by `python -m benchmarks.arch_compare` (<= 90 min; the estimate and how it
# was made: README, architectures lab; `python -m benchmarks.arch_compare --estimate` times it again on the machine at
# hand). "reduced" is what a machine shared with six other jobs finished in under an hour; "quick" is the few-minute
# run; "smoke" the seconds-long plumbing for tests. The sequential Feedback Transformer dominates every budget.
# State tracking (parity; S3 composition, the smallest non-abelian group) sweeps depth (1, 2, 4 layers at one length)
# and evaluation length (L/2 .. 4L).
SWEEP = (0.5, 1.0, 2.0, 4.0)
PRESETS = {
    "full": Preset(
        "full",
        5,
        (
            Plan("parity", (1, 2, 4), 32, 4, 64, steps=600, batch_size=32, lr=3e-3, length=16, eval_lengths=SWEEP),
            Plan("perm", (1, 2, 4), 32, 4, 64, steps=600, batch_size=32, lr=3e-3, length=16, eval_lengths=SWEEP),
            Plan("repeat", (2,), 32, 4, 64, steps=800, batch_size=32, lr=3e-3, length=24),
            Plan("text", (2,), 64, 4, 128, steps=800, batch_size=16, lr=3e-3, length=64, eval_every=100),
        ),
    ),
    "reduced": Preset(
        "reduced",
        3,
        (
            Plan("parity", (1, 2), 32, 4, 64, steps=200, batch_size=32, lr=3e-3, length=16, eval_lengths=SWEEP),
            Plan("repeat", (2,), 32, 4, 64, steps=400, batch_size=32, lr=3e-3, length=24),
            Plan("text", (2,), 64, 4, 128, steps=300, batch_size=16, lr=3e-3, length=32, eval_every=75),
        ),
    ),
    # seconds: the plumbing (train, aggregate, plot) on models too small to learn; for tests of what presents it
    "smoke": Preset(
        "smoke",
        2,
        (
            Plan("parity", (1, 2), 16, 2, 32, steps=3, batch_size=8, lr=3e-3, length=8, eval_lengths=SWEEP),
            Plan("repeat", (1,), 16, 2, 32, steps=3, batch_size=8, lr=3e-3, length=12),
        ),
    ),
    "quick": Preset(
        "quick",
        2,
        (
            Plan("parity", (1, 2), 32, 4, 64, steps=300, batch_size=32, lr=3e-3, length=16, eval_lengths=SWEEP),
            Plan("repeat", (2,), 32, 4, 64, steps=150, batch_size=32, lr=3e-3, length=24),
            Plan("text", (2,), 64, 4, 128, steps=40, batch_size=8, lr=3e-3, length=32, eval_every=20),
        ),
    ),
}


@dataclass
class RunSummary:
    task: str
    layers: int
    arch: str
    seed: int
    n_params: int
    accuracy: float
    loss: float
    by_position: list[float]
    train_tokens_per_second: float
    evals: list[dict]
    train_seconds: float
    by_length: dict[int, dict] = field(default_factory=dict)  # eval length -> accuracy, tail_accuracy, loss


@dataclass
class ComparisonResult:
    preset: str
    seeds: int
    runs: list[RunSummary]
    costs: dict[str, Costs]  # per architecture, at the text shape
    tasks: dict[str, dict]
    seconds: float
    table: list[dict] = field(default_factory=list)  # per task, layers, arch: accuracy/loss intervals
    myopia_gaps: list[dict] = field(default_factory=list)  # per task: myopic - standard, paired by seed
    equal_flops: list[dict] = field(default_factory=list)  # text: held-out loss at the smallest shared FLOPs
    depth_sweep: list[dict] = field(default_factory=list)  # per task, arch: accuracy vs layers at the training length
    length_sweep: list[dict] = field(default_factory=list)  # per task, layers, arch: accuracy vs evaluation length

    def to_dict(self) -> dict:
        return asdict(self)


def _run_folder(out: Path, plan: Plan, layers: int, arch: str, seed: int) -> Path:
    return out / "runs" / f"{plan.task}-L{layers}-{arch}-s{seed}"


def run_config(task: Task, plan: Plan, layers: int, arch: str) -> ArchConfig:
    """The shape of one run of the comparison."""
    return ArchConfig(
        arch, task.vocab_size, plan.d_model, layers, plan.n_heads, plan.d_ff, context_length=plan.context_length(task)
    )


def _one_run(
    task: Task, plan: Plan, layers: int, arch: str, seed: int, out: Path, on_step, train_missing: bool = True
) -> RunSummary | None:
    config = run_config(task, plan, layers, arch)
    settings = TrainSettings(
        steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr, seed=seed, eval_every=plan.eval_every
    )
    folder = _run_folder(out, plan, layers, arch, seed)
    state = read_state(folder)  # verified against its hashes, its scores in range
    if state is not None:  # a run of another preset in the same --out must not stand in for this one
        check_resumable(folder, config, task)
        if state["settings"] != asdict(settings):
            raise ForethoughtError(f"{folder} holds a run with other training settings; choose a new --out")
    if state is not None and state.get("final"):
        model, state = load_checkpoint(folder)
        final = state["final"]
        summary = RunSummary(
            task.name,
            layers,
            arch,
            seed,
            model.n_params(),
            final["accuracy"],
            final["loss"],
            final["by_position"],
            state["train_tokens_per_second"],
            state.get("evals", []),
            state["train_seconds"],
        )
        return _with_lengths(summary, model, task, plan, folder)
    if not train_missing:
        return None
    # Seed 0's model folder is what `lens`, `probe`, the viewer and benchmarks.arch_probe open (a text model's
    # folder holds the full 49k-token vocabulary, 25 MB: not worth writing for every seed).
    model, result = train(config, task, settings, folder, on_step=on_step, export=seed == 0)
    summary = RunSummary(
        task.name,
        layers,
        arch,
        seed,
        model.n_params(),
        result.final.accuracy,
        result.final.loss,
        result.final.by_position,
        result.train_tokens_per_second,
        result.evals,
        result.train_seconds,
    )
    return _with_lengths(summary, model, task, plan, folder)


def _with_lengths(summary: RunSummary, model: ArchModel, task: Task, plan: Plan, folder: Path) -> RunSummary:
    """Attach the run's length sweep (computed once, then read from its folder)."""
    if plan.eval_lengths:
        lengths = sweep_lengths(task.length, plan.eval_lengths)
        measure = lambda: length_record(evaluate_lengths(model, task, lengths))  # noqa: E731 - run only on a miss
        summary.by_length = cached_lengths(folder, lengths, measure)
    return summary


def _aggregate(result: ComparisonResult) -> None:
    groups: dict[tuple, list[RunSummary]] = {}
    for r in result.runs:
        groups.setdefault((r.task, r.layers, r.arch), []).append(r)
    for (task, layers, arch), runs in groups.items():
        positions = list(zip(*(r.by_position for r in runs)))
        result.table.append(
            {
                "task": task,
                "layers": layers,
                "arch": arch,
                "n_params": runs[0].n_params,
                "accuracy": interval([r.accuracy for r in runs]),
                "loss": interval([r.loss for r in runs]),
                "accuracy_by_position": [
                    statistics.fmean(p) if not any(map(math.isnan, p)) else None for p in positions
                ],
                "train_tokens_per_second": statistics.fmean(r.train_tokens_per_second for r in runs),
            }
        )
        if arch != "myopic":
            continue
        standard = {r.seed: r for r in groups.get((task, layers, "standard"), [])}
        paired = [(r, standard[r.seed]) for r in runs if r.seed in standard]
        if paired:
            result.myopia_gaps.append(
                {
                    "task": task,
                    "layers": layers,
                    "loss_gap": interval([m.loss - s.loss for m, s in paired]),
                    "accuracy_gap": interval([m.accuracy - s.accuracy for m, s in paired]),
                }
            )
    _equal_flops(result)
    train_lengths = {name: t["length"] for name, t in result.tasks.items()}
    result.depth_sweep = depth_sweep(result.table, train_lengths)
    result.length_sweep = length_sweep(result.runs, train_lengths)


def _loss_at(evals: list[dict], flops: float) -> float:
    """Held-out loss at `flops` training FLOPs, linearly interpolated between evaluations."""
    points = sorted((e["flops"], e["loss"]) for e in evals)
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            return l0 + (l1 - l0) * (flops - f0) / (f1 - f0) if f1 > f0 else l1
    return points[-1][1] if flops >= points[-1][0] else float("nan")


def _equal_flops(result: ComparisonResult) -> None:
    text = [r for r in result.runs if r.task == "text" and r.evals]
    if not text:
        return
    budget = min(max(e["flops"] for e in r.evals) for r in text)
    for arch in ARCHS:
        runs = [r for r in text if r.arch == arch]
        if runs:
            losses = [_loss_at(r.evals, budget) for r in runs]
            result.equal_flops.append({"arch": arch, "flops": budget, "loss": interval(losses)})


def run_comparison(
    preset: Preset,
    out: Path,
    archs: tuple[str, ...] = ARCHS,
    text_cache: Path | None = None,
    on_run: Callable[[str], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    train_missing: bool = True,
) -> ComparisonResult:
    """Train every (task, depth, architecture, seed) of `preset` under `out`, then aggregate.

    With `train_missing=False`, only runs already finished under `out` are aggregated (a partial comparison)."""
    started = time.perf_counter()
    result = ComparisonResult(preset.name, preset.seeds, [], {}, {}, 0.0)
    text_shape: tuple[Task, Plan] | None = None
    for plan in preset.plans:
        options = dict(plan.options)
        if plan.task == "text":
            options["cache_dir"] = text_cache or out / "data"
        task = build_task(plan.task, plan.length, **options)
        result.tasks[task.name] = task.describe()
        if plan.task == "text":
            text_shape = (task, plan)
        for layers in plan.layers:
            for arch in archs:
                for seed in range(preset.seeds):
                    if on_run is not None:
                        on_run(f"{task.name} L{layers} {arch} seed {seed}")
                    run = _one_run(task, plan, layers, arch, seed, out, on_step, train_missing)
                    if run is not None:
                        result.runs.append(run)
    task, plan = text_shape if text_shape else (task, plan)
    torch.manual_seed(0)
    models = {
        arch: build_model(ArchConfig(arch, task.vocab_size, plan.d_model, plan.layers[-1], plan.n_heads, plan.d_ff))
        for arch in archs
    }
    speeds = decode_speeds(models)
    for arch, model in models.items():
        result.costs[arch] = costs(model, task.length, speeds[arch])
    _aggregate(result)
    result.seconds = time.perf_counter() - started
    return result
