"""GPT-2: the Llama block with LayerNorm, a bias on every projection, a GELU MLP and learned positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forethought.model.config import ModelConfig
from forethought.model.family import Family
from forethought.model.layers import Linear
from forethought.model.llama import Block, decoder_forward


class GPT2Block(Block):
    layer_norm = True
    bias = True

    def make_mlp(self, c: ModelConfig) -> None:
        self.up = Linear(c.d_model, c.d_ff, bias=True)
        self.down = Linear(c.d_ff, c.d_model, bias=True)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class GPT2Family(Family):
    name = "gpt2"
    block = GPT2Block
    learned_positions = True
    layer_norm = True
    mlp_matrices = 2  # up, down
    tree_attention = True

    def forward(self, model, tokens, cache, hooks, last_only, causal, start):  # noqa: D102 - Family.forward
        return decoder_forward(model, tokens, cache, hooks, last_only, causal, start)

    def forward_tree(self, model, tokens, cache, positions, visible, hooks, last_only):  # noqa: D102 - Family's
        return decoder_forward(model, tokens, cache, hooks, last_only, True, cache.length, (positions, visible))

    def n_params(self, config: ModelConfig) -> int:
        return super().n_params(config) + config.context_length * config.d_model  # the position table


GPT2 = GPT2Family()
