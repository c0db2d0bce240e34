"""`forethought plan-tasks --ray`: one model's tasks per Ray worker (each loads its model by name or path), the
results back in the order of the models."""

from __future__ import annotations

from collections.abc import Sequence

from forethought.distributed.cluster import ray_session
from forethought.distributed.dispatch import checked_spec
from forethought.distributed.fanout import fan_out
from forethought.experiments.plan_tasks.pipeline import ModelJob, TaskOutcome, run_model


def run_models_on_ray(ray: str, jobs: Sequence[ModelJob]) -> list[list[TaskOutcome]]:
    if not jobs:
        return []
    with ray_session(checked_spec(ray)) as session:
        return fan_out(session, run_model, list(jobs))
