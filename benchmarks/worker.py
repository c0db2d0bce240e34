"""One engine's measurements, in its own process: `python -m benchmarks.worker ENGINE OPTIONS_JSON`.

Prints `@progress TEXT` lines while it works and one `@result JSON` line at the end; the parent
(`python -m benchmarks`) reads them. Running apart keeps each engine's peak RSS and threads its own.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import (
    GGUF_NAME,
    PROMPT,
    THREADS,
    check_workers,
    gguf_dir,
    gguf_tokenizer,
    llama,
    llama_file,
    llama_greedy,
    long_text,
    median,
    median_time,
)


def progress(text: str) -> None:
    print(f"@progress {text}", flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def repeat(fn: Callable[[], tuple[float, list[int]]], repeats: int, warmup: int = 1) -> tuple[float, list[int]]:
    """Median rate of `repeats` runs after `warmup` untimed ones; fn returns (rate, token ids)."""
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    return median([r for r, _ in runs]), runs[-1][1]


# ----------------------------------------------------------------------------------- forethought


def forethought_engine(opts: dict, dtype: str, device: str = "cpu", fused: bool = True) -> dict:
    """dtype: float32, bfloat16 or int8 (8-bit weights). fused=False forces the op-by-op decode step."""
    from forethought import generate, load_model
    from forethought.model import kernels
    from forethought.model.layers import Linear

    label = f"forethought {dtype}" + ("" if fused else " op-by-op")
    progress(f"{label}: loading")
    loaded = load_model(dtype=dtype, device=device)
    model, tok = loaded.model, loaded.tokenizer
    model.fused_decode = fused
    prompt = tok.encode(PROMPT)
    text_ids = tok.encode(long_text())
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict = {"engine": label, "device": device, "prompt_tokens": len(prompt)}

    def decode(n: int, use_cache: bool) -> tuple[float, list[int]]:
        g = generate(model, prompt, n, use_cache=use_cache)
        # step k (< n-1) samples token k and runs the forward that produces the next logits.
        forwards = g.step_seconds[: n - 1]
        return len(forwards) / sum(forwards), g.new_ids

    n = opts["tokens"]
    progress(f"{label}: decode {n} tokens with KV cache")
    out["decode_tok_s"], out["ids"] = repeat(lambda: decode(n, True), opts["repeats"])
    out["kernels"] = kernels.status()
    with torch.inference_mode():
        out["compiled_step"] = model._decode_step(model.new_cache()) is not None
    if opts["nocache"] and device == "cpu":
        m = opts["nocache_tokens"]
        progress(f"{label}: decode {m} tokens recomputing the prefix")
        out["nocache_decode_tok_s"], ids = repeat(lambda: decode(m, False), opts["repeats"])
        out["nocache_tokens"] = m
        out["nocache_matches_cache"] = ids == out["ids"][:m]

    p = opts["prompt_len"]
    ids = torch.tensor([text_ids[:p]], device=device)

    @torch.inference_mode()
    def prefill() -> None:
        model(ids, cache=model.new_cache(capacity=p), last_only=True)
        sync()

    if opts.get("prefill", True):
        progress(f"{label}: prefill {p} tokens")
        out["prefill_tok_s"] = p / median_time(prefill, opts["repeats"])
        out["prefill_tokens"] = p
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    out["weight_bytes"] = sum(t.nbytes for m in linears for t in (m.weight_t, m.bias, m.scale) if t is not None)

    if opts["sweep"] and device == "cpu":
        out["context_ms"] = context_sweep(model, text_ids, opts)
    if opts["trace"] and device == "cpu":
        out["trace"] = trace_overhead(model, ids, opts)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


@torch.inference_mode()
def context_sweep(model, text_ids: list[int], opts: dict) -> dict:
    """ms per decoded token at each context length: one cached step vs one full recompute."""
    result = {}
    for length in opts["contexts"]:
        progress(f"forethought: decode cost at context {length}")
        ids = torch.tensor([text_ids[: length + 1]])
        cache = model.new_cache(capacity=length + 1)
        model(ids[:, :length], cache=cache, last_only=True)
        nxt = ids[:, length:]

        def cached_step(cache=cache, length=length, nxt=nxt) -> None:
            cache.truncate(length)
            model(nxt, cache=cache)

        cached = median_time(cached_step, max(5, opts["repeats"]), warmup=2)
        recompute = median_time(lambda ids=ids: model(ids, last_only=True), opts["repeats"])
        result[str(length)] = {"cache_ms": cached * 1e3, "recompute_ms": recompute * 1e3}
    return result


def trace_overhead(model, ids: torch.Tensor, opts: dict) -> dict:
    """A 512-token forward capturing every layer's resid_post vs the same forward without hooks."""
    progress("forethought: trace overhead")
    from forethought.trace import run_with_trace

    def traced():
        return run_with_trace(model, ids, "resid_post")

    api = "forethought.trace.run_with_trace(model, ids, 'resid_post')"

    def plain():
        with torch.inference_mode():
            return model(ids)

    plain(), traced()  # warm-up
    t_plain, t_trace = [], []
    for _ in range(max(5, opts["repeats"])):  # interleaved, so drift hits both alike
        for fn, acc in ((plain, t_plain), (traced, t_trace)):
            started = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - started)
    return {
        "api": api,
        "tokens": ids.shape[1],
        "plain_ms": median(t_plain) * 1e3,
        "trace_ms": median(t_trace) * 1e3,
        "ratio": median(t_trace) / median(t_plain),
    }


