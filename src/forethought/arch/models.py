"""Four trainable causal language models with one interface: `forward` (all positions, for training and
recompute), `new_state` + `step` (decode with the model's own cache), and what that cache costs in bytes.

- `StandardLM` is the engine's own `Transformer` with trainable weights; `myopic=True` trains it with Wu et al.'s
  stop-gradient (the loss at position s reaches earlier positions t < s through none of their keys/values).
  At inference the two are the same network, and the checkpoint loads into the engine and the trace API.
- `FeedbackLM` is Fan et al.'s Feedback Transformer: each token's layer states merge into one memory vector
  (softmax-weighted), projected once to a key and a value that every layer of every later token attends to.
- `RecurrentLM` is a GRU of the same width and depth: a fixed-size state.

All four are the engine's own `Transformer` (families `llama`, `feedback`, `recurrent`), so every trained model
exports to a folder that `forethought.weights.load_model` -- and with it the trace API, `lens`, `probe` and the
viewer -- runs unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from forethought.arch.config import ArchConfig
from forethought.model.config import ModelConfig
from forethought.model.layers import apply_rope, split_qkv
from forethought.model.llama import Block
from forethought.model.transformer import Transformer


class TrainableBlock(Block):
    """The engine's Llama block; with `myopic` set, attention in a training forward reads the keys and values
    of earlier positions through `detach()`, so no gradient flows from position s into positions t < s."""

    myopic = False

    def attention(self, x, rope, mask, cache, start, hooks):  # noqa: D102 - same signature as Block.attention
        if not (self.myopic and torch.is_grad_enabled() and cache is None and x.shape[1] > 1):
            return super().attention(x, rope, mask, cache, start, hooks)
        c = self.config
        B, T, _ = x.shape
        n_q, n_kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v = split_qkv(self.qkv(x), n_q, n_kv, hd)
        k, v = k.repeat_interleave(n_q // n_kv, dim=1), v.repeat_interleave(n_q // n_kv, dim=1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        scale = 1 / math.sqrt(hd)
        own = torch.eye(T, dtype=torch.bool, device=x.device)
        # Off the diagonal a query sees only detached keys/values; on it, its own live ones.
        scores = torch.where(own, (q * k).sum(-1, keepdim=True) * scale, q @ k.detach().transpose(-1, -2) * scale)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = p.masked_fill(own, 0.0) @ v.detach() + p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v
        return self.o(out.transpose(1, 2).reshape(B, T, n_q * hd))


def _init_weights(module: nn.Module, n_layers: int, generator: torch.Generator) -> None:
    """GPT-2-style init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 L), norm gains 1, biases 0.
    torch's own modules (the GRU) keep their default init."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ".gru." in f".{name}":
                continue
            if "norm" in name and leaf == "weight":
                param.fill_(1.0)
            elif leaf in ("bias", "layer_logits"):
                param.zero_()
            else:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o.weight_t", "down.weight_t")) else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)


class ArchModel(nn.Module):
    """What every architecture offers the training loop, the tasks and the measurements."""

    config: ArchConfig

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def new_state(self, batch_size: int = 1, capacity: int = 256):  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state) -> torch.Tensor:  # pragma: no cover - interface
        """Logits [batch, 1, vocab] for one new token per sequence; `state` is updated in place."""
        raise NotImplementedError

    def state_bytes(self, n_tokens: int, batch_size: int = 1) -> int:  # pragma: no cover - interface
        """Bytes this model carries from one token to the next after `n_tokens` tokens."""
        raise NotImplementedError

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops_per_token(self, context: int) -> float:  # pragma: no cover - interface
        """2 x (weights a token multiplies) + attention over `context / 2` positions on average."""
        raise NotImplementedError


class EngineLM(ArchModel):
    """An architecture that runs as an engine family: the trainable model is the engine's `Transformer`, so the
    network trained is the network traced, probed and served, with no second implementation of its maths."""

    def __init__(self, config: ArchConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        # torch's own modules (the GRU) draw their init from the global generator.
        torch.manual_seed(seed)
        self.net = self._make_net(config.engine_config(f"arch-{config.arch}"))
        # Every model here decodes op by op in Python, so speed comparisons are like for like.
        self.net.fused_decode = False
        _init_weights(self.net, config.n_layers, torch.Generator().manual_seed(seed))
        self.net.requires_grad_(True)

    def _make_net(self, config: ModelConfig) -> Transformer:
        return Transformer(config)

    @property
    def engine_config(self) -> ModelConfig:
        return self.net.config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def new_state(self, batch_size: int = 1, capacity: int = 256):
        return self.net.new_cache(capacity, batch_size)

    def step(self, tokens: torch.Tensor, state) -> torch.Tensor:
        return self.net(tokens, cache=state)

    def state_bytes(self, n_tokens: int, batch_size: int = 1) -> int:
        return self.net.config.kv_bytes(n_tokens) * batch_size

    def forward_flops_per_token(self, context: int) -> float:
        """Counted by the engine family (the same count as `forethought equivalence`): every projection and the
        unembedding, plus attention over `context / 2` positions on average."""
        c = self.net.config
        return float(c.family_spec.matmul_flops(c) + c.family_spec.attention_flops(c, context / 2))


class StandardLM(EngineLM):
    """The engine's decoder (`forethought.model.transformer.Transformer`, Llama blocks) with trainable weights;
    `set_myopic(True)` trains it with the stop-gradient."""

    def _make_net(self, config: ModelConfig) -> Transformer:
        net = Transformer(config)
        net.blocks = nn.ModuleList(TrainableBlock(config, i) for i in range(config.n_layers))
        return net

    def __init__(self, config: ArchConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.set_myopic(config.arch == "myopic")

    def set_myopic(self, myopic: bool) -> None:
        for block in self.net.blocks:
            block.myopic = myopic


class FeedbackLM(EngineLM):
    """Feedback Transformer (the engine's `feedback` family, forethought.model.feedback): memory_t = sum_l
    softmax(w)_l state_t^l over the embedding and every layer's output; layer l of token t attends to the
    memories of tokens < t and to its own layer input, through one key/value projection shared by all layers.
    Training is sequential in time, because token t's memory needs its top layer. Its cache holds one K and one
    V per token."""


class RecurrentLM(EngineLM):
    """A GRU (torch's) of the model width and depth between the shared embedding and unembedding (the engine's
    `recurrent` family, forethought.model.recurrent): a fixed-size state."""


def build_model(config: ArchConfig, seed: int = 0) -> ArchModel:
    """A freshly initialised model of `config.arch`, reproducible from `seed`."""
    if config.arch in ("standard", "myopic"):
        return StandardLM(config, seed)
    if config.arch == "feedback":
        return FeedbackLM(config, seed)
    return RecurrentLM(config, seed)
