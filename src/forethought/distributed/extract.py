"""Extraction on Ray: shards computed by worker tasks, written by the driver exactly as a single process would.

Work units are deterministic: documents (in the corpus's fixed order) -> packed windows -> shards of
`shard_windows` windows, numbered from 0 (`plan_shards`, the same cut `store.extract` makes). A Ray task turns
one unit into the shard's bytes with `store.shard_bytes`, the function the single-process path calls too, so
the bytes and their sha256 are the same wherever they are computed. The driver runs the ordinary
`store.extract` with a `shard_runner`: it stays the one writer of every shard file and of the manifest
(atomic replace after each shard, in shard order), so resuming after a killed driver is the ordinary resume.

Workers keep their model in a per-process cache, so it loads once per worker process, not once per shard.
A worker killed mid-task is a Ray system failure: Ray reruns the task on another worker (`MAX_RETRIES`), and
since only the driver writes, a killed attempt leaves nothing behind. Identity assumes the same torch thread
count on both sides (CPU matmuls may round differently with another split of the work): each task runs with
`threads` intra-op threads, one by default, one task per CPU.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from forethought.data.store import ExtractResult, ExtractSettings, Window, _shard_name, pack_windows, shard_bytes
from forethought.distributed.cluster import RaySpec, cluster_cpus, ray_session, worker_name
from forethought.distributed.fanout import MAX_RETRIES, unwrap
from forethought.model.transformer import Transformer

# --------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    """How a worker gets the model: `factory()` builds it; `key` names it in the worker's cache."""

    key: str
    factory: Callable[[], Transformer]


def _load_network(name: str, device: str, dtype: str) -> Transformer:
    from forethought.weights import load_model

    return load_model(name, device, dtype).model


def named_model(name: str, device: str = "cpu", dtype: str = "float32") -> ModelSource:
    """A model every node can load by name or path (the embedded package installed there, or shared storage)."""
    return ModelSource(f"{name}|{device}|{dtype}", functools.partial(_load_network, name, device, dtype))


_MODELS: dict[str, Transformer] = {}  # per worker process: loaded by the first task, reused by the rest


def worker_model(source: ModelSource) -> Transformer:
    if source.key not in _MODELS:
        _MODELS.clear()  # one model per worker: a new key (another run on a long-lived cluster) replaces it
        _MODELS[source.key] = source.factory()
    return _MODELS[source.key]


# --------------------------------------------------------------------------------------------- work units


@dataclass
class ShardUnit:
    index: int
    first_window: int
    windows: list[Window]


