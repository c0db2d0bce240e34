"""Where a forethought decode step spends its time:
`python -m benchmarks.profile_decode [--model M] [--dtype D] [--steps N] [--threads N]`.

`--verify-sweep` instead times one forward of T = 1..8 tokens through the compiled step (what verifying
T-1 drafted tokens costs), as wall time and as the thread's CPU time (the figure a loaded, shared
machine does not distort), relative to T = 1.

Times, warm and as medians, (1) the step's weight products alone -- every Linear of the model through
the batch-1 kernel, nothing else: the floor set by memory bandwidth --, (2) the compiled whole-token
step that `model(token, cache=cache)` runs, and (3) the op-by-op forward (`fused_decode = False`),
whose ATen ops torch.profiler then lists by self time. (2) - (1) is everything that is not weight
traffic; (3) - (2) is what the fusion removed. (1) is also split by kind of product (qkv, o, gate_up, down,
unembed: each kind's matrices of every layer in turn, so each reads from memory as in a step), with its
share of the products' time and the rate it reads its weights at: on a shared machine the shares hold
when the absolute figures do not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import PROMPT


def per_step_ms(fn, steps: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time of `steps` calls, after one untimed round."""
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times) * 1e3


def verify_sweep(threads: int, repeats: int = 12, tokens: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)) -> None:
    """ms per forward of T tokens at a 300-token context, fp32 and int8, T interleaved in a shuffled order."""
    import random

    from forethought import load_model

    torch.set_num_threads(threads)
    model = load_model().model
    for dtype in ("float32", "int8"):
        if dtype == "int8":
            model.quantize_int8_()
        cache = model.new_cache(1024)
        model.forward_with_state(list(range(100, 400)), cache)
        base = cache.length
        wall: dict[int, list[float]] = {t: [] for t in tokens}
        cpu: dict[int, list[float]] = {t: [] for t in tokens}
        order = [t for t in tokens for _ in range(repeats)]
        random.Random(0).shuffle(order)
        for t in order:
            cache.truncate(base)
            w, c = time.perf_counter(), time.thread_time()
            model.forward_with_state(list(range(500, 500 + t)), cache, with_state=False)
            cpu[t].append(time.thread_time() - c)
            wall[t].append(time.perf_counter() - w)
        w1, c1 = statistics.median(wall[1]), statistics.median(cpu[1])
        print(f"{dtype}, {threads} thread(s): T  wall ms (x T=1)  cpu ms (x T=1)")
        for t in tokens:
            w, c = statistics.median(wall[t]), statistics.median(cpu[t])
            print(f"  T={t}  {w * 1e3:7.1f} ({w / w1:.2f}x)  {c * 1e3:7.1f} ({c / c1:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode")
    p.add_argument("--dtype", default="float32", help="float32 or int8 (the compiled step's dtypes)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--verify-sweep", action="store_true", help="ms per forward of T = 1..8 tokens instead")
    p.add_argument("--threads", type=int, default=None, help="threads (default 2; 1 for --verify-sweep)")
    p.add_argument("--model", default=None, help="a registry name or path (default: the embedded model)")
    args = p.parse_args()
    if args.verify_sweep:
        verify_sweep(args.threads or 1)
        return
    from forethought import load_model
    from forethought.model import kernels
    from forethought.model.layers import Linear

    torch.set_num_threads(args.threads or 2)
    loaded = load_model(args.model, dtype=args.dtype) if args.model else load_model(dtype=args.dtype)
    model, ids = loaded.model, loaded.tokenizer.encode(PROMPT)
    named = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, Linear)]
    linears = [m for _, m in named]
    weight_bytes = sum(m.weight_t.nbytes + (m.scale.nbytes if m.scale is not None else 0) for m in linears)
    inputs = [torch.randn(m.d_in) for m in linears]

    with torch.inference_mode():
        cache = model.new_cache(capacity=len(ids) + 64 * args.steps)
        model(torch.tensor([ids]), cache=cache, last_only=True)
        start = cache.length
        token = torch.tensor([[42]])

        def products(kind: str | None = None) -> None:
            for (k, m), x in zip(named, inputs):
                if kind is None or k == kind:
                    kernels.matvec(x, m.weight_t, m.bias, m.scale)

        kinds = {}
        for kind in dict.fromkeys(k for k, _ in named):
            mats = [m for k, m in named if k == kind]
            nbytes = sum(m.weight_t.nbytes + (m.scale.nbytes if m.scale is not None else 0) for m in mats)
            kinds[kind] = (len(mats), nbytes, per_step_ms(lambda kind=kind: products(kind), args.steps))

        def step() -> None:
            if cache.length > start + 32:
                cache.truncate(start)  # keep the context (and so attention's cost) constant
            model(token, cache=cache)

        rows = {"weight products only": per_step_ms(products, args.steps)}
        model.fused_decode = True
        rows["compiled step (default)"] = per_step_ms(step, args.steps)
        model.fused_decode = False
        rows["op-by-op forward"] = per_step_ms(step, args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        model.fused_decode = True

    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    floor = rows["weight products only"]
    threads = torch.get_num_threads()
    print(f"{loaded.name} {args.dtype}: {weight_bytes / 1e6:.0f} MB of weights per step, {threads} thread(s)")
    total = sum(ms for _, _, ms in kinds.values())
    for kind, (count, nbytes, ms) in kinds.items():
        print(
            f"  {kind:8s} x{count:<3d} {nbytes / 1e6:7.1f} MB  {ms:6.2f} ms  {100 * ms / total:4.1f}% of the products"
            f"  {nbytes / ms / 1e6:5.1f} GB/s"
        )
    for name, ms in rows.items():
        print(
            f"  {name:24s} {ms:6.2f} ms/step  {1e3 / ms:6.1f} tok/s  {weight_bytes / ms / 1e6:5.1f} GB/s of weights"
            f"  ({ms - floor:+.2f} ms beyond the products)"
        )


if __name__ == "__main__":
    main()
