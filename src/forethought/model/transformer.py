"""The decoder-only transformer: Llama family and GPT-2 in one readable module, Gemma 3 at its end, and the
architectures lab's Feedback Transformer and GRU stack as families of the same `Transformer` (model/feedback.py,
model/recurrent.py), so every one runs under the same trace API.

Each block reads `h = x + attention(norm(x)); out = h + mlp(norm(h))`. Every intermediate that a
user may want to see has a name (`blocks.{l}.resid_pre`, `...attn_out`, `...q`, ...); the forward
pass hands it to `hooks` only when that name was asked for, so a plain forward pays one set lookup
per point and nothing else.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from forethought.model import kernels
from forethought.model.config import ModelConfig
from forethought.model.kv_cache import KVCache, SlidingKVCache

BLOCK_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "q", "k", "v", "attn_pattern")
GLOBAL_POINTS = ("embed", "final_norm", "logits")
ROPE_FAMILIES = ("llama", "feedback")  # rotate-half RoPE from one table (Gemma builds its own per base)
OP_BY_OP_FAMILIES = ("gemma3", "feedback", "recurrent")  # families the compiled decode step does not run


class Hooks(Protocol):
    """What the forward pass calls at named points; see `forethought.trace` for the implementation."""

    points: frozenset[str]

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...


class Linear(nn.Module):
    """y = x W + b with W stored [in, out]; W may be int8 with scales (see `quantize_int8_`).

    Batch-1 products (a decode step) on the CPU go to `kernels.matvec`, which streams the [in, out]
    matrix row by row and is memory-bound at close to copy speed; everything else (prefill, GPU,
    autograd, small matrices, no compiler) goes to BLAS, which is the faster choice there.
    """

    # Below this many weights the call overhead dominates and BLAS is as good.
    KERNEL_MIN_WEIGHTS = 1 << 16
    # Inputs that share one int8 scale, per output: llama.cpp's Q8_0 block.
    INT8_GROUP = 32

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(d_in, d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None
        self.scale: nn.Parameter | None = None  # int8 only: float16 [in / 32, out]

    @property
    def quantized(self) -> bool:
        return self.weight_t.dtype == torch.int8

    @property
    def d_in(self) -> int:
        return self.scale.shape[0] * self.INT8_GROUP if self.quantized else self.weight_t.shape[0]

    @property
    def d_out(self) -> int:
        return self.scale.shape[1] if self.quantized else self.weight_t.shape[1]

    def quantize_int8_(self) -> None:
        """Store W as int8, one float16 scale per 32 consecutive inputs of each output (absmax / 127,
        round to nearest: Q8_0's rule), packed in the order the batch-1 kernel reads (`pack_int8`).
        A decode step then streams ~1.06 bytes per weight instead of 4. The kernel rounds its input
        to int16 per group of 32 (llama.cpp's Q8_0 rounds it to int8); the effect on the logits is
        measured in tests/test_int8.py."""
        if self.quantized:
            return
        d_in, d_out = self.weight_t.shape
        g = self.INT8_GROUP
        if d_in % g:
            raise ValueError(f"int8 weights need the input size to be a multiple of {g}, got {d_in}")
        w = self.weight_t.detach().float().view(d_in // g, g, d_out)
        scale = (w.abs().amax(dim=1) / 127).half()
        safe = torch.where(scale == 0, 1.0, scale.float())  # an all-zero group stays zero
        q = torch.round(w / safe[:, None, :]).clamp_(-127, 127).to(torch.int8).view(d_in, d_out)
        self.weight_t = nn.Parameter(pack_int8(q), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W [in, out] as `dtype`; for int8 storage, the float matrix its scales stand for."""
        if not self.quantized:
            return self.weight_t.to(dtype)
        d_out = self.scale.shape[1]
        q = unpack_int8(self.weight_t, d_out).to(dtype)
        groups = q.view(-1, self.INT8_GROUP, d_out)
        return (groups * self.scale.to(dtype)[:, None, :]).view(-1, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_t
        if (
            x.numel() == x.shape[-1]
            and w.device.type == "cpu"
            and w.dtype in _KERNEL_DTYPES
            and w.numel() >= self.KERNEL_MIN_WEIGHTS
            and not (x.requires_grad and torch.is_grad_enabled())
            and w.is_contiguous()
            and (self.scale is None or self.scale.dtype == torch.float16)
            and not torch.compiler.is_compiling()
        ):
            y = kernels.matvec(x, w, self.bias, self.scale)
            if y is not None:
                return y.view(*x.shape[:-1], y.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        if self.quantized:
            # Many tokens at once (prefill): dequantizing one matrix at a time costs a few ms per
            # forward and keeps the float copy only for the duration of this product.
            w = self.dequantized(flat.dtype)
        if self.bias is None:
            y = torch.mm(flat, w)
        else:
            y = torch.addmm(self.bias, flat, w)
        return y.view(*x.shape[:-1], y.shape[-1])


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [in, out] -> [in / 32, ceil(out / 16), 16, 32]: block [g, s] holds inputs 32g.. 32g+31 of
    outputs 16s.. 16s+15 as 16 input pairs, each pair's two weights side by side per output (zero-padded)."""
    d_in, d_out = q.shape
    strips = -(-d_out // 16)
    padded = torch.zeros(d_in, strips * 16, dtype=torch.int8, device=q.device)
    padded[:, :d_out] = q
    # [g, p, r, s, c] -> [g, s, p, c, r]
    blocks = padded.view(d_in // 32, 16, 2, strips, 16).permute(0, 3, 1, 4, 2)
    return blocks.reshape(d_in // 32, strips, 16, 32).contiguous()


def unpack_int8(packed: torch.Tensor, d_out: int) -> torch.Tensor:
    """The inverse of pack_int8: int8 [in, out]."""
    groups, strips = packed.shape[:2]
    q = packed.view(groups, strips, 16, 16, 2).permute(0, 2, 4, 1, 3)
    return q.reshape(groups * 32, strips * 16)[:, :d_out]


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


class _LastState:
    """Hooks that keep one activation (the last block's output) and change nothing."""

    def __init__(self, name: str) -> None:
        self.points = frozenset((name,))
        self.state: torch.Tensor | None = None

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.state = tensor
        return tensor


def _block_class(family: str) -> type[nn.Module]:
    if family == "gemma3":
        return GemmaBlock
    if family == "feedback":
        from forethought.model.feedback import FeedbackBlock

        return FeedbackBlock
    if family == "recurrent":
        from forethought.model.recurrent import RecurrentBlock

        return RecurrentBlock
    return Block


# Each model's compiled decode step with the weight addresses it was built for. Kept beside the module,
# not in it, so that copy.deepcopy / pickling a model never meets the (unpicklable) C++ object.
_DECODE_STEPS: weakref.WeakKeyDictionary[Transformer, tuple] = weakref.WeakKeyDictionary()


class Transformer(nn.Module):
    # A batch-1 decode step of a float32 Llama-family model on the CPU (or a few tokens at once, as
    # speculative decoding verifies them), with no hook asking to see inside, runs as one compiled call
    # (kernels.DecodeStep): same numbers up to float rounding, 1.5x faster here (benchmarks/RESULTS.md).
    # Set False on an instance to force the op-by-op path (e.g. for nn.Module hooks, which the compiled
    # step does not call).
    fused_decode = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.d_model), requires_grad=False)
        self.pos_embed = (
            nn.Parameter(torch.empty(c.context_length, c.d_model), requires_grad=False) if c.family == "gpt2" else None
        )
        self.blocks = nn.ModuleList(_block_class(c.family)(c, i) for i in range(c.n_layers))
        self.memory = None
        if c.family == "feedback":
            from forethought.model.feedback import FeedbackMemory

            self.memory = FeedbackMemory(c)
        self.final_norm = Norm(c.d_model, c.norm_eps, c.family == "gpt2")
        # Kept [d_model, vocab] even when tied to the embedding: the copy costs memory but makes the
        # largest matrix-vector product of a decode step read at the faster layout.
        self.unembed = Linear(c.d_model, c.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self, positions: int = 256) -> None:
        """cos/sin of the rotation angles of the first `positions` positions (at most the context), in float32
        (HF's rotate-half convention). `forward` grows the table as sequences get longer: sizing it by the
        declared context would let one edited header field (a context of 1e9) allocate tens of gigabytes."""
        c = self.config
        if c.family not in ROPE_FAMILIES or self.rope_cos.device.type == "meta":
            return
        positions = max(1, min(positions, c.context_length))
        # Plain tensors even when first needed inside inference_mode, so autograd may use them later.
        with torch.inference_mode(False), torch.no_grad():
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
            angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
            angles = torch.cat((angles, angles), dim=-1).to(self.rope_cos.device)
            self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, capacity: int = 256, batch_size: int = 1) -> KVCache:
        if self.config.family == "recurrent":
            from forethought.model.recurrent import RecurrentCache

            return RecurrentCache(self.config, batch_size, capacity, self.dtype, self.device)
        if self.config.sliding_layers:
            # Local layers keep a bounded ring; a few spare slots let callers rewind rejected tokens.
            return SlidingKVCache(self.config, batch_size, capacity, self.dtype, self.device, rewind=GEMMA_REWIND)
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
        if c.family in ROPE_FAMILIES and end > self.rope_cos.shape[0]:
            self.init_rope(max(end, 2 * self.rope_cos.shape[0]))  # doubling: O(log n) rebuilds
        wanted = hooks.points if hooks is not None else ()
        if T <= kernels.MAX_TOKENS and B == 1 and cache is not None and not wanted and self.fused_decode:
            # A decode step, or the verification of a few drafted tokens (forethought.model.speculative):
            # one compiled call that reads the weights once for all T tokens.
            step = self._decode_step(cache)
            if step is not None:
                logits, _ = step.forward_many(tokens[0].cpu(), start, cache.k, cache.v)
                cache.length = end
                return (logits[-1:] if last_only else logits).unsqueeze(0)
        if c.family == "gemma3":
            return gemma_forward(self, tokens, cache, hooks, last_only, causal, start)
        if c.family == "feedback":
            from forethought.model.feedback import feedback_forward

            return feedback_forward(self, tokens, cache, hooks, last_only, causal, start)
        if c.family == "recurrent":
            from forethought.model.recurrent import recurrent_forward

            return recurrent_forward(self, tokens, cache, hooks, last_only, causal, start)

        x = F.embedding(tokens, self.embed)
        if self.pos_embed is not None:
            x = x + self.pos_embed[start:end]
        if "embed" in wanted:
            x = hooks("embed", x)
        rope = None
        if c.family == "llama" and c.use_rope:
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
        return self._head(x, hooks, last_only)

    def _head(self, x: torch.Tensor, hooks: Hooks | None, last_only: bool) -> torch.Tensor:
        """Final norm + unembedding (+ Gemma's soft-cap) of the last block's output, with their hook points."""
        wanted = hooks.points if hooks is not None else ()
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if "final_norm" in wanted:
            x = hooks("final_norm", x)
        logits = softcap(self.unembed(x), self.config.final_logit_softcap)
        if "logits" in wanted:
            logits = hooks("logits", logits)
        return logits

    def forward_with_state(
        self, ids: list[int], cache: KVCache, last_only: bool = False, with_state: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [T, vocab] (float32) of `ids` continuing `cache`, and the last block's output (the residual
        before the final norm) [T, d_model], or None without `with_state`: what a drafter reads.

        A few tokens go through the compiled step when it applies (it returns the state for free); else
        the op-by-op forward, with a hook on the last block when the state is wanted.
        """
        tokens = torch.tensor([ids], device=self.device)
        T = len(ids)
        step = None
        if T <= kernels.MAX_TOKENS and self.fused_decode:
            cache.reserve(cache.length + T)
            step = self._decode_step(cache)
        if step is not None:
            logits, states = step.forward_many(tokens[0].cpu(), cache.length, cache.k, cache.v)
            cache.length += T
        else:
            last = _LastState(self.blocks[-1].names["resid_post"]) if with_state else None
            logits = self(tokens, cache=cache, hooks=last, last_only=last_only)[0].float()
            states = last.state[0] if last is not None else None
        if last_only:
            logits = logits[-1:]
            states = None if states is None else states[-1:]
        return logits, (states if with_state else None)

    def lens_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The logit lens: this model's final norm + unembedding applied to residual states [..., d_model].

        Runs in the model's dtype on its device and returns float32 logits there; the one place experiments,
        probes and the viewer decode a hidden state into next-token logits.
        """
        first = self.final_norm.weight
        logits = self.unembed(self.final_norm(states.to(device=first.device, dtype=first.dtype))).float()
        return softcap(logits, self.config.final_logit_softcap)

    def announce_decode_path(self) -> None:
        """Say once on stderr when decoding cannot use the compiled step, so that a caller about to stream text
        can have it said first, on its own line, rather than in the middle of the text."""
        family = self.config.family
        if family in OP_BY_OP_FAMILIES:
            _say_once(f"the compiled decode step covers Llama-family models only; {family} decodes op by op")

    def _decode_step(self, cache: KVCache):
        """The compiled step for the current weights, or None where it does not apply."""
        c = self.config
        if c.family in OP_BY_OP_FAMILIES:
            self.announce_decode_path()
            return None
        if (
            c.family != "llama"
            or not c.use_rope  # the compiled step always rotates
            or self.device.type != "cpu"
            or self.dtype != torch.float32
            or cache.k.dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            return None
        model_weights, layer_weights = self._decode_step_weights()
        tensors = [t for named in (model_weights, *layer_weights) for t in named.values()]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return None  # someone is training: autograd must see every op
        # Rebuilt whenever a weight tensor is replaced (load, .to(), quantize_int8_); in-place edits
        # need nothing, since the step reads the tensors' memory directly.
        key = tuple(0 if t is None else t.data_ptr() for t in tensors)
        built = _DECODE_STEPS.get(self)
        if built is None or built[0] != key:
            try:
                step = kernels.decode_step(
                    model_weights, layer_weights, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
                )
                if step is None:
                    kernels.announce_fallback(kernels.status())
            except RuntimeError as exc:  # weights it does not take (e.g. non-contiguous after surgery): op by op
                step = None
                kernels.announce_fallback(str(exc).splitlines()[0])
            built = (key, step)
            _DECODE_STEPS[self] = built
        return built[1]

    def quantize_int8_(self) -> Transformer:
        """Every weight matrix to int8 with Q8_0-style scales (embedding, norms and cache stay float)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.quantize_int8_()
        _DECODE_STEPS.pop(self, None)
        return self

    def _decode_step_weights(self) -> tuple[dict[str, torch.Tensor | None], list[dict[str, torch.Tensor | None]]]:
        """The weights DecodeStep reads, by the names its constructor documents (None = absent)."""

        def linear(prefix: str, lin: Linear) -> dict[str, torch.Tensor | None]:
            fields = (lin.weight_t, lin.scale, lin.bias)
            return {f"{prefix}.{name}": t for name, t in zip(kernels.LINEAR_FIELDS, fields, strict=True)}

        model_weights = {
            "embed": self.embed,
            "final_norm": self.final_norm.weight,
            **linear("unembed", self.unembed),
            "rope_cos": self.rope_cos,
            "rope_sin": self.rope_sin,
        }
        layer_weights = [
            {
                "attn_norm": b.attn_norm.weight,
                **linear("qkv", b.qkv),
                **linear("o", b.o),
                "mlp_norm": b.mlp_norm.weight,
                **linear("gate_up", b.gate_up),
                **linear("down", b.down),
            }
            for b in self.blocks
        ]
        return model_weights, layer_weights


# Gemma 3 ----------------------------------------------------------------------------------------------

# Tokens a Gemma cache can rewind (SlidingKVCache.truncate): spare ring slots beyond the window.
GEMMA_REWIND = 16
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(f"forethought: {message}", file=sys.stderr)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2 style); the identity when cap is 0."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def rope_tables(theta: float, head_dim: int, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [end - start, head_dim] for positions start..end-1, float32, rotate-half convention.

    Computed per call rather than stored: a Gemma context of 32k positions would need 128 MB of tables
    for its two bases, and the outer product of a few positions costs microseconds."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(start, end, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class GemmaBlock(nn.Module):
    """A Gemma 3 block: `h = x + norm(attention(norm(x))); out = h + norm(mlp(norm(h)))`.

    Differences from the Llama block: a norm after attention and after the MLP as well as before;
    RMSNorm on each head's query and key before RoPE; GeGLU (tanh GELU) instead of SwiGLU; sliding-
    window (local) layers that see only the last `sliding_window` positions and use their own RoPE
    base. Norm gains are stored as the multiplier (GGUF convention; HF stores gain - 1). The named
    points mean the same as in Block: `attn_out`/`mlp_out` are what is added to the residual stream.
    """

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.index = index
        self.local = index in c.sliding_layers
        self.theta = c.rope_local_theta if self.local else c.rope_theta
        self.scale = c.query_scale or c.head_dim**-0.5
        self.names = {p: f"blocks.{index}.{p}" for p in BLOCK_POINTS}
        self.attn_norm = Norm(c.d_model, c.norm_eps, False)
        self.post_attn_norm = Norm(c.d_model, c.norm_eps, False)
        self.mlp_norm = Norm(c.d_model, c.norm_eps, False)
        self.post_mlp_norm = Norm(c.d_model, c.norm_eps, False)
        self.q_norm = Norm(c.head_dim, c.norm_eps, False)
        self.k_norm = Norm(c.head_dim, c.norm_eps, False)
        self.qkv = Linear(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.o = Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.gate_up = Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.down = Linear(c.d_ff, c.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        ropes: dict[float, tuple[torch.Tensor, torch.Tensor]],
        causal: bool,
        cache: KVCache | None,
        start: int,
        hooks: Hooks | None,
    ) -> torch.Tensor:
        names = self.names
        wanted = hooks.points if hooks is not None else ()
        if names["resid_pre"] in wanted:
            x = hooks(names["resid_pre"], x)
        attn = self.post_attn_norm(self.attention(self.attn_norm(x), ropes[self.theta], causal, cache, start, hooks))
        if names["attn_out"] in wanted:
            attn = hooks(names["attn_out"], attn)
        h = x + attn
        if names["resid_mid"] in wanted:
            h = hooks(names["resid_mid"], h)
        mlp = self.post_mlp_norm(self.mlp(self.mlp_norm(h)))
        if names["mlp_out"] in wanted:
            mlp = hooks(names["mlp_out"], mlp)
        out = h + mlp
        if names["resid_post"] in wanted:
            out = hooks(names["resid_post"], out)
        return out

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)

    def attention(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        causal: bool,
        cache: KVCache | None,
        start: int,
        hooks: Hooks | None,
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        n_q, n_kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v = self.qkv(x).split((n_q * hd, n_kv * hd, n_kv * hd), dim=-1)
        q = self.q_norm(q.view(B, T, n_q, hd)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, n_kv, hd)).transpose(1, 2)
        v = v.view(B, T, n_kv, hd).transpose(1, 2)
        cos, sin = (t.to(x.dtype) for t in rope)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if hooks is not None:
            q, k, v = (Block._hook(self, hooks, point, t) for point, t in (("q", q), ("k", k), ("v", v)))
        device = x.device
        if isinstance(cache, SlidingKVCache) and self.local:
            k, v, key_pos = cache.write_window(self.index, start, k, v)
        else:
            if cache is not None:
                k, v = cache.write(self.index, start, k, v)
            key_pos = torch.arange(k.shape[2], device=device)
        mask = self.mask(torch.arange(start, start + T, device=device), key_pos, causal)
        S = k.shape[2]
        group = n_q // n_kv
        qg = q.reshape(B, n_kv, group * T, hd)
        if hooks is not None and self.names["attn_pattern"] in hooks.points:
            # Key axis in cache order: position order except on a local layer's ring.
            scores = (torch.matmul(qg, k.transpose(-1, -2)) * self.scale).view(B, n_q, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            pattern = hooks(self.names["attn_pattern"], torch.softmax(scores.float(), dim=-1).to(q.dtype))
            out = torch.matmul(pattern.view(B, n_kv, group * T, S), v).view(B, n_q, T, hd)
        else:
            m = None if mask is None else mask.repeat(group, 1)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=self.scale).view(B, n_q, T, hd)
        return self.o(out.transpose(1, 2).reshape(B, T, n_q * hd))

    def mask(self, query_pos: torch.Tensor, key_pos: torch.Tensor, causal: bool) -> torch.Tensor | None:
        """Which keys each query may read [T, S], or None when it may read them all."""
        allowed = (key_pos >= 0)[None, :].expand(len(query_pos), -1)
        if causal:
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
            if self.local:
                allowed = allowed & (query_pos[:, None] - key_pos[None, :] < self.config.sliding_window)
        return None if bool(allowed.all()) else allowed


def gemma_forward(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache | None,
    hooks: Hooks | None,
    last_only: bool,
    causal: bool,
    start: int,
) -> torch.Tensor:
    """Transformer.forward for Gemma 3: embedding scaled by sqrt(d_model), two RoPE bases, optional
    final logit soft-capping; the rest as for Llama."""
    c = model.config
    end = start + tokens.shape[1]
    wanted = hooks.points if hooks is not None else ()
    x = F.embedding(tokens, model.embed)
    # HF and llama.cpp both multiply by sqrt(d_model) rounded to the activation dtype.
    x = x * torch.tensor(math.sqrt(c.d_model), dtype=x.dtype)
    if "embed" in wanted:
        x = hooks("embed", x)
    ropes = {theta: rope_tables(theta, c.head_dim, start, end, x.device) for theta in {b.theta for b in model.blocks}}
    for block in model.blocks:
        x = block(x, ropes, causal, cache, start, hooks)
    if cache is not None:
        cache.length = end
    return model._head(x, hooks, last_only)
