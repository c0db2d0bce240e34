"""Speculative decoding as a report section: can the plan be spent? Draft tokens from the context (prompt lookup)
and from the model's own last state (the shipped heads), verify them in one forward, and check that the greedy
text is the plain greedy text, token for token.

Timings are warm (one untimed run of each first) and the speedup is a ratio to plain decoding measured in the
same process a moment before, on the same prompt; tokens per forward (the acceptance length) does not depend on
the machine at all and is the number to compare across machines.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from forethought.report.context import ReportContext
from forethought.report.finding import Figure, Finding

# One prompt per kind of text the issue names: a story, a chat answer, code.
PROMPTS = {
    "story": ("Once upon a time, there was a little", False),
    "chat": ("What are three good habits for staying healthy? Explain each briefly.", True),
    "code": ("def fibonacci(n):\n    ", False),
}


def speculative(ctx: ReportContext, folder: Path) -> Finding:
    from forethought.errors import ForethoughtError
    from forethought.model.generate import generate

    lm = ctx.lm()
    n_new = ctx.settings.speculative_tokens
    drafters = ["lookup", "heads", "auto"]
    skipped: dict[str, str] = {}
    rows: dict[str, dict[str, dict]] = {}
    for kind, (text, chat) in PROMPTS.items():
        if chat:
            try:
                text = lm.tokenizer.apply_chat_template(text)
            except ForethoughtError:  # a model without a chat template answers the bare question
                pass
        ids = lm.tokenizer.encode(text)
        stops = (lm.tokenizer.eos_id,) if lm.tokenizer.eos_id is not None else ()

        plain, plain_s = _timed(generate, lm.model, ids, n_new, stops)
        rows[kind] = {}
        for name in drafters:
            if name in skipped:
                continue
            try:
                out, seconds = _timed(generate, lm.model, ids, n_new, stops, name)
            except ForethoughtError as e:  # no heads shipped for this model: lookup still runs
                skipped[name] = str(e)
                continue
            stats = out.speculative
            rows[kind][name] = {
                "identical": out.new_ids == plain.new_ids,
                "tokens": len(out.new_ids),
                "tokens_per_forward": stats.tokens_per_forward,
                "acceptance_rate": stats.acceptance_rate,
                "accepted_histogram": stats.as_dict()["accepted_histogram"],
                "speedup": plain_s / seconds,
            }
    used = [d for d in drafters if d not in skipped]
    identical = all(r["identical"] for kind in rows.values() for r in kind.values())
    numbers: dict = {"greedy_identical": identical}
    for d in used:
        numbers[f"{d}_tokens_per_forward"] = statistics.median(rows[k][d]["tokens_per_forward"] for k in rows)
        numbers[f"{d}_speedup"] = statistics.median(rows[k][d]["speedup"] for k in rows)
    best = max(used, key=lambda d: numbers[f"{d}_tokens_per_forward"])
    _plot(rows, used, folder / "speculative_acceptance.png")
    per_kind = "; ".join(
        f"{k}: " + ", ".join(f"{d} {rows[k][d]['tokens_per_forward']:.2f}" for d in used if d in rows[k]) for k in rows
    )
    verdict = (
        f"Greedy output with drafting is {'token-identical' if identical else 'NOT identical'} to plain greedy "
        f"decoding on all {len(rows)} prompts ({n_new} tokens each). Tokens per verifying forward (1.00 = no gain): "
        f"{per_kind}. The best drafter here is {best} ({numbers[f'{best}_tokens_per_forward']:.2f} tokens per "
        f"forward, {numbers[f'{best}_speedup']:.2f}x plain decode in wall time, median over the prompts, measured "
        "warm in this run). " + _state_vs_context(numbers)
        if "heads" in used and "lookup" in used
        else f"Greedy output with drafting is {'token-identical' if identical else 'NOT identical'} to plain greedy "
        f"decoding ({per_kind} tokens per forward)."
    )
    if skipped:
        verdict += " Not run: " + "; ".join(f"{d} ({why})" for d, why in skipped.items()) + "."
    cmd = f"forethought generate PROMPT -n {n_new} --temperature 0 --speculative lookup{ctx.model_flag()}"
    return Finding(
        verdict,
        numbers=numbers,
        figures=[
            Figure(
                "speculative_acceptance.png",
                "Drafted tokens accepted per verifying forward, per drafter and kind of text",
                "python -m benchmarks.speculative",
            )
        ],
        commands=[cmd, "python -m benchmarks.speculative  # the benchmark, with llama.cpp and HF peers"],
        data={"new_tokens": n_new, "rows": rows, "skipped": skipped},
    )


speculative.report_version = 2


def _state_vs_context(numbers: dict) -> str:
    """What the two drafters' acceptance says about the plan, worded from the measured medians."""
    heads, lookup = numbers["heads_tokens_per_forward"], numbers["lookup_tokens_per_forward"]
    if heads < lookup - 0.02:
        return (
            f"Drafting from the model's own last state (heads, {heads:.2f}) gains less than copying from the context "
            f"(lookup, {lookup:.2f}): the state forecasts the model's own continuation weakly, less than the context "
            "already offers."
        )
    if heads > lookup + 0.02:
        return (
            f"Drafting from the model's own last state (heads, {heads:.2f}) gains more than copying from the context "
            f"(lookup, {lookup:.2f}) on these prompts."
        )
    return (
        f"Drafting from the model's own last state (heads, {heads:.2f}) gains about as much as copying from the "
        f"context (lookup, {lookup:.2f})."
    )


def _timed(generate, model, ids: list[int], n_new: int, stops: tuple[int, ...], drafter: str | None = None):
    """(the generation, its seconds), warm: one untimed run first (first calls are several times slower)."""
    import time

    generate(model, ids, n_new, stop_ids=stops, speculative=drafter)
    t0 = time.perf_counter()
    out = generate(model, ids, n_new, stop_ids=stops, speculative=drafter)
    return out, time.perf_counter() - t0


def _plot(rows: dict, drafters: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(rows)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.0), sharey=True, layout="constrained")
    for ax, kind in zip(axes if len(kinds) > 1 else [axes], kinds):
        width = 0.8 / max(len(drafters), 1)
        for i, d in enumerate(drafters):
            if d not in rows[kind]:
                continue
            hist = rows[kind][d]["accepted_histogram"]
            total = max(sum(hist), 1)
            xs = [j + (i - (len(drafters) - 1) / 2) * width for j in range(len(hist))]
            label = f"{d} ({rows[kind][d]['tokens_per_forward']:.2f} tok/fwd)"
            ax.bar(xs, [h / total for h in hist], width=width, label=label)
        ax.set_title(kind)
        ax.set_xlabel("drafted tokens accepted in a forward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    (axes[0] if len(kinds) > 1 else axes).set_ylabel("share of forwards")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
