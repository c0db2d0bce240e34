"""Future Lens at the issue's budget: extract + probe, 30 layers x offsets 1-4, >= 200k training tokens, <= 30 min.

    python -m benchmarks.future_lens                    # full budget run into /tmp/future_run
    python -m benchmarks.future_lens --tokens 20000     # a quick run

Prints the wall time (and the process CPU time, which says how much of the wall time other processes took on a
shared machine) of each phase and the total against the 30-minute budget, and writes them to OUT/timings.json.
Rerunning into the same OUT resumes extraction (completed shards are skipped, and their time is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from forethought.weights.registry import DEFAULT_MODEL

BUDGET_SECONDS = 30 * 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=245_760, help="tokens to extract, train + test")
    parser.add_argument("--out", type=Path, default=Path("/tmp/future_run"))
    parser.add_argument("--offsets", default="1-4")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored per cell")
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        # On a machine shared with other jobs, one thread wastes far less time waiting at barriers.
        import torch

        torch.set_num_threads(args.threads)

    from forethought.commands.common import parse_int_list, progress_bar
    from forethought.weights import load_model

    phases: dict[str, dict[str, float]] = {}

    def timed(name: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        phases[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        print(f"{name:<8} {phases[name]['wall_s']:8.1f} s wall  {phases[name]['cpu_s']:8.1f} s cpu", flush=True)
        return value

    load_before = os.getloadavg()
    lm = timed("load", lambda: load_model(args.model))
    layers = list(range(lm.config.n_layers))

    from forethought.experiments.future import run_extract

    with progress_bar("extract", unit="tok", quiet=args.no_progress) as progress:
        extracted = timed(
            "extract",
            lambda: run_extract(
                lm, args.corpus, args.out / "store", layers, tokens=args.tokens, float16=True, progress=progress
            ),
        )
    print(
        f"         {extracted.tokens:,} tokens ({extracted.tokens_by_split['train']:,} train), "
        f"{extracted.shards_skipped} shards resumed, {extracted.tokens_per_second:,.0f} tok/s"
    )

    from forethought.data.store import ActivationStore
    from forethought.experiments.probes import run_probes
    from forethought.viz.future import write_report

    store = ActivationStore(args.out / "store")
    offsets = parse_int_list(args.offsets, "offsets")
    with progress_bar("probe layers", quiet=args.no_progress) as progress:
        result = timed(
            "probe",
            lambda: run_probes(store, lm.model, offsets, layers, eval_tokens=args.eval_tokens, progress=progress),
        )
    paths = timed("report", lambda: write_report(result, args.out / "probes", tokenizer=lm.tokenizer))

    total = sum(p["wall_s"] for p in phases.values())
    verdict = "within" if total <= BUDGET_SECONDS else "OVER"
    print(f"total    {total:8.1f} s wall  ({total / 60:.1f} min, {verdict} the {BUDGET_SECONDS // 60}-minute budget)")
    print(f"train tokens used by the probes: {result.n_train:,}; held-out tokens scored per cell: {result.n_eval:,}")
    timings = {
        "phases": phases,
        "total_wall_s": total,
        "budget_s": BUDGET_SECONDS,
        "within_budget": total <= BUDGET_SECONDS,
        "tokens": extracted.tokens,
        "train_tokens": result.n_train,
        "extract_tokens_per_second": extracted.tokens_per_second,
        "shards_resumed": extracted.shards_skipped,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": __import__("torch").get_num_threads(),
        "files": {k: str(v) for k, v in paths.items()},
    }
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
