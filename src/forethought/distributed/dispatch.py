"""The CLI's one call per command: `--ray SPEC` -> a drop-in for `run_extract` / `run_probes`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from forethought.distributed.cluster import RaySpec, check_reachable, parse_ray_spec
from forethought.distributed.extract import named_model, run_extract_on_ray
from forethought.distributed.probes import run_probes_on_ray


def checked_spec(ray: str) -> RaySpec:
    """`--ray` parsed, and a cluster address connected to once, before any work: one line within 30 s if not."""
    spec = parse_ray_spec(ray)
    if spec.address is not None:
        check_reachable(spec.address)
    return spec


def extract_run(ray: str, model: str, device: str) -> Callable:
    """`experiments.future.run_extract(lm, corpus, out, layers, **options)`, its shards computed on Ray."""
    return functools.partial(run_extract_on_ray, checked_spec(ray), named_model(model, device))


def probe_run(ray: str, model: str, device: str) -> Callable:
    """`experiments.probes.run_probes(store, model, offsets, layers, **options)`, its layers fitted on Ray.

    The driver's loaded model is not sent: every worker loads `model` by name or path itself (the driver's
    serves the shared phase and the summary, which the driver computes).
    """
    source = named_model(model, device)
    spec = checked_spec(ray)

    def run(store, driver_model, offsets, layers=None, **options):
        return run_probes_on_ray(spec, source, store, driver_model, offsets, layers, **options)

    return run
