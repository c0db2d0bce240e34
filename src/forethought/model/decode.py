"""The decode loop, written once: `generate_steps` chooses a token from the logits, runs it through the model,
and yields a `Step` record, until a stop token or the token budget. `generate`, speculative decoding, the
viewer, `lens` and the draft heads' training data all consume it (or, for speculative decoding, an iterator
that yields the same records), so following the model through any of them reads the same way."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from forethought.errors import ForethoughtError
from forethought.model.kv_cache import Cache
from forethought.model.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from forethought.model.transformer import Transformer

GREEDY = SamplingParams(temperature=0)


@dataclass
class Step:
    """One new token: what it was chosen from and what choosing it (and running it through the model) took."""

    index: int  # 0-based among the new tokens
    token: int  # (a [batch] tensor when `choose` picks a token per row)
    logits: torch.Tensor  # the logits it was chosen from: [vocab] ([batch, vocab] batched)
    seconds: float  # choosing it, plus running it through the model unless it was the last
    stop: bool = False  # a stop token: generation ends with it
    next_logits: torch.Tensor | None = None  # after running it through the model; None when it was not run
    origin: str = "model"  # speculative decoding: "draft" (a drafted token the model kept) or "model"


def sampler(params: SamplingParams, generator: torch.Generator) -> Callable[[torch.Tensor], int]:
    """Choose one token id from logits [vocab] by `params` (greedy, temperature, top-k, top-p)."""
    return lambda logits: sample(logits, params, generator)


def greedy_rows(logits: torch.Tensor) -> torch.Tensor:
    """Choose the argmax of every row of logits [batch, vocab]: batched greedy decoding."""
    return logits.argmax(-1)


def generate_steps(
    model: Transformer,
    prompt_ids: list[int],
    logits: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], int],
    cache: Cache | None = None,
    stop_ids: Iterable[int] = (),
    feed_last: bool = False,
    forward: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[Step]:
    """Up to `max_new_tokens` steps after `prompt_ids`, whose next-token `logits` the caller computed (the
    prefill: timed, traced or batched as the caller needs).

    Each step chooses a token from the current logits and, unless it is the last (the budget is spent or it
    is one of `stop_ids`), runs it through the model for the next step's logits: on the `cache`, or without
    one by recomputing the whole text so far. `feed_last` runs the last token too, so that the cache holds
    every token (the viewer continues from it). `forward(token) -> logits` replaces the model call (a
    batched or traced step)."""
    ids = list(prompt_ids)
    stops = frozenset(stop_ids)
    device = model.device
    if forward is None:
        if cache is not None:

            def forward(token: int) -> torch.Tensor:
                return model(torch.tensor([[token]], device=device), cache=cache)[0, -1]

        else:

            def forward(token: int) -> torch.Tensor:
                return model(torch.tensor([ids], device=device), last_only=True)[0, -1]

    for index in range(max_new_tokens):
        started = time.perf_counter()
        token = choose(logits)
        stop = isinstance(token, int) and token in stops
        last = stop or index + 1 == max_new_tokens
        ids.append(token)
        following = forward(token) if feed_last or not last else None
        yield Step(index, token, logits, time.perf_counter() - started, stop, following)
        if last:
            return
        logits = following


@dataclass
class SpeculativeStats:
    """What the drafter proposed and the model kept, one entry per verifying forward (speculative decoding,
    model/speculative.py)."""

    drafter: str
    draft_len: int
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def forwards(self) -> int:
        return len(self.drafted)

    @property
    def mean_accepted(self) -> float:
        """Drafted tokens kept per forward (0 = no gain; plain decoding makes 1 token per forward)."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Acceptance length: tokens each verifying forward yields (accepted drafts + the model's own)."""
        return 1.0 + self.mean_accepted

    @property
    def acceptance_rate(self) -> float:
        total = sum(self.drafted)
        return sum(self.accepted) / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "drafter": self.drafter,
            "draft_len": self.draft_len,
            "forwards": self.forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_rate": self.acceptance_rate,
            "accepted_histogram": [self.accepted.count(i) for i in range(self.draft_len + 1)],
            "forwards_without_draft": self.drafted.count(0),
        }


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    stop_reason: str = "max_tokens"  # or "eos"
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    cache: Cache | None = None
    speculative: SpeculativeStats | None = None  # drafted / accepted per forward, when speculative
    origins: list[str] = field(default_factory=list)  # speculative: "draft" (accepted) or "model", per new token

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.new_ids

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total else float("nan")

    def collect(self, steps: Iterable[Step], on_token: Callable[[int], None] | None = None) -> Generation:
        """Record every step's token (calling `on_token` as each arrives) and why generation stopped."""
        with collector_paused():
            self._collect(steps, on_token)
        return self

    def _collect(self, steps: Iterable[Step], on_token: Callable[[int], None] | None) -> None:
        for step in steps:
            self.new_ids.append(step.token)
            self.step_seconds.append(step.seconds)
            if self.speculative is not None:
                self.origins.append(step.origin)
            if on_token is not None:
                on_token(step.token)
            if step.stop:
                self.stop_reason = "eos"


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the block (and back on after, if it was on). A decode step
    allocates a few small objects, and with a model and its tokenizer loaded (~220k tracked objects) the
    collections they trigger cost ~0.3 ms a token: 1.7% of a Qwen 0.5B int8 step (collector on / off /
    frozen, alternating in one process). Cycles made meanwhile are collected once it is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_prompt(model: Transformer, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ForethoughtError("the prompt is empty: give at least one token of text")
    if max_new_tokens < 0:
        raise ForethoughtError(f"-n must be >= 0, got {max_new_tokens}")
    limit = model.config.context_length
    if len(prompt_ids) + max_new_tokens > limit:
        raise ForethoughtError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceed the context length {limit}"
        )
