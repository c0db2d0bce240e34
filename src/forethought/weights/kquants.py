"""llama.cpp's K-quant formats (Q4_K, Q5_K, Q6_K) dequantized to float32 with numpy.

A K-quant super-block holds 256 weights in sub-blocks of 16 or 32 that share a small integer scale
(and, for Q4_K/Q5_K, a minimum), which a float16 super-scale turns into floats. The layouts below
follow ggml's `dequantize_row_q*_K`; the result is checked value for value against the `gguf`
package's own dequantizer (tests/test_gemma.py on random blocks, tests/test_gemma_real.py on the
real file). Working on whole tensors at once makes this several times faster than looping over rows.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # weights per super-block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


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


_DEQUANTIZERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
SUPPORTED = tuple(_DEQUANTIZERS)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Bytes of whole super-blocks [rows..., bytes per row] -> float32 [rows..., weights per row]."""
    size = BLOCK_BYTES[kind]
    flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if flat.size % size:
        raise ValueError(f"{kind}: {flat.size} bytes are not whole {size}-byte blocks")
    values = _DEQUANTIZERS[kind](flat.reshape(-1, size))
    rows = raw.shape[:-1]
    return values.reshape(*rows, -1) if rows else values.reshape(-1)
