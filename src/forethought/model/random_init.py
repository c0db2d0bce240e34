"""Random weights of a given shape: tiny models for fast tests, and the random-network control."""

from __future__ import annotations

import torch

from forethought.model.config import ModelConfig
from forethought.model.transformer import Transformer

# Grouped-query attention in the tiny Llama; the other families' tiny models have one KV head per query head.
TINY_KV_HEADS = {"llama": 2}


def random_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.05
) -> Transformer:
    """A Transformer with i.i.d. normal weights (norm gains 1, biases 0), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        if config.tie_embeddings:
            model.unembed.weight_t.copy_(model.embed.t())
    return model.to(dtype).eval()


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A 2-layer model small enough for millisecond tests, with grouped-query attention."""
    base = dict(
        family=family,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=TINY_KV_HEADS.get(family, 4),
        head_dim=16,
        d_ff=128,
        vocab_size=256,
        context_length=128,
        name=f"tiny-{family}",
    )
    return ModelConfig(**(base | overrides))
