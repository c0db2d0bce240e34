"""`python -m benchmarks.speculative [--tokens N] [--repeats R] [--threads T] [--only fp32,int8,llamacpp,hf]`

Plain vs speculative greedy decoding (prompt lookup, draft heads, auto) for forethought fp32 and int8 on a
story, a chat answer and code, with the peers on the same weights in the same run: llama.cpp's
`LlamaPromptLookupDecoding` and HF transformers' assisted generation (`prompt_lookup_num_tokens`). Every
speculative output is checked token for token against the same engine's plain greedy output. Runs and
engines are interleaved per text, medians of R runs after a warm-up; speedups are ratios within one
engine and one run. Also `python -m benchmarks --only speculative`. Writes benchmarks/speculative.json
and an acceptance-length histogram PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import GGUF_NAME, SPECULATIVE_TEXTS, gguf_dir, gguf_tokenizer, llama, llama_file, llama_greedy

ROOT = Path(__file__).resolve().parent
DRAFTERS = ("lookup", "heads", "auto")
DRAFT_LEN = 4
LABEL = {"float32": "fp32", "int8": "int8"}
WARMUP = 16  # tokens of the untimed first run
PEER_DRAFT = 10  # llama.cpp's and HF's default number of prompt-lookup tokens


def _say(text: str) -> None:
    print(text, flush=True)


def prompts(tok) -> dict[str, list[int]]:
    return {name: tok.encode(tok.apply_chat_template(text) if chat else text) for name, text, chat in SPECULATIVE_TEXTS}


def forethought_rows(dtype: str, n: int, repeats: int, progress: Callable[[str], None]) -> list[dict]:
    from forethought import load_model
    from forethought.errors import ForethoughtError
    from forethought.model.generate import GREEDY, generate
    from forethought.model.speculative import make_drafter

    lm = load_model(dtype=dtype)
    model, tok = lm.model, lm.tokenizer
    rows, drafters = [], []
    for kind in DRAFTERS:
        try:
            make_drafter(model, kind)
            drafters.append(kind)
        except ForethoughtError as exc:
            rows.append({"engine": f"forethought {LABEL[dtype]}", "mode": kind, "skipped": str(exc)})
    for text, ids in prompts(tok).items():
        progress(f"forethought {dtype}: {text}")
        configs = [None, *drafters]
        runs: dict = {c: [] for c in configs}
        outputs: dict = {}
        for r in range(repeats + 1):  # run 0 is a short warm-up
            for c in configs:  # interleaved: drift hits every configuration alike
                g = generate(model, ids, n if r else WARMUP, GREEDY, speculative=c, draft_len=DRAFT_LEN)
                if r:
                    runs[c].append(len(g.new_ids) / sum(g.step_seconds))
                    outputs[c] = g
        plain = outputs[None]
        base = statistics.median(runs[None])
        label = f"forethought {LABEL[dtype]}"
        rows.append({"engine": label, "text": text, "mode": "plain", "tok_s": base, "speedup": 1.0})
        for c in drafters:
            g = outputs[c]
            rate = statistics.median(runs[c])
            rows.append(
                {
                    "engine": f"forethought {LABEL[dtype]}",
                    "text": text,
                    "mode": c,
                    "tok_s": rate,
                    "speedup": rate / base,
                    "identical": g.new_ids == plain.new_ids,
                    "tokens": len(g.new_ids),
                    **g.speculative.as_dict(),
                }
            )
    return rows


def llamacpp_rows(n: int, repeats: int, threads: int, progress: Callable[[str], None]) -> list[dict]:
    try:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as exc:
        return [{"engine": "llama.cpp F32", "skipped": f"llama-cpp-python not importable ({exc})"}]
    path = llama_file("F32", progress)  # the same weights as forethought fp32
    tok = gguf_tokenizer()

    def make(draft):
        return llama(path, threads, n_ctx=1024, draft_model=draft)

    engines = {"plain": make(None), "lookup": make(LlamaPromptLookupDecoding(num_pred_tokens=PEER_DRAFT))}
    rows = []
    for text, ids in prompts(tok).items():
        progress(f"llama.cpp F32: {text}")
        runs: dict = {m: [] for m in engines}
        outs: dict = {}
        for r in range(repeats + 1):
            for mode, llm in engines.items():
                got, stamps = llama_greedy(llm, ids, n if r else WARMUP)
                if r:  # timed from the first token (after prefill)
                    runs[mode].append((len(got) - 1) / (stamps[-1] - stamps[0]))
                    outs[mode] = got
        base = statistics.median(runs["plain"])
        for mode in engines:
            rate = statistics.median(runs[mode])
            row = {"engine": "llama.cpp F32", "text": text, "mode": mode, "tok_s": rate, "speedup": rate / base}
            if mode != "plain":
                row["identical"] = outs[mode] == outs["plain"]
                row["draft_len"] = PEER_DRAFT
            rows.append(row)
    return rows


def hf_rows(n: int, repeats: int, progress: Callable[[str], None]) -> list[dict]:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tok = gguf_tokenizer()
    rows = []
    for text, ids in prompts(tok).items():
        progress(f"HF fp32: {text}")
        x = torch.tensor([ids])
        modes = {"plain": {}, "lookup": {"prompt_lookup_num_tokens": PEER_DRAFT}}
        runs: dict = {m: [] for m in modes}
        outs: dict = {}
        for r in range(repeats + 1):
            for mode, extra in modes.items():

                def gen(k: int, extra=extra, x=x) -> list[int]:
                    with torch.inference_mode():
                        out = model.generate(
                            x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=2, **extra
                        )
                    return out[0, x.shape[1] :].tolist()

                if not r:
                    gen(WARMUP)
                    continue
                started = time.perf_counter()
                gen(1)
                first = time.perf_counter() - started
                started = time.perf_counter()
                outs[mode] = gen(n)
                runs[mode].append((n - 1) / (time.perf_counter() - started - first))
        base = statistics.median(runs["plain"])
        for mode in modes:
            rate = statistics.median(runs[mode])
            row = {"engine": "HF fp32", "text": text, "mode": mode, "tok_s": rate, "speedup": rate / base}
            if mode != "plain":
                row["identical"] = outs[mode] == outs["plain"]
                row["draft_len"] = PEER_DRAFT
            rows.append(row)
    return rows


def run(opts: dict, progress: Callable[[str], None] = _say) -> dict:
    n, repeats = opts.get("spec_tokens", 128), opts.get("repeats", 2)
    threads = torch.get_num_threads()
    only = opts.get("only_spec") or ["fp32", "int8", "llamacpp", "hf"]
    rows: list[dict] = []
    for dtype, key in (("float32", "fp32"), ("int8", "int8")):
        if key in only:
            rows += forethought_rows(dtype, n, repeats, progress)
    if "llamacpp" in only:
        rows += llamacpp_rows(n, repeats, threads, progress)
    if "hf" in only:
        rows += hf_rows(n, repeats, progress)
    return {"engine": "speculative", "tokens": n, "repeats": repeats, "threads": threads, "rows": rows}


def table(result: dict) -> list[str]:
    lines = [
        "| engine | text | mode | tok/s | speedup | tokens/forward | drafts accepted | identical |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['engine']} | - | skipped: {r['skipped']} | | | | | |")
            continue
        tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else ""
        acc = f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else ""
        same = {True: "yes", False: "NO"}.get(r.get("identical"), "")
        speed = f"{r['tok_s']:.1f} | {r['speedup']:.2f}x"
        lines.append(f"| {r['engine']} | {r['text']} | {r['mode']} | {speed} | {tpf} | {acc} | {same} |")
    return lines


def histogram_png(result: dict, path: Path) -> Path:
    """Accepted drafts per verifying forward, one panel per drafter, one bar group per text (fp32)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("engine") == "forethought fp32" and "accepted_histogram" in r]
    texts = [t for t, _, _ in SPECULATIVE_TEXTS]
    fig, axes = plt.subplots(1, len(DRAFTERS), figsize=(13, 3.8), sharey=True)
    for ax, drafter in zip(axes, DRAFTERS):
        for i, text in enumerate(texts):
            row = next((r for r in rows if r["mode"] == drafter and r["text"] == text), None)
            if row is None:
                continue
            h = torch.tensor(row["accepted_histogram"], dtype=torch.float)
            share = h / h.sum()
            xs = torch.arange(len(h)) + (i - 1) * 0.27
            ax.bar(xs, share, width=0.27, label=f"{text} ({row['tokens_per_forward']:.2f} tok/fwd)")
        limit = "first head only" if drafter == "heads" else f"up to {DRAFT_LEN} drafted"
        ax.set_title(f"{drafter} drafter ({limit})")
        ax.set_xlabel("drafted tokens accepted in one forward")
        ax.set_xticks(range(DRAFT_LEN + 1))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("share of forwards (0 includes nothing drafted)")
    fig.suptitle("SmolLM2-135M fp32, greedy, 128 tokens: how far ahead the drafts hold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speculative", description=__doc__.split("\n\n")[1])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per figure (median); run the script twice")
    p.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads (1 on a shared machine)")
    p.add_argument("--only", default="", help="comma-separated from fp32,int8,llamacpp,hf")
    p.add_argument("--out", type=Path, default=ROOT / "speculative.json")
    p.add_argument("--png", type=Path, default=ROOT / "speculative_acceptance.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    result = run({"spec_tokens": args.tokens, "repeats": args.repeats, "only_spec": only})
    result["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=1))
    print("\n".join(table(result)))
    if any(r.get("engine") == "forethought fp32" for r in result["rows"]):
        print(f"histogram: {histogram_png(result, args.png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
