"""What a lab run will need, checked against the machine before anything is allocated.

The sizes come from flags, so `--d-model 10**12` or `--batch 10**9` must end in one line that names the estimate
and what is available -- not an allocator's RuntimeError after minutes, nor a machine pushed into swap. The estimate
errs high (weights, gradients and AdamW's two moments, plus the activations a step keeps for backward, including the
attention scores), so a run it admits does fit.
"""

from __future__ import annotations

import resource
from pathlib import Path

from forethought.arch.config import ArchConfig
from forethought.errors import ForethoughtError

MAX_LAYERS = 256  # the lab trains small models; a deeper stack takes minutes just to build
FLOAT = 4  # bytes: the lab trains in float32
EVAL_BATCH = 64  # evaluate() reads batches of this size


def parameter_count(c: ArchConfig) -> int:
    """An upper bound on the model's parameters (every architecture's block is at most this big)."""
    d = c.d_model
    per_layer = 6 * d * d + 3 * d * c.d_ff + 8 * d  # qkv + o (or a GRU's 2 x 3d x d) + SwiGLU + norms and biases
    return 2 * c.vocab_size * d + c.n_layers * per_layer + 3 * d * d + c.n_layers + 2 * d


def training_bytes(c: ArchConfig, batch: int, length: int) -> int:
    """Peak bytes of one training step or evaluation, an overestimate."""
    sequences = max(batch, EVAL_BATCH)
    per_token_layer = 16 * c.d_model + 4 * c.d_ff + 3 * c.n_heads * length  # saved activations + attention scores
    activations = sequences * length * (c.n_layers * per_token_layer + 3 * c.vocab_size)
    return FLOAT * (4 * parameter_count(c) + activations)


def available_bytes() -> int:
    """Memory this process may still take: the smaller of the system's available memory and the room left
    under an address-space limit (`ulimit -v`)."""
    room = _meminfo_kb("MemAvailable") * 1024 or 1 << 62
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room = min(room, soft - _status_kb("VmSize") * 1024)
    return max(0, room)


def check_fits(c: ArchConfig, batch: int, length: int) -> None:
    if c.n_layers > MAX_LAYERS:
        raise ForethoughtError(f"--layers {c.n_layers} is more than the lab's {MAX_LAYERS}")
    need, room = training_bytes(c, batch, length), available_bytes()
    if need > room:
        raise ForethoughtError(
            f"this run needs about {_gib(need)} of memory ({_count(parameter_count(c))} parameters, batch {batch} x "
            f"length {length}); {_gib(room)} is available: lower --d-model, --layers, --batch or --length"
        )


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"~10^{len(str(n)) - 1}"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**70 else f"2^{n.bit_length() - 1} bytes"


def _meminfo_kb(key: str) -> int:
    return _field_kb(Path("/proc/meminfo"), key)


def _status_kb(key: str) -> int:
    return _field_kb(Path("/proc/self/status"), key)


def _field_kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:  # not Linux: no estimate of what is free, only the address-space limit
        pass
    return 0
