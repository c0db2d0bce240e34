"""One config dataclass for every supported architecture family, built from file metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

from forethought.errors import ForethoughtError


class FamilyRules(Protocol):
    """What a config asks its family (model/family.py's `Family` has these and more)."""

    def check(self, config: ModelConfig) -> str | None: ...

    def kv_layers(self, config: ModelConfig) -> int: ...

    def state_bytes(self, config: ModelConfig, n_tokens: int, element_bytes: int = 4) -> int: ...

    def n_params(self, config: ModelConfig) -> int: ...


# Every family by name, filled by the registry (model/families.py) when the model package loads. The table lives
# here so that the config can ask its family without importing the family modules, which import the config.
FAMILY_TABLE: dict[str, FamilyRules] = {}

FamilyName = Literal["llama", "gpt2", "gemma3", "feedback", "recurrent"]  # the keys of families.FAMILIES


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    `llama` covers Llama, SmolLM, Mistral-style and Qwen2 (RMSNorm, RoPE, grouped-query attention,
    SwiGLU, optional q/k/v bias); `gpt2` covers GPT-2 (LayerNorm, learned positions, GELU);
    `gemma3` covers Gemma 3 text models (see the Gemma fields below). Two families exist for the
    architectures lab's trained models (`forethought.arch`): `feedback` is the Feedback Transformer
    (Llama blocks whose keys and values come from one memory vector per token, see model/feedback.py)
    and `recurrent` a stack of GRU layers (model/recurrent.py; the head fields are unused there).
    """

    family: FamilyName
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
    # Gemma 3 only. Local layers attend to the last `sliding_window` positions (the query's own
    # included) and rotate with `rope_local_theta`; the others are global and use `rope_theta`.
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float = 10000.0
    query_scale: float = 0.0  # attention score scale; 0 means 1/sqrt(head_dim)
    final_logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap) when > 0
    # False: no positional encoding at all (NoPE), for the architectures lab's length-generalisation control;
    # the causal mask, and a Feedback Transformer's memory, still order the tokens. Llama and feedback only.
    use_rope: bool = True

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
        problem = self.family_spec.check(self)
        if problem:
            raise ForethoughtError(f"model config: {problem}")
        if self.n_heads % self.n_kv_heads:
            raise ForethoughtError(
                f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.sliding_layers and self.sliding_window <= 0:
            raise ForethoughtError("model config: sliding-window layers need a positive sliding_window")
        if any(not 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ForethoughtError(f"model config: sliding_layers {self.sliding_layers} name layers that do not exist")

    @property
    def n_global_layers(self) -> int:
        return self.n_layers - len(self.sliding_layers)

    @property
    def family_spec(self):  # -> model.family.Family (not imported here: the family modules import this one)
        """This config's family: its block, forward, cache and costs (model/families.py)."""
        family = FAMILY_TABLE.get(self.family)
        if family is None:
            raise ForethoughtError(f"unknown model family {self.family!r} (one of {', '.join(FAMILY_TABLE)})")
        return family

    @property
    def kv_layers(self) -> int:
        """How many K/V pairs a token adds to the cache: one per layer, except the Feedback Transformer's
        single memory key/value per token, and none for a recurrent model (its state does not grow)."""
        return self.family_spec.kv_layers(self)

    def kv_bytes(self, n_tokens: int, element_bytes: int = 4) -> int:
        """The state held after `n_tokens` tokens: K and V of global layers grow with every token,
        sliding-window layers stop growing at the window; a recurrent model's state is one vector per
        layer however many tokens it has read."""
        return self.family_spec.state_bytes(self, n_tokens, element_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every cached layer, float32: the state a transformer adds per token."""
        return 2 * self.kv_layers * self.n_kv_heads * self.head_dim * 4

    def n_params(self) -> int:
        return self.family_spec.n_params(self)

    def to_dict(self) -> dict:
        return asdict(self)
