"""The KV cache is only a memory/compute trade: however tokens are fed, the logits are those of one full pass."""

import pytest
import torch

import forethought

TOL = 1e-5


@pytest.fixture(scope="module")
def family_lm(request, family):
    """forethought's tiny model of each family (learned positions in GPT-2 test the cache offset too)."""
    return forethought.load_model(str(request.getfixturevalue(f"{family}_dir")))


def ids_of(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (1, length), generator=torch.Generator().manual_seed(seed))


def feed(model, cache, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed `ids` through the cache in chunks of the given sizes; the logits of every position."""
    out, start = [], 0
    for size in chunks:
        out.append(model(ids[:, start : start + size], cache=cache))
        start += size
    assert start == ids.shape[1]
    return torch.cat(out, dim=1)


@torch.inference_mode()
def test_prefill_chunked_and_stepwise_agree(family_lm):
    """One-call prefill, 3+5+... chunks and one token at a time give the logits of a cache-free pass."""
    model = family_lm.model
    ids = ids_of(40)
    full = model(ids)
    one_call = feed(model, model.new_cache(), ids, [40])
    chunked = feed(model, model.new_cache(), ids, [3, 5, 11, 1, 20])
    stepwise = feed(model, model.new_cache(), ids, [1] * 40)
    prefill_then_decode = feed(model, model.new_cache(), ids, [25] + [1] * 15)
    for logits in (one_call, chunked, stepwise, prefill_then_decode):
        assert (logits - full).abs().max() <= TOL


@torch.inference_mode()
def test_nbytes_is_length_times_bytes_per_token(tiny_lm):
    """nbytes = length x bytes_per_token, and a token costs 2 x layers x kv_heads x head_dim x 4 bytes in float32."""
    model, c = tiny_lm.model, tiny_lm.config
    cache = model.new_cache(capacity=64)
    assert cache.bytes_per_token == 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4 == c.kv_bytes_per_token == 512
    assert cache.nbytes == 0
    model(ids_of(7), cache=cache)
    model(ids_of(1, seed=1), cache=cache)
    assert cache.length == 8 and cache.nbytes == 8 * cache.bytes_per_token
    assert cache.allocated_nbytes == 64 * cache.bytes_per_token


@torch.inference_mode()
def test_truncate_then_refeed_gives_same_logits(family_lm):
    """Rewinding to position 12 and feeding the same tokens again reproduces their logits; other tokens branch."""
    model = family_lm.model
    ids, other = ids_of(20), ids_of(8, seed=7)
    cache = model.new_cache()
    before = model(ids, cache=cache)[:, 12:]
    cache.truncate(12)
    assert cache.length == 12 and cache.nbytes == 12 * cache.bytes_per_token
    assert (model(ids[:, 12:], cache=cache) - before).abs().max() <= TOL
    cache.truncate(12)
    branch = model(other, cache=cache)
    expected = model(torch.cat([ids[:, :12], other], dim=1))[:, 12:]
    assert (branch - expected).abs().max() <= TOL


def test_truncate_rejects_out_of_range(tiny_lm):
    cache = tiny_lm.model.new_cache()
    with torch.inference_mode():
        tiny_lm.model(ids_of(5), cache=cache)
    for bad in (-1, 6):
        with pytest.raises(ValueError):
            cache.truncate(bad)


@torch.inference_mode()
def test_copy_is_independent(family_lm):
    """Feeding different tokens into a copy leaves the original's next logits unchanged."""
    model = family_lm.model
    ids, nxt = ids_of(10), ids_of(1, seed=3)
    cache = model.new_cache(capacity=16)
    model(ids, cache=cache)
    clone = cache.copy()
    assert clone.length == 10 and torch.equal(clone.k[:, :, :, :10], cache.k[:, :, :, :10])
    model(ids_of(6, seed=4), cache=clone)  # fills the copy up to its capacity and past it
    assert cache.length == 10 and clone.length == 16
    expected = model(torch.cat([ids, nxt], dim=1))[:, -1]
    assert (model(nxt, cache=cache)[:, -1] - expected).abs().max() <= TOL


@torch.inference_mode()
def test_cache_grows_beyond_initial_capacity(family_lm):
    """A cache made for 4 tokens grows (up to the context length) and still gives exact logits."""
    model = family_lm.model
    cache = model.new_cache(capacity=4)
    assert cache.capacity == 4
    ids = ids_of(model.config.context_length)
    logits = feed(model, cache, ids, [3, 2, 1, 30, 60, 32])
    assert cache.length == cache.capacity == model.config.context_length
    assert (logits - model(ids)).abs().max() <= TOL


@torch.inference_mode()
def test_feeding_past_context_length_raises(tiny_lm):
    model = tiny_lm.model
    cache = model.new_cache()
    model(ids_of(120), cache=cache)
    with pytest.raises(ValueError, match="context length"):
        model(ids_of(9), cache=cache)
    with pytest.raises(ValueError, match="context length"):
        model(ids_of(129))


@torch.inference_mode()
def test_batched_cache_matches_single_rows(tiny_lm):
    """A batch-2 cache decodes each row as if it were alone, and counts bytes for both rows."""
    model = tiny_lm.model
    ids = torch.cat([ids_of(12, seed=1), ids_of(12, seed=2)])
    cache = model.new_cache(batch_size=2)
    assert cache.bytes_per_token == 2 * tiny_lm.config.kv_bytes_per_token
    batched = feed(model, cache, ids, [9, 1, 1, 1])
    for row in range(2):
        assert (batched[row] - model(ids[row : row + 1])[0]).abs().max() <= TOL
