"""llama.cpp's K-quant formats (Q4_K, Q5_K, Q6_K) and the older 32-weight formats (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0) dequantized to float32 with numpy, all blocks of a tensor at once.

The older formats hold 32 weights per block: a float16 scale (and for _1 formats a float16 minimum),
then 4-bit quants, with a 32-bit mask of fifth bits for Q5 (or int8 quants for Q8_0). The `gguf`
package dequantizes them too, but 16 rows at a time over a memory map (numpy builds a memmap view per
slice): 21 s for the Qwen 0.5B file, against about 1 s here. The arithmetic follows `gguf`'s order,
so the values are bit-identical (tests/test_kquants.py).

A K-quant super-block holds 256 weights in sub-blocks of 16 or 32 that share a small integer scale
(and, for Q4_K/Q5_K, a minimum), which a float16 super-scale turns into floats. The layouts below
follow ggml's `dequantize_row_q*_K`; the result is checked value for value against the `gguf`
package's own dequantizer (tests/test_gemma.py on random blocks, tests/test_gemma_real.py on the
real file). Working on whole tensors at once makes this several times faster than looping over rows.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # weights per super-block
QK = 32  # weights per block of the older formats
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
# Blocks dequantized per pass: whole tensors at once, but in slices that keep the temporaries small.
BLOCKS_PER_PASS = 1 << 15


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float32 [n, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and eight 6-bit minimums packed in 12 bytes (ggml's get_scale_min_k4)."""
    q = packed.astype(np.uint8)
    scales = np.empty((q.shape[0], 8), dtype=np.uint8)
    mins = np.empty((q.shape[0], 8), dtype=np.uint8)
    scales[:, :4] = q[:, 0:4] & 63
    mins[:, :4] = q[:, 4:8] & 63
    scales[:, 4:] = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    qs = blocks[:, 16:144].reshape(-1, 4, 32)  # four groups of 64 weights: low nibbles, then high
    q = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 8, 32).astype(np.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, QK_K)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # bit j of qh[l] is the fifth bit of weight l in sub-block j
    qs = blocks[:, 48:176].reshape(-1, 4, 32)
    low = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).astype(np.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, QK_K)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    ql = blocks[:, 0:128].reshape(-1, 2, 64)  # two halves of 128 weights
    qh = blocks[:, 128:192].reshape(-1, 2, 32)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)  # 16 per super-block
    d = _f16(blocks[:, 208:210])
    # In each half, weight 32i + l takes ql[l] (i = 0, 2) or ql[l + 32] (i = 1, 3), low nibble for
    # i < 2 and high for i >= 2, and bits 2i, 2i+1 of qh[l] on top.
    low = np.stack((ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4), axis=2)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (qh[:, :, None, :] >> shifts) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(-1, 16, 16)
    return ((d * scales)[:, :, None] * q).reshape(-1, QK_K)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: the low nibbles are weights 0-15, the high ones 16-31."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Four bytes per block, a little-endian 32-bit mask -> bit j of it for weight j, as 0 or 16."""
    mask = np.ascontiguousarray(qh).view("<u4")
    return (((mask >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    return d * (_nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    return d * _nibbles(blocks[:, 4:20]).astype(np.float32) + m


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    q = (_nibbles(blocks[:, 6:22]) | _fifth_bits(blocks[:, 2:6])).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = (_nibbles(blocks[:, 8:24]) | _fifth_bits(blocks[:, 4:8])).astype(np.float32)
    return d * q + m


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    return np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).astype(np.float32) * d


_DEQUANTIZERS = {
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
}  # fmt: skip
WEIGHTS_PER_BLOCK = {kind: (QK_K if kind.endswith("_K") else QK) for kind in _DEQUANTIZERS}
SUPPORTED = tuple(_DEQUANTIZERS)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Bytes of whole super-blocks [rows..., bytes per row] -> float32 [rows..., weights per row]."""
    size = BLOCK_BYTES[kind]
    flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if flat.size % size:
        raise ValueError(f"{kind}: {flat.size} bytes are not whole {size}-byte blocks")
    blocks = flat.reshape(-1, size)
    per_block = WEIGHTS_PER_BLOCK[kind]
    values = np.empty((blocks.shape[0], per_block), dtype=np.float32)
    for start in range(0, blocks.shape[0], BLOCKS_PER_PASS):
        stop = start + BLOCKS_PER_PASS
        values[start:stop] = _DEQUANTIZERS[kind](blocks[start:stop]).reshape(-1, per_block)
    rows = raw.shape[:-1]
    return values.reshape(*rows, -1) if rows else values.reshape(-1)
