"""Gemma 3: the Llama block with a norm after attention and after the MLP as well as before, RMSNorm on each
head's query and key before RoPE, GeGLU (tanh GELU) instead of SwiGLU, and sliding-window (local) layers that see
only the last `sliding_window` positions and rotate with their own RoPE base. Its cache keeps a bounded ring for
the local layers (`SlidingKVCache`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from forethought.model.config import ModelConfig
from forethought.model.family import Family
from forethought.model.kv_cache import KVCache, SlidingKVCache
from forethought.model.layers import Hooks, Norm, apply_rope, attend, rope_at, rope_tables, split_qkv
from forethought.model.llama import Block

# Tokens a Gemma cache can rewind (SlidingKVCache.truncate): spare ring slots beyond the window.
GEMMA_REWIND = 16


class GemmaBlock(Block):
    """A Gemma 3 block: `h = x + norm(attention(norm(x))); out = h + norm(mlp(norm(h)))`.

    Norm gains are stored as the multiplier (GGUF convention; HF stores gain - 1). The named points mean the
    same as in Block: `attn_out`/`mlp_out` are what is added to the residual stream (after the post-norms).
    `forward` is Block's, called with (RoPE tables by base, causal) where Block takes (rope, mask); under tree
    attention `causal` is the tree's [query, slot] visibility instead (see `attention`).
    """

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        c = config
        self.local = index in c.sliding_layers
        self.theta = c.rope_local_theta if self.local else c.rope_theta
        self.scale = c.query_scale or c.head_dim**-0.5
        self.post_attn_norm = Norm(c.d_model, c.norm_eps, False)
        self.post_mlp_norm = Norm(c.d_model, c.norm_eps, False)
        self.q_norm = Norm(c.head_dim, c.norm_eps, False)
        self.k_norm = Norm(c.head_dim, c.norm_eps, False)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)

    def attention(
        self,
        x: torch.Tensor,
        ropes: dict[float, tuple[torch.Tensor, torch.Tensor]],
        causal: bool | torch.Tensor,
        cache: KVCache | None,
        start: int,
        hooks: Hooks | None,
    ) -> torch.Tensor:
        c = self.config
        T = x.shape[1]
        q, k, v = split_qkv(self.qkv(x), c.n_heads, c.n_kv_heads, c.head_dim, self.q_norm, self.k_norm)
        rope = tuple(t.to(x.dtype) for t in ropes[self.theta])
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if hooks is not None:
            q, k, v = self.hook_qkv(hooks, q, k, v)
        if isinstance(causal, torch.Tensor):
            # Tree attention: `causal` says which slots each query reads. forward_tree reads at most `window`
            # slots, and a token's position never runs ahead of its slot, so no visible key is out of a local
            # layer's window: the visibility is the whole mask.
            k, v = cache.write_slots(self.index, start, k, v)
            return self.o(attend(q, k, v, causal, hooks, self.names["attn_pattern"], self.scale))
        device = x.device
        if isinstance(cache, SlidingKVCache) and self.local:
            k, v, key_pos = cache.write_window(self.index, start, k, v)
        else:
            if cache is not None:
                k, v = cache.write(self.index, start, k, v)
            key_pos = torch.arange(k.shape[2], device=device)
        mask = self.mask(torch.arange(start, start + T, device=device), key_pos, causal)
        # Key axis of a hooked pattern in cache order: position order except on a local layer's ring.
        return self.o(attend(q, k, v, mask, hooks, self.names["attn_pattern"], self.scale))

    def mask(self, query_pos: torch.Tensor, key_pos: torch.Tensor, causal: bool) -> torch.Tensor | None:
        """Which keys each query may read [T, S], or None when it may read them all."""
        allowed = (key_pos >= 0)[None, :].expand(len(query_pos), -1)
        if causal:
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
            if self.local:
                allowed = allowed & (query_pos[:, None] - key_pos[None, :] < self.config.sliding_window)
        return None if bool(allowed.all()) else allowed


def gemma_forward(
    model,
    tokens: torch.Tensor,
    cache: KVCache | None,
    hooks: Hooks | None,
    last_only: bool,
    causal: bool,
    start: int,
    tree: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Transformer.forward for Gemma 3: embedding scaled by sqrt(d_model), two RoPE bases, optional
    final logit soft-capping; the rest as for Llama. `tree` = (positions, visible) as in Llama's
    decoder_forward (Transformer.forward_tree)."""
    c = model.config
    end = start + tokens.shape[1]
    wanted = hooks.points if hooks is not None else ()
    x = F.embedding(tokens, model.embed)
    # HF and llama.cpp both multiply by sqrt(d_model) rounded to the activation dtype.
    x = x * torch.tensor(math.sqrt(c.d_model), dtype=x.dtype)
    if "embed" in wanted:
        x = hooks("embed", x)
    # Computed per call rather than stored: a Gemma context of 32k positions would need 128 MB of tables for
    # its two bases, and the outer product of a few positions costs microseconds.
    thetas = {b.theta for b in model.blocks}
    if tree is None:
        ropes = {theta: rope_tables(theta, c.head_dim, start, end, x.device) for theta in thetas}
    else:
        ropes = {theta: rope_at(theta, c.head_dim, tree[0]) for theta in thetas}
    for block in model.blocks:
        x = block(x, ropes, causal if tree is None else tree[1], cache, start, hooks)
    return model.finish(x, cache, end, hooks, last_only)


class Gemma3Family(Family):
    name = "gemma3"
    residual_fits_float16 = False  # the residual reaches ~1e5 on Gemma 3 270M (float16 ends at 65,504)
    block = GemmaBlock

    tree_attention = True

    def forward(self, model, tokens, cache, hooks, last_only, causal, start):  # noqa: D102 - Family.forward
        return gemma_forward(model, tokens, cache, hooks, last_only, causal, start)

    def forward_tree(self, model, tokens, cache, positions, visible, hooks, last_only):  # noqa: D102 - Family's
        return gemma_forward(model, tokens, cache, hooks, last_only, True, cache.length, (positions, visible))

    def tree_slots(self, config: ModelConfig) -> int | None:
        """A local layer's window: within it the slot visibility alone is exact (see GemmaBlock.attention);
        beyond it a ring would wrap under the tree's slots."""
        return config.sliding_window if config.sliding_layers else None

    def new_cache(self, config, batch_size, capacity, dtype, device, minimal=False):  # noqa: D102 - Family's
        if not config.sliding_layers:
            return KVCache(config, batch_size, capacity, dtype, device, exact=minimal)
        # Local layers keep a bounded ring; a few spare slots let callers rewind rejected tokens (none when
        # minimal: the bytes are then exactly what a query can read).
        rewind = 0 if minimal else GEMMA_REWIND
        return SlidingKVCache(config, batch_size, capacity, dtype, device, rewind=rewind)


GEMMA3 = Gemma3Family()
