"""The report's sections, in page order: what each asks, the function that answers it, what keys its cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forethought.errors import ForethoughtError
from forethought.report import builtin
from forethought.report.context import ReportContext
from forethought.report.finding import Finding
from forethought.report.pending import Pending


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


def _pending(key: str, title: str, question: str, needs: str) -> Section:
    p = Pending(key, needs)
    return Section(key, title, question, p.run, p.inputs)


_SECOND = Pending("second_model", "no second model's report to compare with (--compare OTHER/report.json)")


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
        builtin.lens,
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
    _pending(
        "plan",
        "Is there a plan? (baselines, horizon, knockout, steering)",
        "Does the state carry a plan for later tokens that causally shapes them, beyond what baselines explain?",
        "the plan-answer experiments (baselines, horizon, knockout, steering) are not in this install",
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
    _pending(
        "architectures",
        "Architectures compared",
        "Do recurrent or state-space models, trained alike, carry more or less ahead than a transformer?",
        "the architectures lab (`forethought arch`) is not in this install",
    ),
    _pending(
        "speculative",
        "Speculative decoding",
        "How many tokens ahead can a draft guess that the model accepts, and what does it save?",
        "speculative decoding is not in this install",
    ),
    Section(
        "second_model",
        "A second model family",
        "Do the answers hold for another model family?",
        lambda ctx, folder: (builtin.second_model if ctx.compare else _SECOND.run)(ctx, folder),
        _SECOND.inputs,
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
