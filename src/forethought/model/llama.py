"""The Llama family (Llama, SmolLM, Mistral-style and Qwen2: RMSNorm, RoPE, grouped-query attention, SwiGLU,
optional q/k/v bias): the block every other attention family builds on.

Each block reads `h = x + attention(norm(x)); out = h + mlp(norm(h))`, handing its named points
(`blocks.{l}.resid_pre`, `...attn_out`, `...q`, ...) to the hooks that asked for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forethought.model.config import ModelConfig
from forethought.model.family import Family
from forethought.model.kv_cache import KVCache
from forethought.model.layers import BLOCK_POINTS, Hooks, Linear, Norm, apply_rope, attend, hook_heads, split_qkv


class Block(nn.Module):
    """The Llama block. Subclasses change a part, not the whole: GPT-2 (LayerNorm, biases, a GELU MLP), Gemma 3
    (norms after attention and the MLP too, its own attention), the Feedback Transformer (keys and values from
    a shared memory)."""

    layer_norm = False  # LayerNorm with bias instead of RMSNorm
    bias = False  # a bias on every projection

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.index = index
        self.names = {p: f"blocks.{index}.{p}" for p in BLOCK_POINTS}
        self.attn_norm = Norm(c.d_model, c.norm_eps, self.layer_norm)
        self.mlp_norm = Norm(c.d_model, c.norm_eps, self.layer_norm)
        # Q, K and V share one matrix (and gate/up another) so a decode step makes fewer, larger reads.
        self.qkv = Linear(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias or self.bias)
        self.o = Linear(c.n_heads * c.head_dim, c.d_model, bias=self.bias)
        self.make_mlp(c)
        # Gemma 3 also norms what attention and the MLP add to the residual stream (see GemmaBlock).
        self.post_attn_norm: Norm | None = None
        self.post_mlp_norm: Norm | None = None

    def make_mlp(self, c: ModelConfig) -> None:
        self.gate_up = Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.down = Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope, mask, cache, start: int, hooks: Hooks | None) -> torch.Tensor:
        """`rope`, `mask` and `cache` are what this block's `attention` reads (for Llama: the rotation tables,
        the [query, key] mask and the KV cache; a subclass's attention may take its own)."""
        names = self.names
        wanted = hooks.points if hooks is not None else ()
        if names["resid_pre"] in wanted:
            x = hooks(names["resid_pre"], x)
        attn = self.attention(self.attn_norm(x), rope, mask, cache, start, hooks)
        if self.post_attn_norm is not None:
            attn = self.post_attn_norm(attn)
        if names["attn_out"] in wanted:
            attn = hooks(names["attn_out"], attn)
        h = x + attn
        if names["resid_mid"] in wanted:
            h = hooks(names["resid_mid"], h)
        mlp = self.mlp(self.mlp_norm(h))
        if self.post_mlp_norm is not None:
            mlp = self.post_mlp_norm(mlp)
        if names["mlp_out"] in wanted:
            mlp = hooks(names["mlp_out"], mlp)
        out = h + mlp
        if names["resid_post"] in wanted:
            out = hooks(names["resid_post"], out)
        return out

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def attention(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        start: int,
        hooks: Hooks | None,
    ) -> torch.Tensor:
        c = self.config
        q, k, v = split_qkv(self.qkv(x), c.n_heads, c.n_kv_heads, c.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if hooks is not None:
            q, k, v = self.hook_qkv(hooks, q, k, v)
        if cache is not None:
            k, v = cache.write(self.index, start, k, v)
        return self.o(attend(q, k, v, mask, hooks, self.names["attn_pattern"]))

    def hook_qkv(self, hooks: Hooks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        names = self.names
        return hook_heads(hooks, names["q"], q), hook_heads(hooks, names["k"], k), hook_heads(hooks, names["v"], v)


def decoder_forward(
    model,
    tokens: torch.Tensor,
    cache: KVCache | None,
    hooks: Hooks | None,
    last_only: bool,
    causal: bool,
    start: int,
    tree: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Transformer.forward for Llama and GPT-2: embed (+ learned positions), every block with one causal mask
    and one slice of the RoPE table, then the final norm and unembedding. `tree` = (positions [T] or [B, T],
    visible [T, start + T] or [B, T, start + T]) gives each token its own position and the cache slots it reads
    (Transformer.forward_tree)."""
    B, T = tokens.shape
    end = start + T
    wanted = hooks.points if hooks is not None else ()
    x = F.embedding(tokens, model.embed)
    if model.pos_embed is not None:
        x = x + (model.pos_embed[start:end] if tree is None else model.pos_embed[tree[0]])
    if "embed" in wanted:
        x = hooks("embed", x)
    if tree is not None:
        rope = model.rope_at(tree[0], x.dtype)
        for block in model.blocks:
            x = block(x, rope, tree[1], cache, start, hooks)
        return model.finish(x, cache, end, hooks, last_only)
    rope = model.rope(start, end, x.dtype)
    mask = None
    if causal and T > 1:
        # Query i sits at position start+i and may see keys 0..start+i.
        key_pos = torch.arange(end, device=tokens.device)
        query_pos = torch.arange(start, end, device=tokens.device)
        mask = key_pos[None, :] <= query_pos[:, None]

    for block in model.blocks:
        x = block(x, rope, mask, cache, start, hooks)
    return model.finish(x, cache, end, hooks, last_only)


class LlamaFamily(Family):
    name = "llama"
    lab_block_tensors = tuple(
        f"{p}.weight" for p in ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down")
    )
    block = Block
    shared_rope = True
    compiled_decode = True
    tree_attention = True
    hf_model_type = "llama"

    def check(self, config: ModelConfig) -> str | None:
        if config.head_dim % 2:
            return f"RoPE needs an even head_dim, got {config.head_dim}"
        return None

    def forward(self, model, tokens, cache, hooks, last_only, causal, start):  # noqa: D102 - Family.forward
        return decoder_forward(model, tokens, cache, hooks, last_only, causal, start)

    def forward_tree(self, model, tokens, cache, positions, visible, hooks, last_only):  # noqa: D102 - Family's
        return decoder_forward(model, tokens, cache, hooks, last_only, True, cache.length, (positions, visible))


LLAMA = LlamaFamily()
