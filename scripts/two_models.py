"""Every finding on every model of the ladder: run the same forethought commands on SmolLM2-135M, Gemma 3
270M, Qwen2.5-Coder-0.5B and -1.5B and write one table of which findings hold on which.

    python scripts/two_models.py [--models smollm2-135m,gemma3-270m,...] [--only NAMES] [--summary-only]

Each command's JSON goes to docs/results/models/runs/<model>/<command>.json and its plot beside it; a
finished command is not rerun (delete its JSON to redo it), so an interrupted run resumes. The table
is docs/results/models.md. Budgets are small on purpose (a shared 2-core machine) and the same on every
model except where a larger model makes them unaffordable (BUDGETS says where; the table says so too):
the Future Lens uses --tokens per model at four layers of equal relative depth, not the full run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "models"
TABLE = ROOT / "docs" / "results" / "models.md"
AGREEMENT = ROOT / "docs" / "results" / "ladder" / "agreement.json"
PROMPT = "Once upon a time, there was a little"
CHAT_PROMPT = "Write a Python function that reverses a string."
CODE_PROMPT = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
SCRATCH = Path(tempfile.gettempdir()) / "forethought-ladder"  # traces and reports: run outputs, not results
MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
# Four layers at depth 0, 1/3, 2/3 and the last, per model. Stored as float32: Gemma's residual stream
# reaches ~1e5, beyond float16's range (extract refuses --float16 for it).
LAYERS = {
    "smollm2-135m": "0,10,20,29",
    "gemma3-270m": "0,6,12,17",
    "qwen2.5-coder-0.5b": "0,8,16,23",
    "qwen2.5-coder-1.5b": "0,9,18,27",
}
# Where a model cannot afford the common budget here: invariance in float64 would hold the 1.5B model's
# weights in 12 GB, so the Qwen models run it in float32 (the cell names the dtype); their Future Lens and
# anatomy see fewer tokens (a 1.5B forward costs ~11x SmolLM2's).
DEFAULT_BUDGET = {
    "tokens": 20000,
    "docs": 32,
    "invariance_dtype": "float64",
    "max_doc_tokens": 2048,  # extract's defaults
    "test_fraction": 0.1,
}
# Whole documents go to one split: at 6,000 tokens a few long stdlib files left the probe's test split empty, so
# the Qwen stores take each file's first 512 tokens (more, shorter documents) and hold out a quarter of them.
SMALL_STORE = {"max_doc_tokens": 512, "test_fraction": 0.25}
BUDGETS = {
    "qwen2.5-coder-0.5b": {"tokens": 6000, "docs": 16, "invariance_dtype": "float32", **SMALL_STORE},
    "qwen2.5-coder-1.5b": {"tokens": 6000, "docs": 8, "invariance_dtype": "float32", **SMALL_STORE},
}


def budget(model: str, tokens: int | None) -> dict:
    b = DEFAULT_BUDGET | BUDGETS.get(model, {})
    return b | ({"tokens": tokens} if tokens else {})


def commands(model: str, folder: Path, tokens: int | None) -> dict[str, list[str]]:
    store = SCRATCH / f"store-{model}"  # activations, hundreds of MB: a run output, not a result
    b = budget(model, tokens)
    dtype = b["invariance_dtype"]
    return {
        "equivalence": ["equivalence", PROMPT, "-n", "16", "--plot", str(folder / "equivalence.png")],
        "invariance": ["invariance", "Once upon a", "Once upon a time", "--dtype", dtype],
        "invariance_control": [
            "invariance",
            "Once upon a",
            "Once upon a time",
            "--dtype",
            dtype,
            "--bidirectional",
        ],
        "state_size": [
            "state-size",
            "--tokens",
            "1,10,100,512,1000,8192,32768",
            "--config",
            "gpt2-small,llama-3-8b",
            "--plot",
            str(folder / "state.png"),
        ],  # fmt: skip
        "revise_force": ["revise", PROMPT, "--at", "3", "--force", " dragon", "--plot", str(folder / "revise.png")],
        "anatomy": ["anatomy", "--docs", str(b["docs"]), "--length", "128", "--plot-dir", str(folder / "anatomy")],
        "extract": [
            "extract",
            "--corpus",
            "stdlib",
            "--tokens",
            str(b["tokens"]),
            "--layers",
            LAYERS[model],
            "--max-doc-tokens",
            str(b["max_doc_tokens"]),
            "--test-fraction",
            str(b["test_fraction"]),
            "--out",
            str(store),
        ],  # fmt: skip
        "probe": ["probe", "--store", str(store), "--offsets", "1-3", "--plot", str(folder / "future_top1.png")],
        # The rest of the command ladder, run once per model: that each works (exit 0) and what it costs.
        "info": ["info"],
        "generate": ["generate", PROMPT, "-n", "24", "-t", "0"],
        "generate_chat": ["generate", CHAT_PROMPT, "--chat", "-n", "24", "-t", "0"],
        "generate_speculative": ["generate", CODE_PROMPT, "-n", "48", "-t", "0", "--speculative", "auto"],
        "lens": ["lens", PROMPT, "--plot", str(folder / "lens.png")],
        "trace": ["trace", PROMPT, "--names", "resid_post", "--save", str(SCRATCH / f"trace-{model}.safetensors")],
        "report_quick": ["report", "--quick", "--out", str(SCRATCH / f"report-{model}")],
    }


# Commands checked by running them, not by their JSON: the viewer serves until stopped.
SMOKE = ["info", "generate", "generate_chat", "generate_speculative", "lens", "trace", "view", "report_quick"]


def run_view(model: str, target: Path) -> None:
    """Start `forethought view` on the model, ask it to write 8 tokens through its API, stop it."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "forethought", "view", "--model", model, "--no-browser", "--port", str(port)]
    print(f"{model}: view ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode}: {proc.stderr.read()[-400:]}")
            try:
                urllib.request.urlopen(f"{base}/api/health", timeout=2).read()
                break
            except OSError:
                if time.perf_counter() - started > 600:
                    raise RuntimeError("no answer on /api/health within 600 s") from None
                time.sleep(1)
        body = json.dumps({"session": "ladder", "prompt": PROMPT, "new_tokens": 8}).encode()
        request = urllib.request.Request(f"{base}/api/analyze", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=600).read())
        data = {"keys": sorted(answer), "_seconds": time.perf_counter() - started}
        target.write_text(json.dumps(data))
        (target.parent / "view.failed.json").unlink(missing_ok=True)
        print(f"  done in {data['_seconds']:.0f} s", flush=True)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"  failed: {exc}", flush=True)
        (target.parent / "view.failed.json").write_text(json.dumps({"error": str(exc)}))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(model: str, tokens: int | None, only: list[str]) -> None:
    folder = OUT / "runs" / model
    folder.mkdir(parents=True, exist_ok=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if not (folder / "view.json").exists() and (not only or "view" in only):
        run_view(model, folder / "view.json")
    for name, args in commands(model, folder, tokens).items():
        target = folder / f"{name}.json"
        if target.exists() or (only and name not in only):
            continue
        argv = [sys.executable, "-m", "forethought", *args, "--json"]
        if name != "probe":  # probe takes the model from its store
            argv += ["--model", model]
        print(f"{model}: {name} ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"  failed ({proc.returncode}): {proc.stderr.strip()[-400:]}", flush=True)
            failure = {"returncode": proc.returncode, "stderr": proc.stderr.strip()[-400:]}
            (folder / f"{name}.failed.json").write_text(json.dumps(failure))
            continue
        (folder / f"{name}.failed.json").unlink(missing_ok=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        data = json.loads(lines[-1]) if lines else {}
        data["_seconds"] = time.perf_counter() - started
        if name == "report_quick":  # the report itself stays in SCRATCH: keep what each section did
            data = slim_report(data)
        target.write_text(json.dumps(data))
        print(f"  done in {data['_seconds']:.0f} s", flush=True)


def slim_report(data: dict) -> dict:
    keep = ("key", "status", "seconds", "cached", "reason", "verdict")
    sections = [{k: section.get(k) for k in keep} for section in data.get("sections", [])]
    return {"sections": sections, "wall_seconds": data.get("wall_seconds"), "_seconds": data.get("_seconds")}


def load(model: str, name: str) -> dict:
    path = OUT / "runs" / model / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def fmt(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def findings(model: str) -> dict[str, str]:
    """One short cell per finding, from the command's own JSON."""
    out: dict[str, str] = {}
    agreement = json.loads(AGREEMENT.read_text())["models"].get(model, {}) if AGREEMENT.is_file() else {}
    if "token_ids_equal" in agreement:
        logits = agreement["logits_vs_llama_cpp_f32"]
        top1 = [r["top1_equal"].split("/") for r in logits if "top1_equal" in r]
        worst = max((r["max_abs_diff_over_std"] for r in logits if "top1_equal" in r), default=None)
        greedy = ", ".join(f"{name} {g['equal']}" for name, g in agreement["greedy_64_vs_llama_cpp_f32"].items())
        out["same model as llama.cpp (same file)"] = (
            f"token ids {agreement['token_ids_equal']}; top-1 {sum(int(a) for a, _ in top1)}/"
            f"{sum(int(b) for _, b in top1)} positions, max abs logit diff {fmt(worst)} x the logits' std; greedy 64 "
            f"tokens equal: {greedy}; chat template equal: "
            f"{agreement['chat_template_equal']}"
        )
    eq = load(model, "equivalence")
    if eq:
        s = eq.get("summary", eq)  # older runs nest a summary; the command's JSON now has the keys at top level
        identical = s.get("identical", s.get("identical_tokens"))
        diff = s.get("max_logit_abs_diff", s.get("logits_max_abs"))
        out["cache = recompute"] = f"identical tokens: {identical}; max logit diff {fmt(diff)}"
    inv, ctrl = load(model, "invariance"), load(model, "invariance_control")
    if inv:
        control = f"; control (no mask) {fmt(max(ctrl['max_abs']))}" if ctrl.get("max_abs") else ""
        dtype = budget(model, None)["invariance_dtype"]
        out["earlier columns unchanged"] = f"max diff {fmt(max(inv['max_abs']))} ({dtype}){control}"
    st = load(model, "state_size")
    if st:
        c = st["configs"][0]
        tokens = st["tokens"]
        grow = c["kv_bytes"][-1] / c["kv_bytes"][tokens.index(1000)] if 1000 in tokens else None
        kind = (
            f"{c['n_local_layers']} of {c['n_layers']} layers saturate at {c['sliding_window']} tokens"
            if c.get("n_local_layers")
            else "every layer grows"
        )
        out["state grows linearly"] = (
            f"{c['kv_bytes'][tokens.index(1000)] / 1e6:.1f} MB at 1k tokens, x{fmt(grow)} at {tokens[-1]} "
            f"(x{tokens[-1] // 1000} tokens); {kind}; measured = formula: {st.get('measured_matches_formula')}"
        )
    pr = load(model, "probe")
    if pr:
        cells = pr.get("cells", [])
        for k in (2, 3):
            best = max((c for c in cells if c["offset"] == k), key=lambda c: c["probe"]["top1"], default=None)
            base = pr.get("baselines", {}).get(str(k), {})
            bigram = (base.get("bigram") or {}).get("top1")
            if best:
                control = (best.get("probe_control") or {}).get("top1")
                pct = [fmt(None if x is None else 100 * x, ".1f") for x in (best["probe"]["top1"], bigram, control)]
                out[f"probe k={k} beats bigram"] = (
                    f"layer {best['layer']}: {pct[0]}% vs bigram {pct[1]}%, shuffled control {pct[2]}% "
                    f"({pr.get('n_train', 0):,} train tokens)"
                )
    plan = load(model, "plan")
    if plan:
        out["plans ahead: probe at k=2 beyond the strongest context baseline"] = plan_cell(plan, 2)
    an = load(model, "anatomy")
    if an and an.get("layers"):
        pos = max(layer["position_share"] for layer in an["layers"])
        slow = max(layer["slow_share"] for layer in an["layers"])
        rand = max((layer["slow_share"] for layer in an.get("random", [])), default=None)
        control = f"; random-weight control up to {100 * rand:.1f}%" if rand is not None else ""
        out["small position part, slow memory part"] = (
            f"position <= {100 * pos:.1f}%; slow part up to {100 * slow:.1f}%{control}"
        )
    ran = [(n, load(model, n)) for n in SMOKE]
    failed = [n for n in SMOKE if (OUT / "runs" / model / f"{n}.failed.json").exists()]
    if any(d for _, d in ran) or failed:
        done = ", ".join(f"{n} {d['_seconds']:.0f} s" for n, d in ran if d.get("_seconds") is not None)
        out["every command runs (exit 0, wall seconds)"] = done + (f"; FAILED: {', '.join(failed)}" if failed else "")
    report = load(model, "report_quick").get("sections") or []
    if report:
        by = {}
        for section in report:
            by.setdefault(section["status"], []).append(section["key"])
        cached = sum(1 for section in report if section.get("cached"))
        out["report --quick: sections"] = "; ".join(
            f"{k} {len(v)}" + (f" ({', '.join(v)})" if k != "ok" else "") for k, v in by.items()
        ) + (f"; {cached} from the cache" if cached else "")
    spec = load(model, "generate_speculative").get("speculative")
    if spec:
        out["speculative auto on code (48 tokens, in the command)"] = (
            f"{spec['tokens_per_forward']:.2f} tokens per forward, "
            f"{fmt(spec.get('speedup'), '.2f')}x plain steps timed after"
        )
    rv = load(model, "revise_force")
    if rv:
        rejoin = f"yes, at step {rv.get('rejoin_step')}" if rv.get("rejoined") else "no (16 steps)"
        out["off-plan token (forced ' dragon')"] = (
            f"p={fmt(rv.get('off_plan_prob'), '.2g')}; states before it changed by {fmt(rv.get('causal_max_diff'))}; "
            f"rejoins: {rejoin}; top-1 agreement after {fmt(rv.get('top1_agreement_after'), '.2f')}"
        )
    return out


def plan_cell(plan: dict, k: int) -> str:
    """The k-step headline of `benchmarks/plan_answer.py`: probe (layer chosen on validation) against the
    strongest context baseline, and the excess with its bootstrap-over-documents interval."""
    h = plan["headline"][str(k)]

    def pct(iv: dict) -> str:
        return f"{100 * iv['estimate']:.1f}% [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]"

    ex = h["excess"]
    return (
        f"{plan['corpus']}, k={k}: probe {pct(h['probe'])} (L{h['layer']}) vs {h['strongest']} "
        f"{pct(h['strongest_top1'])}; excess {100 * ex['estimate']:+.1f} points "
        f"[{100 * ex['low']:+.1f}, {100 * ex['high']:+.1f}] ({plan['n_eval_documents']} held-out documents, "
        f"{plan['n_train']:,} train positions, layers {plan['layers']})"
    )


def import_plan(model: str, results: Path, corpus: str, command: str) -> None:
    """Keep the headline of a plan_answer probe run (its results.json) as runs/<model>/plan.json."""
    d = json.loads(results.read_text())
    keep = {key: d[key] for key in ("layers", "offsets", "n_train", "n_val", "n_eval", "n_eval_documents", "headline")}
    keep.update(corpus=corpus, command=command)
    folder = OUT / "runs" / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(keep, indent=1))


def budget_text(model: str) -> str:
    b = budget(model, None)
    store = ""
    if (b["max_doc_tokens"], b["test_fraction"]) != (DEFAULT_BUDGET["max_doc_tokens"], DEFAULT_BUDGET["test_fraction"]):
        store = f" (each document's first {b['max_doc_tokens']}, {b['test_fraction']:.0%} held out)"
    return (
        f"{model}: Future Lens {b['tokens']:,} tokens{store}, anatomy {b['docs']} documents, "
        f"invariance {b['invariance_dtype']}"
    )


# Rows whose figures come from elsewhere than this script's commands: what a missing cell means there.
NOT_HERE = {
    "plans ahead: probe at k=2 beyond the strongest context baseline": (
        "not measured here (benchmarks/plan_answer.py; where each model plans: docs/results/plan_map.md)"
    ),
    "same model as llama.cpp (same file)": (
        "not in this table (`python -m benchmarks`: greedy tokens equal llama.cpp F32's, benchmarks/RESULTS.md)"
    ),
}


def summarize(models: list[str]) -> str:
    rows = {m: findings(m) for m in models}
    names = list(dict.fromkeys(k for m in models for k in rows[m]))
    budgets = "; ".join(budget_text(m) for m in models)
    lines = [
        "# The model ladder: which findings hold on which model",
        "",
        "`python scripts/two_models.py` (same commands, small budgets; per-command JSON and plots in "
        "`docs/results/models/runs/`; the llama.cpp row from `python -m benchmarks.ladder agree`). "
        "Taken on a shared 2-core machine, one thread per model, two models at a time. Budgets: "
        + budgets
        + ". A cell reads `not run` where the "
        "command has not finished for that model.",
        "",
        "| finding | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for name in names:
        missing = NOT_HERE.get(name, "not run")
        lines.append(f"| {name} | " + " | ".join(rows[m].get(name, missing) for m in models) + " |")
    text = "\n".join(lines) + "\n"
    TABLE.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/two_models.py")
    p.add_argument("--tokens", type=int, default=None, help="Future Lens tokens, every model (default: BUDGETS)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--only", default="", help="comma-separated command names to run (default: all)")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument(
        "--import-plan",
        nargs=4,
        metavar=("MODEL", "RESULTS_JSON", "CORPUS", "COMMAND"),
        help="keep a benchmarks/plan_answer.py probe run's headline as runs/MODEL/plan.json, then summarize",
    )
    args = p.parse_args(argv)
    if args.import_plan:
        model, results, corpus, command = args.import_plan
        import_plan(model, Path(results), corpus, command)
        args.summary_only = True
    models = [m for m in args.models.split(",") if m]
    if not args.summary_only:
        for m in models:
            run(m, args.tokens, [n for n in args.only.split(",") if n])
    print(summarize(models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