# ------------------------------------------------------------------------------ HF transformers


def hf_engine(opts: dict, dtype: str = "float32", device: str = "cpu") -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    progress(f"HF {dtype}: loading from the GGUF file")
    torch_dtype = getattr(torch, dtype)
    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, torch_dtype=torch.float32)
    model = model.to(device=device, dtype=torch_dtype).eval()
    tok = gguf_tokenizer()
    prompt = torch.tensor([tok.encode(PROMPT)], device=device)
    text_ids = tok.encode(long_text())
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict = {"engine": f"HF {dtype}", "device": device, "transformers": transformers.__version__}

    def gen(n: int, use_cache: bool) -> list[int]:
        with torch.inference_mode():
            ids = model.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=2
            )
        sync()
        return ids[0, prompt.shape[1] :].tolist()

    def decode(n: int, use_cache: bool) -> tuple[float, list[int]]:
        # generate(n) - generate(1) leaves the n-1 decode forwards, like the other engines.
        started = time.perf_counter()
        gen(1, use_cache)
        first = time.perf_counter() - started
        started = time.perf_counter()
        ids = gen(n, use_cache)
        total = time.perf_counter() - started
        return (n - 1) / (total - first), ids

    n = opts["tokens"]
    progress(f"HF {dtype}: decode {n} tokens with KV cache")
    out["decode_tok_s"], out["ids"] = repeat(lambda: decode(n, True), opts["repeats"])
    if opts["nocache"] and device == "cpu":
        m = opts["nocache_tokens"]
        progress(f"HF {dtype}: decode {m} tokens, use_cache=False")
        out["nocache_decode_tok_s"], _ = repeat(lambda: decode(m, False), opts["repeats"])
        out["nocache_tokens"] = m

    p = opts["prompt_len"]
    ids = torch.tensor([text_ids[:p]], device=device)

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)
        sync()

    progress(f"HF {dtype}: prefill {p} tokens")
    out["prefill_tok_s"] = p / median_time(prefill, opts["repeats"])
    out["prefill_tokens"] = p
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ----------------------------------------------------------------------------------- llama.cpp


