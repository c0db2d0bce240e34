"""The KV cache as an object a user can hold, measure, copy and truncate.

Per layer it stores, for every past token, the key and value projections that attention reads.
That is all a decoder carries from one step to the next: the residual stream of earlier positions
is never stored, because causal attention only ever reads it through these two projections.
"""

from __future__ import annotations

import torch

from forethought.model.config import ModelConfig


class KVCache:
    """Preallocated keys and values, shape [layer, batch, kv_head, position, head_dim]."""

    PREALLOCATE_BYTES = 1 << 30

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        # Preallocated up to a cap, grown with use past it (`reserve`): asking for a context of 1e9 tokens (a
        # file's declared maximum, or -n 1e9) must not allocate terabytes before the first token.
        per_token = 2 * config.n_layers * batch_size * config.n_kv_heads * config.head_dim * dtype.itemsize
        capacity = max(1, min(capacity, config.context_length, self.PREALLOCATE_BYTES // per_token))
        shape = (config.n_layers, batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens whose K and V are stored

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token at every layer, for the whole batch."""
        c = self.config
        return 2 * c.n_layers * self.batch_size * c.n_kv_heads * c.head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of state held for the tokens seen so far: grows linearly with `length`."""
        return self.length * self.bytes_per_token

    @property
    def allocated_nbytes(self) -> int:
        """Bytes actually reserved, including room not yet filled."""
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n_tokens: int) -> None:
        """Make room for `n_tokens` in total, growing geometrically so appends stay amortised O(1)."""
        if n_tokens > self.config.context_length:
            raise ValueError(f"{n_tokens} tokens exceed the context length {self.config.context_length}")
        if n_tokens <= self.capacity:
            return
        new_capacity = min(max(n_tokens, 2 * self.capacity), self.config.context_length)
        for name in ("k", "v"):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[3] = new_capacity
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K/V [batch, kv_head, new, head_dim] at positions start.., return all keys/values up to them."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from position `n_tokens` on (e.g. to rewind and branch a generation)."""
        if not 0 <= n_tokens <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n_tokens}")
        self.length = n_tokens

    def copy(self) -> KVCache:
        """An independent cache with the same contents (only the filled part is copied)."""
        new = KVCache(self.config, self.batch_size, self.capacity, self.k.dtype, self.k.device)
        new.reserve(self.length)  # the constructor caps what it preallocates
        new.k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        new.v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        new.length = self.length
        return new

    def __repr__(self) -> str:
        return (
            f"KVCache(length={self.length}, capacity={self.capacity}, "
            f"bytes_per_token={self.bytes_per_token}, nbytes={self.nbytes})"
        )
