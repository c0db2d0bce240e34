"""Autoregressive generation with the KV cache, or by recomputing the whole prefix every step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from forethought.errors import ForethoughtError
from forethought.model import kernels
from forethought.model.kv_cache import KVCache
from forethought.model.sampling import SamplingParams, sample
from forethought.model.speculative import Drafter, SpeculativeStats, generate_speculative, make_drafter
from forethought.model.transformer import Transformer

GREEDY = SamplingParams(temperature=0)


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    stop_reason: str = "max_tokens"  # or "eos"
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    cache: KVCache | None = None
    speculative: SpeculativeStats | None = None  # drafted / accepted per forward, when speculative
    origins: list[str] = field(default_factory=list)  # speculative: "draft" (accepted) or "model", per new token

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.new_ids

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total else float("nan")


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


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    use_cache: bool = True,
    stop_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    speculative: str | Drafter | None = None,
    draft_len: int = 4,
) -> Generation:
    """Generate up to `max_new_tokens` after `prompt_ids`, calling `on_token` as each is chosen.

    With `use_cache=False` every step runs the full prefix through the network again: the same
    tokens (the thread's point), at a cost that grows with the length instead of staying flat.
    `speculative` ("lookup", "heads", "auto" or a Drafter) drafts up to `draft_len` tokens per forward
    and verifies them: the same tokens as without it (greedy), or the same distribution (sampling).
    """
    if speculative is not None:
        if not use_cache:
            raise ForethoughtError("speculative decoding verifies drafts on the KV cache: drop --no-cache")
        drafter = make_drafter(model, speculative) if isinstance(speculative, str) else speculative
        return generate_speculative(model, prompt_ids, max_new_tokens, params, drafter, draft_len, stop_ids, on_token)
    check_prompt(model, prompt_ids, max_new_tokens)
    result = Generation(list(prompt_ids))
    generator = params.generator()
    device = model.device
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens) if use_cache else None
    result.cache = cache

    if use_cache and model.device.type == "cpu":
        kernels.module()  # a first-run compile (~40 s, announced on stderr) is not prefill
    started = time.perf_counter()
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)[0, -1]
    result.prefill_seconds = time.perf_counter() - started

    for step in range(max_new_tokens):
        step_started = time.perf_counter()
        token = sample(logits, params, generator)
        result.new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            result.stop_reason = "eos"
            result.step_seconds.append(time.perf_counter() - step_started)
            break
        if step + 1 < max_new_tokens:
            if use_cache:
                logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
            else:
                logits = model(torch.tensor([result.ids], device=device), last_only=True)[0, -1]
        result.step_seconds.append(time.perf_counter() - step_started)
    return result
