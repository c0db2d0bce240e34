"""Extraction throughput on Ray: 1 vs 2 local workers against the single process, and the same store bytes.

    python -m benchmarks.ray_extract                      # 8192 stdlib tokens, 4 layers, into /tmp/ray_bench
    python -m benchmarks.ray_extract --tokens 4096 --rounds 3 --check-threads

Every run extracts the same settings into its own store; the script checks that all stores have the same shard
hashes (the identity check on the real model) and reports, per run: wall time (including starting the local
cluster and loading the model in each worker), the driver's tokens/s over the shards, and each worker's own
tokens/s (time inside its tasks, model already loaded). The projected cluster throughput is the per-worker rate of
the 1-worker run times a worker count: what N machines' worth of dedicated cores would sustain if the driver keeps
up (it writes every shard; see the README). Worker processes run one torch thread each, so the single-process
reference does too (`--threads 1`), for identical bytes. Results go to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from forethought.weights.registry import DEFAULT_MODEL


def shard_hashes(store: Path) -> list[str]:
    manifest = json.loads((store / "manifest.json").read_text())
    return [s["sha256"] for s in manifest["shards"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", default="0,10,20", help="stored layers (the final layer is always added)")
    parser.add_argument("--workers", default="1,2", help="local Ray worker counts to run")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass (and per shard)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ray_bench"))
    parser.add_argument("--project", default="4,16,64", help="worker counts to project throughput for")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every configuration; the table has medians")
    parser.add_argument("--check-threads", action="store_true", help="also compare a single process at all cores")
    args = parser.parse_args(argv)

    import torch

    from forethought.data.corpus import load_corpus
    from forethought.distributed.cluster import RaySpec
    from forethought.distributed.extract import named_model, run_extract_on_ray
    from forethought.experiments.future import run_extract
    from forethought.weights import load_model

    torch.set_num_threads(1)  # what each Ray worker runs with: the same bytes need the same thread count
    shutil.rmtree(args.out, ignore_errors=True)
    lm = load_model(args.model)
    corpus = load_corpus("stdlib")
    layers = [int(x) for x in args.layers.split(",")]
    options = dict(tokens=args.tokens, window=args.window, batch=args.batch, float16=True, shard_mb=1e-6)
    options["progress"] = False
    plan = [("single process", 0)] + [(f"ray local:{n}", n) for n in map(int, args.workers.split(","))]
    runs: dict[str, list[dict]] = {name: [] for name, _ in plan}
    reference: list[str] | None = None
    identical: dict[str, bool] = {}
    for round_ in range(args.rounds):
        # alternate the order so a drift in the machine's load does not favour one configuration
        for name, n in plan if round_ % 2 == 0 else plan[::-1]:
            folder = args.out / f"{name.replace(' ', '_').replace(':', '')}-{round_}"
            started = time.perf_counter()
            if n == 0:
                result = run_extract(lm, corpus, folder, layers, **options)
                extra: dict = {}
            else:
                spec, source = RaySpec(local_workers=n), named_model(args.model)
                result = run_extract_on_ray(spec, source, lm, corpus, folder, layers, **options)
                extra = result.ray
            row = {
                "wall_s": round(time.perf_counter() - started, 2),
                "tokens_per_second": round(result.tokens_per_second, 1),
                "load_avg": os.getloadavg()[0],
                **extra,
            }
            runs[name].append(row)
            print(json.dumps({name: row}), flush=True)
            hashes = shard_hashes(folder)
            reference = reference or hashes
            identical[name] = identical.get(name, True) and hashes == reference
            shutil.rmtree(folder)
    if args.check_threads:  # does the single process give the same bytes with torch's default thread count?
        torch.set_num_threads(os.cpu_count() or 1)
        run_extract(lm, corpus, args.out / "threads", layers, **options)
        same = shard_hashes(args.out / "threads") == reference
        identical[f"single process, {torch.get_num_threads()} threads"] = same

    def median(values):
        return round(statistics.median(values), 1)

    table = {}
    for name, rows in runs.items():
        per_worker = [w["tokens_per_second"] for r in rows for w in r.get("workers", {}).values()]
        table[name] = {
            "wall_s": median([r["wall_s"] for r in rows]),
            "tokens_per_second": median([r["tokens_per_second"] for r in rows]),
            "per_worker_tokens_per_second": median(per_worker) if per_worker else None,
            "sum_of_workers_tokens_per_second": median([r["projected_tokens_per_second"] for r in rows])
            if per_worker
            else None,
        }
    one = table.get("ray local:1", {}).get("per_worker_tokens_per_second")
    projected = {n: round(one * n, 1) for n in map(int, args.project.split(","))} if one else {}
    summary = {
        "tokens": args.tokens,
        "layers": layers,
        "model": args.model,
        "cores": os.cpu_count(),
        "rounds": args.rounds,
        "table": table,
        "identical_to_single_process": identical,
        "shard_sha256": reference,
        "projected_tokens_per_second": projected,
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    print()
    print("| run | wall s (incl. start) | driver tok/s | per-worker tok/s | sum of workers tok/s |")
    print("|---|---|---|---|---|")
    for name, r in table.items():
        print(
            f"| {name} | {r['wall_s']} | {r['tokens_per_second']} | {r['per_worker_tokens_per_second'] or '-'} "
            f"| {r['sum_of_workers_tokens_per_second'] or '-'} |"
        )
    return 0 if all(v for k, v in identical.items() if "threads" not in k) else 1


if __name__ == "__main__":
    raise SystemExit(main())
