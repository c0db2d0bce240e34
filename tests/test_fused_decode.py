"""The compiled whole-token decode step (kernels.DecodeStep) computes what the op-by-op forward computes."""

from pathlib import Path

import pytest
import torch

from forethought.model import kernels
from forethought.model.generate import generate
from forethought.model.random_init import random_model, tiny_config
from forethought.trace import run_with_trace

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels unavailable: {kernels.status()}")


def model_for(variant: str, seed: int = 0):
    if variant == "qwen2-bias":
        model = random_model(tiny_config(qkv_bias=True), seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        for block in model.blocks:
            block.qkv.bias.data = torch.randn(block.qkv.bias.shape, generator=g) * 0.5
        return model
    model = random_model(tiny_config(), seed=seed)
    if variant == "int8":
        model.quantize_int8_()
    return model


@torch.inference_mode()
def decode_logits(model, prompt: list[int], steps: list[int], fused: bool) -> torch.Tensor:
    model.fused_decode = fused
    cache = model.new_cache(capacity=2)  # small on purpose: the steps must grow it
    model(torch.tensor([prompt]), cache=cache)
    out = [model(torch.tensor([[t]]), cache=cache)[0, -1] for t in steps]
    assert cache.length == len(prompt) + len(steps)
    return torch.stack(out)


@needs_kernels
@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias", "int8"])
def test_fused_step_equals_op_by_op(variant):
    """Logits of 40 cached steps (RoPE, GQA, cache growth, qkv bias, int8 scales) agree to float32 rounding."""
    model = model_for(variant)
    prompt, steps = [3, 14, 15, 92, 65], list(range(7, 47))
    fused = decode_logits(model, prompt, steps, fused=True)
    assert model._decode_step(model.new_cache()) is not None  # the compiled path really ran
    reference = decode_logits(model, prompt, steps, fused=False)
    # int8: the compiled step rounds each product's input to 15 bits per group (tests/test_int8.py); these
    # tiny matrices take BLAS on the unrounded input in the op-by-op path.
    tolerance = 1e-4 if variant == "int8" else 1e-5
    assert (fused - reference).abs().max() <= tolerance * reference.abs().max()


@needs_kernels
def test_fused_step_leaves_the_same_cache():
    """K and V the fused step appends are the ones the op-by-op forward appends."""
    model = model_for("llama-gqa")
    caches = []
    with torch.inference_mode():
        for fused in (True, False):
            model.fused_decode = fused
            cache = model.new_cache(capacity=16)
            model(torch.tensor([[1, 2, 3]]), cache=cache)
            for t in (4, 5, 6):
                model(torch.tensor([[t]]), cache=cache)
            caches.append(cache)
    a, b = caches
    assert (a.k[:, :, :, :6] - b.k[:, :, :, :6]).abs().max() < 1e-6
    assert (a.v[:, :, :, :6] - b.v[:, :, :, :6]).abs().max() < 1e-6


@needs_kernels
def test_fused_step_follows_weight_changes():
    """Replaced weights rebuild the step; in-place edits are read directly. Neither is ever stale."""
    model = model_for("llama-gqa")
    before = decode_logits(model, [1, 2], [3], fused=True)
    model.blocks[0].o.weight_t.data = model.blocks[0].o.weight_t.data * 2  # replaced tensor
    replaced = decode_logits(model, [1, 2], [3], fused=True)
    assert (replaced - before).abs().max() > 1e-3
    assert (replaced - decode_logits(model, [1, 2], [3], fused=False)).abs().max() < 1e-5
    with torch.no_grad():
        model.blocks[1].gate_up.weight_t.mul_(-1)  # edited in place
    edited = decode_logits(model, [1, 2], [3], fused=True)
    assert (edited - replaced).abs().max() > 1e-3
    assert (edited - decode_logits(model, [1, 2], [3], fused=False)).abs().max() < 1e-5
    # A new Parameter object in place of the old one (the step checks its own pointers only until a
    # parameter, buffer or module is registered anywhere: this one is).
    down = model.blocks[1].down
    down.weight_t = torch.nn.Parameter(down.weight_t.detach() * 3, requires_grad=False)
    swapped = decode_logits(model, [1, 2], [3], fused=True)
    assert (swapped - edited).abs().max() > 1e-3
    assert (swapped - decode_logits(model, [1, 2], [3], fused=False)).abs().max() < 1e-5
    # A norm's memory moved under the same tensor object.
    norm = model.blocks[0].mlp_norm.weight
    norm.data = norm.data * 0.5
    moved = decode_logits(model, [1, 2], [3], fused=True)
    assert (moved - swapped).abs().max() > 1e-3
    assert (moved - decode_logits(model, [1, 2], [3], fused=False)).abs().max() < 1e-5


@needs_kernels
def test_hooks_see_every_point_of_a_decode_step():
    """Asking for a point inside the step takes the op-by-op path, so the hook gets its tensor."""
    model = model_for("llama-gqa")
    with torch.inference_mode():
        cache = model.new_cache()
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        logits, trace = run_with_trace(model, torch.tensor([[4]]), ["blocks.1.resid_post"], cache=cache)
    assert trace["blocks.1.resid_post"].numel() == 64  # one position of d_model
    assert (logits[0, -1] - decode_logits(model, [1, 2, 3], [4], fused=False)[0]).abs().max() < 1e-5


@needs_kernels
def test_out_of_range_token_is_an_error():
    model = model_for("llama-gqa")
    with torch.inference_mode(), pytest.raises((RuntimeError, IndexError), match="vocabulary|index"):
        cache = model.new_cache()
        model(torch.tensor([[1]]), cache=cache)
        model(torch.tensor([[10_000]]), cache=cache)


@needs_kernels
def test_thread_count_may_change_between_steps():
    """The step sizes its scratch for the current torch thread count (more threads, more partial sums)."""
    # Matrices large enough (>= 32768 weights) that the products really split across threads.
    model = random_model(tiny_config(d_model=256, head_dim=64, d_ff=512), seed=3).quantize_int8_()
    reference = decode_logits(model, [1, 2, 3], [4, 5], fused=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        decode_logits(model, [1, 2, 3], [4], fused=True)  # built with one thread
        torch.set_num_threads(4)
        fused = decode_logits(model, [1, 2, 3], [4, 5], fused=True)
    finally:
        torch.set_num_threads(before)
    assert (fused - reference).abs().max() <= 1e-4 * reference.abs().max()


@torch.inference_mode()
def _steps_at_once_and_op_by_op(model, ids: list[int]):
    """The logits of ids[2:] after the prefix ids[:2]: one compiled step per token, all of them in one compiled
    call, and the op-by-op forward (the reference)."""
    one, many = model.new_cache(16), model.new_cache(16)
    model(torch.tensor([ids[:2]]), cache=one)
    model(torch.tensor([ids[:2]]), cache=many)
    steps = torch.cat([model.forward_with_state([t], one, with_state=False)[0] for t in ids[2:]])
    at_once, _ = model.forward_with_state(ids[2:], many, with_state=False)
    model.fused_decode = False
    try:
        reference = model(torch.tensor([ids]))[0, 2:]
    finally:
        model.fused_decode = True
    return steps, at_once, reference


@needs_kernels
def test_a_vocabulary_wider_than_one_pass_keeps_t_tokens_bitwise_t_steps():
    """The kernel reads a wide matrix (the unembedding) in passes of as many columns as the T tokens'
    accumulators allow in L2: fewer columns per pass at larger T. Every logit must still be one chain of
    multiply-adds in input order, so T tokens at once give exactly the logits of T steps (what keeps
    speculative greedy decoding token-identical), and they equal the op-by-op forward to float rounding."""
    model = random_model(tiny_config(vocab_size=300_007, d_model=32, d_ff=64, head_dim=8), seed=3)
    ids = [7, 70_000, 150_001, 299_999, 12, 250_000, 33, 99_999, 1, 2]
    steps, at_once, reference = _steps_at_once_and_op_by_op(model, ids)
    assert torch.equal(steps, at_once)
    assert (at_once - reference).abs().max() <= 1e-4 * reference.abs().max()


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_narrow_matrices_read_in_bands_keep_t_tokens_bitwise_t_steps(threads):
    """A narrow matrix (fewer than 4096 outputs) is read 8 rows at a time, one row from each of 8 bands of
    each thread's rows; 200 and 520 inputs split into uneven bands, and at 2 threads each thread bands its
    own half. T tokens at once must still give exactly the logits of T steps, near the op-by-op forward."""
    model = random_model(tiny_config(d_model=200, d_ff=520, n_heads=6, head_dim=40, vocab_size=300), seed=4)
    assert model.blocks[0].down.weight_t.numel() >= 1 << 15  # large enough for both threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps, at_once, reference = _steps_at_once_and_op_by_op(model, [3, 141, 59, 26, 53, 58, 97, 93, 238, 46])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(steps, at_once)
    assert (at_once - reference).abs().max() <= 1e-4 * reference.abs().max()


def qwen2_shaped(seed: int = 0, tied: bool = False):
    """A tiny model with the decode-relevant shape of Qwen2.5: QKV bias, an output matrix of its own
    (untied from the embedding), 3 query heads per KV head, RoPE base 1e6. Weights at std 0.2, so greedy
    text varies (at the fixtures' 0.05 it settles into a two-token loop that would hide most mistakes)."""
    config = tiny_config(
        qkv_bias=True, tie_embeddings=tied, n_heads=6, n_kv_heads=2, head_dim=16, rope_theta=1e6, name="tiny-qwen2"
    )
    model = random_model(config, seed=seed, std=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.qkv.bias.copy_(torch.randn(block.qkv.bias.shape, generator=g) * 0.5)
    return model


def greedy(model, fused: bool, n: int = 32) -> list[int]:
    model.fused_decode = fused
    return generate(model, [5, 17, 99, 3, 42], n).new_ids


@needs_kernels
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_qwen2_shaped_greedy_is_token_identical(int8):
    """The compiled step runs a Qwen2-shaped model (QKV bias, untied output), fp32 and int8, and its greedy
    tokens equal the op-by-op path's."""
    model = qwen2_shaped()
    if int8:
        model.quantize_int8_()
    with torch.inference_mode():
        assert model._decode_step(model.new_cache()) is not None  # the fast path, not a silent fallback
    fast, slow = greedy(model, True), greedy(model, False)
    assert fast == slow
    assert len(set(fast)) > 4  # a real continuation, not one token repeated
    # Control: the same model with its output tied to the embedding writes other text, so the comparison
    # above would see a step that read the wrong output matrix (or dropped the bias).
    tied = qwen2_shaped(tied=True)
    if int8:
        tied.quantize_int8_()
    assert greedy(tied, True) != fast
    no_bias = qwen2_shaped()
    with torch.no_grad():
        for block in no_bias.blocks:
            block.qkv.bias.zero_()
    if int8:
        no_bias.quantize_int8_()
    assert greedy(no_bias, True) != fast


def test_kernel_cache_key_covers_every_build_input():
    """Changing any input of the build (torch install, compiler, flags, source, CPU) changes the cache
    folder; the same inputs give the same folder."""
    parts = kernels.build_key_parts()
    assert set(parts) >= {"source", "torch", "compiler", "flags", "cpu", "python"}
    assert str(Path(torch.__file__).resolve().parent) in parts["torch"]  # the install, not only the version
    assert kernels.build_key(parts) == kernels.build_key(dict(parts))
    for name in parts:
        changed = dict(parts, **{name: parts[name] + " (another)"})
        assert kernels.build_key(changed) != kernels.build_key(parts), name


def test_a_stale_kernel_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-compile leaves torch's lock file; every later build would wait on it for ever."""
    import os
    import time

    from forethought.model import kernels

    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.write_text("")
    fresh.write_text("")
    old = time.time() - kernels.STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    kernels._clear_stale_lock(stale)
    kernels._clear_stale_lock(fresh)
    kernels._clear_stale_lock(tmp_path / "absent")  # no lock: nothing to do, no error
    assert not stale.exists()
    assert fresh.exists()  # a build in progress keeps its lock


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@torch.inference_mode()
def test_attention_over_several_position_blocks(threads):
    """Attention runs in blocks of 256 positions per KV head, merged in order. Across block boundaries (a
    600-token prefix, then 8 tokens over 768) the compiled step equals the op-by-op forward to float rounding,
    8 tokens in one call give exactly the logits of 8 steps, and the thread count changes nothing."""
    config = tiny_config(qkv_bias=True, n_heads=6, n_kv_heads=2, head_dim=16, rope_theta=1e6, context_length=1024)
    model = random_model(config, seed=5, std=0.2)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, model.config.vocab_size, (770,), generator=g).tolist()
    prefix, tail = ids[:760], ids[760:]  # the tail crosses position 768 (three blocks -> four)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one, many = model.new_cache(800), model.new_cache(800)
        model(torch.tensor([prefix]), cache=one)
        model(torch.tensor([prefix]), cache=many)
        steps = torch.cat([model.forward_with_state([t], one, with_state=False)[0] for t in tail])
        at_once, _ = model.forward_with_state(tail, many, with_state=False)
        assert model._decode_step(one) is not None  # the compiled path really ran
    finally:
        torch.set_num_threads(before)
    assert torch.equal(steps, at_once)
    model.fused_decode = False
    try:
        reference = model(torch.tensor([ids]))[0, 760:]
    finally:
        model.fused_decode = True
    assert (at_once - reference).abs().max() <= 1e-5 * reference.abs().max()
    # The same logits at the other thread count.
    other = 3 - threads
    torch.set_num_threads(other)
    try:
        again = model.new_cache(800)
        model(torch.tensor([prefix]), cache=again)
        at_other, _ = model.forward_with_state(tail, again, with_state=False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(at_once, at_other)