def llamacpp_engine(opts: dict, kind: str) -> dict:
    import llama_cpp

    path = llama_file(kind, progress)
    progress(f"llama.cpp {kind}: loading")
    llm = llama(path, n_batch=512)
    tok = gguf_tokenizer()
    prompt = tok.encode(PROMPT)
    text_ids = tok.encode(long_text())
    out: dict = {"engine": f"llama.cpp {kind}", "llama_cpp_python": llama_cpp.__version__, "file": str(path)}

    def decode(n: int) -> tuple[float, list[int]]:
        ids, stamps = llama_greedy(llm, prompt, n)
        return (n - 1) / (stamps[-1] - stamps[0]), ids

    n = opts["tokens"]
    progress(f"llama.cpp {kind}: decode {n} tokens")
    out["decode_tok_s"], out["ids"] = repeat(lambda: decode(n), opts["repeats"])

    p = opts["prompt_len"]

    def prefill() -> None:
        llm.reset()
        llm.eval(text_ids[:p])

    progress(f"llama.cpp {kind}: prefill {p} tokens")
    out["prefill_tok_s"] = p / median_time(prefill, opts["repeats"])
    out["prefill_tokens"] = p
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ------------------------------------------------------------------------------------ machine


def machine_engine(opts: dict) -> dict:
    """Memory bandwidth as torch sees it: a large copy and a large read-only reduction."""
    progress("machine: memory bandwidth")
    n = (256 if opts["quick"] else 512) * 2**20 // 4
    a = torch.ones(n)
    b = torch.empty_like(a)
    t_copy = median_time(lambda: b.copy_(a), 5, warmup=2)
    t_sum = median_time(lambda: a.sum(), 5, warmup=2)
    return {
        "engine": "machine",
        "buffer_mb": a.nbytes / 2**20,
        "copy_read_gb_s": a.nbytes / t_copy / 1e9,  # bytes read (as many again are written)
        "copy_total_gb_s": 2 * a.nbytes / t_copy / 1e9,
        "sum_read_gb_s": a.nbytes / t_sum / 1e9,
        "threads": torch.get_num_threads(),
    }


# -------------------------------------------------------------------------------------- CUDA


def cuda_engine(opts: dict) -> dict:
    if not torch.cuda.is_available():
        return {"engine": "cuda", "skipped": "torch.cuda.is_available() is False on this machine"}
    rows = []
    for dtype in ("float32", "bfloat16"):
        sub = dict(opts, nocache=False, sweep=False, trace=False)
        rows.append(forethought_engine(sub, dtype, device="cuda"))
        rows.append(hf_engine(sub, dtype, device="cuda"))
        torch.cuda.empty_cache()
    return {"engine": "cuda", "gpu": torch.cuda.get_device_name(), "rows": rows}


ENGINES: dict[str, Callable[[dict], dict]] = {
    "forethought-fp32": lambda o: forethought_engine(o, "float32"),
    "forethought-fp32-opbyop": lambda o: forethought_engine(
        dict(o, nocache=False, sweep=False, trace=False, prefill=False), "float32", fused=False
    ),
    "forethought-bf16": lambda o: forethought_engine(dict(o, nocache=False, sweep=False, trace=False), "bfloat16"),
    "forethought-int8": lambda o: forethought_engine(dict(o, nocache=False, sweep=False, trace=False), "int8"),
    "hf-fp32": lambda o: hf_engine(o),
    "llamacpp-f32": lambda o: llamacpp_engine(o, "F32"),
    "llamacpp-q8_0": lambda o: llamacpp_engine(o, "Q8_0"),
    "llamacpp-q4_1": lambda o: llamacpp_engine(o, "Q4_1"),
    "machine": machine_engine,
    "cuda": cuda_engine,
    "speculative": lambda o: speculative_engine(o),
}
check_workers("main", ENGINES)


def speculative_engine(opts: dict) -> dict:
    from benchmarks.speculative import run

    return run(dict(opts, repeats=min(opts["repeats"], 2)), progress)


def main() -> None:
    name, opts = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(THREADS)
    result = ENGINES[name](opts)
    print("@result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
