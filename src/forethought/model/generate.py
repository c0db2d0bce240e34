"""Autoregressive generation with the KV cache, or by recomputing the whole prefix every step, or speculatively:
the prefill, then the one decode loop (model/decode.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from forethought.errors import ForethoughtError
from forethought.model import kernels
from forethought.model.decode import GREEDY, Generation, Step, check_prompt, generate_steps, sampler
from forethought.model.sampling import SamplingParams
from forethought.model.speculative import Drafter, generate_speculative, make_drafter
from forethought.model.transformer import Transformer

__all__ = ["GREEDY", "Generation", "Step", "check_prompt", "generate", "generate_steps"]


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
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens) if use_cache else None
    result.cache = cache

    if use_cache and model.device.type == "cpu":
        kernels.module()  # a first-run compile (~40 s, announced on stderr) is not prefill
    started = time.perf_counter()
    logits = model(torch.tensor([prompt_ids], device=model.device), cache=cache, last_only=True)[0, -1]
    result.prefill_seconds = time.perf_counter() - started
    steps = generate_steps(model, prompt_ids, logits, max_new_tokens, sampler(params, generator), cache, stop_ids)
    return result.collect(steps, on_token)
