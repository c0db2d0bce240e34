"""Gemma 3 270M against independent references, on the same GGUF file:

  python -m benchmarks.gemma agree   # token ids vs llama.cpp, next-token logits vs llama.cpp F32 and
                                     # HF transformers fp32, greedy continuations of all three
  python -m benchmarks.gemma speed   # decode and prefill: forethought fp32 vs HF fp32 vs llama.cpp F32 / Q4_K_M

Each engine runs in its own process (`python -m benchmarks.gemma engine NAME`), so peak RSS and threads
are its own. Needs the `gemma` and `bench` extras. The F32 GGUF (llama.cpp) and the HF safetensors copy
are converted once and cached under ~/.cache/forethought/. Results go to docs/results/gemma/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    THREADS,
    cache_dir,
    check_workers,
    gguf_tokenizer,
    llama,
    llama_converted,
    llama_greedy,
    long_text,
    median,
    median_time,
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Once upon a time, there was a little",
    "1 + 1 = 2, 2 + 3 =",
    "Le château de Versailles est situé à",
]
HARD_STRINGS = [
    "Hello world",
    "  two leading spaces,  double  spaces and a trailing one ",
    "digits 0123456789, 3.14159, 1,000,000 and 2026-11-27",
    "accents: café, naïve, Ångström, señor, Øresund, İstanbul",
    "CJK: 日本語のテキスト、中文文本、한국어 텍스트",
    "emoji: 😀 👍🏽 🇫🇷 👩‍💻",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "tabs\tand\nnewlines\n\n\nend\r\n",
    "code: def f(x):\n    return x**2  # comment",
    "mixed Ünïcödé 😀 and <b>html</b> &amp; entities",
]
GREEDY_TOKENS = 32
OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "gemma"


def progress(text: str) -> None:
    print(f"@progress {text}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    from forethought.weights.registry import GEMMA3_270M, REGISTRY

    return REGISTRY[GEMMA3_270M].locate()


def f32_gguf() -> Path:
    """llama.cpp's own F32 conversion of the Q4_K_M file, made once."""
    return llama_converted(gguf_path(), "F32", "gemma-3-270m-f32.gguf", progress)


