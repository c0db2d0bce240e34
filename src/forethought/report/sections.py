"""The report's sections, in page order: what each asks, the function that answers it, what keys its cache."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forethought.errors import ForethoughtError
from forethought.report import builtin
from forethought.report.architectures import architectures
from forethought.report.context import ReportContext
from forethought.report.finding import Finding, Unavailable, read_finding
from forethought.report.plan import plan_answer
from forethought.report.plan_tasks import plan_map_inputs, where_it_plans
from forethought.report.speculative import speculative


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    question: str
    run: Callable[[ReportContext, Path], Finding]  # writes its PNGs into the folder it is given
    inputs: Callable[[ReportContext], dict]  # the settings its result depends on (besides the model)
    version: int = 1  # bump when the section's output changes, so old cached results are not reused
    cache: bool = True  # False: cheap, and depends on more than its inputs (e.g. on the other sections)


def _settings(*names: str, corpus: bool = False) -> Callable[[ReportContext], dict]:
    def inputs(ctx: ReportContext) -> dict:
        chosen = {n: getattr(ctx.settings, n) for n in names}
        return chosen | ({"corpus": ctx.corpus} if corpus else {})

    return inputs


def _elsewhere(key: str, title: str, question: str, fn: Callable[[ReportContext, Path], Finding]) -> Section:
    """A section whose experiment lives in another part of the project (plan.py, architectures.py,
    speculative.py): keyed by the function, its `report_version` (bumped when its output changes) and every
    setting, since it sizes itself from `ctx.settings`."""

    def inputs(ctx: ReportContext) -> dict:
        provider = f"{fn.__module__}.{fn.__qualname__}"
        version = getattr(fn, "report_version", 1)
        return {"provider": provider, "version": version, "settings": ctx.settings.to_dict(), "corpus": ctx.corpus}

    return Section(key, title, question, fn, inputs)


def _second_model(ctx: ReportContext, folder: Path) -> Finding:
    """Side by side with another model's report (--compare), else another run's `<results>/second_model.json`."""
    if ctx.compare:
        return builtin.second_model(ctx, folder)
    path = Path(ctx.results_dir) / "second_model.json" if ctx.results_dir else None
    if path is None or not path.is_file():
        where = f"no {path}" if path else "no --results DIR"
        raise Unavailable(f"no second model's report to compare with (--compare OTHER/report.json; {where})")
    return read_finding(path, folder)


def _second_model_inputs(ctx: ReportContext) -> dict:
    path = Path(ctx.results_dir) / "second_model.json" if ctx.results_dir else None
    return {"results_sha256": hashlib.sha256(path.read_bytes()).hexdigest()} if path and path.is_file() else {}


SECTIONS: list[Section] = [
    Section(
        "equivalence",
        "Caching = recomputing",
        "Is generating with a KV cache the same computation as recomputing the whole prefix at every token?",
        builtin.equivalence,
        _settings("prompt", "equivalence_steps"),
    ),
    Section(
        "invariance",
        "Earlier columns never change",
        "Do appended tokens change what the model computed for earlier tokens? (control: no causal mask)",
        builtin.invariance,
        _settings(),
    ),
    Section(
        "state_size",
        "What is carried: the state's size",
        "How large is the state carried from token to token, and how does it grow, vs a recurrent state?",
        builtin.state_size,
        _settings("state_tokens"),
    ),
    Section(
        "lens",
        "What the logits hide",
        "When does the next token appear across layers, and which alternatives does the sampled text hide?",
        builtin.logit_lens,
        _settings("prompt", "lens_steps"),
    ),
    Section(
        "future_lens",
        "How far ahead do hidden states see?",
        "Can a linear probe read tokens 2, 3, 4 ahead from one state, beyond baselines that see the same context?",
        builtin.future_lens,
        _settings(
            "future_tokens",
            "future_layers",
            "future_offsets",
            "future_window",
            "future_doc_tokens",
            "future_test_fraction",
            "future_eval_tokens",
            corpus=True,
        ),
        version=4,
    ),
    _elsewhere(
        "plan",
        "Is there a plan? (baselines, horizon, knockout, steering)",
        "Does the state carry a plan for later tokens that causally shapes them, beyond what baselines explain?",
        plan_answer,
    ),
    Section(
        "where_it_plans",
        "Where it plans",
        "On tasks whose future is fixed before it is written (rhyme, answer, response, code, article), does the "
        "state at the planning site add to the prompt text, and does the output follow it, as models grow?",
        where_it_plans,
        plan_map_inputs,
        version=2,
    ),
    Section(
        "anatomy",
        "Anatomy of a column",
        "Is a column a position part that changes a lot plus a memory part that changes slowly?",
        builtin.anatomy,
        _settings("anatomy_docs", "anatomy_length", corpus=True),
        version=2,
    ),
    Section(
        "revise",
        "After an off-plan token",
        "When a token the model would not have chosen is forced in, what changes, and does the text come back?",
        builtin.revise,
        _settings("prompt", "revise_steps"),
        version=3,
    ),
    _elsewhere(
        "architectures",
        "Architectures compared",
        "Do recurrent or state-space models, trained alike, carry more or less ahead than a transformer?",
        architectures,
    ),
    _elsewhere(
        "speculative",
        "Speculative decoding",
        "How many tokens ahead can a draft guess that the model accepts, and what does it save?",
        speculative,
    ),
    Section(
        "second_model",
        "A second model family",
        "Do the answers hold for another model family?",
        _second_model,
        _second_model_inputs,
        cache=False,
    ),
]


def section_keys() -> list[str]:
    return [s.key for s in SECTIONS]


def select(keys: list[str] | None) -> list[Section]:
    """The sections named (in page order), or all; an unknown name is the user's error."""
    if not keys:
        return list(SECTIONS)
    unknown = [k for k in keys if k not in section_keys()]
    if unknown:
        raise ForethoughtError(f"unknown section {unknown[0]!r} (known: {', '.join(section_keys())})")
    return [s for s in SECTIONS if s.key in keys]
