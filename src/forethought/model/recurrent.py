"""A stack of GRU layers as an engine family: the architectures lab's fixed-state baseline under the trace API.

Each "block" is one GRU layer (torch's, so its maths is torch's own); its output at token t is also the state
it carries to token t + 1. Named points: `blocks.{l}.resid_pre` (the layer's input) and `blocks.{l}.resid_post`
(its output, i.e. its state) -- there is no attention, no residual stream and no K/V. The logit lens reads a
layer's state through the final norm and unembedding like any other model's.

The state a recurrent model carries is one vector per layer, whatever the length; `RecurrentCache` also keeps
every earlier position's state, only so that it can rewind like a KV cache (branching in the viewer,
rejected drafts). `nbytes` counts what is carried, `allocated_nbytes` what is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.family import Family
from forethought.model.kv_cache import Cache
from forethought.model.layers import Hooks
from forethought.model.sequential import TokenByToken

POINTS = ("resid_pre", "resid_post")


class RecurrentCache(Cache):
    """The GRU states of every layer after each position: [layer, batch, position, d_model]."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        history: bool = True,
    ) -> None:
        self.config = config
        # Without history only the carried state is kept (one slot) and the cache cannot rewind.
        self.history = history
        capacity = max(1, min(capacity, config.context_length)) if history else 1
        self.states = torch.zeros(config.n_layers, batch_size, capacity, config.d_model, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.states.shape[2]

    @property
    def batch_size(self) -> int:
        return self.states.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """What one more token adds to the carried state: nothing."""
        return 0

    @property
    def nbytes(self) -> int:
        """The carried state: one vector per layer once any token has been read."""
        return self.config.kv_bytes(self.length, self.states.element_size()) * self.batch_size

    @property
    def allocated_nbytes(self) -> int:
        return self.states.nbytes

    def last(self, layer: int) -> torch.Tensor | None:
        """The state layer `layer` carries into the next token [1, batch, d], or None before the first."""
        if not self.length:
            return None
        slot = self.length - 1 if self.history else 0
        return self.states[layer, :, slot][None].contiguous()

    def reserve(self, n_tokens: int) -> None:
        self.check_fits(n_tokens)
        if n_tokens <= self.capacity or not self.history:
            return
        L, B, _, d = self.states.shape
        grown = self.states.new_zeros(L, B, min(max(n_tokens, 2 * self.capacity), self.config.context_length), d)
        grown[:, :, : self.length] = self.states[:, :, : self.length]
        self.states = grown

    def write(self, layer: int, start: int, states: torch.Tensor) -> None:
        """Store a layer's outputs [batch, new, d] for positions start.. (only the last one without history)."""
        if self.history:
            self.states[layer, :, start : start + states.shape[1]] = states
        else:
            self.states[layer, :, 0] = states[:, -1]

    def truncate(self, n_tokens: int) -> None:
        """Rewind to the state after `n_tokens` tokens."""
        if 0 <= n_tokens < self.length and not self.history:
            raise ValueError("a recurrent cache without history cannot rewind")
        super().truncate(n_tokens)

    def copy(self) -> RecurrentCache:
        new = RecurrentCache(
            self.config, self.batch_size, self.capacity, self.states.dtype, self.states.device, self.history
        )
        new.states[:, :, : self.length] = self.states[:, :, : self.length]
        new.length = self.length
        return new

    def __repr__(self) -> str:
        return f"RecurrentCache(length={self.length}, nbytes={self.nbytes}, allocated={self.allocated_nbytes})"


class RecurrentBlock(nn.Module):
    """One GRU layer with the engine's named points."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.config = config
        self.index = index
        self.names = {p: f"blocks.{index}.{p}" for p in POINTS}
        self.gru = nn.GRU(config.d_model, config.d_model, num_layers=1, batch_first=True)

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None, start: int, hooks: Hooks | None) -> torch.Tensor:
        names = self.names
        wanted = hooks.points if hooks is not None else ()
        if names["resid_pre"] in wanted:
            x = hooks(names["resid_pre"], x)
        state = cache.last(self.index) if cache is not None else None
        if names["resid_post"] in wanted:
            # The output is the state carried forward: a patched output must be what the next token reads,
            # so the tokens run one at a time.
            per_token = TokenByToken(hooks, x.shape[1])
            outs = []
            for t in range(x.shape[1]):
                out, _ = self.gru(x[:, t : t + 1], state)
                out = per_token.at(t)(names["resid_post"], out)
                state = out.transpose(0, 1).contiguous()
                outs.append(out)
            out = torch.cat(outs, dim=1)
        else:
            out, _ = self.gru(x, state)
        if cache is not None:
            cache.write(self.index, start, out)
        return out


def recurrent_forward(
    model,
    tokens: torch.Tensor,
    cache: RecurrentCache | None,
    hooks: Hooks | None,
    last_only: bool,
    causal: bool,
    start: int,
) -> torch.Tensor:
    """Transformer.forward for the GRU stack."""
    if not causal:
        raise ForethoughtError("a recurrent model has no bidirectional form: its state runs forward in time")
    wanted = hooks.points if hooks is not None else ()
    x = F.embedding(tokens, model.embed)
    if "embed" in wanted:
        x = hooks("embed", x)
    for block in model.blocks:
        x = block(x, cache, start, hooks)
    return model.finish(x, cache, start + tokens.shape[1], hooks, last_only)


class RecurrentFamily(Family):
    name = "recurrent"
    lab_block_tensors = ("gru.weight_ih", "gru.weight_hh", "gru.bias_ih", "gru.bias_hh")
    block = RecurrentBlock
    block_points = POINTS
    has_attention = False

    def forward(self, model, tokens, cache, hooks, last_only, causal, start):  # noqa: D102 - Family.forward
        return recurrent_forward(model, tokens, cache, hooks, last_only, causal, start)

    def new_cache(self, config, batch_size, capacity, dtype, device, minimal=False):  # noqa: D102 - Family's
        # Minimal: no rewind history, only the state carried to the next token.
        return RecurrentCache(config, batch_size, capacity, dtype, device, history=not minimal)

    def kv_layers(self, config: ModelConfig) -> int:
        return 0  # the state does not grow with the tokens

    def state_bytes(self, config: ModelConfig, n_tokens: int, element_bytes: int = 4) -> int:
        """One vector per layer however many tokens it has read."""
        return config.n_layers * config.d_model * element_bytes if n_tokens else 0

    def matmul_weights(self, config: ModelConfig) -> int:
        return config.n_layers * 6 * config.d_model * config.d_model  # a GRU layer: 3 gates x (input + hidden)

    def attention_flops(self, config: ModelConfig, n_keys: float) -> float:
        return 0

    def n_params(self, config: ModelConfig) -> int:
        c = config
        embed = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return c.n_layers * (2 * 3 * c.d_model * c.d_model + 2 * 3 * c.d_model) + embed  # two biases per layer


RECURRENT = RecurrentFamily()
