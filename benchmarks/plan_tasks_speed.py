"""Collection speed of `forethought plan-tasks`: for each task, the model's behaviour rate on N prompts and the wall
time of batched greedy collection (prompts/s, new tokens/s), then batched vs one prompt at a time on the first K
prompts, and batched with vs without the task's shared prefix run once (same tokens: checked). Prints one JSON
object per task and a Markdown table.

    python -m benchmarks.plan_tasks_speed [--model smollm2-135m] [--prompts 200] [--compare 16] [--tasks all]
"""

from __future__ import annotations

import argparse
import json
import time

from forethought.experiments.plan_tasks.collect import collect, spread_layers
from forethought.experiments.plan_tasks.generate import greedy_completions, shared_prefix_length, stop_token_ids
from forethought.experiments.plan_tasks.tasks import TASKS, task_names
from forethought.weights import load_model


def _timed(lm, ids, task, layers, batch_size, share_prefix=True) -> tuple[float, list[list[int]]]:
    stops = stop_token_ids(lm.tokenizer, task.stop_texts)
    started = time.perf_counter()
    made = greedy_completions(
        lm.model, ids, task.max_new_tokens, stops, layers, None, batch_size, share_prefix=share_prefix
    )
    return time.perf_counter() - started, made.ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--compare", type=int, default=16, help="prompts timed batched vs one at a time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", default="all")
    args = parser.parse_args()
    lm = load_model(args.model, "cpu", args.dtype)
    layers = spread_layers(lm.config.n_layers)
    rows = []
    for name in task_names(args.tasks):
        task = TASKS[name]
        prompts = task.prompts(lm.tokenizer, args.prompts, 0)
        run = collect(lm, task, prompts, layers, args.batch_size)
        new = run.settings["new_tokens"]
        ids = run.prompt_ids[: args.compare]
        one_s, one_ids = _timed(lm, ids, task, layers, 1)
        batch_s, batch_ids = _timed(lm, ids, task, layers, args.batch_size)
        whole_s, whole_ids = _timed(lm, ids, task, layers, args.batch_size, share_prefix=False)
        row = {
            "task": name,
            "prompts": len(run),
            "behaviour": float(run.behaved.mean()),
            "collect_s": run.seconds,
            "prompts_per_s": len(run) / run.seconds,
            "new_tok_per_s": new / run.seconds,
            "compare_prompts": len(ids),
            "one_at_a_time_s": one_s,
            "batched_s": batch_s,
            "batched_speedup": one_s / batch_s,
            "same_tokens": one_ids == batch_ids,
            "shared_prefix": shared_prefix_length(ids),
            "whole_prompts_s": whole_s,
            "shared_prefix_speedup": whole_s / batch_s,
            "same_tokens_whole": whole_ids == batch_ids,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.model} ({args.dtype}), batch {args.batch_size}, {args.prompts} prompts per task\n")
    print(
        "| task | behaviour | collect s | prompts/s | new tok/s | batched vs 1-at-a-time (K prompts) | same tokens "
        "| shared prefix (tokens) | shared prefix once vs every row | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['behaviour']:.0%} | {r['collect_s']:.0f} | {r['prompts_per_s']:.2f} | "
            f"{r['new_tok_per_s']:.0f} | {r['batched_speedup']:.2f}x ({r['compare_prompts']}) | {r['same_tokens']} "
            f"| {r['shared_prefix']} | {r['shared_prefix_speedup']:.2f}x | {r['same_tokens_whole']} |"
        )


if __name__ == "__main__":
    main()
