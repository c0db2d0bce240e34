"""`python -m benchmarks --models smollm2-135m,gemma3-270m,MODEL,...`: speed on the model ladder.

For each model (a registry name or a .gguf path), against llama.cpp on the same file, in one run:
decode fp32 vs llama.cpp F32, int8 vs llama.cpp Q8_0, prefill vs llama.cpp F32, speculative decoding
(prompt lookup and `auto`) on a code-continuation prompt vs plain fp32 and vs llama.cpp's prompt-lookup
decoding, decode with one core taken by a busy process (both engines), and each engine's peak RSS.
llama.cpp's F32 and Q8_0 files are `llama_model_quantize` conversions of the model's own file, made once.
Every engine runs in its own process (its RSS is its own; only one model is in memory at a time) with
2 threads; every figure is the median of `--repeats` runs after an untimed warm-up; ratios are taken
within this run only. Also `python -m benchmarks.ladder_speed ENGINE MODEL OPTIONS_JSON` (one worker).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.common import (
    PROMPT,
    SPECULATIVE_TEXTS,
    llama,
    llama_converted,
    llama_greedy,
    long_text,
    median,
    median_time,
)

THREADS = 2
ENGINES = ("forethought-fp32", "forethought-int8", "llamacpp-f32", "llamacpp-q8_0")
CODE_PROMPT = next(text for name, text, _ in SPECULATIVE_TEXTS if name == "code")
DRAFT_LEN = 4  # forethought's default --draft-len
PEER_DRAFT = 10  # llama.cpp's default number of prompt-lookup tokens

SPEC_PLAIN, LOOKUP = "decode_tok_s_spec_plain", "lookup_tok_s"
# (what, engine, key, peer engine, peer key, bar): the targets, each checked on every model.
LADDER_TARGETS = [
    ("fp32 decode vs llama.cpp F32", "forethought-fp32", "decode_tok_s", "llamacpp-f32", "decode_tok_s", 1.0),
    ("int8 decode vs llama.cpp Q8_0", "forethought-int8", "decode_tok_s", "llamacpp-q8_0", "decode_tok_s", 1.3),
    ("fp32 prefill vs llama.cpp F32", "forethought-fp32", "prefill_tok_s", "llamacpp-f32", "prefill_tok_s", 1.0),
    ("speculative on code vs plain fp32", "forethought-fp32", "spec_best_tok_s", "forethought-fp32", SPEC_PLAIN, 2.0),
    ("speculative on code vs llama.cpp lookup", "forethought-fp32", "spec_best_tok_s", "llamacpp-f32", LOOKUP, 1.0),
]
# Which models the issue sets each bar for (a substring of the model's name, and how to say it): the speed
# bars for the Qwen files, speculative >= 2x for the 1.5B (where verifying is nearly free). The other models'
# rows are shown for comparison.
QWEN = ("qwen2.5-coder", "the Qwen files")
TARGET_MODELS = {
    "fp32 decode vs llama.cpp F32": QWEN,
    "int8 decode vs llama.cpp Q8_0": QWEN,
    "fp32 prefill vs llama.cpp F32": QWEN,
    "speculative on code vs plain fp32": ("1.5b", "the 1.5B"),
    "speculative on code vs llama.cpp lookup": ("1.5b", "the 1.5B"),
}


def progress(text: str) -> None:
    print(f"@progress {text}", flush=True)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def one_core_busy():
    """Another process spinning on one core while the block runs: decode under contention."""
    # It spins until told to stop, or until its parent is gone (a killed benchmark leaves no spinner).
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # let it get scheduled
        yield
    finally:
        os.kill(busy.pid, signal.SIGTERM)
        busy.wait()


def rates(fn: Callable[[int], tuple[float, list[int]]], n: int, repeats: int, warmup: int) -> tuple[float, list]:
    """Median rate of `repeats` runs of fn(n) after one untimed fn(warmup); fn returns (rate, ids)."""
    fn(warmup)
    runs = [fn(n) for _ in range(repeats)]
    return median([r for r, _ in runs]), runs[-1][1]


# ----------------------------------------------------------------------------------- forethought


def forethought_rate(model, ids: list[int], n: int, speculative=None) -> tuple[float, list[int]]:
    """Greedy decode of n tokens after `ids`: (forwards per second, the new ids)."""
    from forethought.model.generate import GREEDY, generate

    g = generate(model, ids, n, GREEDY, speculative=speculative, draft_len=DRAFT_LEN)
    steps = g.step_seconds[1:]  # the first step samples from prefill's logits: not a decode forward
    return len(steps) / sum(steps), g.new_ids


def forethought_engine(model_ref: str, opts: dict, dtype: str) -> dict:
    import torch

    from forethought import load_model
    from forethought.model.generate import GREEDY, generate
    from forethought.model.speculative import make_drafter
    from forethought.weights.registry import load_draft_model

    label = "fp32" if dtype == "float32" else dtype
    progress(f"forethought {label}: loading {model_ref}")
    started = time.perf_counter()
    lm = load_model(model_ref, dtype=dtype)
    load_s = time.perf_counter() - started
    model, tok = lm.model, lm.tokenizer
    prompt, code = tok.encode(PROMPT), tok.encode(CODE_PROMPT)
    text_ids = tok.encode(long_text())[: opts["prompt_len"]]
    with torch.inference_mode():
        compiled = model._decode_step(model.new_cache()) is not None
    out: dict = {"engine": f"forethought {label}", "load_s": load_s, "compiled_step": compiled}
    out["token_ids"] = {"prompt": prompt, "code": code, "prefill": text_ids}  # the peers decode the same ids

    def decode(n: int, ids=prompt) -> tuple[float, list[int]]:
        return forethought_rate(model, ids, n)

    n, reps, warm = opts["tokens"], opts["repeats"], opts["warmup_tokens"]
    progress(f"forethought {label}: decode {n} tokens")
    out["decode_tok_s"], out["ids"] = rates(decode, n, reps, warm)
    if opts.get("decode_only"):
        return out
    if dtype == "float32":
        progress(f"forethought {label}: decode {n} tokens, one core busy")
        with one_core_busy():
            out["busy_decode_tok_s"], _ = rates(decode, n, reps, warm)

        @torch.inference_mode()
        def prefill() -> None:
            model(torch.tensor([text_ids]), cache=model.new_cache(capacity=len(text_ids)), last_only=True)

        progress(f"forethought {label}: prefill {len(text_ids)} tokens")
        out["prefill_tok_s"] = len(text_ids) / median_time(prefill, reps)

    # The peak before a draft model (if any) loads: the engine's own.
    out["peak_rss_mb"] = peak_rss_mb()
    # Speculative on code, interleaved with plain so drift hits both alike; output checked token for token.
    m = opts["spec_tokens"]
    modes = {"plain": None, "lookup": "lookup", "auto": "auto"}
    draft = load_draft_model(lm, None, required=False)  # the registry's default draft, when installed
    if draft is not None:
        modes["model"] = "model"
        out["draft_model"] = f"{draft.name} ({draft.describe()['weights']})"
    runs: dict = {k: [] for k in modes}
    outs: dict = {}
    usage: dict = {}
    progress(f"forethought {label}: speculative on code, {m} tokens")
    for r in range(reps + 1):  # run 0: warm-up
        for mode, kind in modes.items():
            drafter = make_drafter(model, kind, None, draft.model if draft is not None else None) if kind else None
            g = generate(model, code, m if r else warm, GREEDY, speculative=drafter, draft_len=DRAFT_LEN)
            if r:
                steps = g.step_seconds[1:]
                runs[mode].append(len(steps) / sum(steps))
                outs[mode] = g
                if hasattr(drafter, "usage"):
                    usage = {**drafter.usage, "benchings": drafter.benchings}
    out["decode_tok_s_spec_plain"] = median(runs["plain"])
    out["speculative"] = {}
    for mode in (mode for mode in modes if mode != "plain"):
        g = outs[mode]
        out["speculative"][mode] = {
            "tok_s": median(runs[mode]),
            "identical": g.new_ids == outs["plain"].new_ids,
            "tokens_per_forward": g.speculative.tokens_per_forward,
            **({"auto_usage": usage} if mode == "auto" else {}),
        }
    out["spec_best_tok_s"] = max(v["tok_s"] for v in out["speculative"].values())
    out["spec_tokens"] = m
    if draft is not None:
        out["peak_rss_with_draft_mb"] = peak_rss_mb()
    return out


# ----------------------------------------------------------------------------------- llama.cpp


def model_file(model_ref: str) -> Path:
    from forethought.weights.registry import resolve_path

    path = resolve_path(model_ref)[1]
    if path.suffix != ".gguf":
        raise SystemExit(f"{model_ref}: llama.cpp needs a .gguf file, got {path}")
    return path


def llama_file(model_ref: str, kind: str) -> Path:
    """An F32 / Q8_0 conversion of the model's file, made once under ~/.cache/forethought/gguf
    (FORETHOUGHT_LLAMA_DIR overrides: the 1.5B's F32 file is 7.1 GB)."""
    src = model_file(model_ref)
    folder = os.environ.get("FORETHOUGHT_LLAMA_DIR", "")
    return llama_converted(src, kind, f"{src.stem}.{kind}.gguf", progress, Path(folder) if folder else None)


def gguf_bytes_per_token(path: Path) -> int:
    """The bytes of a GGUF file's tensors that one decode step reads: all of them but the token-embedding
    table (a step reads one row of it) unless it doubles as the output matrix (no `output.weight`)."""
    from forethought.weights.gguf_file import GGUFFile

    tensors = GGUFFile(path).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    return sum(t.nbytes for t in tensors if not (untied and t.name == "token_embd.weight"))


def llamacpp_model(path: Path, draft=None):
    return llama(path, n_ctx=1024, n_batch=512, draft_model=draft)


def llamacpp_rate(llm, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy decode of n tokens after `ids`: (forwards per second after the first token, the new ids)."""
    got, stamps = llama_greedy(llm, ids, n)
    return (len(got) - 1) / (stamps[-1] - stamps[0]), got


def llamacpp_engine(model_ref: str, opts: dict, kind: str) -> dict:
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    path = llama_file(model_ref, kind)
    ids = opts["token_ids"]

    def make(draft=None):
        return llamacpp_model(path, draft)

    progress(f"llama.cpp {kind}: loading")
    started = time.perf_counter()
    llm = make()
    out: dict = {"engine": f"llama.cpp {kind}", "file": str(path), "load_s": time.perf_counter() - started}
    if ids is None:  # forethought did not run (e.g. out of memory): llama.cpp's own tokenizer, same texts
        texts = {"prompt": PROMPT, "code": CODE_PROMPT, "prefill": long_text()}
        ids = {k: llm.tokenize(t.encode(), add_bos=True, special=False) for k, t in texts.items()}
        ids["prefill"] = ids["prefill"][: opts["prompt_len"]]
        out["token_ids_from"] = "llama.cpp (forethought fp32 did not run)"

    def decode(n: int, engine=llm, prompt=ids["prompt"]) -> tuple[float, list[int]]:
        return llamacpp_rate(engine, prompt, n)

    n, reps, warm = opts["tokens"], opts["repeats"], opts["warmup_tokens"]
    progress(f"llama.cpp {kind}: decode {n} tokens")
    out["decode_tok_s"], out["ids"] = rates(decode, n, reps, warm)
    if kind == "F32" and not opts.get("decode_only"):
        progress(f"llama.cpp {kind}: decode {n} tokens, one core busy")
        with one_core_busy():
            out["busy_decode_tok_s"], _ = rates(decode, n, reps, warm)
        text = ids["prefill"]

        def prefill() -> None:
            llm.reset()
            llm.eval(text)

        progress(f"llama.cpp {kind}: prefill {len(text)} tokens")
        out["prefill_tok_s"] = len(text) / median_time(prefill, reps)
        m = opts["spec_tokens"]
        progress(f"llama.cpp {kind}: prompt lookup on code, {m} tokens")
        lookup = make(LlamaPromptLookupDecoding(num_pred_tokens=PEER_DRAFT))
        runs: dict = {"plain": [], "lookup": []}
        outs: dict = {}
        for r in range(reps + 1):
            for mode, engine in (("plain", llm), ("lookup", lookup)):
                rate, got = decode(m if r else warm, engine, ids["code"])
                if r:
                    runs[mode].append(rate)
                    outs[mode] = got
        out["plain_code_tok_s"] = median(runs["plain"])
        out["lookup_tok_s"] = median(runs["lookup"])
        out["lookup_identical"] = outs["lookup"] == outs["plain"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


WORKERS: dict[str, Callable[[str, dict], dict]] = {
    "forethought-fp32": lambda m, o: forethought_engine(m, o, "float32"),
    "forethought-int8": lambda m, o: forethought_engine(m, o, "int8"),
    "llamacpp-f32": lambda m, o: llamacpp_engine(m, o, "F32"),
    "llamacpp-q8_0": lambda m, o: llamacpp_engine(m, o, "Q8_0"),
}


def worker_main() -> None:
    import torch

    engine, model_ref, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` blocks run (the busy process ends)
    torch.set_num_threads(THREADS)
    print("@result " + json.dumps(WORKERS[engine](model_ref, opts)), flush=True)


def serve_main() -> None:
    """`python -m benchmarks.ladder_speed serve ENGINE MODEL OPTIONS_JSON`: the engine loaded once and warm,
    then for each line N on stdin, one greedy decode of N tokens after the prompt and its `@rate` (tok/s)."""
    import torch

    engine, model_ref, opts = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    torch.set_num_threads(THREADS)
    ids = (opts.get("token_ids") or {}).get("prompt")
    if engine.startswith("forethought-"):
        from forethought import load_model
        from forethought.model.layers import Linear

        lm = load_model(model_ref, dtype="float32" if engine == "forethought-fp32" else "int8")
        ids = ids or lm.tokenizer.encode(PROMPT)
        linears = [m for m in lm.model.modules() if isinstance(m, Linear)]
        weight_bytes = sum(t.nbytes for m in linears for t in (m.weight_t, m.bias, m.scale) if t is not None)

        def decode(n: int) -> float:
            return forethought_rate(lm.model, ids, n)[0]
    else:
        path = llama_file(model_ref, "F32" if engine == "llamacpp-f32" else "Q8_0")
        llm = llamacpp_model(path)
        ids = ids or llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        weight_bytes = gguf_bytes_per_token(path)

        def decode(n: int) -> float:
            return llamacpp_rate(llm, ids, n)[0]

    for _ in range(2):  # first calls are several times slower: never timed
        decode(opts["warmup_tokens"])
    print(f"@ready {json.dumps({'weight_bytes': weight_bytes})}", flush=True)
    for line in sys.stdin:
        print(f"@rate {decode(int(line))}", flush=True)


# ------------------------------------------------------------------------------------- parent

# (forethought engine, its peer, label): the decode pairs measured side by side.
PAIRS = (("forethought-fp32", "llamacpp-f32", "fp32 / F32"), ("forethought-int8", "llamacpp-q8_0", "int8 / Q8_0"))
PAIR_PAUSE_S = 0.2  # between bursts: the engine that just ran has parked its threads (OpenMP spins ~ms)


def _worker_env() -> tuple[Path, dict]:
    root = Path(__file__).resolve().parent.parent
    return root, dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


class Served:
    """An engine in a process of its own (`serve`), loaded and warm, decoding when asked."""

    def __init__(self, engine: str, model_ref: str, opts: dict):
        root, env = _worker_env()
        self.engine = engine
        self.log = tempfile.TemporaryFile("w+")  # stderr, for the error message; a pipe could fill and block
        cmd = [sys.executable, "-m", "benchmarks.ladder_speed", "serve", engine, model_ref, json.dumps(opts)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=root
        )
        self.info = json.loads(self._reply("@ready") or "{}")

    def _reply(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :].strip()
        self.log.seek(0)
        tail = " | ".join(self.log.read().strip().splitlines()[-3:])
        raise RuntimeError(f"{self.engine} exited {self.proc.wait()}: {tail}")

    def rate(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self._reply("@rate"))

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def bootstrap_median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the median of `values` by the percentile bootstrap (resampling the values)."""
    rng = random.Random(seed)
    meds = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


class ReadBandwidth:
    """The machine's read bandwidth now, as torch sees it on THREADS threads: sums of a 512 MiB buffer of
    random floats (torch's reduction, not forethought's kernels) for `seconds`, bytes over time -- a window
    like a decode burst's, since the bandwidth swings within a second. A decode step reads its weights once,
    so bandwidth / bytes per token is the speed no engine reading those bytes can pass (the roofline)."""

    def __init__(self, mib: int = 512, seconds: float = 1.0):
        import torch

        torch.set_num_threads(THREADS)
        self.buffer = torch.rand(mib * 2**20 // 4)  # random: no page is like another
        self.seconds = seconds
        self.buffer.sum()  # code warm

    def __call__(self) -> float:
        started, sums = time.perf_counter(), 0
        while time.perf_counter() - started < self.seconds:
            self.buffer.sum()
            sums += 1
        return sums * self.buffer.nbytes / (time.perf_counter() - started) / 1e9


def paired_decode(model_ref: str, ours: str, peer: str, opts: dict, served=Served, bandwidth=ReadBandwidth) -> dict:
    """Both engines loaded at once, decoding in turn: `decode_pairs` pairs of bursts of `tokens` tokens, the
    order swapped every pair (ours, peer, peer, ours, ...), and between a pair's two bursts the machine's read
    bandwidth. A pair's bursts run seconds apart under the same conditions, so its ratio is what drift touches
    least; the figure is the median of the pairs' ratios, with a bootstrap 95% interval over the pairs. Each
    burst's share of the roofline (tok/s x bytes per token / bandwidth) says how close to the memory's limit
    each engine ran; the peer reads the same weights (F32: float32, the same bytes; Q8_0: a byte and a
    16-bit scale per 32, 4.4% more than forethought's int8 where its scale serves 128 inputs)."""
    n, pairs = opts["tokens"], opts["decode_pairs"]
    with ExitStack() as stack:
        engines = [served(engine, model_ref, opts) for engine in (ours, peer)]
        for engine in engines:
            stack.callback(engine.close)
        probe = bandwidth()
        rates: list[list[float]] = [[], []]
        gb_s: list[float] = []
        for k in range(pairs):
            first, second = (0, 1) if k % 2 == 0 else (1, 0)
            time.sleep(PAIR_PAUSE_S)
            rates[first].append(engines[first].rate(n))
            gb_s.append(probe())
            time.sleep(PAIR_PAUSE_S)
            rates[second].append(engines[second].rate(n))
        weight_bytes = engines[0].info.get("weight_bytes")
        peer_bytes = engines[1].info.get("weight_bytes") or weight_bytes
        del probe
    ratios = [a / b for a, b in zip(*rates, strict=True)]
    lo, hi = bootstrap_median_ci(ratios)
    roofline = {}
    if weight_bytes:
        for key, got, size in (
            ("roofline_share", rates[0], weight_bytes),
            ("peer_roofline_share", rates[1], peer_bytes),
        ):
            roofline[key] = median([r * size / 1e9 / bw for r, bw in zip(got, gb_s, strict=True)])
    return {
        "read_gb_s": gb_s,
        "weight_bytes": weight_bytes,
        "peer_weight_bytes": peer_bytes,
        **roofline,
        "engines": [ours, peer],
        "tokens": n,
        "tok_s": rates[0],
        "peer_tok_s": rates[1],
        "ratios": ratios,
        "median_tok_s": median(rates[0]),
        "peer_median_tok_s": median(rates[1]),
        "median_ratio": median(ratios),
        "ci95": [lo, hi],
    }


def run_engine(engine: str, model_ref: str, opts: dict, on_progress: Callable[[str], None]) -> dict:
    root, env = _worker_env()
    cmd = [sys.executable, "-m", "benchmarks.ladder_speed", engine, model_ref, json.dumps(opts)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    result = None
    for line in proc.stdout:
        if line.startswith("@progress "):
            on_progress(line[len("@progress ") :].strip())
        elif line.startswith("@result "):
            result = json.loads(line[len("@result ") :])
    stderr = proc.stderr.read()
    proc.wait()
    if result is None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        result = {"engine": engine, "error": f"exit {proc.returncode}: {tail}"}
    result["wall_s"] = time.perf_counter() - started
    result["load_average_after"] = os.getloadavg()[0]  # 1-minute: how busy the machine was meanwhile
    return result


def run_ladder(
    models: list[str],
    opts: dict,
    on_progress: Callable[[str], None],
    on_result: Callable[[dict], None] = lambda results: None,
    engines=ENGINES,
) -> dict:
    """{model: {engine: result}}; forethought fp32 runs first and hands its token ids to the peers.
    `on_result` gets the results so far after every engine (a long run saves as it goes).

    Decode is bandwidth-bound for both engines, and this machine's memory bandwidth drifts by +-20% over
    minutes and by more between seconds (a process's plain decode read 15.6 tok/s in one phase and 18.9 in
    the next), more than the engines differ. So after its engines' own runs, each pair of `PAIRS` decodes
    side by side (`paired_decode`, `decode_pairs` pairs; 0 skips it), and the decode targets use that."""
    results: dict = {}
    for model_ref in models:
        per: dict = {}
        results[model_ref] = per
        token_ids = None
        for engine in engines:
            sub = dict(opts, token_ids=token_ids)
            on_progress(f"{model_ref}: {engine}")
            per[engine] = run_engine(engine, model_ref, sub, lambda text, m=model_ref: on_progress(f"{m}: {text}"))
            if engine == "forethought-fp32" and "token_ids" in per[engine]:
                token_ids = per[engine].pop("token_ids")
            per[engine].pop("token_ids", None)
            on_result(results)
        for ours, peer, label in PAIRS:
            if not opts.get("decode_pairs") or not all("decode_tok_s" in (per.get(e) or {}) for e in (ours, peer)):
                continue
            on_progress(f"{model_ref}: {label} side by side, {opts['decode_pairs']} pairs")
            try:
                paired = paired_decode(model_ref, ours, peer, dict(opts, token_ids=token_ids))
            except RuntimeError as e:
                paired = {"error": str(e)}
            per.setdefault("paired_decode", {})[label] = paired
            on_result(results)
    return results


def _get(per: dict, engine: str, key: str):
    value = (per.get(engine) or {}).get(key)
    return value if isinstance(value, int | float) else None


def _fmt(x, digits=1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def _times(r) -> str:
    return "–" if r is None else f"{r:.2f}x"


def short_name(model_ref: str) -> str:
    return Path(model_ref).name.removesuffix(".gguf") if model_ref.endswith(".gguf") else model_ref


def paired(per: dict, ours: str, peer: str) -> dict | None:
    """The side-by-side decode of this pair, when it ran."""
    return next(
        (v for v in (per.get("paired_decode") or {}).values() if v.get("engines") == [ours, peer] and v.get("ratios")),
        None,
    )


def decode_figures(per: dict, ours: str, peer: str) -> tuple:
    """(our tok/s, the peer's, their ratio): from the side-by-side pairs where they ran (the median of the
    pairs' ratios), else from each engine's own run."""
    p = paired(per, ours, peer)
    if p:
        return p["median_tok_s"], p["peer_median_tok_s"], p["median_ratio"]
    a, b = _get(per, ours, "decode_tok_s"), _get(per, peer, "decode_tok_s")
    return a, b, (a / b if a is not None and b else None)


def paired_table(results: dict) -> list[str]:
    """Every pair of bursts: tok/s of each engine and the pair's ratio, the median ratio and its interval."""
    rows = []
    for model_ref, per in results.items():
        for label, p in (per.get("paired_decode") or {}).items():
            if "error" in p:
                rows.append(f"| {short_name(model_ref)} | {label} | failed: {p['error'][:100]} | | | | |")
                continue
            lo, hi = p["ci95"]
            share = "–"
            if p.get("roofline_share") is not None:
                share = f"{p['roofline_share']:.0%} / {p['peer_roofline_share']:.0%}"
            bw = f"{median(p['read_gb_s']):.1f}" if p.get("read_gb_s") else "–"
            mb = f"{p['weight_bytes'] / 1e6:,.0f}" if p.get("weight_bytes") else "–"
            if p.get("peer_weight_bytes") and p.get("weight_bytes"):
                mb += f" / {p['peer_weight_bytes'] / 1e6:,.0f}"
            rows.append(
                f"| {short_name(model_ref)} | {label} | {', '.join(_fmt(x) for x in p['tok_s'])} | "
                f"{', '.join(_fmt(y) for y in p['peer_tok_s'])} | {', '.join(f'{r:.2f}' for r in p['ratios'])} | "
                f"**{p['median_ratio']:.2f}x** | {lo:.2f}-{hi:.2f}x | {mb} | {bw} | {share} |"
            )
    if not rows:
        return []
    return [
        "",
        "Decode side by side (both engines loaded at once, taking turns: one burst each per pair, the order "
        "swapped every pair, so the two bursts of a pair see the same machine; the ratio is the median of the "
        "pairs', with a bootstrap 95% interval over the pairs). Between a pair's bursts, the machine's read "
        "bandwidth: torch summing 512 MiB of random floats for a second on 2 threads (the median over pairs). A "
        "decode step reads its weights once, so tok/s x MB per token / that bandwidth is each engine's share of "
        "the memory's limit (the roofline), the median over pairs; only a rough guide, since the probe runs "
        "beside the bursts, not during them, and this machine's bandwidth swings within seconds:",
        "",
        "| model | pair | forethought tok/s, burst by burst | peer tok/s | ratio per pair | median ratio | 95% CI | "
        "MB per token: forethought / peer | read GB/s | roofline share: forethought / peer |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def markdown(results: dict, opts: dict) -> list[str]:
    lines = [
        "## The model ladder (`--models`)",
        "",
        f"2 threads; decode {opts['tokens']} greedy tokens after {json.dumps(PROMPT)}; prefill "
        f"{opts['prompt_len']} tokens of `argparse.py`; speculative: {opts['spec_tokens']} tokens continuing a "
        f"code prompt (forethought draft length {DRAFT_LEN}, llama.cpp `LlamaPromptLookupDecoding` "
        f"{PEER_DRAFT}); busy: the same decode with another process spinning on one core. Median of "
        f"{opts['repeats']} after a warm-up; every ratio is within this run."
        + (
            f" Decode (not busy): {opts['decode_pairs']} pairs of {opts['tokens']}-token bursts with both engines "
            "loaded, taking turns (the machine's bandwidth drifts by the second); tok/s the medians, the ratio the "
            "median of the pairs' ratios (table below)."
            if opts.get("decode_pairs")
            else ""
        ),
        "",
        "| model | forethought fp32 tok/s | llama.cpp F32 | ratio | int8 | llama.cpp Q8_0 | ratio | "
        "prefill fp32 | llama.cpp F32 | ratio | fp32 busy | llama.cpp F32 busy | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_ref, per in results.items():
        f, lf, fr = decode_figures(per, "forethought-fp32", "llamacpp-f32")
        i, lq, ir = decode_figures(per, "forethought-int8", "llamacpp-q8_0")
        fp, lp = _get(per, "forethought-fp32", "prefill_tok_s"), _get(per, "llamacpp-f32", "prefill_tok_s")
        fb, lb = _get(per, "forethought-fp32", "busy_decode_tok_s"), _get(per, "llamacpp-f32", "busy_decode_tok_s")
        lines.append(
            f"| {short_name(model_ref)} | {_fmt(f)} | {_fmt(lf)} | {_times(fr)} | {_fmt(i)} | {_fmt(lq)} | "
            f"{_times(ir)} | {_fmt(fp, 0)} | {_fmt(lp, 0)} | {_ratio(fp, lp)} | {_fmt(fb)} | {_fmt(lb)} | "
            f"{_ratio(fb, lb)} |"
        )
    lines += paired_table(results)
    lines += [
        "",
        "| model | engine | plain tok/s | lookup | draft model | auto | best vs plain | identical | tokens/forward "
        "(lookup, draft model, auto) | auto: forwards plain/lookup/model/heads, benchings | llama.cpp plain | "
        "llama.cpp lookup | ours vs theirs |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for model_ref, engine in ((m, e) for m in results for e in ("forethought-fp32", "forethought-int8")):
        per = results[model_ref]
        fr = per.get(engine) or {}
        spec = fr.get("speculative") or {}
        if not spec:
            continue
        lk, au, dm = spec.get("lookup") or {}, spec.get("auto") or {}, spec.get("model") or {}
        plain, best = fr.get("decode_tok_s_spec_plain"), fr.get("spec_best_tok_s")
        ll_plain, ll_lookup = _get(per, "llamacpp-f32", "plain_code_tok_s"), _get(per, "llamacpp-f32", "lookup_tok_s")
        if engine != "forethought-fp32":  # llama.cpp's lookup runs on F32: the peer of the fp32 row only
            ll_plain = ll_lookup = None
        use = au.get("auto_usage") or {}
        usage = "/".join(str(use.get(k, "–")) for k in ("plain", "lookup", "model", "heads"))
        usage += f", {use.get('benchings', '–')}"
        same = "yes" if all(v.get("identical") for v in spec.values()) else "NO"
        lines.append(
            f"| {short_name(model_ref)} | {fr.get('engine', engine)} | {_fmt(plain)} | {_fmt(lk.get('tok_s'))} | "
            f"{_fmt(dm.get('tok_s'))} | {_fmt(au.get('tok_s'))} | "
            f"{_ratio(best, plain)} | {same} | {_fmt(lk.get('tokens_per_forward'), 2)}, "
            f"{_fmt(dm.get('tokens_per_forward'), 2)}, {_fmt(au.get('tokens_per_forward'), 2)} | {usage} | "
            f"{_fmt(ll_plain)} | {_fmt(ll_lookup)} | {_ratio(best, ll_lookup)} |"
        )
    drafts = {
        short_name(m): r["forethought-fp32"]["draft_model"]
        for m, r in results.items()
        if (r.get("forethought-fp32") or {}).get("draft_model")
    }
    if drafts:
        lines += [
            "",
            "Draft model (`--speculative model`, and `auto`'s first source): "
            + "; ".join(f"{k}: {v}" for k, v in drafts.items())
            + ". Peak RSS below is the engine's own, before it loads.",
        ]
    lines += [
        "",
        "| model | engine | load s | peak RSS MB | compiled step | wall s | machine load average after |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for model_ref, per in results.items():
        for engine in ENGINES:
            r = per.get(engine) or {}
            if "error" in r:
                lines.append(f"| {short_name(model_ref)} | {engine} | failed: {r['error'][:100]} | | | | |")
                continue
            step = {True: "yes", False: "no (op by op)"}.get(r.get("compiled_step"), "")
            lines.append(
                f"| {short_name(model_ref)} | {r.get('engine', engine)} | {_fmt(r.get('load_s'))} | "
                f"{_fmt(r.get('peak_rss_mb'), 0)} | {step} | {_fmt(r.get('wall_s'), 0)} | "
                f"{_fmt(r.get('load_average_after'))} |"
            )
    lines += ["", "### Targets on the ladder, from this run", "", "| model | target | ratio | bar | met |"]
    lines.append("|---|---|---:|---:|---|")
    for model_ref, per in results.items():
        for what, a, ka, b, kb, bar in LADDER_TARGETS:
            if ka == "decode_tok_s":
                r = decode_figures(per, a, b)[2]
            else:
                x, y = _get(per, a, ka), _get(per, b, kb)
                r = x / y if x is not None and y else None
            if r is None:
                lines.append(f"| {short_name(model_ref)} | {what} | – | >= {bar:.2f}x | not measured |")
                continue
            p = paired(per, a, b) if ka == "decode_tok_s" else None
            shown = f"{r:.2f}x" + (f" (95% CI {p['ci95'][0]:.2f}-{p['ci95'][1]:.2f})" if p else "")
            met = "yes" if r >= bar else "NO"
            only, which = TARGET_MODELS.get(what, ("", ""))
            if only not in model_ref.lower():
                met += f" (the bar is set for {which} only)"
            lines.append(f"| {short_name(model_ref)} | {what} | {shown} | >= {bar:.2f}x | {met} |")
    return lines


if __name__ == "__main__":
    serve_main() if sys.argv[1:2] == ["serve"] else worker_main()
