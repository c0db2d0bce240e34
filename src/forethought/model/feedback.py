"""The Feedback Transformer (Fan et al. 2020) as an engine family, so it runs under the trace API.

In a standard decoder, layer l of token t reads earlier tokens only at layer l (the "pyramidal" flow: the
top layers of the past are never seen by the lower layers of the present). Here every token's states --
the embedding and every layer's output -- merge into one memory vector

    memory_t = sum_l softmax(w)_l state_t^l,

which one key/value projection shared by all layers turns into a single key and value per token. Layer l of
token t attends to the memories of tokens < t and to its own layer input (projected by the same map), so the
past is seen at full depth. The price: token t needs token t - 1's top layer, so tokens run one at a time
even in training, and the cache holds one K and one V per token instead of one per layer.

Named points are the Llama block's (`blocks.{l}.q/k/v` are token t's own query, key and value at layer l;
`attn_pattern`'s key axis is the past memories then the token itself) plus `memory`, the merged vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.family import Family
from forethought.model.kv_cache import KVCache
from forethought.model.layers import Hooks, Linear, Norm, apply_rope, attend
from forethought.model.llama import Block
from forethought.model.sequential import TokenByToken


class FeedbackMemory(nn.Module):
    """What all layers share: the layer weights `w`, the memory's norm and the key/value projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.n_heads * config.head_dim
        self.norm = Norm(config.d_model, config.norm_eps, False)
        self.kv = Linear(config.d_model, 2 * width, bias=False)
        self.layer_logits = nn.Parameter(torch.zeros(config.n_layers + 1), requires_grad=False)


@dataclass
class _Past:
    """What a FeedbackBlock's attention reads besides its input: the past tokens' memory keys and values
    [batch, head, position, head_dim] and the shared projection for its own key and value."""

    k: torch.Tensor
    v: torch.Tensor
    kv: Linear


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)


def key_value(x: torch.Tensor, kv: Linear, n_heads: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Key (rotated) and value [batch, head, 1, head_dim] of a normed vector through the shared map: a layer's
    own input, or a token's merged memory."""
    k, v = kv(x).chunk(2, dim=-1)
    return apply_rope(_heads(k, n_heads), rope), _heads(v, n_heads)


class FeedbackBlock(Block):
    """The Llama block with its own query projection only: keys and values come from the shared memory map.
    `forward` is Block's (same named points); it is called with a `_Past` where Block takes the cache."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        del self.qkv
        self.q = Linear(config.d_model, config.n_heads * config.head_dim, bias=False)

    def attention(self, x, rope, mask, past: _Past, start, hooks):  # noqa: D102 - Block.attention's signature
        H = self.config.n_heads
        q = apply_rope(_heads(self.q(x), H), rope)
        k, v = key_value(x, past.kv, H, rope)
        if hooks is not None:
            q, k, v = self.hook_qkv(hooks, q, k, v)
        keys, values = torch.cat((past.k, k), dim=2), torch.cat((past.v, v), dim=2)
        return self.o(attend(q, keys, values, None, hooks, self.names["attn_pattern"]))


def feedback_forward(
    model,
    tokens: torch.Tensor,
    cache: KVCache | None,
    hooks: Hooks | None,
    last_only: bool,
    causal: bool,
    start: int,
) -> torch.Tensor:
    """Transformer.forward for the Feedback Transformer: token by token, each through every layer, then its
    memory key and value appended (to the cache when there is one)."""
    if not causal:
        raise ForethoughtError(
            "the Feedback Transformer has no bidirectional form: token t is built from token t - 1's memory"
        )
    c = model.config
    B, T = tokens.shape
    H, hd = c.n_heads, c.head_dim
    wanted = hooks.points if hooks is not None else ()
    x = F.embedding(tokens, model.embed)
    if "embed" in wanted:
        x = hooks("embed", x)
    memory: FeedbackMemory = model.memory
    # Without a cache the memories are kept as a list and joined per token (autograd needs every one as it
    # was); with one, they are written into it and read back as views.
    keys, values = [x.new_zeros(B, H, 0, hd)], [x.new_zeros(B, H, 0, hd)]
    weights = torch.softmax(memory.layer_logits.float(), dim=0).to(x.dtype)
    per_token = TokenByToken(hooks, T) if hooks is not None else None
    tops = []
    for t in range(T):
        position = start + t
        rope = model.rope(position, position + 1, x.dtype)
        token_hooks = per_token.at(t) if per_token is not None else None
        if cache is not None:
            past = _Past(cache.k[0, :, :, :position], cache.v[0, :, :, :position], memory.kv)
        else:
            past = _Past(torch.cat(keys, dim=2), torch.cat(values, dim=2), memory.kv)
        h = x[:, t : t + 1]
        states = [h]
        for block in model.blocks:
            h = block(h, rope, None, past, position, token_hooks)
            states.append(h)
        merged = torch.einsum("l,lbtd->btd", weights, torch.stack(states))
        if "memory" in wanted:
            merged = token_hooks("memory", merged)
        k, v = key_value(memory.norm(merged), memory.kv, H, rope)
        if cache is not None:
            cache.write(0, position, k, v)
        else:
            keys, values = [past.k, k], [past.v, v]
        tops.append(h)
    return model.finish(torch.cat(tops, dim=1), cache, start + T, hooks, last_only)


class FeedbackFamily(Family):
    name = "feedback"
    lab_block_tensors = tuple(f"{p}.weight" for p in ("attn_norm", "mlp_norm", "q", "o", "gate", "up", "down"))
    lab_model_tensors = ("memory.norm.weight", "memory.k.weight", "memory.v.weight", "memory.layer_logits")
    block = FeedbackBlock
    model_points = ("memory",)  # each token's merged memory vector, what later tokens' keys/values read
    shared_rope = True
    shared_memory = True

    def check(self, config: ModelConfig) -> str | None:
        if config.head_dim % 2:
            return f"RoPE needs an even head_dim, got {config.head_dim}"
        return None

    def shared_module(self, config: ModelConfig) -> FeedbackMemory:
        return FeedbackMemory(config)

    def forward(self, model, tokens, cache, hooks, last_only, causal, start):  # noqa: D102 - Family.forward
        return feedback_forward(model, tokens, cache, hooks, last_only, causal, start)

    def kv_layers(self, config: ModelConfig) -> int:
        return 1  # one memory key and value per token, whatever the depth

    def matmul_weights(self, config: ModelConfig) -> int:
        # Per layer: its query and output, and the shared key/value map on its own input (counted as a layer's
        # k and v); plus that map once more on the token's merged memory.
        return super().matmul_weights(config) + 2 * config.d_model * config.n_heads * config.head_dim

    def n_params(self, config: ModelConfig) -> int:
        c = config
        memory = 2 * c.d_model * c.n_heads * c.head_dim + c.n_layers + 1  # the shared key/value map, layer weights
        embed = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return c.n_layers * (2 * c.d_model * c.n_heads * c.head_dim + 3 * c.d_model * c.d_ff) + memory + embed


FEEDBACK = FeedbackFamily()
