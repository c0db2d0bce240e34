"""int8 weights (a float16 scale per 128, 64 or 32 inputs of each output): exact kernels, small error."""

import pytest
import torch

from forethought.model.layers import Linear, pack_int8
from forethought.weights import load_model

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used for wine. Within fifty "
    "years, presses operated in more than two hundred cities, and the price of books fell so far that "
    "ordinary merchants could own them. Scholars argue about how much of the Reformation, the scientific "
    "revolution and the growth of literacy follow from this one machine. def mean(xs):\n    return sum(xs) / "
    "len(xs)\n\nprint(mean([1, 2, 3, 4]))  # 2.5\n"
)


def quantized_linear(d_in: int, d_out: int, bias: bool) -> tuple[Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(d_in + d_out)
    lin = Linear(d_in, d_out, bias)
    lin.weight_t.data = torch.randn(d_in, d_out, generator=g) * 0.05
    if bias:
        lin.bias.data = torch.randn(d_out, generator=g)
    original = lin.weight_t.data.clone()
    lin.quantize_int8_()
    return lin, original


@pytest.mark.parametrize(("d_in", "group"), [(1536, 128), (576, 64), (96, 32)])
def test_quantization_error_is_half_a_step(d_in, group):
    """One scale per output serves the longest run of 128, 64 or 32 inputs that divides the input size; each
    weight is off by at most half its scale, and the storage is 1 + 2 / group bytes per weight (Q8_0: 1 + 2 / 32)."""
    lin, w = quantized_linear(d_in, 1536, False)
    assert lin.weight_t.dtype == torch.uint8 and lin.scale.shape == (d_in // group, 1536)
    assert (lin.d_in, lin.d_out, lin.scale_group) == (d_in, 1536, group)
    step = lin.scale.float().repeat_interleave(group, dim=0)
    assert ((lin.dequantized(torch.float32) - w).abs() <= step / 2 + 1e-7).all()
    stored = lin.weight_t.nbytes + lin.scale.nbytes
    assert stored / w.numel() == pytest.approx(1 + 2 / group)


def test_kernel_rejects_scales_that_do_not_divide_the_blocks():
    """A scale matrix whose rows do not each cover a whole number of 32-input blocks is refused by name."""
    from forethought.model import kernels

    if not kernels.available():
        pytest.skip("no compiled kernels on this machine")
    lin, _ = quantized_linear(576, 256, False)  # 18 blocks of 32, scales per 64: 9 rows
    bad = torch.ones(5, 256, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="one row per 32 k inputs"):
        kernels.matvec(torch.randn(576), lin.weight_t, None, bad)


def kernel_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernel sees it: rounded to steps of max|x| / 32639 per group of 32 (15 bits, sent to the
    byte products as a high and a low byte)."""
    groups = x.double().view(*x.shape[:-1], -1, 32)
    step = groups.abs().amax(-1, keepdim=True) / 32639
    return (torch.round(groups / torch.where(step == 0, 1, step)) * step).view(x.shape)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("d_in", "d_out"), [(576, 1536), (1536, 576), (576, 4099), (96, 700), (64, 4096), (64, 4095)])
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_int8_batch1_equals_dequantized_matmul(threads, d_in, d_out, bias):
    """The batch-1 kernel computes x @ dequantized(W) + b with x rounded to 15 bits per group (integer
    sums are exact, so only the float scaling rounds); the prefill path (BLAS on the dequantized
    matrix, x unrounded) agrees to 1e-4."""
    lin, _ = quantized_linear(d_in, d_out, bias)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(5))
    W, b = lin.dequantized(torch.float64), (lin.bias.double() if bias else 0)
    expected = kernel_rounded(x) @ W + b
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = lin(x)
    finally:
        torch.set_num_threads(before)
    assert y.shape == (1, d_out)
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    unrounded = x.double() @ W + b
    assert (y.double() - unrounded).abs().max() <= 1e-4 * unrounded.abs().max()
    # Up to MAX_TOKENS rows (a speculative verification without the compiled step) take the kernel too, each
    # row exactly as alone; more rows (prefill) go to BLAS on the dequantized matrix, x unrounded.
    alone = lin(x)  # at this thread count (the split of a narrow product's sum depends on it)
    few = lin(torch.cat([x, torch.randn(2, d_in), x]))
    assert torch.equal(few[0], alone[0]) and torch.equal(few[3], alone[0])
    many = lin(x.expand(17, d_in).contiguous())
    assert (many[0].double() - unrounded[0]).abs().max() <= 1e-5 * unrounded.abs().max()
    assert not torch.equal(many[0], alone[0])  # control: the BLAS path is another computation


def test_packing_round_trips():
    """pack_int8 / unpack_int8 are inverse, including outputs that do not fill a 16-wide strip, in both
    layouts: group-major below INT8_STRIP_MAJOR_OUT outputs, strip-major from there."""
    from forethought.model.layers import INT8_STRIP_MAJOR_OUT, int8_input_groups, pack_int8, unpack_int8

    q = torch.randint(-127, 128, (64, 37), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_int8(q)
    assert packed.shape == (2, 3, 8, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int8(packed, 37), q) and int8_input_groups(packed, 37) == 2
    # Stored as q + 128: one output's four inputs side by side, then the next output's.
    stored = packed.int() - 128
    assert stored[0, 0, 0, 0] == q[0, 0] and stored[0, 0, 0, 1] == q[1, 0] and stored[0, 0, 0, 4] == q[0, 1]
    assert stored[0, 0, 1, 0] == q[4, 0] and stored[1, 2, 0, 0] == q[32, 32]
    assert (stored[:, 2, :, 4 * 5 :] == 0).all()  # outputs 37..47 of the last strip: padding, zero

    wide = INT8_STRIP_MAJOR_OUT + 5
    q = torch.randint(-127, 128, (64, wide), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_int8(q)
    strips = -(-wide // 16)
    assert packed.shape == (strips, 2, 8, 64) and int8_input_groups(packed, wide) == 2
    assert torch.equal(unpack_int8(packed, wide), q)
    stored = packed.int() - 128
    assert stored[0, 1, 0, 0] == q[32, 0] and stored[2, 0, 0, 4] == q[0, 33]  # block [s, g]
    # Each strip's blocks are contiguous: strip s, group g at byte (s * groups + g) * 512.
    flat = packed.view(-1).int() - 128
    assert flat[(2 * 2 + 1) * 512] == q[32, 32]


def test_input_size_must_fill_whole_groups():
    lin = Linear(40, 8, False)
    with pytest.raises(ValueError, match="multiple of 32"):
        lin.quantize_int8_()


@pytest.mark.slow
@torch.inference_mode()
def test_int8_model_stays_close_to_float32(real_lm):
    """On the embedded model, int8 weights keep >= 97% of next-token argmaxes and a small KL divergence;
    the control -- one scale per whole column instead of per run of inputs -- measurably loses more."""
    ids = torch.tensor([real_lm.tokenizer.encode(TEXT)])
    assert ids.shape[1] > 100
    reference = real_lm.model(ids).log_softmax(-1)[0]
    int8 = load_model(dtype="int8")
    assert int8.describe()["weights"] == "int8"

    def compare(model) -> tuple[float, float]:
        logp = model(ids).log_softmax(-1)[0]
        agree = (logp.argmax(-1) == reference.argmax(-1)).float().mean().item()
        kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
        return agree, kl

    agree, kl = compare(int8.model)
    assert agree >= 0.97 and kl < 5e-3, (agree, kl)

    # Control: per-column scales (the same int8 budget, coarser groups) on the same float weights.
    for lin8, lin32 in zip(int8.model.modules(), real_lm.model.modules()):
        if isinstance(lin8, Linear):
            w = lin32.weight_t.float()
            scale = w.abs().amax(0, keepdim=True) / 127
            lin8.weight_t.data = pack_int8(torch.round(w / scale).clamp(-127, 127).to(torch.int8))
            lin8.scale.data = scale.expand(lin8.scale.shape).half().contiguous()
    coarse_agree, coarse_kl = compare(int8.model)
    assert coarse_kl > 2 * kl, (coarse_kl, kl)


@pytest.mark.slow
def test_int8_greedy_text_via_cli(real_lm):
    """`--dtype int8` runs end to end and continues the story as float32 does for the first tokens."""
    import subprocess
    import sys

    story = "Once upon a time, there was a little"
    cmd = [sys.executable, "-m", "forethought", "generate", story, "-n", "12", "-t", "0", "--dtype", "int8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from forethought import generate

    expected = generate(real_lm.model, real_lm.tokenizer.encode(story), 12)
    assert proc.stdout.startswith(story + real_lm.tokenizer.decode(expected.new_ids[:6]))
