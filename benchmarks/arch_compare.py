"""The architectures lab's full comparison, split into worker processes, then one aggregation.

    python -m benchmarks.arch_compare [--preset full|reduced|quick] [--out arch_results] [--plot-dir docs/results]
    python -m benchmarks.arch_compare --estimate [--preset full]   # time a few steps of every run, predict the wall

The work is cut into jobs: the sequential Feedback Transformer gets one job per (task, depth), the other three
architectures one job per task. At most `--jobs` (default: the CPU count) run at once, longest first, each as
`nice -n 10 forethought arch compare --tasks T --archs A [--layers N] --threads 1`; every run checkpoints into
`--out/runs/`, so rerunning resumes. The last call finds every run finished and only aggregates: compare.md,
compare.json and the arch_*.png figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from forethought.arch.compare import PRESETS, Plan, Preset
from forethought.arch.tasks import build_task

OTHERS = "standard,myopic,recurrent"


@dataclass
class Job:
    task: str
    archs: str
    layers: tuple[int, ...]
    seconds: float  # CPU seconds measured by --estimate, or a relative guess (_guess) that only orders the queue

    @property
    def name(self) -> str:
        return f"{self.task}-{self.archs.split(',')[0]}-L{'_'.join(map(str, self.layers))}"


def _guess(plan: Plan, archs: str, layers: tuple[int, ...], seeds: int) -> float:
    """A relative cost without timing anything, good enough to order the queue: tokens x layers, with the feedback
    model ~6x slower per token than each of the other three (sequential in time; `--estimate` measures it)."""
    per_token = 6.0 if archs == "feedback" else 3.0  # three architectures per job
    length = plan.length or 32
    return seeds * plan.steps * plan.batch_size * length * sum(layers) * per_token * 1e-6


def jobs_of(preset: Preset, seconds: dict[tuple[str, int, str], float] | None = None) -> list[Job]:
    """The preset's jobs, longest first; `seconds[(task, layers, arch)]` (one seed) replaces the guess."""
    out = []
    for plan in preset.plans:
        groups = [("feedback", (n,)) for n in plan.layers] + [(OTHERS, plan.layers)]
        for archs, layers in groups:
            if seconds is None:
                cost = _guess(plan, archs, layers, preset.seeds)
            else:
                cost = preset.seeds * sum(seconds[(plan.task, n, a)] for n in layers for a in archs.split(","))
            out.append(Job(plan.task, archs, layers, cost))
    return sorted(out, key=lambda job: -job.seconds)


def predicted_wall(jobs: list[Job], slots: int) -> float:
    """Longest-first list scheduling of the jobs on `slots` cores (one thread each): the makespan."""
    free = [0.0] * slots
    for job in sorted(jobs, key=lambda j: -j.seconds):
        free[free.index(min(free))] += job.seconds
    return max(free)


def estimate(preset: Preset, out: Path, probe_steps: int = 10) -> dict[tuple[str, int, str], float]:
    """CPU seconds of one seed of every (task, layers, arch), from `probe_steps` timed training steps and one timed
    evaluation, in this process on one thread: run it on an otherwise idle machine."""
    import torch

    from forethought.arch.compare import run_config
    from forethought.arch.sweeps import evaluate_lengths, sweep_lengths
    from forethought.arch.train import TrainSettings, evaluate, train

    torch.set_num_threads(1)
    seconds = {}
    for plan in preset.plans:
        task = build_task(plan.task, plan.length, **_options(plan, out))
        for layers in plan.layers:
            for arch in ("feedback", *OTHERS.split(",")):
                config = run_config(task, plan, layers, arch)
                settings = TrainSettings(steps=probe_steps, batch_size=plan.batch_size, lr=plan.lr, eval_batches=1)
                model, result = train(config, task, settings)
                started = time.perf_counter()
                evaluate(model, task, 4)
                evaluations = 1 + (plan.steps // plan.eval_every if plan.eval_every else 0)
                eval_seconds = evaluations * (time.perf_counter() - started)
                if plan.eval_lengths:
                    started = time.perf_counter()
                    evaluate_lengths(model, task, sweep_lengths(task.length, plan.eval_lengths))
                    eval_seconds += time.perf_counter() - started
                per_step = result.train_seconds / probe_steps
                seconds[(plan.task, layers, arch)] = plan.steps * per_step + eval_seconds
                print(
                    f"{plan.task:7s} L{layers} {arch:9s} {1000 * per_step:7.1f} ms/step x {plan.steps} steps "
                    f"+ {eval_seconds:5.1f} s eval = {seconds[(plan.task, layers, arch)]:6.0f} s per seed",
                    file=sys.stderr,
                )
    return seconds


def _options(plan: Plan, out: Path) -> dict:
    return dict(plan.options) | ({"cache_dir": out / "data"} if plan.task == "text" else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--quick", action="store_true", help="the few-minute preset")
    parser.add_argument("--out", type=Path, default=Path("arch_results"))
    parser.add_argument("--plot-dir", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="worker processes at once")
    parser.add_argument("--estimate", action="store_true", help="time a few steps of every run; train nothing")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    args.out.mkdir(parents=True, exist_ok=True)
    for plan in preset.plans:
        if plan.task == "text":  # tokenize once, before two workers would race to write the cache
            build_task("text", plan.length, **_options(plan, args.out))
    if args.estimate:
        jobs = jobs_of(preset, estimate(preset, args.out))
        total = sum(job.seconds for job in jobs)
        print(
            f"preset {preset.name}: {total / 60:.1f} CPU-min in {len(jobs)} jobs; longest job {jobs[0].name} ", end=""
        )
        print(
            f"{jobs[0].seconds / 60:.1f} min; predicted wall on {args.jobs} idle cores "
            f"{predicted_wall(jobs, args.jobs) / 60:.1f} min (+ aggregation)"
        )
        return 0
    base = [sys.executable, "-m", "forethought", "arch", "compare", "--preset", preset.name, "--out", str(args.out)]
    started = time.perf_counter()
    queue, running, failed = jobs_of(preset), [], []
    while queue or running:
        while queue and len(running) < args.jobs:
            job = queue.pop(0)
            log = open(args.out / f"{job.name}.log", "w")  # noqa: SIM115 - closed when the worker ends
            cmd = ["nice", "-n", "10", *base, "--tasks", job.task, "--archs", job.archs, "--json", "--threads", "1"]
            cmd += ["--layers", ",".join(map(str, job.layers))]
            running.append((job, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log), log))
        time.sleep(1)
        for entry in [e for e in running if e[1].poll() is not None]:
            running.remove(entry)
            entry[2].close()
            if entry[1].returncode != 0:
                failed.append(entry[0].name)
    if failed:
        print(f"error: job(s) {', '.join(failed)} failed; see {args.out}/<job>.log", file=sys.stderr)
        return 1
    final = base + (["--plot-dir", str(args.plot_dir)] if args.plot_dir else [])
    code = subprocess.call(final)
    print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
