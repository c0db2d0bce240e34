"""The architectures lab's full comparison, one process per task in parallel, then one aggregation.

    python -m benchmarks.arch_compare [--quick] [--out arch_results] [--plot-dir docs/results]

Each task group runs as `forethought arch compare --tasks T` under `nice -n 10` with one torch thread; every run
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute preset")
    parser.add_argument("--out", type=Path, default=Path("arch_results"))
    parser.add_argument("--plot-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "full"
    base = [sys.executable, "-m", "forethought", "arch", "compare", "--preset", preset, "--out", str(args.out)]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workers = []
    for plan in PRESETS[preset].plans:
        log = open(args.out / f"{plan.task}.log", "w")  # noqa: SIM115 - closed when the worker ends
        cmd = ["nice", "-n", "10", *base, "--tasks", plan.task, "--json"]
        workers.append((plan.task, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log), log))
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