def plan_shards(
    token_docs: Iterable[tuple[int, list[int]]], doc_splits: list[int], settings: ExtractSettings
) -> Iterator[ShardUnit]:
    """The shards `store.extract` writes for these settings, in order (lazily: it tokenizes only as it goes)."""
    windows = pack_windows(
        token_docs, doc_splits.__getitem__, settings.window, settings.separator_id, settings.max_doc_tokens
    )
    wanted = -(-settings.tokens // settings.window)
    index = first = 0
    while first < wanted:
        group = list(islice(windows, min(settings.shard_windows, wanted - first)))
        if not group:
            return
        yield ShardUnit(index, first, group)
        first += len(group)
        index += 1


@dataclass
class ShardOutput:
    data: bytes
    worker: str  # node-ip:pid
    tokens: int
    seconds: float  # computing the shard, model already loaded
    load_seconds: float  # loading the model, when this task was the worker's first


def compute_shard(
    source: ModelSource, unit: ShardUnit, settings: ExtractSettings, threads: int = 1, crash_hook=None
) -> ShardOutput:
    """The body of one Ray task (also callable in-process)."""
    import ray

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = worker_model(source)
    t1 = time.perf_counter()
    if crash_hook is not None:  # tests: kill this worker process mid-task
        crash_hook(unit.index)
    data = shard_bytes(model, unit.windows, settings, unit.first_window)
    name = worker_name(ray) if ray.is_initialized() else f"local:{os.getpid()}"
    tokens = len(unit.windows) * settings.window
    return ShardOutput(data, name, tokens, time.perf_counter() - t1, t1 - t0)


# --------------------------------------------------------------------------------------------- the driver


@dataclass
class WorkerStats:
    shards: int = 0
    tokens: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0

    def to_dict(self) -> dict:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return {
            "shards": self.shards,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "tokens_per_second": round(rate, 1),
        }


class RayShardRunner:
    """`store.extract`'s shard_runner: keeps up to `in_flight` shards computing ahead, returns them in order.

    `token_docs` is a second, independent pass over the same tokenized documents that `store.extract` reads
    (a factory, called once): the runner plans from it to know the shards ahead of the one asked for, and checks
    that each shard it is asked for is the one it planned.
    """

    def __init__(
        self,
        ray,
        source: ModelSource,
        token_docs: Callable[[], Iterable[tuple[int, list[int]]]],
        doc_splits: list[int],
        done: set[str],
        in_flight: int,
        threads: int = 1,
        crash_hook=None,
    ) -> None:
        self.ray = ray
        self.source = source
        self.token_docs = token_docs
        self.doc_splits = doc_splits
        self.done = done
        self.in_flight = max(1, in_flight)
        self.threads = threads
        self.crash_hook = crash_hook
        self.workers: dict[str, WorkerStats] = {}
        self._plan: Iterator[ShardUnit] | None = None
        self._pending: dict[int, tuple[object, ShardUnit]] = {}
        self._remote = ray.remote(compute_shard).options(num_cpus=threads, max_retries=MAX_RETRIES)
        self._source_ref = None

    def _top_up(self, settings: ExtractSettings) -> None:
        if self._plan is None:
            self._plan = plan_shards(self.token_docs(), self.doc_splits, settings)
            self._source_ref = self.ray.put(self.source)
        while len(self._pending) < self.in_flight:
            unit = next(self._plan, None)
            if unit is None:
                return
            if _shard_name(unit.index) in self.done:
                continue
            ref = self._remote.remote(self._source_ref, unit, settings, self.threads, self.crash_hook)
            self._pending[unit.index] = (ref, unit)

    def __call__(self, index: int, first_window: int, windows: list[Window], settings: ExtractSettings) -> bytes:
        self._top_up(settings)
        if index not in self._pending:
            raise RuntimeError(f"shard {index} was not planned: the driver and the planner cut the corpus apart")
        ref, unit = self._pending.pop(index)
        if unit.first_window != first_window or [w.tokens for w in unit.windows] != [w.tokens for w in windows]:
            raise RuntimeError(f"shard {index}: the planned windows differ from the driver's")
        out: ShardOutput = unwrap(self.ray, ref)
        stats = self.workers.setdefault(out.worker, WorkerStats())
        stats.shards += 1
        stats.tokens += out.tokens
        stats.seconds += out.seconds
        stats.load_seconds += out.load_seconds
        self._top_up(settings)
        return out.data

    def cancel(self) -> None:
        for ref, _ in self._pending.values():
            self.ray.cancel(ref, force=True)
        self._pending.clear()

    def summary(self) -> dict:
        workers = {name: s.to_dict() for name, s in sorted(self.workers.items())}
        return {
            "workers": workers,
            # what the cluster would sustain if every worker ran flat out at its measured rate in parallel
            "projected_tokens_per_second": round(sum(w["tokens_per_second"] for w in workers.values()), 1),
        }


@dataclass
class RayExtractResult(ExtractResult):
    ray: dict = field(default_factory=dict)  # spec, cluster CPUs, per-worker throughput


def done_shards(out: str | Path) -> set[str]:
    """Shards the manifest already records (`store.extract` skips them; the runner must not compute them)."""
    from forethought.data.store import read_manifest

    manifest = read_manifest(Path(out))
    return {s["name"] for s in manifest["shards"]} if manifest else set()


def extract_on_ray(
    ray,
    source: ModelSource,
    run: Callable[..., ExtractResult],
    token_docs: Callable[[], Iterable[tuple[int, list[int]]]],
    doc_splits: list[int],
    out: str | Path,
    threads: int = 1,
    in_flight: int | None = None,
    crash_hook=None,
) -> RayExtractResult:
    """Call `run(shard_runner=...)` (a `store.extract` or `run_extract` with its other arguments bound).

    `in_flight` defaults to one shard per cluster CPU plus one, so a worker never waits for the driver.
    """
    workers = cluster_cpus(ray) // threads
    runner = RayShardRunner(
        ray,
        source,
        token_docs,
        doc_splits,
        done_shards(out),
        in_flight or workers + 1,
        threads=threads,
        crash_hook=crash_hook,
    )
    try:
        result = run(shard_runner=runner)
    finally:
        runner.cancel()
    fields = {k: getattr(result, k) for k in ExtractResult.__dataclass_fields__}
    return RayExtractResult(**fields, ray={"cluster_cpus": cluster_cpus(ray), **runner.summary()})


def run_extract_on_ray(
    spec: RaySpec | None, source: ModelSource, lm, corpus, out: str | Path, layers: list[int], **options
) -> RayExtractResult:
    """`experiments.future.run_extract` with its shards computed on Ray (same arguments, same store)."""
    import inspect

    from forethought.data.corpus import load_corpus
    from forethought.experiments.future import document_splits, reading_order, run_extract

    docs = load_corpus(corpus) if isinstance(corpus, str) else corpus
    # run_extract's own values (its defaults where not given), so the planner reads the documents as it does
    bound = inspect.signature(run_extract).bind(lm, docs, out, layers, **options)
    bound.apply_defaults()
    test_fraction, max_doc_tokens = bound.arguments["test_fraction"], bound.arguments["max_doc_tokens"]
    with ray_session(spec) as ray:
        result = extract_on_ray(
            ray,
            source,
            functools.partial(run_extract, lm, docs, out, layers, **options),
            lambda: reading_order(lm, docs, test_fraction, max_doc_tokens),
            document_splits(docs, test_fraction),
            out,
        )
    result.ray["spec"] = spec.describe() if spec else "session"
    return result
