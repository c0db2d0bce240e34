"""One task on one model: tokenise its prompts, decode greedily (batched) with the site's residual stream captured
at a spread of layers, and read the labels and the behaviour from what the model wrote."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from forethought.errors import ForethoughtError
from forethought.experiments.plan_tasks.generate import completion_texts, greedy_completions, stop_token_ids
from forethought.experiments.plan_tasks.tasks import TaskSpec
from forethought.experiments.plan_tasks.types import TaskPrompt, TaskRun
from forethought.progress import Progress

N_LAYERS = 8


def spread_layers(n_layers: int, count: int = N_LAYERS) -> list[int]:
    """`count` blocks evenly spread from the first to the last (all of them on a model with fewer): the site's
    state after each is what the probes read and where steering and patching act."""
    if n_layers <= count:
        return list(range(n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, count)})


def collect(
    lm,
    task: TaskSpec,
    prompts: Sequence[TaskPrompt],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> TaskRun:
    """`lm` is a LoadedModel; `layers` default to `spread_layers`. The states are float32 [n, layers, d_model]."""
    n_layers = lm.config.n_layers
    layers = list(spread_layers(n_layers) if layers is None else layers)
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise ForethoughtError(f"layers {layers} do not fit a model of {n_layers} blocks")
    ids = [lm.tokenizer.encode(p.text) for p in prompts]
    if any(not x for x in ids):
        raise ForethoughtError(f"task {task.name!r}: a prompt encodes to no tokens")
    stops = stop_token_ids(lm.tokenizer, task.stop_texts)
    started = time.perf_counter()
    made = greedy_completions(lm.model, ids, task.max_new_tokens, stops, layers, None, batch_size, progress)
    seconds = time.perf_counter() - started
    texts = completion_texts(lm.tokenizer, made.ids)
    per_prompt = [task.labels(p, text) for p, text in zip(prompts, texts)]
    labels = {target: [lab.get(target) for lab in per_prompt] for target in task.targets}
    behaved = np.array([task.behaved(p, t, lab) for p, t, lab in zip(prompts, texts, per_prompt)], dtype=bool)
    settings = {
        "max_new_tokens": task.max_new_tokens,
        "stop_texts": list(task.stop_texts),
        "stop_ids": stops,
        "batch_size": batch_size,
        "new_tokens": int(sum(len(x) for x in made.ids)),
        "prompt_tokens": int(sum(len(x) for x in ids)),
    }
    return TaskRun(
        task=task.name,
        model=lm.name,
        prompts=list(prompts),
        prompt_ids=ids,
        completion_ids=made.ids,
        completions=texts,
        labels=labels,
        behaved=behaved,
        layers=layers,
        states=made.states,
        seconds=seconds,
        settings=settings,
    )
