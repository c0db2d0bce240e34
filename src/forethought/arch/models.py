"""Four trainable causal language models with one interface: `forward` (all positions, for training and
recompute), `new_state` + `step` (decode with the model's own cache), and what that cache costs in bytes.

- `StandardLM` is the engine's own `Transformer` with trainable weights; `myopic=True` trains it with Wu et al.'s
  stop-gradient (the loss at position s reaches earlier positions t < s through none of their keys/values).
  At inference the two are the same network, and the checkpoint loads into the engine and the trace API.
- `FeedbackLM` is Fan et al.'s Feedback Transformer: each token's layer states merge into one memory vector
  (softmax-weighted), projected once to a key and a value that every layer of every later token attends to.
- `RecurrentLM` is a GRU of the same width and depth: a fixed-size state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forethought.arch.config import ArchConfig
from forethought.model.config import ModelConfig
from forethought.model.kv_cache import KVCache
from forethought.model.transformer import Block, Linear, Norm, Transformer, rotate_half

BYTES_PER_FLOAT = 4  # every model here keeps its state in float32


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, head_dim] in the engine's rotate-half convention (Transformer.init_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


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
        q, k, v = self.qkv(x).split((n_q * hd, n_kv * hd, n_kv * hd), dim=-1)
        q = q.view(B, T, n_q, hd).transpose(1, 2)
        k = k.view(B, T, n_kv, hd).transpose(1, 2).repeat_interleave(n_q // n_kv, dim=1)
        v = v.view(B, T, n_kv, hd).transpose(1, 2).repeat_interleave(n_q // n_kv, dim=1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
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
            if ".gru." in f".{name}" or name.startswith("gru."):
                continue
            if "norm" in name and leaf == "weight":
                param.fill_(1.0)
            elif leaf == "bias" or name == "layer_logits":
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

    def forward_flops_per_token(self, context: int) -> float:
        """2 x (weights a token multiplies) + attention over `context / 2` positions on average."""
        return 2.0 * self._matmul_weights() + self._attention_flops(context / 2)

    def _matmul_weights(self) -> int:
        embed = self.config.vocab_size * self.config.d_model  # a lookup, not a product
        return self.n_params() - embed

    def _attention_flops(self, mean_context: float) -> float:
        return 0.0


class StandardLM(ArchModel):
    """The engine's decoder (`forethought.model.transformer.Transformer`) with trainable weights."""

    def __init__(self, config: ArchConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.net = Transformer(config.engine_config(f"arch-{config.arch}"))
        self.net.blocks = nn.ModuleList(TrainableBlock(self.net.config, i) for i in range(config.n_layers))
        # Every model here decodes op by op in Python, so speed comparisons are like for like.
        self.net.fused_decode = False
        _init_weights(self.net, config.n_layers, torch.Generator().manual_seed(seed))
        self.net.requires_grad_(True)
        self.set_myopic(config.arch == "myopic")

    @property
    def engine_config(self) -> ModelConfig:
        return self.net.config

    def set_myopic(self, myopic: bool) -> None:
        for block in self.net.blocks:
            block.myopic = myopic

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def new_state(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        return self.net.new_cache(capacity, batch_size)

    def step(self, tokens: torch.Tensor, state: KVCache) -> torch.Tensor:
        return self.net(tokens, cache=state)

    def state_bytes(self, n_tokens: int, batch_size: int = 1) -> int:
        return n_tokens * batch_size * self.net.config.kv_bytes_per_token

    def _attention_flops(self, mean_context: float) -> float:
        return 4.0 * self.config.n_layers * self.config.d_model * mean_context  # QK^T and PV


class FeedbackBlock(Block):
    """The engine's block with its own query projection only: keys and values come from the shared memory."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        del self.qkv
        self.q = Linear(config.d_model, config.n_heads * config.head_dim, bias=False)


@dataclass
class FeedbackCache:
    """One key and one value per past token (not one per layer): [batch, head, position, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @property
    def nbytes(self) -> int:
        return self.length * self.bytes_per_token

    @property
    def bytes_per_token(self) -> int:
        B, H, _, hd = self.k.shape
        return 2 * B * H * hd * self.k.element_size()


class FeedbackLM(ArchModel):
    """Feedback Transformer: memory_t = sum_l softmax(w)_l state_t^l over the embedding and every layer's output;
    layer l of token t attends to the memories of tokens < t and to its own layer-(l-1) state, through one key/value
    projection shared by all layers. Training is sequential in time, because token t's memory needs its top layer."""

    def __init__(self, config: ArchConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        ec = config.engine_config("arch-feedback")
        d = config.d_model
        self.embed = nn.Parameter(torch.empty(config.vocab_size, d))
        self.blocks = nn.ModuleList(FeedbackBlock(ec, i) for i in range(config.n_layers))
        self.memory_norm = Norm(d, ec.norm_eps, layer_norm=False)
        self.memory_kv = Linear(d, 2 * d, bias=False)
        self.layer_logits = nn.Parameter(torch.zeros(config.n_layers + 1))
        self.final_norm = Norm(d, ec.norm_eps, layer_norm=False)
        self.unembed = Linear(d, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.rope_theta, config.context_length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        _init_weights(self, config.n_layers, torch.Generator().manual_seed(seed))
        self.requires_grad_(True)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        return x.view(B, 1, self.config.n_heads, self.config.head_dim).transpose(1, 2)

    def _token(
        self, x: torch.Tensor, pos: int, mem_k: torch.Tensor, mem_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token through every layer: (top state [B, 1, d], its memory key, its memory value [B, H, 1, hd])."""
        B, d = x.shape[0], self.config.d_model
        cos, sin = self.rope_cos[pos : pos + 1], self.rope_sin[pos : pos + 1]
        h, states = x, [x]
        for block in self.blocks:
            a = block.attn_norm(h)
            q = apply_rope(self._heads(block.q(a)), cos, sin)
            k_own, v_own = self.memory_kv(a).split(d, dim=-1)
            keys = torch.cat((mem_k, apply_rope(self._heads(k_own), cos, sin)), dim=2)
            values = torch.cat((mem_v, self._heads(v_own)), dim=2)
            attn = F.scaled_dot_product_attention(q, keys, values)
            h = h + block.o(attn.transpose(1, 2).reshape(B, 1, d))
            h = h + block.mlp(block.mlp_norm(h))
            states.append(h)
        weights = torch.softmax(self.layer_logits, dim=0)
        memory = torch.einsum("l,lbtd->btd", weights, torch.stack(states))
        k_mem, v_mem = self.memory_kv(self.memory_norm(memory)).split(d, dim=-1)
        return h, apply_rope(self._heads(k_mem), cos, sin), self._heads(v_mem)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.config.context_length:
            raise ValueError(f"{T} tokens exceed the context length {self.config.context_length}")
        x = F.embedding(tokens, self.embed)
        H, hd = self.config.n_heads, self.config.head_dim
        mem_k = x.new_zeros(B, H, 0, hd)
        mem_v = x.new_zeros(B, H, 0, hd)
        tops = []
        for t in range(T):
            top, k, v = self._token(x[:, t : t + 1], t, mem_k, mem_v)
            mem_k, mem_v = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)
            tops.append(top)
        return self.unembed(self.final_norm(torch.cat(tops, dim=1)))

    def new_state(self, batch_size: int = 1, capacity: int = 256) -> FeedbackCache:
        shape = (batch_size, self.config.n_heads, min(capacity, self.config.context_length), self.config.head_dim)
        return FeedbackCache(self.embed.new_zeros(shape), self.embed.new_zeros(shape))

    def step(self, tokens: torch.Tensor, state: FeedbackCache) -> torch.Tensor:
        n = state.length
        if n >= state.k.shape[2]:
            raise ValueError(f"the feedback cache is full ({n} tokens)")
        x = F.embedding(tokens, self.embed)
        top, k, v = self._token(x, n, state.k[:, :, :n], state.v[:, :, :n])
        state.k[:, :, n : n + 1] = k
        state.v[:, :, n : n + 1] = v
        state.length = n + 1
        return self.unembed(self.final_norm(top))

    def state_bytes(self, n_tokens: int, batch_size: int = 1) -> int:
        return n_tokens * batch_size * 2 * self.config.d_model * BYTES_PER_FLOAT

    def _attention_flops(self, mean_context: float) -> float:
        # Every layer attends over the memories; the memory K/V projection is counted with the weights.
        return 4.0 * self.config.n_layers * self.config.d_model * mean_context

    def _matmul_weights(self) -> int:
        # memory_kv multiplies L + 1 vectors per token (each layer's own state, then the memory).
        extra = self.config.n_layers * self.memory_kv.weight_t.numel()
        return super()._matmul_weights() + extra


@dataclass
class RecurrentState:
    h: torch.Tensor | None
    batch_size: int
    length: int = 0


class RecurrentLM(ArchModel):
    """A GRU (torch's) of the model width and depth between the shared embedding and unembedding."""

    def __init__(self, config: ArchConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        torch.manual_seed(seed)  # nn.GRU draws its init from the global generator
        self.embed = nn.Parameter(torch.empty(config.vocab_size, d))
        self.gru = nn.GRU(d, d, num_layers=config.n_layers, batch_first=True)
        self.final_norm = Norm(d, 1e-5, layer_norm=False)
        self.unembed = Linear(d, config.vocab_size, bias=False)
        _init_weights(self, config.n_layers, torch.Generator().manual_seed(seed))
        self.requires_grad_(True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(F.embedding(tokens, self.embed))
        return self.unembed(self.final_norm(out))

    def new_state(self, batch_size: int = 1, capacity: int = 256) -> RecurrentState:
        return RecurrentState(None, batch_size)

    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        out, state.h = self.gru(F.embedding(tokens, self.embed), state.h)
        state.length += 1
        return self.unembed(self.final_norm(out))

    def state_bytes(self, n_tokens: int, batch_size: int = 1) -> int:
        return batch_size * self.config.n_layers * self.config.d_model * BYTES_PER_FLOAT if n_tokens else 0


def build_model(config: ArchConfig, seed: int = 0) -> ArchModel:
    """A freshly initialised model of `config.arch`, reproducible from `seed`."""
    if config.arch in ("standard", "myopic"):
        return StandardLM(config, seed)
    if config.arch == "feedback":
        return FeedbackLM(config, seed)
    return RecurrentLM(config, seed)
