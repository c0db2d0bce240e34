"""The KV cache as an object a user can hold, measure, copy and truncate.

Per layer it stores, for every past token, the key and value projections that attention reads.
That is all a decoder carries from one step to the next: the residual stream of earlier positions
is never stored, because causal attention only ever reads it through these two projections.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from forethought.model.config import ModelConfig


class Cache(ABC):
    """What a model carries from one token to the next, as an object: every family's cache (`KVCache`,
    `SlidingKVCache`, the GRU stack's `RecurrentCache`) holds `length` tokens, says what it costs (`nbytes`
    carried, `allocated_nbytes` reserved, `bytes_per_token` added by one more token), grows on `reserve`,
    rewinds on `truncate` and `copy`s itself. The model's forward writes into it and sets `length`."""

    config: ModelConfig
    length: int

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Tokens it can hold before `reserve` must grow it."""

    @property
    @abstractmethod
    def batch_size(self) -> int: ...

    @property
    @abstractmethod
    def bytes_per_token(self) -> int:
        """What one more token adds to the carried state."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of state carried for the tokens seen so far."""

    @property
    @abstractmethod
    def allocated_nbytes(self) -> int:
        """Bytes actually reserved, including room not yet filled."""

    @abstractmethod
    def reserve(self, n_tokens: int) -> None:
        """Make room for `n_tokens` in total."""

    @abstractmethod
    def copy(self) -> Cache:
        """An independent cache with the same contents."""

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.config.context_length:
            raise ValueError(f"{n_tokens} tokens exceed the context length {self.config.context_length}")

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from position `n_tokens` on (e.g. to rewind and branch a generation)."""
        if not 0 <= n_tokens <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n_tokens}")
        self.length = n_tokens


class KVCache(Cache):
    """Preallocated keys and values, shape [layer, batch, kv_head, position, head_dim]: one layer slot per
    cached layer (`config.kv_layers`; a single one for the Feedback Transformer's per-token memory)."""

    PREALLOCATE_BYTES = 1 << 30

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        exact: bool = False,
    ) -> None:
        self.config = config
        # Preallocated up to a cap, grown with use past it (`reserve`): asking for a context of 1e9 tokens (a
        # file's declared maximum, or -n 1e9) must not allocate terabytes before the first token. `exact`
        # allocates the capacity asked (up to the context) whatever it costs: a measurement of what that
        # many tokens take (`state-size`), which the cap would silently cut at 1 GiB.
        per_token = 2 * config.kv_layers * batch_size * config.n_kv_heads * config.head_dim * dtype.itemsize
        limit = config.context_length if exact else min(config.context_length, self.PREALLOCATE_BYTES // per_token)
        capacity = max(1, min(capacity, limit))
        shape = (config.kv_layers, batch_size, config.n_kv_heads, capacity, config.head_dim)
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
        """K and V of one token at every cached layer, for the whole batch."""
        c = self.config
        return 2 * c.kv_layers * self.batch_size * c.n_kv_heads * c.head_dim * self.k.element_size()

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
        self.check_fits(n_tokens)
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

    def write_slots(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tree attention's write: K/V into slots start.., every slot up to them returned in slot order."""
        return self.write(layer, start, k, v)

    def copy_slots(self, row: int, at: int, source: KVCache, source_row: int, source_at: int, n: int) -> None:
        """Slots source_at.. of `source`'s row `source_row` into slots at.. of `row` (n of them): a prefix run
        once, copied into every row that continues it."""
        self.k[:, row, :, at : at + n] = source.k[:, source_row, :, source_at : source_at + n]
        self.v[:, row, :, at : at + n] = source.v[:, source_row, :, source_at : source_at + n]

    def repeat_prefix(self, rows: int, length: int, room: int = 32) -> KVCache:
        """A new cache of `rows` copies of batch row 0's first `length` tokens, with room for `room` more: the
        shared start of a batch of branches."""
        new = type(self)(self.config, rows, length + room, self.k.dtype, self.k.device)
        new.reserve(min(length + room, self.config.context_length))
        new.k[:, :, :, :length] = self.k[:, :1, :, :length]
        new.v[:, :, :, :length] = self.v[:, :1, :, :length]
        new.length = length
        return new

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (in that order): the branches a batch goes on with."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

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


class BranchCache(KVCache):
    """Tree attention's cache: a batch-1 prefix copied once, then slots for tokens that branch off it, in the
    order they are run. A slot is not a position: each branch token brings its own position and the slots it
    reads (`Transformer.forward_tree`), so many continuations of many prefix lengths share one prefix copy and
    one forward, and the cache's size is bounded by memory, not by the model's context."""

    def __init__(self, prefix: KVCache, length: int, room: int = 256) -> None:
        shape = list(prefix.k.shape)
        shape[1], shape[3] = 1, length + room
        self.config = prefix.config
        self.k = prefix.k.new_empty(shape)
        self.v = prefix.v.new_empty(shape)
        self.k[:, :, :, :length] = prefix.k[:, :1, :, :length]
        self.v[:, :, :, :length] = prefix.v[:, :1, :, :length]
        self.length = length

    def check_fits(self, n_tokens: int) -> None:
        """Slots are not positions (forward_tree checks the positions against the context)."""

    def reserve(self, n_tokens: int) -> None:
        if n_tokens <= self.capacity:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[3] = max(n_tokens, 2 * self.capacity)
            new = old.new_empty(shape)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def copy(self) -> BranchCache:
        return BranchCache(self, self.length, self.capacity - self.length)


class SlidingKVCache(KVCache):
    """A KV cache for models with sliding-window layers (Gemma 3): global layers keep every token
    (`k`, `v`: [global layer, batch, kv_head, position, head_dim], grown like KVCache), local layers
    keep a ring of `window + rewind` slots (`ring_k`, `ring_v`), position p in slot p % ring_size.

    A local layer's query at position q reads keys q-window+1..q, so once the ring is full its state
    stops growing: the cache's bytes saturate for local layers and grow only for global ones. The
    ring is exact, not an approximation: every key a query may see is still there (tested against
    recompute beyond the window). `rewind` extra slots let `truncate` go back that many tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rewind: int = 0,
    ) -> None:
        self.config = config
        self.window = config.sliding_window
        local = sorted(set(config.sliding_layers))
        global_ = [i for i in range(config.n_layers) if i not in local]
        # Index of each layer inside its own storage.
        self.slot_of = {layer: i for i, layer in enumerate(global_)} | {layer: i for i, layer in enumerate(local)}
        self.is_local = {layer: layer in local for layer in range(config.n_layers)}
        capacity = max(1, min(capacity, config.context_length))
        kv, hd = config.n_kv_heads, config.head_dim
        self.k = torch.zeros((len(global_), batch_size, kv, capacity, hd), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.ring_size = min(self.window + max(0, rewind), config.context_length)
        # Allocated like the global part (room for `capacity` tokens) and grown up to ring_size: until
        # the ring wraps, position p sits in slot p, so growing is a plain copy.
        ring_shape = (len(local), batch_size, kv, min(capacity, self.ring_size), hd)
        self.ring_k = torch.zeros(ring_shape, dtype=dtype, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)
        self._batch = batch_size
        self.length = 0
        # The most tokens ever written: truncate may go back at most the spare slots from there.
        self._high = 0

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def n_local(self) -> int:
        return self.ring_k.shape[0]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one more token while the rings fill; global layers only once they are full."""
        per_layer = 2 * self.batch_size * self.config.n_kv_heads * self.config.head_dim * self.k.element_size()
        return per_layer * (self.k.shape[0] + (self.n_local if self.length < self.window else 0))

    @property
    def nbytes(self) -> int:
        """Bytes of state held for the tokens seen so far: global layers grow with `length`, each local
        layer holds at most `window` tokens (the slots a query can read)."""
        per_layer = 2 * self.batch_size * self.config.n_kv_heads * self.config.head_dim * self.k.element_size()
        return per_layer * (self.k.shape[0] * self.length + self.n_local * min(self.length, self.window))

    @property
    def allocated_nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.ring_k.nbytes + self.ring_v.nbytes

    def reserve(self, n_tokens: int) -> None:
        super().reserve(n_tokens)
        allocated, needed = self.ring_k.shape[3], min(n_tokens, self.ring_size)
        if needed <= allocated:
            return
        new_slots = min(max(needed, 2 * allocated), self.ring_size)
        for name in ("ring_k", "ring_v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], new_slots, old.shape[4]))
            new[:, :, :, :allocated] = old
            setattr(self, name, new)

    def ring_positions(self, end: int) -> torch.Tensor:
        """The position each ring slot holds once tokens 0..end-1 are written (-1: empty)."""
        slots = torch.arange(self.ring_size, device=self.ring_k.device)
        # The newest p < end with p % ring_size == slot.
        return end - 1 - (end - 1 - slots) % self.ring_size if end > 0 else slots * 0 - 1

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_local[layer]:
            raise RuntimeError("local layers write with write_window, which also returns key positions")
        return super().write(self.slot_of[layer], start, k, v)

    def write_window(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store K/V of positions start.. in the layer's ring; return the keys, values and key
        positions [S] that the new queries may need (the caller masks by position and window)."""
        T = k.shape[2]
        end = start + T
        R = self.ring_size
        i = self.slot_of[layer]
        rk, rv = self.ring_k[i], self.ring_v[i]
        self._high = max(self._high, end)
        if T <= R - self.window + 1:
            # Writing first only overwrites positions older than any new query's window: return the ring.
            slots = torch.arange(start, end, device=rk.device) % R
            rk[:, :, slots], rv[:, :, slots] = k, v
            n = min(end, R)
            return rk[:, :, :n], rv[:, :, :n], self.ring_positions(end)[:n]
        # A chunk longer than the spare slots: the earliest new queries still need keys the chunk's
        # own writes would overwrite, so attend over (old ring + whole chunk) and write afterwards.
        n_old = min(start, R)
        keys = torch.cat((rk[:, :, :n_old], k), dim=2)
        values = torch.cat((rv[:, :, :n_old], v), dim=2)
        positions = torch.cat((self.ring_positions(start)[:n_old], torch.arange(start, end, device=rk.device)))
        keep = min(T, R)
        slots = torch.arange(end - keep, end, device=rk.device) % R
        rk[:, :, slots], rv[:, :, slots] = k[:, :, T - keep :], v[:, :, T - keep :]
        return keys, values, positions

    def write_slots(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tree attention's write (forward_tree reads at most `window` slots, so a ring never wraps there: slot
        s is ring slot s, and every key a local query may read is still in place)."""
        if not self.is_local[layer]:
            return self.write(layer, start, k, v)
        end = start + k.shape[2]
        if end > self.ring_k.shape[3]:
            raise ValueError(f"tree attention over {end} slots does not fit a ring of {self.ring_k.shape[3]}")
        i = self.slot_of[layer]
        self.ring_k[i, :, :, start:end], self.ring_v[i, :, :, start:end] = k, v
        self._high = max(self._high, end)
        return self.ring_k[i, :, :, :end], self.ring_v[i, :, :, :end]

    def copy_slots(self, row: int, at: int, source: KVCache, source_row: int, source_at: int, n: int) -> None:
        """As KVCache's, the local layers' rings too (neither ring may have wrapped)."""
        super().copy_slots(row, at, source, source_row, source_at, n)
        if not self.n_local:
            return
        if max(at, source_at) + n > self.ring_size or source._high > source.ring_size:
            raise ValueError("copy_slots reads and writes unwrapped rings only")
        self.ring_k[:, row, :, at : at + n] = source.ring_k[:, source_row, :, source_at : source_at + n]
        self.ring_v[:, row, :, at : at + n] = source.ring_v[:, source_row, :, source_at : source_at + n]
        self._high = max(self._high, at + n)

    def truncate(self, n_tokens: int) -> None:
        """Forget tokens from position `n_tokens` on; a local layer can only go back as far as its
        spare ring slots (`rewind`) reach, since older keys were overwritten."""
        oldest = max(0, self._high - (self.ring_size - self.window))
        if n_tokens < oldest and self.n_local:
            raise ValueError(
                f"a sliding-window cache of {self.length} tokens can rewind to {oldest} at the earliest, "
                f"not {n_tokens} (create it with a larger `rewind`)"
            )
        super().truncate(n_tokens)

    def repeat_prefix(self, rows: int, length: int, room: int = 32) -> SlidingKVCache:
        """As KVCache's, local layers included: their rings must still hold the first `length` tokens in place
        (never wrapped: at most ring_size tokens were ever written)."""
        if self._high > self.ring_size and self.n_local:
            raise ValueError(
                f"a sliding-window cache that has wrapped ({self._high} tokens written, ring of {self.ring_size}) "
                "no longer holds its first tokens"
            )
        rewind = self.ring_size - self.window
        new = SlidingKVCache(self.config, rows, length + room, self.k.dtype, self.k.device, rewind)
        new.reserve(min(length + room, self.config.context_length))
        new.k[:, :, :, :length] = self.k[:, :1, :, :length]
        new.v[:, :, :, :length] = self.v[:, :1, :, :length]
        n = min(length, self.ring_size)
        new.ring_k[:, :, :, :n] = self.ring_k[:, :1, :, :n]
        new.ring_v[:, :, :, :n] = self.ring_v[:, :1, :, :n]
        new.length = new._high = length
        return new

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        self.ring_k, self.ring_v = self.ring_k[:, rows], self.ring_v[:, rows]
        self._batch = len(rows)

    def copy(self) -> SlidingKVCache:
        new = SlidingKVCache.__new__(SlidingKVCache)
        new.__dict__.update(self.__dict__)
        new.k, new.v = self.k.clone(), self.v.clone()
        new.ring_k, new.ring_v = self.ring_k.clone(), self.ring_v.clone()
        return new

    def __repr__(self) -> str:
        return (
            f"SlidingKVCache(length={self.length}, window={self.window}, ring={self.ring_size}, "
            f"global_layers={self.k.shape[0]}, local_layers={self.n_local}, nbytes={self.nbytes})"
        )
