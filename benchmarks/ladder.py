"""The Qwen2.5-Coder rungs of the model ladder against llama.cpp, on the same GGUF files:

  python -m benchmarks.ladder agree [--models qwen2.5-coder-0.5b qwen2.5-coder-1.5b] [--record] [--reuse]

For each model: token ids of hard strings (llama.cpp reads the Q4_K_M file, vocabulary only); the logits at
every position of four prompts against llama.cpp running its own F32 conversion of the file (so both engines
compute in float32 from the same dequantised weights); greedy 64-token continuations of a code and a prose
prompt against the same; and the chat prompt rendered from the GGUF's own template by llama-cpp-python's
Jinja2 formatter against ours. Each engine runs in its own process, one after the other, so the 1.5B model's
two float32 copies (ours ~7 GB, llama.cpp's ~6 GB) are never in memory together.

`--record` writes llama.cpp's ids, per-position top-1 tokens and greedy ids to tests/qwen_llama_cpp_ids.json,
which tests/test_qwen_real.py checks without llama-cpp-python. Results: docs/results/ladder/agreement.json.
Needs the `qwen05` / `qwen15` and `bench` extras.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cache_dir, llama_greedy

THREADS = 2
MODELS = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "ladder"
RECORD = ROOT / "tests" / "qwen_llama_cpp_ids.json"
GREEDY_TOKENS = 64
# Logits at every position of each.
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The history of the printing press begins in the fifteenth century, when",
    "Compute 1234 * 5678 = 7006652 and 2**20 = 1048576; then 3.14159 * 2 =",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_PROMPTS = {
    "code": "import json\n\n\ndef load_config(path):\n",
    "prose": "Once upon a time, in a small village by the mountains,",
}
CHAT_MESSAGE = "Write a Python function that reverses a string."
HARD_STRINGS = [
    "Hello world",
    "def f(x):\n    return x**2  # square",
    "    indented four\n\tand a tab\n        eight",
    "class Foo(Bar):\n    def __init__(self, *args, **kwargs) -> None:\n        super().__init__()",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    'print(f"{name!r:>10} = {value:.3f}")',
    "x=1;y=2;z=x+y",
    "if a != b and c >= d or not e:\n\tpass",
    "digits 0123456789",
    "3.14159265358979 and 2.718281828",
    "1,000,000 and 1_000_000 and 1e-9 and 0xFF",
    "2026-12-07T03:15:00Z",
    "1234567890123456789012345678901234567890",
    "CJK: 日本語のテキスト、中文文本、한국어 텍스트",
    "中文：今天天气很好，我们去公园散步吧。",
    "emoji: 😀 👍🏽 🇫🇷 👩‍💻",
    "🤖🤖🤖 robots",
    "accents: café, naïve, Ångström, señor, İstanbul",
    "two  spaces, three   spaces, eight        spaces",
    "   leading spaces and trailing   ",
    "line\n\nblank\n\n\nthree blank\n\n\n\n",
    "windows\r\nline\r\nends\r\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after the end",
    "<b>html</b> &amp; entities &lt;tag&gt;",
    "https://example.com/path?query=1&other=two#frag",
    "SELECT * FROM users WHERE id = 42;",
    "mixed Ünïcödé 😀 and ASCII",
    "'s 't 're 've 'm 'll 'd THEY'RE",
    '{\n  "key": [1, 2, 3],\n  "nested": {"a": null}\n}',
]


def progress(text: str) -> None:
    print(f"@progress {text}", file=sys.stderr, flush=True)


def gguf_path(model: str) -> Path:
    from forethought.weights.registry import REGISTRY

    return REGISTRY[model].locate()


def f32_gguf(model: str) -> Path:
    """llama.cpp's own F32 conversion of the Q4_K_M file (ftype 0 = all F32), made once, atomically."""
    import llama_cpp

    dst = cache_dir() / "gguf" / f"{model}-f32.gguf"
    if not dst.exists():
        progress(f"llama.cpp: converting {model} Q4_K_M -> F32 (once)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 0
        params.allow_requantize = True
        params.nthread = THREADS
        tmp = dst.with_name(dst.name + ".part")
        rc = llama_cpp.llama_model_quantize(str(gguf_path(model)).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to F32 failed ({rc})")
        tmp.rename(dst)
    return dst


# ------------------------------------------------------------------------------------------- engines


def engine_forethought(model: str, dump: str) -> dict:
    from forethought import generate, load_model

    progress(f"forethought: loading {model}")
    started = time.perf_counter()
    lm = load_model(model)
    out: dict = {"engine": "forethought fp32", "load_s": time.perf_counter() - started}
    tok = lm.tokenizer
    out["tokens"] = [tok.encode(s) for s in HARD_STRINGS]
    progress("forethought: logits")
    with torch.inference_mode():
        np.savez(dump, *[lm.model(torch.tensor([tok.encode(p)]))[0].float().numpy() for p in PROMPTS])
    out["greedy"] = {}
    for name, prompt in GREEDY_PROMPTS.items():
        progress(f"forethought: greedy {name}")
        out["greedy"][name] = generate(lm.model, tok.encode(prompt), GREEDY_TOKENS).new_ids
    out["chat"] = tok.apply_chat_template(CHAT_MESSAGE)
    return out


def engine_llamacpp(model: str, dump: str) -> dict:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from forethought.weights.gguf_loader import open_gguf

    path = gguf_path(model)
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    out: dict = {"engine": "llama.cpp F32", "llama_cpp_python": llama_cpp.__version__}
    out["tokens"] = [vocab.tokenize(s.encode(), add_bos=True, special=True) for s in HARD_STRINGS]
    meta = vocab.metadata
    del vocab
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    _, _, tok, _ = open_gguf(path)  # only to turn token ids into the strings the template is given
    formatter = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"],
        bos_token=tok.backend.id_to_token(int(bos)) if bos is not None else "",
        eos_token=tok.backend.id_to_token(int(eos)) if eos is not None else "",
    )
    out["chat"] = formatter(messages=[{"role": "user", "content": CHAT_MESSAGE}]).prompt
    f32 = f32_gguf(model)
    progress(f"llama.cpp: loading {f32.name}")
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(f32), n_ctx=512, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
        logits_all=True, verbose=False,
    )  # fmt: skip
    out["load_s"] = time.perf_counter() - started
    dumps = []
    for p in PROMPTS:
        progress("llama.cpp: logits")
        ids = llm.tokenize(p.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        dumps.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    np.savez(dump, *dumps)
    out["greedy"] = {}
    for name, prompt in GREEDY_PROMPTS.items():
        progress(f"llama.cpp: greedy {name}")
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        out["greedy"][name] = [int(t) for t in llama_greedy(llm, prompt_ids, GREEDY_TOKENS)[0]]
    return out


ENGINES = {"forethought": engine_forethought, "llamacpp": engine_llamacpp}


def run_engine(name: str, model: str, dump: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ladder", "engine", name, model, dump], capture_output=True, text=True
    )
    for line in proc.stderr.splitlines():
        if line.startswith("@progress"):
            print(f"  {model} {name}: {line.removeprefix('@progress ')}", flush=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {"engine": name, "error": tail[-1] if tail else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- report


def compare(model: str, ours: dict, ref: dict, mine: np.lib.npyio.NpzFile, theirs: np.lib.npyio.NpzFile) -> dict:
    equal = [a == b for a, b in zip(ours["tokens"], ref["tokens"])]
    rows = []
    for i, p in enumerate(PROMPTS):
        a, b = mine[f"arr_{i}"], theirs[f"arr_{i}"]
        if a.shape != b.shape:  # the engines cut the prompt differently: the token-id rows say where
            rows.append({"prompt": p, "error": f"shapes differ: {a.shape} vs {b.shape}"})
            continue
        scale = float(b.std())
        rows.append(
            {
                "prompt": p,
                "positions": int(a.shape[0]),
                "top1_equal": f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{a.shape[0]}",
                "max_abs_diff": float(np.abs(a - b).max()),
                "logit_std": scale,
                "max_abs_diff_over_std": float(np.abs(a - b).max()) / scale,
                "max_abs_logit": float(np.abs(b).max()),
            }
        )
    greedy = {
        name: {
            "equal": ours["greedy"][name] == ref["greedy"][name],
            "first_difference": next(
                (i for i, (x, y) in enumerate(zip(ours["greedy"][name], ref["greedy"][name])) if x != y), None
            ),
        }
        for name in GREEDY_PROMPTS
    }
    return {
        "model": model,
        "load_s": {"forethought": ours.get("load_s"), "llama.cpp F32": ref.get("load_s")},
        "token_ids_equal": f"{sum(equal)}/{len(equal)}",
        "token_ids_differ_on": [s for s, e in zip(HARD_STRINGS, equal) if not e],
        "logits_vs_llama_cpp_f32": rows,
        "greedy_64_vs_llama_cpp_f32": greedy,
        "chat_template_equal": ours["chat"] == ref["chat"],
        "chat_rendered": ours["chat"],
    }


def agree(args) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {"llama_cpp_python": None, "models": {}}
    if (OUT / "agreement.json").is_file():  # other models' earlier results stay
        report = json.loads((OUT / "agreement.json").read_text())
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    for model in args.models:
        dumps = {n: str(cache_dir() / f"ladder-logits-{model}-{n}.npz") for n in ENGINES}
        results = {}
        for n in ENGINES:  # one after the other: RAM
            saved = Path(dumps[n]).with_suffix(".json")
            if args.reuse and saved.is_file() and Path(dumps[n]).is_file():
                results[n] = json.loads(saved.read_text())
                continue
            results[n] = run_engine(n, model, dumps[n])
            if "error" not in results[n]:
                saved.write_text(json.dumps(results[n], ensure_ascii=False))
        if any("error" in r for r in results.values()):
            report["models"][model] = {n: r["error"] for n, r in results.items() if "error" in r}
            print(f"{model}: {report['models'][model]}")
            continue
        ours, ref = results["forethought"], results["llamacpp"]
        report["llama_cpp_python"] = ref["llama_cpp_python"]
        theirs = np.load(dumps["llamacpp"])
        report["models"][model] = compare(model, ours, ref, np.load(dumps["forethought"]), theirs)
        print_summary(report["models"][model])
        record[model] = {
            "ids": dict(zip(HARD_STRINGS, ref["tokens"])),
            "top1": {p: theirs[f"arr_{i}"].argmax(-1).tolist() for i, p in enumerate(PROMPTS)},
            "greedy": {GREEDY_PROMPTS[n]: ids for n, ids in ref["greedy"].items()},
            "chat": {CHAT_MESSAGE: ref["chat"]},
        }
    (OUT / "agreement.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.record:
        record["source"] = (
            f"llama-cpp-python {report['llama_cpp_python']}: ids from Llama(<Q4_K_M file>, vocab_only=True)"
            ".tokenize(text.encode(), add_bos=True, special=True); top-1 per position and greedy (top_k=1, "
            "64 tokens) from its F32 conversion (llama_model_quantize ftype 0); chat from Jinja2ChatFormatter "
            "over the GGUF's tokenizer.chat_template. Written by `python -m benchmarks.ladder agree --record`."
        )
        text = json.dumps(dict(sorted(record.items())), indent=1, ensure_ascii=False)
        # One line per list of ids: the file stays a few hundred lines long and diffs stay readable.
        text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        RECORD.write_text(text + "\n")
    return report


def print_summary(r: dict) -> None:
    print(f"{r['model']}: token ids equal {r['token_ids_equal']}; chat template equal {r['chat_template_equal']}")
    for row in r["logits_vs_llama_cpp_f32"]:
        if "error" in row:
            print(f"  logits {row['prompt'][:40]!r}: {row['error']}")
            continue
        print(
            f"  logits {row['prompt'][:40]!r}: top-1 {row['top1_equal']}, max |diff| {row['max_abs_diff']:.4f} "
            f"= {row['max_abs_diff_over_std']:.4f} x the logits' std ({row['logit_std']:.2f})"
        )
    for name, g in r["greedy_64_vs_llama_cpp_f32"].items():
        print(f"  greedy {name} 64 tokens equal: {g['equal']} (first difference at {g['first_difference']})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:
        name, model, dump = argv[1:4]
        torch.set_num_threads(THREADS)
        print(json.dumps(ENGINES[name](model, dump), ensure_ascii=False))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ladder")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("agree", help="token ids, logits, greedy text and chat template vs llama.cpp")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--record", action="store_true", help="write llama.cpp's reference ids for the tests")
    p.add_argument("--reuse", action="store_true", help="reuse an engine's saved results from an earlier run")
    args = parser.parse_args(argv)
    agree(args)


if __name__ == "__main__":
    main()
