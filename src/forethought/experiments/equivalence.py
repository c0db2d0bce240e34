"""Is the KV cache only a memory/compute trade? Generate with it and by recomputing the whole prefix,
and compare the two step by step: the chosen tokens, the logits and every layer's residual stream at
the new position. The cost of a step is counted (analytic FLOPs) and timed for both ways."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from forethought.model.config import ModelConfig
from forethought.model.generate import check_prompt
from forethought.model.kv_cache import KVCache
from forethought.model.transformer import Transformer
from forethought.trace import run_with_trace


def matmul_flops_per_token(config: ModelConfig, with_unembed: bool = True) -> int:
    """2 FLOPs per weight of every projection a token goes through (embedding lookup is free)."""
    return config.family_spec.matmul_flops(config, with_unembed)


def attention_flops(config: ModelConfig, n_keys: int) -> int:
    """QK^T and AV of one query over `n_keys` keys at every layer: 4 * keys * (heads * head_dim); none for a GRU."""
    return config.family_spec.attention_flops(config, n_keys)


def cached_step_flops(config: ModelConfig, position: int) -> int:
    """One new token at `position` (0-based), attending to the cache and itself."""
    return matmul_flops_per_token(config) + attention_flops(config, position + 1)


def recompute_step_flops(config: ModelConfig, n_tokens: int) -> int:
    """A full pass over `n_tokens`, unembedding only the last position (as generation does)."""
    blocks = n_tokens * matmul_flops_per_token(config, with_unembed=False)
    unembed = 2 * config.d_model * config.vocab_size
    causal_keys = n_tokens * (n_tokens + 1) // 2  # query i sees i + 1 keys
    return blocks + unembed + attention_flops(config, causal_keys)


def _max_abs(a: torch.Tensor) -> float:
    return float(a.abs().max()) if a.numel() else 0.0


def _diff(cached: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that divided by max |b|) in float64, so the comparison adds no rounding."""
    a, b = cached.double(), full.double()
    abs_diff = _max_abs(a - b)
    scale = _max_abs(b)
    return abs_diff, abs_diff / scale if scale else 0.0


@dataclass
class EquivalenceStep:
    """Step `step` chooses the token at `position`, from logits computed both ways."""

    step: int
    position: int
    token_cached: int
    token_recompute: int
    logits_abs: float
    logits_rel: float
    resid_abs: list[float]  # per layer, blocks.{l}.resid_post at the last position
    resid_rel: list[float]
    flops_cached: int
    flops_recompute: int
    seconds_cached: float
    seconds_recompute: float


@dataclass
class EquivalenceResult:
    model: str
    dtype: str
    prompt_ids: list[int]
    steps: list[EquivalenceStep] = field(default_factory=list)

    @property
    def cached_ids(self) -> list[int]:
        return [s.token_cached for s in self.steps]

    @property
    def recompute_ids(self) -> list[int]:
        return [s.token_recompute for s in self.steps]

    @property
    def identical(self) -> bool:
        return self.cached_ids == self.recompute_ids

    def worst(self, key: str) -> float:
        values = [v for s in self.steps for v in (getattr(s, key) if key.startswith("resid") else [getattr(s, key)])]
        return max(values, default=0.0)

    def summary(self) -> dict:
        return {
            "identical_tokens": self.identical,
            "n_steps": len(self.steps),
            "logits_max_abs": self.worst("logits_abs"),
            "logits_max_rel": self.worst("logits_rel"),
            "resid_max_abs": self.worst("resid_abs"),
            "resid_max_rel": self.worst("resid_rel"),
            "flops_cached_total": sum(s.flops_cached for s in self.steps),
            "flops_recompute_total": sum(s.flops_recompute for s in self.steps),
            "seconds_cached_total": sum(s.seconds_cached for s in self.steps),
            "seconds_recompute_total": sum(s.seconds_recompute for s in self.steps),
        }

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "prompt_ids": self.prompt_ids,
            "cached_ids": self.cached_ids,
            "recompute_ids": self.recompute_ids,
            **self.summary(),
            "steps": [asdict(s) for s in self.steps],
        }


def _traced_pass(model: Transformer, ids: list[int], cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(last position's logits [vocab], its resid_post at every layer [layer, d], wall seconds).

    `last_only` because generation never unembeds earlier positions: without it the recompute
    pass would pay a cost generation does not. Capture only keeps references to tensors the pass
    computes anyway, so the time is that of a plain step.
    """
    started = time.perf_counter()
    logits, trace = run_with_trace(model, [ids], "resid_post", cache=cache, last_only=True)
    seconds = time.perf_counter() - started
    return logits[0, -1], trace["resid_post"][:, -1], seconds


@torch.inference_mode()
def equivalence(model: Transformer, prompt_ids: list[int], n_steps: int, model_name: str = "") -> EquivalenceResult:
    """Greedy-generate `n_steps` tokens with the KV cache and by full recompute, comparing every step.

    Each path follows its own greedy choices, so a divergence would show as different tokens, not be
    hidden by forcing one path onto the other's. Step 0 is the prompt's prefill (the same full pass
    both ways). Times are per forward pass, after a warm-up, on whatever else the machine is doing.
    """
    check_prompt(model, prompt_ids, n_steps)
    config = model.config
    device = model.device
    result = EquivalenceResult(model_name or config.name, str(model.dtype).removeprefix("torch."), list(prompt_ids))
    if n_steps == 0:
        return result

    # Warm-up: first calls are several times slower (allocator, BLAS/kernel set-up) and must not be timed.
    warm = model.new_cache(capacity=len(prompt_ids) + 1)
    model(torch.tensor([prompt_ids], device=device), cache=warm, last_only=True)
    model(torch.tensor([[prompt_ids[-1]]], device=device), cache=warm)

    cache = model.new_cache(capacity=len(prompt_ids) + n_steps)
    cached_ids = list(prompt_ids)
    full_ids = list(prompt_ids)
    for step in range(n_steps):
        position = len(cached_ids) - 1  # the position whose output chooses this step's token
        if step == 0:
            new, flops_cached = cached_ids, recompute_step_flops(config, len(cached_ids))
        else:
            new, flops_cached = cached_ids[-1:], cached_step_flops(config, position)
        logits_c, resid_c, seconds_cached = _traced_pass(model, new, cache)
        logits_f, resid_f, seconds_full = _traced_pass(model, full_ids, None)
        per_layer = [_diff(resid_c[layer], resid_f[layer]) for layer in range(config.n_layers)]
        logits_abs, logits_rel = _diff(logits_c, logits_f)
        token_c, token_f = int(logits_c.argmax()), int(logits_f.argmax())
        result.steps.append(
            EquivalenceStep(
                step=step,
                position=position,
                token_cached=token_c,
                token_recompute=token_f,
                logits_abs=logits_abs,
                logits_rel=logits_rel,
                resid_abs=[a for a, _ in per_layer],
                resid_rel=[r for _, r in per_layer],
                flops_cached=flops_cached,
                flops_recompute=recompute_step_flops(config, len(full_ids)),
                seconds_cached=seconds_cached,
                seconds_recompute=seconds_full,
            )
        )
        cached_ids.append(token_c)
        full_ids.append(token_f)
    return result
