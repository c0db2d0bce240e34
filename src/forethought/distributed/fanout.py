"""Independent runs (seeds, models, settings) on Ray workers, results in the order of their inputs.

For experiments that repeat one function over a list: `fan_out(ray, run_seed, seeds)` is `[run_seed(s) for s in
seeds]` computed on the cluster. `fn` must be importable on every node (a module-level function of forethought)
and return something picklable (the experiments' result dataclasses are). A worker that dies is rerun by Ray; a
`ForethoughtError` raised inside `fn` reaches the caller as itself, so the CLI prints its one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from forethought.errors import ForethoughtError

T = TypeVar("T")
R = TypeVar("R")

MAX_RETRIES = 3


def unwrap(ray, ref):
    """`ray.get(ref)`, with user errors and missing packages on a worker turned into one-line ForethoughtErrors."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ForethoughtError):
            raise e.cause from None
        if isinstance(e.cause, ImportError):
            raise ForethoughtError(
                f"a Ray worker cannot import {getattr(e.cause, 'name', None) or e.cause}: "
                'install forethought on every node (pip install "forethought[ray]")'
            ) from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
        raise ForethoughtError(
            f"Ray workers died {MAX_RETRIES + 1} times on one task ({type(e).__name__}); rerun to resume"
        ) from None


def fan_out(ray, fn: Callable[[T], R], items: Sequence[T], num_cpus: float = 1) -> list[R]:
    """[fn(item) for item in items], each call a Ray task; the results in the order of `items`."""
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=MAX_RETRIES)
    refs = [remote.remote(item) for item in items]
    try:
        return [unwrap(ray, ref) for ref in refs]
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
