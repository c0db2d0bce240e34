"""`python -m benchmarks [--quick] [--only NAMES] [--json FILE] [--markdown FILE]`

Decode and prefill speed, decode cost against context length, trace overhead, peak RSS and memory
bandwidth for forethought, HF transformers and llama.cpp on the same weights (the embedded
SmolLM2-135M GGUF), in one run. Every figure is warm: warm-up runs first, then the median of >= 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.common import ENGINES, PROMPT, TARGETS

ALL = ENGINES  # benchmarks/common.py: one list for the parent, the workers and the report
ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="fewer tokens and contexts (< 3 min)")
    p.add_argument("--only", default="", help=f"comma-separated engines to run, from: {', '.join(ALL)}")
    p.add_argument("--tokens", type=int, help="new greedy tokens per decode run (default 128; quick 32)")
    p.add_argument(
        "--nocache-tokens", type=int, help="new tokens for the recompute-every-step runs (default 128; quick 16)"
    )
    p.add_argument("--prompt-len", type=int, help="tokens for the prefill measurement (default 512; ladder 256)")
    p.add_argument(
        "--models",
        default="",
        help="comma-separated models (registry names or .gguf paths): the ladder benchmark against llama.cpp "
        "on each file (benchmarks/ladder_speed.py) instead of the engines above",
    )
    p.add_argument("--spec-tokens", type=int, help="new tokens per speculative run on the ladder (default 64)")
    p.add_argument(
        "--ladder-from",
        type=Path,
        help="write the ladder's report from this --json file of an earlier run, running nothing",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after warm-up (median)")
    p.add_argument(
        "--decode-pairs",
        type=int,
        default=9,
        help="ladder: pairs of decode bursts with forethought and its peer loaded side by side, taking turns "
        "(the decode ratio is the median of the pairs'; 0 skips it; default 9)",
    )
    p.add_argument("--contexts", default="", help="context lengths for the decode-cost sweep (default 128..2048)")
    p.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="write the report here (default: benchmarks/RESULTS.md on a full run of every engine, nowhere otherwise)",
    )
    args = p.parse_args(argv)
    if args.decode_pairs < 0:
        p.error(f"--decode-pairs must be >= 0, got {args.decode_pairs}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.ladder_from and not args.models:
        args.models = list(json.loads(args.ladder_from.read_text())["results"])
    args.tokens = args.tokens or (32 if args.quick or args.models else 128)
    args.prompt_len = args.prompt_len or (256 if args.models else 512)
    args.spec_tokens = args.spec_tokens or (32 if args.quick else 64)
    args.nocache_tokens = args.nocache_tokens or (16 if args.quick else 128)
    args.contexts = [int(c) for c in args.contexts.split(",") if c] or (
        [128, 256, 512] if args.quick else [128, 256, 512, 1024, 2048]
    )
    args.engines = [e.strip() for e in args.only.split(",") if e.strip()] or ALL
    unknown = [e for e in args.engines if e not in ALL]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {ALL}")
    args.repeats = max(3, args.repeats)
    return args


def run_worker(name: str, opts: dict, progress: Progress, task) -> dict:
    """One engine in a fresh interpreter; its `@progress` lines drive the progress bar."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.worker", name, json.dumps(opts)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT.parent)
    result = None
    for line in proc.stdout:
        if line.startswith("@progress "):
            progress.update(task, description=line[len("@progress ") :].strip())
        elif line.startswith("@result "):
            result = json.loads(line[len("@result ") :])
    stderr = proc.stderr.read()
    proc.wait()
    if result is None:
        tail = "\n".join(stderr.strip().splitlines()[-3:])
        result = {"engine": name, "error": f"exit {proc.returncode}: {tail}"}
    result["wall_s"] = time.perf_counter() - started
    return result


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "llama_cpp_python", "forethought"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "memory": mem, "os": platform.platform()}


# ------------------------------------------------------------------------------------- tables


