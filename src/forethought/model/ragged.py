"""Prompts of different lengths as one batch: left-padded to the longest, each row at its own positions and blind to
its padding, through `Transformer.forward_tree`'s per-row positions and masks.

Batching by exact length leaves a templated task with many lengths (chat prompts) in batches of one or two rows,
and a bandwidth-bound CPU decode step costs about as much for one row as for sixteen. Row b holds its `lengths[b]`
real tokens in the last slots of the first `width` columns (slots pad[b]..width-1 at positions 0..), then every new
token in the next column. A pad slot reads only itself (a query that reads nothing would give NaN keys and values
that poison every row through 0 * NaN), and no real token ever reads a pad slot, so each row's logits are those of
its prompt alone (to float rounding).

A batch may also start from a prefix every row shares (`shared` slots, positions 0..shared-1, run once and copied
into each row: `KVCache.repeat_prefix`); the rows' own tokens are then left-padded after it. Templated prompts
share most of their tokens (a task's instruction and examples: 64-86% of the plan tasks' prompt tokens), and
their pass is most of a short completion's cost."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forethought.model.kv_cache import Cache
from forethought.model.layers import Hooks


class RaggedBatch:
    """Rows with `lengths[b]` real tokens right-aligned in the slots after a `shared` prefix (width: shared + the
    longest row)."""

    def __init__(self, lengths: Sequence[int], device: torch.device | str = "cpu", shared: int = 0) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
        self.shared = shared
        self.width = shared + (int(self.lengths.max()) if len(self.lengths) else 0)
        self.pad = self.width - self.lengths  # [B] the first real slot of each row's own tokens

    @classmethod
    def left_padded(
        cls, prompts: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str = "cpu", shared: int = 0
    ) -> tuple[RaggedBatch, torch.Tensor]:
        """The batch and its tokens [B, width - shared], each prompt right-aligned after `pad_id`s (the tokens
        after a shared prefix of `shared` slots, when there is one)."""
        batch = cls([len(p) for p in prompts], device, shared)
        tokens = torch.full((len(prompts), batch.width - shared), pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            if len(p):
                tokens[b, tokens.shape[1] - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        return batch, tokens

    def positions(self, start: int, T: int) -> torch.Tensor:
        """[B, T]: the position of slots start..start+T-1 in each row (the shared prefix's slots are its
        positions; pad slots: whatever, they are read by no one)."""
        slots = torch.arange(start, start + T, device=self.pad.device)[None, :]
        own = (slots - (self.pad[:, None] - self.shared)).clamp_min(0)
        return torch.where(slots < self.shared, slots, own)

    def visible(self, start: int, T: int) -> torch.Tensor:
        """[B, T, start + T]: query slot i reads key slot j <= i of the shared prefix and of its own row's real
        tokens; a pad slot reads itself."""
        keys = torch.arange(start + T, device=self.pad.device)
        queries = torch.arange(start, start + T, device=self.pad.device)
        causal = keys[None, None, :] <= queries[None, :, None]
        real = (keys[None, None, :] >= self.pad[:, None, None]) | (keys[None, None, :] < self.shared)
        padding = (queries[None, :, None] < self.pad[:, None, None]) & (queries[None, :, None] >= self.shared)
        own = (keys[None, :] == queries[:, None])[None] & padding
        return (causal & real) | own

    def forward(
        self,
        model,
        tokens: torch.Tensor,
        cache: Cache,
        hooks: Hooks | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T or 1, vocab] for tokens [B, T] in the next T slots of every row of `cache`."""
        start, T = cache.length, tokens.shape[1]
        return model.forward_tree(
            tokens, cache, self.positions(start, T), self.visible(start, T), hooks=hooks, last_only=last_only
        )
