"""Where a forethought decode step spends its time: `python -m benchmarks.profile_decode [--dtype D] [--steps N]`.

Runs warm decode steps under torch.profiler and prints the ops sorted by self CPU time, plus the
share taken by the weight products (the batch-1 kernel, or mm/addmm when it is off).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import PROMPT


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    from forethought import load_model
    from forethought.model import kernels

    # The kernel is a pybind call, invisible to the profiler unless labelled.
    inner = kernels.matvec

    def labelled(*a):
        with torch.profiler.record_function("forethought::matvec"):
            return inner(*a)

    kernels.matvec = labelled
    torch.set_num_threads(2)
    loaded = load_model(dtype=args.dtype)
    model, ids = loaded.model, loaded.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        cache = model.new_cache(capacity=len(ids) + 2 * args.steps + 8)
        logits = model(torch.tensor([ids]), cache=cache, last_only=True)
        token = torch.tensor([[int(logits[0, -1].argmax())]])
        for _ in range(8):  # warm-up (and the one-time kernel build)
            token = model(token, cache=cache)[0, -1].argmax().view(1, 1)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(args.steps):
                token = model(token, cache=cache)[0, -1].argmax().view(1, 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    weights = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm") or "matvec" in e.key)
    print(
        f"{args.steps} steps, {total / args.steps / 1e3:.2f} ms/step of op self time; weight products "
        f"{weights / total:.0%}, everything else {1 - weights / total:.0%}"
    )


if __name__ == "__main__":
    main()
