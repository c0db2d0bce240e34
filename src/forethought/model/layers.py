"""The layers every family is built from: linear maps, norms, RoPE, the attention core, and the named points
that hooks see.

A family module (model/llama.py, gemma3.py, feedback.py, recurrent.py, gpt2.py) assembles a block from these;
nothing here knows which family it serves.

Every intermediate that a user may want to see has a name (`blocks.{l}.resid_pre`, `...attn_out`, `...q`, ...);
a forward pass hands it to `hooks` only when that name was asked for, so a plain forward pays one set lookup
per point and nothing else.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from forethought.model import kernels

BLOCK_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "q", "k", "v", "attn_pattern")
GLOBAL_POINTS = ("embed", "final_norm", "logits")


def act_name(layer: int, point: str) -> str:
    """(3, 'resid_post') -> 'blocks.3.resid_post': the one place a block activation's name is spelled."""
    if point not in BLOCK_POINTS:
        raise ValueError(f"unknown block point {point!r} (one of {', '.join(BLOCK_POINTS)})")
    return f"blocks.{layer}.{point}"


class Hooks(Protocol):
    """What the forward pass calls at named points; see `forethought.trace` for the implementation."""

    points: frozenset[str]

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...


class Linear(nn.Module):
    """y = x W + b with W stored [in, out]; W may be int8 with scales (see `quantize_int8_`).

    Batch-1 products (a decode step) on the CPU go to `kernels.matvec`, which streams the [in, out]
    matrix row by row and is memory-bound at close to copy speed, and so do int8 products of up to
    `kernels.MAX_TOKENS` rows; float32 products of several rows (prefill) go to oneDNN's GEMM, everything
    else (GPU, autograd, bfloat16, small matrices, no compiler) to torch's BLAS.
    """

    # Below this many weights the call overhead dominates and BLAS is as good.
    KERNEL_MIN_WEIGHTS = 1 << 16
    # int8 weights are packed in blocks of 32 inputs (`pack_int8`); one float16 scale per output serves
    # the first of these many inputs that divides the matrix's input size. 128 stores 8.125 bits a weight
    # against Q8_0's 8.5 (a scale per 32): 4.4% fewer bytes for a decode step to stream, and the logits
    # stay closer to float32's than llama.cpp's Q8_0 products (`python -m benchmarks.int8_precision`).
    INT8_GROUP = 32
    INT8_SCALE_GROUPS = (128, 64, 32)

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(d_in, d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None
        self.scale: nn.Parameter | None = None  # int8 only: float16 [in / scale_group, out]

    @property
    def quantized(self) -> bool:
        return self.weight_t.dtype == torch.uint8  # packed int8 (pack_int8)

    @property
    def d_in(self) -> int:
        if self.quantized:
            return int8_input_groups(self.weight_t, self.d_out) * self.INT8_GROUP
        return self.weight_t.shape[0]

    @property
    def d_out(self) -> int:
        return self.scale.shape[1] if self.quantized else self.weight_t.shape[1]

    @property
    def scale_group(self) -> int:
        """Consecutive inputs that share one int8 scale per output (int8 weights only)."""
        return self.d_in // self.scale.shape[0]

    def quantize_int8_(self) -> None:
        """Store W as int8, one float16 scale per `INT8_SCALE_GROUPS` consecutive inputs of each output
        (absmax / 127, round to nearest: Q8_0's rule over a longer run), packed in the order the batch-1
        kernel reads (`pack_int8`). A decode step then streams ~1.02 bytes per weight instead of 4. The
        kernel rounds its input to 15 bits per group of 32 (llama.cpp's Q8_0 products round it to 8); the
        effect on the logits is measured in tests/test_int8.py and `benchmarks.int8_precision`."""
        if self.quantized:
            return
        d_in, d_out = self.weight_t.shape
        if d_in % self.INT8_GROUP:
            raise ValueError(f"int8 weights need the input size to be a multiple of {self.INT8_GROUP}, got {d_in}")
        g = next(n for n in self.INT8_SCALE_GROUPS if d_in % n == 0)
        w = self.weight_t.detach().view(d_in // g, g, d_out)
        scale = torch.empty(d_in // g, d_out, dtype=torch.float16, device=w.device)
        q = torch.empty(d_in // g, g, d_out, dtype=torch.int8, device=w.device)
        # A few groups at a time: the float temporaries stay a few MB, not three copies of the matrix (the
        # 1.5B's unembedding is 0.9 GB in float32).
        step = max(1, (1 << 22) // (g * d_out))
        for a in range(0, d_in // g, step):
            part = w[a : a + step].float()
            scale[a : a + step] = (part.abs().amax(dim=1) / 127).half()
            safe = torch.where(scale[a : a + step] == 0, 1.0, scale[a : a + step].float())  # zero stays zero
            q[a : a + step] = torch.round(part / safe[:, None, :]).clamp_(-127, 127)
        self.weight_t = nn.Parameter(in_huge_pages(pack_int8(q.view(d_in, d_out))), requires_grad=False)
        self.scale = nn.Parameter(in_huge_pages(scale), requires_grad=False)
        del w, q  # the float weights' last view and the unpacked int8, before the heap is trimmed
        return_freed_heap()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W [in, out] as `dtype`; for int8 storage, the float matrix its scales stand for."""
        if not self.quantized:
            return self.weight_t.to(dtype)
        d_out = self.scale.shape[1]
        q = unpack_int8(self.weight_t, d_out).to(dtype)
        groups = q.view(-1, self.scale_group, d_out)
        return (groups * self.scale.to(dtype)[:, None, :]).view(-1, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_t
        rows = x.numel() // max(1, x.shape[-1])
        # int8 weights take the kernel for up to MAX_TOKENS rows too (a speculative verification without the
        # compiled step, as on Gemma 3): dequantizing every matrix for a few rows cost ~10x a decode step.
        if (
            (rows == 1 or (self.quantized and rows <= kernels.MAX_TOKENS))
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
        if (
            _ONEDNN_LINEAR
            and w.device.type == "cpu"
            and w.dtype == flat.dtype == torch.float32
            and not (torch.is_grad_enabled() and (flat.requires_grad or w.requires_grad))
            and not torch.compiler.is_compiling()
        ):
            # oneDNN's float32 GEMM on the [out, in] view of W: 1.3-2.1x torch.mm's (MKL) on this AMD CPU
            # for 16-512 rows (Qwen 0.5B's MLP shapes, 2 threads), each row's result independent of how
            # many rows come with it. Same float32 arithmetic, another summation order (~1e-4 on the logits).
            y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), w.t(), self.bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.bias is None:
            y = torch.mm(flat, w)
        else:
            y = torch.addmm(self.bias, flat, w)
        return y.view(*x.shape[:-1], y.shape[-1])


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # uint8: packed int8
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in private anonymous memory advised for 2 MB pages (Linux transparent huge pages in
    "madvise" mode, this machine's default), or `t` itself where that does not apply (not CPU, under 2 MB,
    no MADV_HUGEPAGE). A decode step streams every weight matrix once, so with 4 KB pages it takes a TLB
    miss every 4 KB. Used for int8 matrices, whose product has less slack for the misses than float32's:
    a Qwen 0.5B int8 step took ~1.7% less time with them (interleaved A/B, two processes a side: 21.56 against
    21.94 ms, a gap no larger than the ~1.6% between the two processes of one side, so a small effect at
    most; 2 MB pages gave float32 products nothing measurable). The memory is freed with the tensor
    (torch.frombuffer keeps the map alive)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < (2 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    try:
        # Private, not mmap's default MAP_SHARED: shared anonymous memory is shmem, whose huge pages are off.
        mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapped.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return t
    out = torch.frombuffer(mapped, dtype=t.dtype, count=t.numel()).view(t.shape)
    out.copy_(t)
    return out


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). Quantizing a
    matrix frees temporaries several times its int8 size, and glibc keeps freed heap memory for reuse; with the
    int8 matrices in maps of their own (`in_huge_pages`) nothing reuses it, and a Qwen 0.5B int8 model held
    ~490 MB more than it needs (VmRSS 1,349 MB against 862 without the maps; 827 with them and this call)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# Matrices with at least this many outputs are packed strip-major (the kernel's kWideOut, which must equal it).
INT8_STRIP_MAJOR_OUT = 4096


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [in, out] -> uint8 [in / 32, ceil(out / 16), 8, 64], or [ceil(out / 16), in / 32, 8, 64] (strip-
    major) for `INT8_STRIP_MAJOR_OUT` outputs or more: block [g, s] ([s, g]) holds inputs 32g.. 32g+31 of
    outputs 16s.. 16s+15 as 8 input quads, each quad's four weights side by side per output, every weight
    stored as q + 128 (the unsigned byte the kernel's vpdpbusd multiplies; padding outputs hold 128: zero).
    The order is the one the kernel's threads read in (cpu_kernels.cpp, kWideOut)."""
    d_in, d_out = q.shape
    strips = -(-d_out // 16)
    padded = torch.zeros(d_in, strips * 16, dtype=torch.int16, device=q.device)
    padded[:, :d_out] = q
    # [g, p, r, s, c] -> [g, s, p, c, r], or [s, g, p, c, r]
    blocks = (padded + 128).to(torch.uint8).view(d_in // 32, 8, 4, strips, 16).permute(0, 3, 1, 4, 2)
    del padded
    if d_out >= INT8_STRIP_MAJOR_OUT:
        return blocks.transpose(0, 1).reshape(strips, d_in // 32, 8, 64).contiguous()
    return blocks.reshape(d_in // 32, strips, 8, 64).contiguous()


def int8_input_groups(packed: torch.Tensor, d_out: int) -> int:
    """How many blocks of 32 inputs a packed int8 matrix with `d_out` outputs holds."""
    return packed.shape[1] if d_out >= INT8_STRIP_MAJOR_OUT else packed.shape[0]


def unpack_int8(packed: torch.Tensor, d_out: int) -> torch.Tensor:
    """The inverse of pack_int8: int8 [in, out]."""
    if d_out >= INT8_STRIP_MAJOR_OUT:
        packed = packed.transpose(0, 1)
    groups, strips = packed.shape[:2]
    q = packed.reshape(groups, strips, 8, 16, 4).permute(0, 2, 4, 1, 3)
    return (q.reshape(groups * 32, strips * 16)[:, :d_out].to(torch.int16) - 128).to(torch.int8)


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


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Rotate queries or keys [..., position, head_dim] by cos/sin tables [position, head_dim] (HF's rotate-half
    convention); None means no positional encoding (NoPE)."""
    if rope is None:
        return x
    cos, sin = rope
    return x * cos + rotate_half(x) * sin


def rope_tables(theta: float, head_dim: int, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [end - start, head_dim] for positions start..end-1, float32, rotate-half convention."""
    return rope_at(theta, head_dim, torch.arange(start, end, device=device))


def rope_at(theta: float, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of any positions: [T] -> [T, head_dim]; [B, T] -> [B, 1, T, head_dim], one table per row for every
    head (tree attention: tokens at positions of their own)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return (cos[:, None], sin[:, None]) if positions.dim() == 2 else (cos, sin)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2 style); the identity when cap is 0."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def split_qkv(
    qkv: torch.Tensor,
    n_q: int,
    n_kv: int,
    head_dim: int,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused q/k/v projection [batch, position, (n_q + 2 n_kv) head_dim] -> q, k, v [batch, head, position,
    head_dim]; per-head norms on q and k (Gemma) are applied before the heads move forward."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split((n_q * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1)
    q, k = q.view(B, T, n_q, head_dim), k.view(B, T, n_kv, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, n_kv, head_dim).transpose(1, 2)


def explicit_pattern(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention weights [batch, head, query, key], for when a user asks to see them. `scale` None means
    1 / sqrt(head_dim)."""
    B, n_q, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(B, n_kv, n_q // n_kv * T, hd), k.transpose(-1, -2))
    scores = scores / math.sqrt(hd) if scale is None else scores * scale
    scores = scores.view(B, n_q, T, S)
    if mask is not None:
        scores = scores.masked_fill(~(mask[:, None] if mask.dim() == 3 else mask), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    hooks: Hooks | None,
    pattern_name: str,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention core: q [batch, n_q, query, head_dim] over k, v [batch, n_kv, key, head_dim] -> [batch,
    query, n_q * head_dim]. `mask` [query, key] (or [batch, query, key]) says which keys each query may read
    (None: all).

    Grouped-query attention without copying K/V: the query heads that share a KV head are stacked along the
    query axis, and the mask is tiled to match. When `pattern_name` is hooked the weights are computed
    explicitly so the hook can see (and patch) them."""
    B, n_q, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    group = n_q // n_kv
    if hooks is not None and pattern_name in hooks.points:
        pattern = hooks(pattern_name, explicit_pattern(q, k, mask, scale))
        out = torch.matmul(pattern.view(B, n_kv, group * T, S), v).view(B, n_q, T, hd)
    else:
        qg = q.reshape(B, n_kv, group * T, hd)
        if mask is None:
            m = None
        elif mask.dim() == 3:  # one mask per row (ragged batches): [B, 1, group * T, S]
            m = mask.repeat(1, group, 1)[:, None]
        else:
            m = mask.repeat(group, 1)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=scale).view(B, n_q, T, hd)
    return out.transpose(1, 2).reshape(B, T, n_q * hd)


def hook_heads(hooks: Hooks, name: str, heads_first: torch.Tensor) -> torch.Tensor:
    """Hand q/k/v [batch, head, position, head_dim] to the hook as [batch, position, head, head_dim] (after RoPE:
    what attention really uses), when that name is asked for."""
    if name not in hooks.points:
        return heads_first
    return hooks(name, heads_first.transpose(1, 2)).transpose(1, 2)


class LastState:
    """Hooks that keep one activation (the last block's output) and change nothing."""

    def __init__(self, name: str) -> None:
        self.points = frozenset((name,))
        self.state: torch.Tensor | None = None

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.state = tensor
        return tensor


_SAID: set[str] = set()


def say_once(message: str) -> None:
    """A notice on stderr, once per process."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"forethought: {message}", file=sys.stderr)
