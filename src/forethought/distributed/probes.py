"""Probe fitting on Ray: (layer, offset) cells fanned out over workers, merged in (layer, offset) order.

A unit of work is one layer with its offsets: the probes of a layer share one Gram matrix across offsets, so
splitting a layer would redo its most expensive step. Each worker process opens the store and loads the model
once (a per-process cache) and fits every layer it is given; the driver merges the cells sorted by
(layer, offset), whatever order they finish in.

The seam: `fit_layer` is the one call into the experiment. It runs the per-layer fitting function on one
layer's cells and returns a `ProbeResult` holding only them; everything else here is generic.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from forethought.distributed.cluster import RaySpec, ray_session, worker_name
from forethought.distributed.extract import ModelSource, WorkerStats, worker_model
from forethought.distributed.fanout import MAX_RETRIES, unwrap
from forethought.experiments.probes import ProbeResult

Cell = tuple[int, int]  # (layer, offset)


def fit_layer(store, model, layer: int, offsets: list[int], options: dict) -> ProbeResult:
    """THE SEAM: fit and score one layer's cells (every offset in `offsets`) on `store` with `model`.

    Today it is `run_probes` restricted to one layer. Note for the merge: `run_probes` draws each layer's
    temperature rows from one generator shared across its layer loop, so a layer fitted alone (here, or in any
    fan-out) matches a sequential run over all layers exactly only for the first layer; a per-cell function that
    seeds its own draws from (seed, layer, offset) makes every layer match.
    """
    from forethought.experiments.probes import run_probes

    return run_probes(store, model, offsets, [layer], progress=False, **options)


_STORES: dict[str, object] = {}  # per worker process: the opened store, reused by every layer it fits


def _worker_store(path: str):
    if path not in _STORES:
        from forethought.data.store import ActivationStore

        _STORES.clear()
        _STORES[path] = ActivationStore(path)
    return _STORES[path]


@dataclass
class LayerOutput:
    result: ProbeResult
    worker: str
    seconds: float
    load_seconds: float


def fit_layer_task(
    store_path: str, source: ModelSource, layer: int, offsets: list[int], options: dict, threads: int = 1
) -> LayerOutput:
    """The body of one Ray task (also callable in-process)."""
    import ray

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    store, model = _worker_store(store_path), worker_model(source)
    t1 = time.perf_counter()
    result = fit_layer(store, model, layer, offsets, options)
    name = worker_name(ray) if ray.is_initialized() else f"local:{os.getpid()}"
    return LayerOutput(result, name, time.perf_counter() - t1, t1 - t0)


@dataclass
class RayProbeResult(ProbeResult):
    ray: dict = field(default_factory=dict)  # spec, per-worker layers and seconds


# the fields every layer's result must agree on (they depend on the store and the options, not on the layer)
SHARED = ("model", "store", "n_train", "n_val", "n_eval", "n_eval_lens", "n_eval_control", "probe_vocab")


def merge(parts: list[ProbeResult], layers: list[int], seconds: float) -> ProbeResult:
    """One ProbeResult from per-layer ones: cells in (layer, offset) order, shared fields checked equal."""
    first = parts[0]
    for part in parts[1:]:
        for name in SHARED:
            if getattr(part, name) != getattr(first, name):
                raise RuntimeError(f"layer results disagree on {name}: the fan-out is not deterministic")
        if part.to_dict()["baselines"] != first.to_dict()["baselines"]:
            raise RuntimeError("layer results disagree on the baselines: the fan-out is not deterministic")
    cells = sorted((c for p in parts for c in p.cells), key=lambda c: (c.layer, c.offset))
    timings: dict[str, float] = defaultdict(float)
    for part in parts:
        for k, v in part.timings.items():
            timings[k] += v
    values = {f.name: getattr(first, f.name) for f in fields(ProbeResult)}
    values |= {
        "layers": list(layers),
        "offsets": sorted({c.offset for c in cells}),
        "cells": cells,
        "seconds": seconds,
        "timings": dict(timings),
    }
    return ProbeResult(**values)


def group_cells(cells: list[Cell]) -> dict[int, list[int]]:
    """layer -> its sorted offsets, layers in first-seen order."""
    by_layer: dict[int, set[int]] = {}
    for layer, offset in cells:
        by_layer.setdefault(layer, set()).add(offset)
    return {layer: sorted(offsets) for layer, offsets in by_layer.items()}


def map_cells(
    ray,
    store_path: str | Path,
    source: ModelSource,
    cells: list[Cell],
    options: dict,
    threads: int = 1,
    progress: bool = False,
) -> RayProbeResult:
    """Fit `cells` on the Ray workers of `ray` (connected) and merge them deterministically."""
    started = time.perf_counter()
    by_layer = group_cells(cells)
    remote = ray.remote(fit_layer_task).options(num_cpus=threads, max_retries=MAX_RETRIES)
    source_ref = ray.put(source)
    refs = {
        remote.remote(str(store_path), source_ref, layer, offsets, options, threads): layer
        for layer, offsets in by_layer.items()
    }
    outputs: dict[int, LayerOutput] = {}
    workers: dict[str, WorkerStats] = {}
    with _bar(progress) as bar:
        task = bar.add_task("probe layers", total=len(refs)) if bar else None
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                out: LayerOutput = unwrap(ray, ready[0])
                outputs[refs[ready[0]]] = out
                stats = workers.setdefault(out.worker, WorkerStats())
                stats.shards += 1  # here: layers
                stats.seconds += out.seconds
                stats.load_seconds += out.load_seconds
                if bar:
                    bar.update(task, advance=1)
        finally:
            for ref in waiting:
                ray.cancel(ref, force=True)
    merged = merge([outputs[layer].result for layer in by_layer], list(by_layer), time.perf_counter() - started)
    summary = {
        name: {"layers": s.shards, "seconds": round(s.seconds, 3), "load_seconds": round(s.load_seconds, 3)}
        for name, s in sorted(workers.items())
    }
    values = {f.name: getattr(merged, f.name) for f in fields(ProbeResult)}
    return RayProbeResult(**values, ray={"workers": summary})


def _bar(enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("probe layers (ray)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def run_probes_on_ray(
    spec: RaySpec | None,
    source: ModelSource,
    store,
    offsets: list[int],
    layers: list[int] | None = None,
    save_dir: str | Path | None = "default",
    progress: bool = True,
    **options,
) -> RayProbeResult:
    """`experiments.probes.run_probes` with its layers fitted on Ray workers (the store on shared storage)."""
    layers = list(store.layers if layers is None else layers)
    if save_dir == "default":
        save_dir = store.path / "probes"
    options = options | {"save_dir": None if save_dir is None else str(Path(save_dir).resolve())}
    cells = [(layer, k) for layer in layers for k in sorted(offsets)]
    with ray_session(spec) as ray:
        result = map_cells(ray, Path(store.path).resolve(), source, cells, options, progress=progress)
    result.ray["spec"] = spec.describe() if spec else "session"
    return result
