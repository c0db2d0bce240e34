"""One config dataclass for every supported architecture family, built from file metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from forethought.errors import ForethoughtError

Family = Literal["llama", "gpt2"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    `llama` covers Llama, SmolLM, Mistral-style and Qwen2 (RMSNorm, RoPE, grouped-query attention,
    SwiGLU, optional q/k/v bias); `gpt2` covers GPT-2 (LayerNorm, learned positions, GELU).
    """

    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = True
    name: str = "model"

    def __post_init__(self) -> None:
        # Configs come from users' files, so an impossible shape is a user error, not a crash.
        sizes = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "context_length")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ForethoughtError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.norm_eps, float | int) and math.isfinite(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ForethoughtError(f"model config: norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, float | int) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ForethoughtError(f"model config: rope_theta must be positive and finite, got {self.rope_theta!r}")
        if self.family == "llama" and self.head_dim % 2:
            raise ForethoughtError(f"model config: RoPE needs an even head_dim, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ForethoughtError(
                f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, float32: the state a transformer adds per token."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    def n_params(self) -> int:
        d, f, L = self.d_model, self.d_ff, self.n_layers
        attn = d * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = (3 if self.family == "llama" else 2) * d * f
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.context_length * d if self.family == "gpt2" else 0
        return L * (attn + mlp) + emb + pos

    def to_dict(self) -> dict:
        return asdict(self)
