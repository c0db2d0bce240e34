"""The architectures lab's full comparison, one process per task in parallel, then one aggregation.

    python -m benchmarks.arch_compare [--preset full|reduced|quick] [--out arch_results] [--plot-dir docs/results]

Each task runs as two workers, `forethought arch compare --tasks T --archs feedback` and one for the other three
architectures, under `nice -n 10` with one torch thread; every run
checkpoints into `--out/runs/`, so rerunning resumes. The last call finds every run finished and only aggregates:
compare.md, compare.json and the arch_*.png figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from forethought.arch.compare import PRESETS
from forethought.arch.tasks import build_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--quick", action="store_true", help="the few-minute preset")
    parser.add_argument("--out", type=Path, default=Path("arch_results"))
    parser.add_argument("--plot-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    base = [sys.executable, "-m", "forethought", "arch", "compare", "--preset", preset, "--out", str(args.out)]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workers = []
    for plan in PRESETS[preset].plans:
        if plan.task == "text":  # tokenize once, before two workers would race to write the cache
            build_task("text", plan.length, cache_dir=args.out / "data")
        # The sequential feedback model takes as long as the other three together: it gets a worker of its own.
        for group in ("feedback", "standard,myopic,recurrent"):
            name = f"{plan.task}-{group.split(',')[0]}"
            log = open(args.out / f"{name}.log", "w")  # noqa: SIM115 - closed when the worker ends
            cmd = ["nice", "-n", "10", *base, "--tasks", plan.task, "--archs", group, "--json"]
            workers.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log), log))
    failed = []
    for task, worker, log in workers:
        if worker.wait() != 0:
            failed.append(task)
        log.close()
    if failed:
        print(f"error: task group(s) {', '.join(failed)} failed; see {args.out}/<task>.log", file=sys.stderr)
        return 1
    final = base + (["--plot-dir", str(args.plot_dir)] if args.plot_dir else [])
    code = subprocess.call(final)
    print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
