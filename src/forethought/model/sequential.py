"""Hooks for forward passes that must run one token at a time.

The Feedback Transformer cannot compute token t before the top layer of token t - 1 exists, and a recurrent
layer whose state is patched must carry the patched state forward; both run their tokens in a loop. The trace
API's hooks (`forethought.trace.Recorder`, the causal experiments' knockouts) are written for passes that hand
them every position at once. `TokenByToken` bridges the two: for token t it hands the hooks the whole pass so
far -- positions before t as they were computed, t the new value, later positions still zero -- so patches find
their absolute positions and a capture ends up holding every position; only token t's (possibly patched) value
goes back into the computation. Values are kept as computed, before any patch, so an "add" patch at a position
is applied once, not once per later token.
"""

from __future__ import annotations

import torch


class TokenByToken:
    """Wraps `hooks` for a pass of `n_tokens` tokens; call `at(t)` before the hooks of token t (0-based in
    this pass)."""

    def __init__(self, hooks, n_tokens: int) -> None:
        self.hooks = hooks
        self.points = hooks.points
        self.n_tokens = n_tokens
        self.t = 0
        self.buffers: dict[str, torch.Tensor] = {}

    def at(self, t: int) -> TokenByToken:
        self.t = t
        return self

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # attn_pattern is [batch, head, query, key] and token t's row covers keys 0..start+t; every other
        # point is [batch, position, ...].
        pattern = name.endswith("attn_pattern")
        axis = 2 if pattern else 1
        t = self.t
        buffer = self.buffers.get(name)
        if buffer is None:
            shape = list(tensor.shape)
            shape[axis] = self.n_tokens
            if pattern:
                shape[3] = tensor.shape[3] + self.n_tokens - 1 - t  # the last token's keys
            buffer = self.buffers[name] = tensor.new_zeros(shape)
        keys = tensor.shape[3] if pattern else None
        row = buffer.narrow(axis, t, 1)
        (row[..., :keys] if pattern else row).copy_(tensor)
        out = self.hooks(name, buffer).narrow(axis, t, 1)
        # A copy, not a view: later tokens write into the buffer, which must not alter what autograd saved.
        return (out[..., :keys] if pattern else out).clone()
