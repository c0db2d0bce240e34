"""One shape for all four architectures, so that they differ only in how information crosses time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig

ARCHS = ("standard", "feedback", "myopic", "recurrent")


@dataclass(frozen=True)
class ArchConfig:
    """Embedding, width, depth and heads shared by every architecture.

    `standard` and `myopic` are the same network (the engine's Llama block) trained two ways; `feedback`
    replaces the per-layer keys/values by one shared memory per token; `recurrent` is a GRU of the same
    width and depth.
    """

    arch: str
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    context_length: int = 256
    rope_theta: float = 10000.0
    positions: str = "rope"  # or "none": no positional encoding (NoPE), the length-generalisation control

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ForethoughtError(f"unknown architecture {self.arch!r} (one of {', '.join(ARCHS)})")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context_length"):
            if getattr(self, name) <= 0:
                raise ForethoughtError(f"{name} must be positive, got {getattr(self, name)}")
        if self.positions not in ("rope", "none"):
            raise ForethoughtError(f"positions must be rope or none, got {self.positions!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ForethoughtError(f"d_model={self.d_model} must split into {self.n_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def family(self) -> str:
        """The engine family this architecture runs as (`standard` and `myopic` are the same network)."""
        return {"feedback": "feedback", "recurrent": "recurrent"}.get(self.arch, "llama")

    def engine_config(self, name: str = "arch") -> ModelConfig:
        """The engine's config for the same shape (multi-head attention, untied unembedding)."""
        return ModelConfig(
            family=self.family,
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            head_dim=self.head_dim,
            d_ff=self.d_ff,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            norm_eps=1e-5,
            rope_theta=self.rope_theta,
            use_rope=self.positions == "rope",
            tie_embeddings=False,
            name=name,
        )

    def to_dict(self) -> dict:
        return asdict(self)