def fmt(x, digits=1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def main_rows(results: dict) -> list[dict]:
    """One row per (engine, mode): decode tok/s, prefill tok/s, peak RSS."""
    rows = []
    order = [name for name in ALL if name not in ("machine", "cuda", "speculative")]  # the speed rows, in ALL's order
    for name in order:
        r = results.get(name)
        if not r or "error" in r:
            if r:
                rows.append({"system": name, "error": r["error"]})
            continue
        label = r["engine"] + (", KV cache" if name.startswith(("forethought", "hf")) else "")
        rows.append(
            {
                "system": label,
                "decode": r.get("decode_tok_s"),
                "prefill": r.get("prefill_tok_s"),
                "rss": r.get("peak_rss_mb"),
            }
        )
        if "nocache_decode_tok_s" in r:
            rows.append(
                {
                    "system": f"{r['engine']}, no cache (recompute, {r['nocache_tokens']} tokens)",
                    "decode": r["nocache_decode_tok_s"],
                    "prefill": None,
                    "rss": None,
                }
            )
    return rows


def reference(results: dict, name: str, key: str):
    r = results.get(name) or {}
    return r.get(key)


def build_table(results: dict, args) -> Table:
    hf_d, hf_p = reference(results, "hf-fp32", "decode_tok_s"), reference(results, "hf-fp32", "prefill_tok_s")
    ll_d, ll_p = reference(results, "llamacpp-f32", "decode_tok_s"), reference(results, "llamacpp-f32", "prefill_tok_s")
    t = Table(
        title=f"SmolLM2-135M, 2 threads, greedy: decode {args.tokens} tokens after a 9-token prompt; "
        f"prefill {args.prompt_len} tokens (warm, median of {args.repeats})"
    )
    for col in (
        "system",
        "decode tok/s",
        "vs HF",
        "vs llama.cpp F32",
        "prefill tok/s",
        "vs HF",
        "vs llama.cpp F32",
        "peak RSS MB",
    ):
        t.add_column(col, justify="left" if col == "system" else "right")
    for row in main_rows(results):
        if "error" in row:
            t.add_row(row["system"], f"[red]failed: {row['error'][:60]}[/red]", *[""] * 6)
            continue
        d, p = row["decode"], row["prefill"]
        t.add_row(
            row["system"],
            fmt(d),
            ratio(d, hf_d),
            ratio(d, ll_d),
            fmt(p, 0),
            ratio(p, hf_p),
            ratio(p, ll_p),
            fmt(row["rss"], 0),
        )
    return t


def markdown(results: dict, args, info: dict, vers: dict, command: str, total_s: float) -> str:
    hf_d, hf_p = reference(results, "hf-fp32", "decode_tok_s"), reference(results, "hf-fp32", "prefill_tok_s")
    ll_d, ll_p = reference(results, "llamacpp-f32", "decode_tok_s"), reference(results, "llamacpp-f32", "prefill_tok_s")
    lines = [
        "# forethought benchmarks",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {total_s:.0f} s.",
        "",
        f"- Machine: {info['cpu']}, {info['logical_cores']} logical cores, {info['memory']}; {info['os']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "- Model: SmolLM2-135M-Instruct from the embedded Q4_1 GGUF; forethought and HF dequantize it to float32 "
        "(bfloat16 row: cast from that); llama.cpp F32 / Q8_0 are `llama_model_quantize` conversions of it.",
        f"- Decode: {args.tokens} new greedy tokens after the 9-token prompt {json.dumps(PROMPT)}; "
        "tok/s = (n - 1) forwards / their time (prefill excluded). Prefill: "
        f"{args.prompt_len} tokens of `argparse.py`, logits of the last position only. Warm-up first, then the "
        f"median of {args.repeats} runs; 2 threads everywhere.",
        "",
        "| system | decode tok/s | vs HF | vs llama.cpp F32 | prefill tok/s | vs HF | vs llama.cpp F32 | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in main_rows(results):
        if "error" in row:
            lines.append(f"| {row['system']} | failed: {row['error'][:80]} | | | | | | |")
            continue
        d, p = row["decode"], row["prefill"]
        lines.append(
            f"| {row['system']} | {fmt(d)} | {ratio(d, hf_d)} | {ratio(d, ll_d)} | {fmt(p, 0)} | "
            f"{ratio(p, hf_p)} | {ratio(p, ll_p)} | {fmt(row['rss'], 0)} |"
        )
    lines += extra_sections(results)
    return "\n".join(lines) + "\n"


NOTES_MARK = "<!-- notes: kept when the figures above are regenerated -->"


# (what, numerator engine, key, denominator engine, key, bar, higher is better)


def target_lines(results: dict) -> list[str]:
    """The issue's bars, each as a ratio of two figures from this run."""
    lines = ["", "## Targets, from this run", "| target | figures | ratio | bar | met |", "|---|---:|---:|---:|---|"]
    for what, a, ka, b, kb, bar, higher in TARGETS:
        x, y = reference(results, a, ka), reference(results, b, kb)
        if x is None or not y:
            continue
        r = x / y
        met = r >= bar if higher else r <= bar
        lines.append(f"| {what} | {x:,.1f} vs {y:,.1f} | {r:.2f}x | >= {bar:.2f}x | {'yes' if met else 'NO'} |")
    tr = (results.get("forethought-fp32") or {}).get("trace")
    if tr:
        met = "yes" if tr["ratio"] <= 1.05 else "NO"
        lines.append(
            f"| trace overhead (every layer's resid_post) | {tr['trace_ms']:.0f} vs {tr['plain_ms']:.0f} ms "
            f"| {tr['ratio']:.2f}x | <= 1.05x | {met} |"
        )
    return lines if len(lines) > 4 else []


def extra_sections(results: dict) -> list[str]:
    lines: list[str] = target_lines(results)
    fp32 = results.get("forethought-fp32") or {}
    mach = results.get("machine") or {}
    ids = {k: (results.get(k) or {}).get("ids") for k in results}
    pairs = [
        ("forethought-fp32", "hf-fp32"),
        ("forethought-fp32", "llamacpp-f32"),
        ("forethought-fp32", "forethought-fp32-opbyop"),
        ("forethought-fp32", "forethought-int8"),
        ("llamacpp-f32", "llamacpp-q8_0"),
    ]
    if ids.get("forethought-fp32"):
        lines += ["", "## Greedy tokens agree"]
        for a, b in pairs:
            if ids.get(a) and ids.get(b):
                n = min(len(ids[a]), len(ids[b]))
                same = next((i for i, (x, y) in enumerate(zip(ids[a], ids[b])) if x != y), n)
                lines.append(f"- {a} vs {b}: first {same} of {len(ids[a])} tokens identical")
        if "nocache_matches_cache" in fp32:
            lines.append(f"- forethought fp32 with vs without KV cache: identical = {fp32['nocache_matches_cache']}")
    if mach.get("copy_read_gb_s"):
        lines += [
            "",
            "## Memory bandwidth",
            f"- torch copy of {mach['buffer_mb']:.0f} MB: {mach['copy_read_gb_s']:.1f} GB/s read "
            f"({mach['copy_total_gb_s']:.1f} GB/s read+write); torch sum (read only): "
            f"{mach['sum_read_gb_s']:.1f} GB/s",
        ]
        if fp32.get("decode_tok_s"):
            wb = fp32["weight_bytes"]
            rate = wb * fp32["decode_tok_s"] / 1e9
            lines.append(
                f"- forethought fp32 decode reads {wb / 1e6:.0f} MB of weights per token: "
                f"{rate:.1f} GB/s = {rate / mach['copy_read_gb_s']:.0%} of copy-read bandwidth, "
                f"{rate / mach['sum_read_gb_s']:.0%} of read-only bandwidth"
            )
        int8 = results.get("forethought-int8") or {}
        if int8.get("decode_tok_s"):
            rate = int8["weight_bytes"] * int8["decode_tok_s"] / 1e9
            lines.append(
                f"- forethought int8 decode reads {int8['weight_bytes'] / 1e6:.0f} MB of weights and scales per "
                f"token: {rate:.1f} GB/s"
            )
        ll = results.get("llamacpp-f32") or {}
        if ll.get("decode_tok_s") and fp32.get("weight_bytes"):
            rate = fp32["weight_bytes"] * ll["decode_tok_s"] / 1e9
            lines.append(f"- llama.cpp F32 at the same bytes per token: {rate:.1f} GB/s")
        if fp32.get("kernels"):
            lines.append(f"- forethought batch-1 kernels: {fp32['kernels']}")
    if fp32.get("context_ms"):
        lines += [
            "",
            "## forethought fp32: cost of one new token against context length",
            "| context | KV cache ms/token | recompute ms/token | recompute / cache |",
            "|---:|---:|---:|---:|",
        ]
        for ctx, v in fp32["context_ms"].items():
            lines.append(
                f"| {ctx} | {v['cache_ms']:.1f} | {v['recompute_ms']:.1f} | {v['recompute_ms'] / v['cache_ms']:.0f}x |"
            )
    if fp32.get("trace"):
        tr = fp32["trace"]
        lines += [
            "",
            "## Trace overhead",
            f"- {tr['tokens']}-token forward capturing `resid_post` of every layer via `{tr['api']}`: "
            f"{tr['trace_ms']:.0f} ms vs {tr['plain_ms']:.0f} ms plain = **{tr['ratio']:.3f}x**",
        ]
    cuda = results.get("cuda")
    if cuda:
        lines += ["", "## CUDA"]
        if "skipped" in cuda:
            lines.append(f"- skipped: {cuda['skipped']}")
        elif "error" in cuda:
            lines.append(f"- failed: {cuda['error']}")
        else:
            lines += [f"GPU: {cuda['gpu']}", "", "| system | decode tok/s | prefill tok/s |", "|---|---:|---:|"]
            for r in cuda["rows"]:
                lines.append(f"| {r['engine']} | {fmt(r['decode_tok_s'])} | {fmt(r['prefill_tok_s'], 0)} |")
    spec = results.get("speculative")
    if spec and "rows" in spec:
        from benchmarks.speculative import table

        lines += ["", f"## Speculative decoding ({spec['tokens']} greedy tokens, {spec['threads']} thread(s))", ""]
        lines += table(spec)
    return lines


LADDER_BEGIN, LADDER_END = "<!-- ladder: python -m benchmarks --models -->", "<!-- /ladder -->"


def ladder_main(args, console: Console, command: str) -> int:
    """`--models`: the ladder benchmark; its section of RESULTS.md is replaced, the rest kept."""
    from benchmarks.ladder_speed import markdown as ladder_markdown
    from benchmarks.ladder_speed import run_ladder

    opts = {
        "tokens": args.tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "warmup_tokens": 4,
        "spec_tokens": args.spec_tokens,
        "decode_pairs": args.decode_pairs,
    }
    info, vers = machine_info(), versions()
    started = time.perf_counter()

    def save(results: dict) -> None:
        if args.json:
            payload = {"command": command, "machine": info, "versions": vers, "options": opts}
            payload |= {"seconds": time.perf_counter() - started, "results": results}
            args.json.write_text(json.dumps(payload, indent=2))

    finished = datetime.now(UTC)
    if args.ladder_from:
        saved = json.loads(args.ladder_from.read_text())
        results, total, command, opts = saved["results"], saved["seconds"], saved["command"], saved["options"]
        # When the run ended (the file's last write), not when its report was rewritten.
        finished = datetime.fromtimestamp(args.ladder_from.stat().st_mtime, UTC)
    else:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("", total=None)
            results = run_ladder(args.models, opts, lambda text: bar.update(task, description=text), save)
        total = time.perf_counter() - started
        save(results)
        finished = datetime.now(UTC)
    body = ladder_markdown(results, opts)
    for line in body:
        if line and not line.startswith("|---"):
            console.print(line, markup=False, highlight=False)
    if args.json and not args.ladder_from:
        console.print(f"wrote {args.json}")
    md_path = args.markdown or (None if args.quick else ROOT / "RESULTS.md")
    if md_path:
        head = [
            LADDER_BEGIN,
            "",
            f"Generated by `{command}`, ended {finished:%Y-%m-%d %H:%M} UTC, in {total:.0f} s. "
            f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, {info['memory']}; "
            + ", ".join(f"{k} {v}" for k, v in vers.items())
            + ".",
            "",
        ]
        section = "\n".join([*head, *body, "", LADDER_END])
        old = md_path.read_text() if md_path.exists() else ""
        if LADDER_BEGIN in old and LADDER_END in old:
            text = old.split(LADDER_BEGIN)[0] + section + old.split(LADDER_END, 1)[1]
        elif NOTES_MARK in old:
            before, after = old.split(NOTES_MARK, 1)
            text = before.rstrip("\n") + "\n\n" + section + "\n\n" + NOTES_MARK + after
        else:
            text = (old.rstrip("\n") + "\n\n" if old else "") + section + "\n"
        md_path.write_text(text)
        console.print(f"wrote {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.models:
        return ladder_main(args, console, "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv))
    opts = {
        "quick": args.quick,
        "spec_tokens": 32 if args.quick else 128,
        "tokens": args.tokens,
        "nocache_tokens": args.nocache_tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "contexts": args.contexts,
        "nocache": True,
        "sweep": True,
        "trace": True,
    }
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict = {}
    started = time.perf_counter()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("engines", total=len(args.engines))
        current = progress.add_task("", total=None)
        for name in args.engines:
            progress.update(overall, description=f"engine {name}")
            results[name] = run_worker(name, opts, progress, current)
            r = results[name]
            msg = (
                r.get("error")
                or r.get("skipped")
                or (
                    f"decode {fmt(r.get('decode_tok_s'))} tok/s, prefill {fmt(r.get('prefill_tok_s'), 0)} tok/s"
                    if "decode_tok_s" in r
                    else "done"
                )
            )
            progress.console.print(f"[bold]{name}[/bold] ({r['wall_s']:.0f} s): {msg}")
            progress.advance(overall)
        progress.update(current, visible=False)
    total = time.perf_counter() - started

    console.print(build_table(results, args))
    for line in extra_sections(results):
        if line and not line.startswith("|---"):
            console.print(line, markup=False, highlight=False)

    info, vers = machine_info(), versions()
    payload = {
        "command": command,
        "machine": info,
        "versions": vers,
        "options": opts,
        "seconds": total,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
        console.print(f"wrote {args.json}")
    md_path = args.markdown or (ROOT / "RESULTS.md" if set(args.engines) == set(ALL) and not args.quick else None)
    if md_path:
        text = markdown(results, args, info, vers, command, total)
        if md_path.exists() and NOTES_MARK in md_path.read_text():
            # Hand-written analysis below the marker survives a regeneration of the figures above it.
            text += "\n" + NOTES_MARK + md_path.read_text().split(NOTES_MARK, 1)[1]
        md_path.write_text(text)
        console.print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