def hf_model():
    """HF transformers' Gemma3ForCausalLM from the same GGUF (its own converter), cached as safetensors:
    converting the GGUF takes minutes on 2 busy cores, loading the copy seconds."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    folder = cache_dir() / "hf" / "gemma-3-270m-from-q4_k_m"
    if not (folder / "config.json").is_file():
        progress("HF: converting the GGUF (once)")
        path = gguf_path()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models; the weights are plain float32 by now, so save them
        # directly and drop the GGUF marker from the config.
        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, str(folder / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------- engines


def engine_forethought(opts: dict) -> dict:
    from forethought import generate, load_model

    progress("forethought: loading")
    started = time.perf_counter()
    lm = load_model("gemma3-270m")
    out: dict = {"engine": "forethought fp32 (op by op)", "load_s": time.perf_counter() - started}
    tok, model = lm.tokenizer, lm.model
    if opts["mode"] == "agree":
        out["tokens"] = [tok.encode(s) for s in HARD_STRINGS]
        logits = {}
        with torch.inference_mode():
            for p in PROMPTS:
                logits[p] = model(torch.tensor([tok.encode(p)]))[0].numpy()
        np.savez(opts["dump"], *[logits[p] for p in PROMPTS])
        g = generate(model, tok.encode(PROMPTS[0]), GREEDY_TOKENS)
        out["greedy_ids"], out["greedy_text"] = g.new_ids, tok.decode(g.new_ids)
        return out
    prompt = tok.encode(PROMPTS[2])

    def decode() -> tuple[float, list[int]]:
        g = generate(model, prompt, opts["tokens"])
        forwards = g.step_seconds[: opts["tokens"] - 1]
        return len(forwards) / sum(forwards), g.new_ids

    out.update(_speed(decode, lambda ids: model(torch.tensor([ids]), cache=model.new_cache(len(ids)), last_only=True),
                      tok.encode(long_text()), opts))  # fmt: skip
    return out


def engine_hf(opts: dict) -> dict:
    progress("HF: loading")
    started = time.perf_counter()
    model = hf_model()
    out: dict = {"engine": "HF transformers fp32", "load_s": time.perf_counter() - started}
    tok = gguf_tokenizer(gguf_path())
    if opts["mode"] == "agree":
        with torch.inference_mode():
            np.savez(opts["dump"], *[model(torch.tensor([tok.encode(p)])).logits[0].numpy() for p in PROMPTS])
            prompt = torch.tensor([tok.encode(PROMPTS[0])])
            ids = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, prompt.shape[1] :].tolist()
        out["greedy_ids"], out["greedy_text"] = ids, tok.decode(ids)
        return out
    prompt = torch.tensor([tok.encode(PROMPTS[2])])
    n = opts["tokens"]

    def gen(k: int) -> list[int]:
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)[0].tolist()

    def decode() -> tuple[float, list[int]]:
        started = time.perf_counter()
        gen(1)
        first = time.perf_counter() - started
        started = time.perf_counter()
        ids = gen(n)
        return (n - 1) / (time.perf_counter() - started - first), ids[prompt.shape[1] :]

    def prefill(ids: list[int]) -> None:
        with torch.inference_mode():
            model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    out.update(_speed(decode, prefill, tok.encode(long_text()), opts))
    return out


def engine_llamacpp(opts: dict, kind: str) -> dict:
    import llama_cpp

    path = f32_gguf() if kind == "F32" else gguf_path()
    progress(f"llama.cpp {kind}: loading")
    started = time.perf_counter()
    llm = llama(path, logits_all=opts["mode"] == "agree")
    out: dict = {"engine": f"llama.cpp {kind}", "llama_cpp_python": llama_cpp.__version__, "load_s": 0.0}
    out["load_s"] = time.perf_counter() - started
    tok = gguf_tokenizer(gguf_path())

    def greedy(prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        return llama_greedy(llm, prompt, n)

    if opts["mode"] == "agree":
        out["tokens"] = [llm.tokenize(s.encode(), add_bos=True, special=True) for s in HARD_STRINGS]
        dumps = []
        for p in PROMPTS:
            llm.reset()
            ids = tok.encode(p)
            llm.eval(ids)
            dumps.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        np.savez(opts["dump"], *dumps)
        ids, _ = greedy(tok.encode(PROMPTS[0]), GREEDY_TOKENS)
        out["greedy_ids"], out["greedy_text"] = ids, tok.decode(ids)
        return out
    prompt = tok.encode(PROMPTS[2])

    def decode() -> tuple[float, list[int]]:
        ids, stamps = greedy(prompt, opts["tokens"])
        return (len(ids) - 1) / (stamps[-1] - stamps[0]), ids

    def prefill(ids: list[int]) -> None:
        llm.reset()
        llm.eval(ids)

    out.update(_speed(decode, prefill, tok.encode(long_text()), opts))
    return out


def _speed(decode, prefill, text_ids: list[int], opts: dict) -> dict:
    progress("decode")
    decode()  # warm-up
    runs = [decode() for _ in range(opts["repeats"])]
    p = opts["prompt_len"]
    progress("prefill")
    seconds = median_time(lambda: prefill(text_ids[:p]), opts["repeats"])
    return {
        "decode_tok_s": median([r for r, _ in runs]),
        "ids": runs[-1][1],
        "prefill_tok_s": p / seconds,
        "prefill_tokens": p,
        "decode_tokens": opts["tokens"],
    }


ENGINES = {
    "forethought": engine_forethought,
    "hf": engine_hf,
    "llamacpp-f32": lambda o: engine_llamacpp(o, "F32"),
    "llamacpp-q4_k_m": lambda o: engine_llamacpp(o, "Q4_K_M"),
}
check_workers("gemma", ENGINES)


def run_engine(name: str, opts: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gemma", "engine", name, json.dumps(opts)],
        capture_output=True,
        text=True,
    )
    for line in proc.stderr.splitlines():
        if line.startswith("@progress"):
            print(f"  {name}: {line.removeprefix('@progress ')}", flush=True)
    if proc.returncode != 0:
        return {"engine": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- reports


def agree(args) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    dumps = {n: str(cache_dir() / f"gemma-logits-{n}.npz") for n in ("forethought", "hf", "llamacpp-f32")}
    results = {n: run_engine(n, {"mode": "agree", "dump": dumps[n]}) for n in args.engines if n in dumps}
    ours = results["forethought"]
    report: dict = {"prompts": PROMPTS, "hard_strings": HARD_STRINGS, "engines": results}
    if "llamacpp-f32" in results and "tokens" in results["llamacpp-f32"]:
        ref = results["llamacpp-f32"]["tokens"]
        report["tokenizer_equal"] = [a == b for a, b in zip(ours["tokens"], ref)]
        report["tokenizer_equal_count"] = f"{sum(report['tokenizer_equal'])}/{len(HARD_STRINGS)}"
    mine = np.load(dumps["forethought"])
    for name in ("llamacpp-f32", "hf"):
        if "error" in results.get(name, {"error": 1}):
            continue
        theirs = np.load(dumps[name])
        rows = []
        for i, p in enumerate(PROMPTS):
            a, b = mine[f"arr_{i}"], theirs[f"arr_{i}"]
            rows.append(
                {
                    "prompt": p,
                    "positions": int(a.shape[0]),
                    "max_abs_diff": float(np.abs(a - b).max()),
                    "max_abs_logit": float(np.abs(b).max()),
                    "last_max_abs_diff": float(np.abs(a[-1] - b[-1]).max()),
                    "top1_agree": f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{a.shape[0]}",
                }
            )
        report[f"logits_vs_{name}"] = rows
        report[f"greedy_equal_{name}"] = results[name]["greedy_ids"] == ours["greedy_ids"]
    (OUT / "agreement.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def speed(args) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    opts = {"mode": "speed", "tokens": args.tokens, "prompt_len": args.prompt_len, "repeats": args.repeats}
    results = {n: run_engine(n, opts) for n in args.engines}
    ref = results.get("forethought", {})
    lines = [
        "| engine | decode tok/s | prefill tok/s | decode ratio to forethought | same greedy ids |",
        "|---|---|---|---|---|",
    ]
    for r in results.values():
        if "error" in r:
            lines.append(f"| {r['engine']} | error: {r['error']} | | | |")
            continue
        ratio = r["decode_tok_s"] / ref["decode_tok_s"] if ref.get("decode_tok_s") else float("nan")
        lines.append(
            f"| {r['engine']} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {ratio:.2f}x | "
            f"{r['ids'] == ref.get('ids')} |"
        )
    note = (
        f"\n`python -m benchmarks.gemma speed --tokens {args.tokens} --prompt-len {args.prompt_len}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), greedy decode of {args.tokens} tokens after a "
        f"9-token prompt and prefill of {args.prompt_len} tokens, median of {args.repeats} after warm-up, "
        f"{THREADS} threads. Taken on a shared 2-core machine under load from other jobs: compare ratios "
        "within this run only.\n"
    )
    (OUT / "speed.md").write_text("\n".join(lines) + "\n" + note)
    (OUT / "speed.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines) + note)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "engine":
        torch.set_num_threads(THREADS)
        print(json.dumps(ENGINES[argv[1]](json.loads(argv[2]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemma")
    p.add_argument("mode", choices=["agree", "speed"])
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from: {', '.join(ENGINES)}")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    if args.mode == "agree":
        print(json.dumps(agree(args), indent=2, ensure_ascii=False))
    else:
        speed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
