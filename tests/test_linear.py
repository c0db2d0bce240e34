"""Batch-1 Linear (the compiled CPU matvec kernel when it builds, torch otherwise) equals a plain matrix product."""

import pytest
import torch

from forethought.model.layers import Linear

# (in, out): the real model's narrow and wide matrices, plus odd sizes that hit the kernel's tail loops, and
# an unembedding-like matrix wider than one pass of the kernel's columns (it sizes a pass to half a core's L2).
SHAPES = [(576, 1536), (1536, 576), (576, 4099), (101, 700), (24, 300_007)]


def make_linear(d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> Linear:
    g = torch.Generator().manual_seed(d_in * d_out)
    lin = Linear(d_in, d_out, bias)
    lin.weight_t.data = torch.randn(d_in, d_out, generator=g).to(dtype)
    if bias:
        lin.bias.data = torch.randn(d_out, generator=g).to(dtype)
    return lin


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_batch1_linear_equals_matmul(threads, d_in, d_out, bias):
    """float32, 1 and 2 threads: same result as float64 x @ W + b, to float32 rounding."""
    lin = make_linear(d_in, d_out, bias, torch.float32)
    assert lin.weight_t.numel() >= Linear.KERNEL_MIN_WEIGHTS  # large enough for the kernel path
    x = torch.randn(1, 1, d_in, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ lin.weight_t.double() + (lin.bias.double() if bias else 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = lin(x)
    finally:
        torch.set_num_threads(before)
    assert y.shape == (1, 1, d_out) and y.dtype == torch.float32
    assert (y.double() - expected).abs().max() <= 1e-4 * expected.abs().max()


@torch.inference_mode()
def test_batch1_linear_bfloat16():
    """bfloat16 weights and input: the product of the bfloat16 values, rounded once to bfloat16."""
    lin = make_linear(576, 1536, True, torch.bfloat16)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    expected = x.double() @ lin.weight_t.double() + lin.bias.double()
    y = lin(x)
    assert y.dtype == torch.bfloat16
    assert (y.double() - expected).abs().max() <= 1e-2 * expected.abs().max()


@torch.inference_mode()
def test_batch1_equals_row_of_a_batch():
    """A decode step's product equals the same row computed inside a prefill-sized matrix product."""
    lin = make_linear(576, 1536, False, torch.float32)
    xs = torch.randn(8, 576, generator=torch.Generator().manual_seed(3))
    batched = lin(xs)
    for i in range(8):
        assert (lin(xs[i : i + 1]) - batched[i : i + 1]).abs().max() <= 1e-5 * batched.abs().max()
