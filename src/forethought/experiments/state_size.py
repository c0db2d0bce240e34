"""How much state does a transformer carry from token to token? Its KV cache: K and V of every
past token at every layer, growing linearly with the tokens seen. Measured on a real cache of the
loaded model, given by formula for well-known shapes, and set against the fixed-size state a
recurrent network (RNN/LSTM, or a Mamba-like state-space model) carries whatever the length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.transformer import Transformer

DEFAULT_TOKENS = (1, 10, 100, 1000, 8192)
# Up to this many tokens the cache is filled by a real prefill; beyond, a cache of exactly that
# capacity is allocated (real tensors, measured by their bytes) without running the model.
PREFILL_LIMIT = 1024

# Published shapes, for scale. Only the fields the KV cache depends on matter here.
NAMED_CONFIGS: dict[str, ModelConfig] = {
    "gpt2-small": ModelConfig(
        family="gpt2",
        n_layers=12,
        d_model=768,
        n_heads=12,
        n_kv_heads=12,
        head_dim=64,
        d_ff=3072,
        vocab_size=50257,
        context_length=1024,
        name="GPT-2 small (124M)",
    ),
    "llama-3-8b": ModelConfig(
        family="llama",
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        vocab_size=128256,
        context_length=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
        name="Llama-3-8B",
    ),
    "gemma-3-270m": ModelConfig(
        family="gemma3",
        n_layers=18,
        d_model=640,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        d_ff=2048,
        vocab_size=262144,
        context_length=32768,
        rope_theta=1_000_000.0,
        name="Gemma-3-270M (15 of 18 layers sliding, window 512)",
        sliding_window=512,
        sliding_layers=tuple(i for i in range(18) if (i + 1) % 6),
    ),
    "llama-3-70b": ModelConfig(
        family="llama",
        n_layers=80,
        d_model=8192,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        d_ff=28672,
        vocab_size=128256,
        context_length=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
        name="70B grouped-query (Llama-3-70B)",
    ),
}

# A Mamba block keeps a [2 * d_model, 16] SSM state per layer (expand 2, d_state 16), plus a short
# convolution window (4 taps of 2 * d_model) -- constant in tokens, like any recurrent network.
MAMBA_EXPAND, MAMBA_STATE, MAMBA_CONV = 2, 16, 4


def kv_bytes_by_kind(config: ModelConfig, n_tokens: int, element_bytes: int) -> tuple[int, int]:
    """(bytes held by global layers, bytes held by sliding-window layers) after `n_tokens` tokens."""
    per_layer_token = 2 * config.n_kv_heads * config.head_dim * element_bytes
    n_local = len(config.sliding_layers)
    local = n_local * min(n_tokens, config.sliding_window) * per_layer_token if n_local else 0
    return config.n_global_layers * n_tokens * per_layer_token, local


def recurrent_states(config: ModelConfig, element_bytes: int) -> dict[str, int]:
    """Bytes of fixed-size states of the same width as `config`, carried whatever the length."""
    d, L = config.d_model, config.n_layers
    inner = MAMBA_EXPAND * d
    return {
        "vector (d)": d * element_bytes,
        "RNN (L·d)": L * d * element_bytes,
        "LSTM (2·L·d)": 2 * L * d * element_bytes,
        "Mamba-like (L·2d·20)": L * inner * (MAMBA_STATE + MAMBA_CONV) * element_bytes,
    }


@dataclass
class ConfigSize:
    key: str
    name: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    context_length: int
    bytes_per_token: int
    kv_bytes: list[int]  # formula, one per token count
    recurrent_bytes: dict[str, int]
    measured_nbytes: list[int | None] = field(default_factory=list)  # KVCache.nbytes after a real prefill
    measured_allocated: list[int | None] = field(default_factory=list)  # k.nbytes + v.nbytes at that capacity
    prefilled: list[bool] = field(default_factory=list)
    # Models with sliding-window layers (Gemma 3): the formula split by kind of layer.
    n_local_layers: int = 0
    sliding_window: int = 0
    kv_bytes_global: list[int] = field(default_factory=list)
    kv_bytes_local: list[int] = field(default_factory=list)


@dataclass
class StateSizeResult:
    tokens: list[int]
    dtype: str
    element_bytes: int
    configs: list[ConfigSize]

    @property
    def loaded(self) -> ConfigSize:
        return self.configs[0]

    @property
    def measured_matches_formula(self) -> bool:
        c = self.loaded
        pairs = zip(c.kv_bytes, c.measured_nbytes, c.measured_allocated)
        return all(m in (None, f) and a in (None, f) for f, m, a in pairs)

    def to_dict(self) -> dict:
        return asdict(self) | {"measured_matches_formula": self.measured_matches_formula}


def parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ForethoughtError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not tokens or any(t < 1 for t in tokens):
        raise ForethoughtError(f"--tokens must list positive token counts, got {text!r}")
    return sorted(set(tokens))


def named_configs(names: str | list[str] | None) -> dict[str, ModelConfig]:
    if names is None:
        return dict(NAMED_CONFIGS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMED_CONFIGS]
    if unknown:
        raise ForethoughtError(f"unknown config {unknown[0]!r} (known: {', '.join(NAMED_CONFIGS)})")
    return {n: NAMED_CONFIGS[n] for n in names}


def _describe(key: str, config: ModelConfig, tokens: list[int], element_bytes: int) -> ConfigSize:
    return ConfigSize(
        key=key,
        name=config.name,
        n_layers=config.n_layers,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        d_model=config.d_model,
        context_length=config.context_length,
        bytes_per_token=config.kv_bytes(1, element_bytes),
        kv_bytes=[config.kv_bytes(t, element_bytes) for t in tokens],
        recurrent_bytes=recurrent_states(config, element_bytes),
        n_local_layers=len(config.sliding_layers),
        sliding_window=config.sliding_window if config.sliding_layers else 0,
        kv_bytes_global=[kv_bytes_by_kind(config, t, element_bytes)[0] for t in tokens]
        if config.sliding_layers
        else [],
        kv_bytes_local=[kv_bytes_by_kind(config, t, element_bytes)[1] for t in tokens] if config.sliding_layers else [],
    )


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable), or None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@torch.inference_mode()
def measure_cache(model: Transformer, n_tokens: int, token_ids: list[int]) -> tuple[int | None, int | None]:
    """(nbytes of a cache after prefilling `n_tokens` real tokens, or None when not prefilled;
    bytes of the K/V tensors of a cache allocated for exactly `n_tokens`, or None -- formula only -- when
    that would take more than half the available memory)."""
    expected = model.config.kv_bytes(n_tokens, torch.empty((), dtype=model.dtype).element_size())
    free = available_memory()
    if free is not None and expected > free // 2:
        return None, None
    # No spare ring slots, no rewind history, and exactly n_tokens of room (not capped at the cache's
    # usual 1 GiB preallocation): the measured bytes are exactly what that many tokens take.
    cache = model.new_cache(capacity=n_tokens, minimal=True)
    allocated = cache.allocated_nbytes
    if n_tokens > min(PREFILL_LIMIT, len(token_ids)):
        return None, allocated
    model(torch.tensor([token_ids[:n_tokens]], device=model.device), cache=cache, last_only=True)
    return cache.nbytes, allocated


def state_size(
    model: Transformer,
    token_ids: list[int],
    tokens: Sequence[int] = DEFAULT_TOKENS,
    configs: dict[str, ModelConfig] | None = None,
    model_name: str = "",
) -> StateSizeResult:
    """KV-cache bytes at each token count: measured on `model` (prefilling `token_ids`), and by formula
    for it and for `configs`, next to fixed recurrent states. Counts beyond the loaded model's context
    are given by formula only."""
    tokens = list(tokens)
    element_bytes = torch.empty((), dtype=model.dtype).element_size()
    loaded = _describe(model_name or model.config.name, model.config, tokens, element_bytes)
    loaded.name = f"{loaded.key} (loaded)"
    for t in tokens:
        if t > model.config.context_length:
            measured, allocated = None, None
        else:
            measured, allocated = measure_cache(model, t, token_ids)
        loaded.measured_nbytes.append(measured)
        loaded.measured_allocated.append(allocated)
        loaded.prefilled.append(measured is not None)
    rows = [loaded] + [_describe(k, c, tokens, element_bytes) for k, c in (configs or {}).items()]
    return StateSizeResult(list(tokens), str(model.dtype).removeprefix("torch."), element_bytes, rows)
