"""Turning next-token logits into a choice: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forethought.errors import ForethoughtError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ForethoughtError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ForethoughtError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ForethoughtError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # torch's generator takes a 64-bit seed
            raise ForethoughtError(f"--seed must be in 0..2**64-1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sampling_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities the sampler actually draws from (after temperature, top-k, top-p), float32."""
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise ForethoughtError("the model produced NaN or infinite logits; its weights or config are broken")
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    # Measured from the top logit, so any temperature > 0 stays finite: as it nears 0 (1e-30, 1e-45) every
    # token but the likeliest goes to -inf and sampling becomes greedy, the limit, instead of inf/inf = NaN.
    scaled = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from the last position's logits [vocab]."""
    if params.greedy:
        if not bool(torch.isfinite(logits).all()):
            raise ForethoughtError("the model produced NaN or infinite logits; its weights or config are broken")
        return int(logits.argmax())
    probs = sampling_distribution(logits, params)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
