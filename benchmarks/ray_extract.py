"""Extraction throughput on Ray: 1 vs 2 local workers against the single process, and the same store bytes.

    python -m benchmarks.ray_extract                      # 8192 stdlib tokens, 4 layers, into /tmp/ray_bench
    python -m benchmarks.ray_extract --tokens 2048 --workers 1,2

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
import time
from pathlib import Path


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
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ray_bench"))
    parser.add_argument("--project", default="4,16,64", help="worker counts to project throughput for")
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
    runs: dict[str, dict] = {}

    started = time.perf_counter()
    result = run_extract(lm, corpus, args.out / "single", layers, **options)
    runs["single process"] = {
        "wall_s": round(time.perf_counter() - started, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "shards": result.shards,
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps({"single process": runs["single process"]}), flush=True)
    for n in [int(x) for x in args.workers.split(",")]:
        started = time.perf_counter()
        result = run_extract_on_ray(
            RaySpec(local_workers=n), named_model(args.model), lm, corpus, args.out / f"ray{n}", layers, **options
        )
        runs[f"ray local:{n}"] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "shards": result.shards,
            "load_avg": os.getloadavg()[0],
            **result.ray,
        }
        print(json.dumps({f"ray local:{n}": runs[f"ray local:{n}"]}), flush=True)

    reference = shard_hashes(args.out / "single")
    identical = {name: shard_hashes(args.out / folder) == reference for name, folder in _folders(runs).items()}
    one = runs.get("ray local:1")
    per_worker = next(iter(one["workers"].values()))["tokens_per_second"] if one else None
    projected = {n: round(per_worker * n, 1) for n in map(int, args.project.split(","))} if per_worker else {}
    summary = {
        "tokens": args.tokens,
        "layers": layers,
        "model": args.model,
        "cores": os.cpu_count(),
        "runs": runs,
        "identical_to_single_process": identical,
        "shard_sha256_first": reference[0],
        "shard_sha256_last": reference[-1],
        "per_worker_tokens_per_second": per_worker,
        "projected_tokens_per_second": projected,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print()
    print("| run | wall s | driver tok/s | per-worker tok/s |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        workers = ", ".join(f"{w['tokens_per_second']:.0f}" for w in r.get("workers", {}).values()) or "-"
        print(f"| {name} | {r['wall_s']:.1f} | {r['tokens_per_second']:.0f} | {workers} |")
    return 0 if all(identical.values()) else 1


def _folders(runs: dict) -> dict[str, str]:
    return {name: "ray" + name.split(":")[1] for name in runs if name.startswith("ray local:")}


if __name__ == "__main__":
    raise SystemExit(main())
