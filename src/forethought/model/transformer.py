"""The decoder-only transformer: Llama family and GPT-2 in one readable module.

Each block reads `h = x + attention(norm(x)); out = h + mlp(norm(h))`. Every intermediate that a
user may want to see has a name (`blocks.{l}.resid_pre`, `...attn_out`, `...q`, ...); the forward
pass hands it to `hooks` only when that name was asked for, so a plain forward pays one set lookup
per point and nothing else.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from forethought.model import kernels
from forethought.model.config import ModelConfig
from forethought.model.kv_cache import KVCache

BLOCK_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "q", "k", "v", "attn_pattern")
GLOBAL_POINTS = ("embed", "final_norm", "logits")


class Hooks(Protocol):
    """What the forward pass calls at named points; see `forethought.trace` for the implementation."""

    points: frozenset[str]

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...


class Linear(nn.Module):
    """y = x W + b with W stored [in, out].

    Batch-1 products (a decode step) on the CPU go to `kernels.matvec`, which streams the [in, out]
    matrix row by row and is memory-bound at close to copy speed; everything else (prefill, GPU,
    autograd, small matrices, no compiler) goes to BLAS, which is the faster choice there.
    """

    # Below this many weights the call overhead dominates and BLAS is as good.
    KERNEL_MIN_WEIGHTS = 1 << 16

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(d_in, d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_t
        if (
            x.numel() == x.shape[-1]
            and w.device.type == "cpu"
            and w.dtype in _KERNEL_DTYPES
            and w.numel() >= self.KERNEL_MIN_WEIGHTS
            and not (x.requires_grad and torch.is_grad_enabled())
            and w.is_contiguous()
            and not torch.compiler.is_compiling()
        ):
            y = kernels.matvec(x, w, self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], y.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        if self.bias is None:
            y = torch.mm(flat, w)
        else:
            y = torch.addmm(self.bias, flat, w)
        return y.view(*x.shape[:-1], y.shape[-1])


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class Norm(nn.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2), computed in at least float32 (half types are upcast)."""

    def __init__(self, d: int, eps: float, layer_norm: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d), requires_grad=False) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.bias is None:
            # HF's order of operations (normalise, cast back, then scale), so float32 logits match exactly.
            y = F.rms_norm(x32, (x.shape[-1],), eps=self.eps)
            return self.weight * y.to(x.dtype)
        w, b = self.weight.to(x32.dtype), self.bias.to(x32.dtype)
        return F.layer_norm(x32, (x.shape[-1],), w, b, self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.index = index
        self.gpt2 = c.family == "gpt2"
        self.names = {p: f"blocks.{index}.{p}" for p in BLOCK_POINTS}
        self.attn_norm = Norm(c.d_model, c.norm_eps, self.gpt2)
        self.mlp_norm = Norm(c.d_model, c.norm_eps, self.gpt2)
        # Q, K and V share one matrix (and gate/up another) so a decode step makes fewer, larger reads.
        self.qkv = Linear(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias or self.gpt2)
        self.o = Linear(c.n_heads * c.head_dim, c.d_model, bias=self.gpt2)
        if self.gpt2:
            self.up = Linear(c.d_model, c.d_ff, bias=True)
        else:
            self.gate_up = Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.down = Linear(c.d_ff, c.d_model, bias=self.gpt2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        start: int,
        hooks: Hooks | None,
    ) -> torch.Tensor:
        names = self.names
        wanted = hooks.points if hooks is not None else ()
        if names["resid_pre"] in wanted:
            x = hooks(names["resid_pre"], x)
        attn = self.attention(self.attn_norm(x), rope, mask, cache, start, hooks)
        if names["attn_out"] in wanted:
            attn = hooks(names["attn_out"], attn)
        h = x + attn
        if names["resid_mid"] in wanted:
            h = hooks(names["resid_mid"], h)
        mlp = self.mlp(self.mlp_norm(h))
        if names["mlp_out"] in wanted:
            mlp = hooks(names["mlp_out"], mlp)
        out = h + mlp
        if names["resid_post"] in wanted:
            out = hooks(names["resid_post"], out)
        return out

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.gpt2:
            return self.down(F.gelu(self.up(x), approximate="tanh"))
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
        B, T, _ = x.shape
        n_q, n_kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v = self.qkv(x).split((n_q * hd, n_kv * hd, n_kv * hd), dim=-1)
        q = q.view(B, T, n_q, hd).transpose(1, 2)
        k = k.view(B, T, n_kv, hd).transpose(1, 2)
        v = v.view(B, T, n_kv, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if hooks is not None:
            # Exposed as [batch, position, head, head_dim], after RoPE: what attention really uses.
            q, k, v = (self._hook(hooks, point, t) for point, t in (("q", q), ("k", k), ("v", v)))
        if cache is not None:
            k, v = cache.write(self.index, start, k, v)
        S = k.shape[2]
        group = n_q // n_kv
        if hooks is not None and self.names["attn_pattern"] in hooks.points:
            pattern = self.explicit_pattern(q, k, mask, group)
            pattern = hooks(self.names["attn_pattern"], pattern)
            out = torch.matmul(pattern.view(B, n_kv, group * T, S), v).view(B, n_q, T, hd)
        else:
            # Grouped-query attention without copying K/V: the `group` query heads that share a KV head
            # are stacked along the query axis, and the [T, S] mask is tiled to match.
            qg = q.reshape(B, n_kv, group * T, hd)
            m = None if mask is None else mask.repeat(group, 1)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m).view(B, n_q, T, hd)
        out = out.transpose(1, 2).reshape(B, T, n_q * hd)
        return self.o(out)

    def _hook(self, hooks: Hooks, point: str, heads_first: torch.Tensor) -> torch.Tensor:
        name = self.names[point]
        if name not in hooks.points:
            return heads_first
        return hooks(name, heads_first.transpose(1, 2)).transpose(1, 2)

    @staticmethod
    def explicit_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, group: int) -> torch.Tensor:
        """Softmax attention weights [batch, head, query, key], for when a user asks to see them."""
        B, n_q, T, hd = q.shape
        n_kv, S = k.shape[1], k.shape[2]
        scores = torch.matmul(q.reshape(B, n_kv, group * T, hd), k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.view(B, n_q, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.d_model), requires_grad=False)
        self.pos_embed = (
            nn.Parameter(torch.empty(c.context_length, c.d_model), requires_grad=False) if c.family == "gpt2" else None
        )
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.final_norm = Norm(c.d_model, c.norm_eps, c.family == "gpt2")
        # Kept [d_model, vocab] even when tied to the embedding: the copy costs memory but makes the
        # largest matrix-vector product of a decode step read at the faster layout.
        self.unembed = Linear(c.d_model, c.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        """cos/sin of every position's rotation angles, in float32 (HF's rotate-half convention)."""
        c = self.config
        if c.family != "llama" or self.rope_cos.device.type == "meta":
            return
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        angles = torch.outer(torch.arange(c.context_length, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1).to(self.rope_cos.device)
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, capacity: int = 256, batch_size: int = 1) -> KVCache:
        return KVCache(self.config, batch_size, capacity, self.dtype, self.device)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        hooks: Hooks | None = None,
        last_only: bool = False,
        causal: bool = True,
    ) -> torch.Tensor:
        """Logits [batch, positions, vocab] for `tokens` [batch, positions].

        With a cache, `tokens` continue the cached sequence: their K/V are appended and attention
        sees every cached token. `last_only` skips the unembedding of all but the last position
        (prefill only needs that one). `causal=False` removes the mask: a control for experiments,
        never a way to generate.
        """
        c = self.config
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        end = start + T
        if end > c.context_length:
            raise ValueError(f"{end} tokens exceed the context length {c.context_length}")
        if cache is not None:
            cache.reserve(end)
        wanted = hooks.points if hooks is not None else ()

        x = F.embedding(tokens, self.embed)
        if self.pos_embed is not None:
            x = x + self.pos_embed[start:end]
        if "embed" in wanted:
            x = hooks("embed", x)
        rope = None
        if c.family == "llama":
            rope = (self.rope_cos[start:end].to(x.dtype), self.rope_sin[start:end].to(x.dtype))
        mask = None
        if causal and T > 1:
            # Query i sits at position start+i and may see keys 0..start+i.
            key_pos = torch.arange(end, device=tokens.device)
            query_pos = torch.arange(start, end, device=tokens.device)
            mask = key_pos[None, :] <= query_pos[:, None]

        for block in self.blocks:
            x = block(x, rope, mask, cache, start, hooks)
        if cache is not None:
            cache.length = end

        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if "final_norm" in wanted:
            x = hooks("final_norm", x)
        logits = self.unembed(x)
        if "logits" in wanted:
            logits = hooks("logits", logits)
        return logits
