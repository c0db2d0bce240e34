"""What each architecture costs to carry and to run: state bytes vs tokens, decode speed with its own cache."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from forethought.arch.models import ArchModel

STATE_TOKENS = (1, 16, 64, 256, 1024, 4096)


@dataclass
class Costs:
    arch: str
    n_params: int
    state_bytes_per_token: float  # growth per token (0 for a fixed-size state)
    state_bytes: dict[int, int]  # tokens -> bytes carried after that many tokens
    decode_tokens_per_second: float
    forward_flops_per_token: float


@torch.no_grad()
def decode_speed(model: ArchModel, tokens: int = 128, repeats: int = 5) -> float:
    """Batch-1 decode (of given tokens) with the model's own cache: tokens/s, the median of `repeats` timed runs
    of `tokens` steps after one untimed warm-up run."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(repeats + 1):
        state = model.new_state(1, tokens)
        started = time.perf_counter()
        for t in range(tokens):
            model.step(ids[t].view(1, 1), state)
        seconds.append(time.perf_counter() - started)
    model.train()
    return tokens / statistics.median(seconds[1:])


def decode_speeds(models: dict[str, ArchModel], tokens: int = 128, rounds: int = 3) -> dict[str, float]:
    """Decode tokens/s of each model, measured in `rounds` interleaved rounds (median): a burst of load on a
    shared machine then slows every model alike instead of whichever happened to run during it."""
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            speeds[name].append(decode_speed(model, min(tokens, model.config.context_length), repeats=3))
    return {name: statistics.median(values) for name, values in speeds.items()}


def costs(model: ArchModel, context: int, decode_tokens_per_second: float) -> Costs:
    sizes = {n: model.state_bytes(n) for n in STATE_TOKENS}
    growth = (sizes[STATE_TOKENS[-1]] - sizes[STATE_TOKENS[-2]]) / (STATE_TOKENS[-1] - STATE_TOKENS[-2])
    return Costs(
        arch=model.config.arch,
        n_params=model.n_params(),
        state_bytes_per_token=growth,
        state_bytes=sizes,
        decode_tokens_per_second=decode_tokens_per_second,
        forward_flops_per_token=model.forward_flops_per_token(context),
    )
