"""Probe fitting on Ray: one task per layer, merged by the driver into exactly the single-process result.

`run_probes` has three phases (`experiments.probes`): `prepare_probes` (positions, baselines, probe vocabulary:
once per run), `fit_probe_layer` per layer, and `summarize_probes` over all layers together (the layer chosen
on validation per offset, every cell's excess over the strongest context baseline, the bootstrap intervals).
Here the middle phase fans out: a unit of work is one layer with all its offsets (the probes of a layer share
one Gram matrix, so splitting a layer would redo its most expensive step). Each worker process opens the store,
loads the model and prepares the shared phase once (per-process caches, keyed by store and options) and fits
every layer it is given, saving that layer's maps. The driver prepares the same shared phase itself
(deterministic, so equal to the workers'), collects cells and per-position hits in layer order, and runs the
summary: the JSON equals the single-process run's in every number but the timings.

The seam: `fit_layer` is the one call into the per-layer fitting; everything else here is generic.
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
from forethought.experiments.probes import Cell, ProbeResult
from forethought.progress import Progress, tell

# the options of `run_probes` that the shared phase depends on (the rest: save_dir, n_boot, progress)
PREPARE_OPTIONS = (
    "eval_tokens",
    "lens_eval_tokens",
    "control_eval_tokens",
    "val_fraction",
    "seed",
    "dedup_threshold",
    "min_context",
    "stacked",
)


def _prepare_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in PREPARE_OPTIONS}


def _save_path(options: dict) -> Path | None:
    save_dir = options.get("save_dir")
    if save_dir is None:
        return None
    path = Path(save_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fit_layer(store, model, layer: int, offsets: list[int], options: dict, prepared=None):
    """THE SEAM: one layer's cells (every offset) and per-position hits, its maps saved under options["save_dir"].

    `prepared` is (setup, fitter) from `prepare_layer_fitting` (a worker reuses it for every layer it fits)."""
    from forethought.experiments.probes import fit_probe_layer

    _, fitter = prepared or prepare_layer_fitting(store, model, offsets, options)
    return fit_probe_layer(fitter, store, layer, _save_path(options))


def prepare_layer_fitting(store, model, offsets: list[int], options: dict):
    """The shared phase and a LayerFitter on it (the final layer loaded once), as `run_probes` builds them."""
    from forethought.experiments.probes import layer_fitter, prepare_probes

    setup = prepare_probes(store, model, offsets, **_prepare_options(options))
    s_final = store.layer(model.config.n_layers - 1)
    return setup, layer_fitter(setup, model, s_final, options.get("seed", 0))


_STORES: dict[str, object] = {}  # per worker process: the opened store, reused by every layer it fits
_PREPARED: dict[tuple, tuple] = {}  # per worker process: (setup, fitter) for one (store, offsets, options)


def _worker_store(path: str):
    if path not in _STORES:
        from forethought.data.store import ActivationStore

        _STORES.clear()
        _STORES[path] = ActivationStore(path)
    return _STORES[path]


def _worker_prepared(path: str, source: ModelSource, offsets: list[int], options: dict):
    key = (path, source.key, tuple(offsets), tuple(sorted(_prepare_options(options).items())))
    if key not in _PREPARED:
        _PREPARED.clear()  # one run at a time per worker: a new run's setup replaces the last
        _PREPARED[key] = prepare_layer_fitting(_worker_store(path), worker_model(source), offsets, options)
    return _PREPARED[key]


@dataclass
class LayerOutput:
    layer: int
    cells: list[Cell]
    correct: dict[tuple[int, int], torch.Tensor]  # (layer, offset) -> hit per evaluation position
    timings: dict[str, float]  # the fitting's own, this layer only
    worker: str
    seconds: float
    load_seconds: float  # store, model and the shared phase, when this task was the worker's first


def fit_layer_task(
    store_path: str, source: ModelSource, layer: int, offsets: list[int], options: dict, threads: int = 1
) -> LayerOutput:
    """The body of one Ray task (also callable in-process)."""
    import ray

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    prepared = _worker_prepared(store_path, source, offsets, options)
    store, model = _worker_store(store_path), worker_model(source)
    t1 = time.perf_counter()
    timings = prepared[1].timings
    before = dict(timings)
    cells, correct = fit_layer(store, model, layer, offsets, options, prepared)
    spent = {k: v - before.get(k, 0.0) for k, v in timings.items() if v != before.get(k, 0.0)}
    name = worker_name(ray) if ray.is_initialized() else f"local:{os.getpid()}"
    return LayerOutput(layer, cells, correct, spent, name, time.perf_counter() - t1, t1 - t0)


@dataclass
class RayProbeResult(ProbeResult):
    ray: dict = field(default_factory=dict)  # spec, per-worker layers and seconds


def merge(store, setup, outputs: list[LayerOutput], options: dict, started: float) -> ProbeResult:
    """The single-process ProbeResult from per-layer outputs (in the run's layer order) and the driver's own
    shared phase (`prepare_probes`): `summarize_probes` over all layers together, as `run_probes` ends."""
    from forethought.experiments.probes import summarize_probes

    cells = [c for out in outputs for c in out.cells]
    correct = {key: hits for out in outputs for key, hits in out.correct.items()}
    timings: dict[str, float] = defaultdict(float, setup.timings)
    for out in outputs:
        for k, v in out.timings.items():
            timings[k] += v
    setup.timings.update(timings)
    layers = [out.layer for out in outputs]
    n_boot = options.get("n_boot", 1000)
    return summarize_probes(setup, store, layers, cells, correct, n_boot, _save_path(options), started)


def group_cells(cells: list[tuple[int, int]]) -> dict[int, list[int]]:
    """layer -> its sorted offsets, layers in first-seen order."""
    by_layer: dict[int, set[int]] = {}
    for layer, offset in cells:
        by_layer.setdefault(layer, set()).add(offset)
    return {layer: sorted(offsets) for layer, offsets in by_layer.items()}


def map_cells(
    ray,
    store,
    model,
    source: ModelSource,
    cells: list[tuple[int, int]],
    options: dict,
    threads: int = 1,
    progress: Progress | None = None,
) -> RayProbeResult:
    """`run_probes` over the (layer, offset) `cells` (every layer with the same offsets) on the Ray workers of
    `ray` (connected); `store` is opened by the driver at a path every node sees, `model` the driver's copy."""
    started = time.perf_counter()
    by_layer = group_cells(cells)
    offsets = sorted({k for ks in by_layer.values() for k in ks})
    if any(ks != offsets for ks in by_layer.values()):
        raise ValueError("every layer must be fitted at the same offsets (they share one set of positions)")
    remote = ray.remote(fit_layer_task).options(num_cpus=threads, max_retries=MAX_RETRIES)
    source_ref = ray.put(source)
    store_path = str(Path(store.path).resolve())
    # workers may run elsewhere: absolute paths for them (the merged result keeps the caller's save_dir)
    save_dir = options.get("save_dir")
    remote_options = options | {"save_dir": None if save_dir is None else str(Path(save_dir).resolve())}
    refs = {remote.remote(store_path, source_ref, layer, offsets, remote_options, threads): layer for layer in by_layer}
    outputs: dict[int, LayerOutput] = {}
    workers: dict[str, WorkerStats] = {}
    try:  # the driver's copy of the shared phase, computed while the workers fit
        from forethought.experiments.probes import prepare_probes

        setup = prepare_probes(store, model, offsets, **_prepare_options(options))
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    waiting = list(refs)
    tell(progress, 0, len(refs))
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            out: LayerOutput = unwrap(ray, ready[0])
            outputs[refs[ready[0]]] = out
            stats = workers.setdefault(out.worker, WorkerStats())
            stats.shards += 1  # here: layers
            stats.seconds += out.seconds
            stats.load_seconds += out.load_seconds
            tell(progress, len(outputs), len(refs))
    finally:
        for ref in waiting:
            ray.cancel(ref, force=True)
    merged = merge(store, setup, [outputs[layer] for layer in by_layer], options, started)
    summary = {
        name: {"layers": s.shards, "seconds": round(s.seconds, 3), "load_seconds": round(s.load_seconds, 3)}
        for name, s in sorted(workers.items())
    }
    values = {f.name: getattr(merged, f.name) for f in fields(ProbeResult)}
    return RayProbeResult(**values, ray={"workers": summary})


def run_probes_on_ray(
    spec: RaySpec | None,
    source: ModelSource,
    store,
    model,
    offsets: list[int],
    layers: list[int] | None = None,
    save_dir: str | Path | None = "default",
    progress: Progress | None = None,
    **options,
) -> RayProbeResult:
    """`experiments.probes.run_probes` with its layers fitted on Ray workers (the store on shared storage).

    `model` is the driver's copy (for the shared phase and the summary); workers load `source` themselves."""
    layers = list(store.layers if layers is None else layers)
    if save_dir == "default":
        save_dir = Path(store.path) / "probes"
    options = options | {"save_dir": save_dir}
    cells = [(layer, k) for layer in layers for k in sorted(offsets)]
    with ray_session(spec) as ray:
        result = map_cells(ray, store, model, source, cells, options, progress=progress)
    result.ray["spec"] = spec.describe() if spec else "session"
    return result
