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


@torch.inference_mode()
def test_tree_attention_equals_one_pass_per_branch(family_lm):
    """Branches off one prefix copy (two prefix lengths, a second token on one branch), each token at its own
    position and reading only its own path: the logits of a cache-free pass over that path, and the model's own
    context check holds for positions, not slots."""
    from forethought.model.kv_cache import BranchCache

    model = family_lm.model
    ids = ids_of(40)
    cache = model.new_cache(capacity=40)
    model(ids, cache=cache)
    tree = BranchCache(cache, cache.length, room=1)  # grows on demand
    L = tree.length
    visible = torch.zeros(3, L + 3, dtype=torch.bool)
    visible[0, :11] = visible[1, :21] = visible[2, :21] = True
    visible[torch.arange(3), L + torch.arange(3)] = True
    logits = model.forward_tree(torch.tensor([[5, 7, 9]]), tree, torch.tensor([11, 21, 21]), visible)[0]
    paths = [(11, [5]), (21, [7]), (21, [9])]
    for row, (p, after) in enumerate(paths):
        full = model(torch.cat([ids[0, :p], torch.tensor(after)])[None])[0, -1]
        assert (logits[row] - full).abs().max() <= TOL, row
    # one more token on the second branch: it reads the prefix, that branch's slot and itself, nothing else
    visible = torch.zeros(1, tree.length + 1, dtype=torch.bool)
    visible[0, :21] = True
    visible[0, [L + 1, tree.length]] = True
    step = model.forward_tree(torch.tensor([[3]]), tree, torch.tensor([22]), visible)[0, 0]
    assert (step - model(torch.cat([ids[0, :21], torch.tensor([7, 3])])[None])[0, -1]).abs().max() <= TOL
    # reading the other branch instead gives the other path's logits (the mask is what separates branches)
    visible = torch.zeros(1, tree.length + 1, dtype=torch.bool)
    visible[0, :21] = True
    visible[0, [L + 2, tree.length]] = True
    other = model.forward_tree(torch.tensor([[3]]), tree, torch.tensor([22]), visible)[0, 0]
    assert (other - model(torch.cat([ids[0, :21], torch.tensor([9, 3])])[None])[0, -1]).abs().max() <= TOL
    assert (other - step).abs().max() > 1e-3
    visible = torch.ones(1, tree.length + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="context length"):
        model.forward_tree(torch.tensor([[3]]), tree, torch.tensor([model.config.context_length]), visible)


@torch.inference_mode()
def test_repeat_prefix_carries_sliding_layers_rings():
    """A batch of branches off the first p tokens (the causal tests' knockout rows and the ceiling without tree
    attention) continues exactly as a cache-free pass, on a Gemma-style model whose local layers keep rings: a copy
    of the global layers alone once left those rings empty (1.1 logits off)."""
    from forethought.model.random_init import random_model, tiny_config

    model = random_model(
        tiny_config("gemma3", vocab_size=64, context_length=64, sliding_window=64, sliding_layers=(0,)), seed=3
    )
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(capacity=42)
    model(ids, cache=cache)
    branches = cache.repeat_prefix(2, 31)
    logits = model(torch.tensor([[5], [6]]), cache=branches)[:, 0]
    for row, token in enumerate((5, 6)):
        full = model(torch.cat([ids[0, :31], torch.tensor([token])])[None])[0, -1]
        assert (logits[row] - full).abs().max() <= TOL
    branches.select(torch.tensor([1]))  # go on with the second branch only
    step = model(torch.tensor([[7]]), cache=branches)[0, 0]
    assert (step - model(torch.cat([ids[0, :31], torch.tensor([6, 7])])[None])[0, -1]).abs().max() <= TOL


@torch.inference_mode()
def test_ragged_batch_equals_each_prompt_alone(family_lm):
    """Prompts of 3, 17, 9 and 1 tokens left-padded into one batch, prefilled and decoded 6 steps together: every
    row's logits are those of its prompt alone, at every step; without the padding mask they are not."""
    from forethought.model.ragged import RaggedBatch

    model = family_lm.model
    prompts = [ids_of(n, seed=n)[0].tolist() for n in (3, 17, 9, 1)]
    batch, tokens = RaggedBatch.left_padded(prompts, pad_id=5)
    cache = model.new_cache(capacity=batch.width + 8, batch_size=len(prompts))
    logits = batch.forward(model, tokens, cache, last_only=True)[:, -1]
    texts = [list(p) for p in prompts]
    for _ in range(6):
        for b, text in enumerate(texts):
            alone = model(torch.tensor([text]))[0, -1]
            assert (logits[b] - alone).abs().max() <= TOL, (b, len(text))
        nxt = logits.argmax(-1)
        for b, text in enumerate(texts):
            text.append(int(nxt[b]))
        logits = batch.forward(model, nxt[:, None], cache)[:, -1]
    assert torch.isfinite(cache.k[:, :, :, : cache.length]).all()  # pad slots read themselves: no NaN
    # the control: the same padded batch without the mask lets the short rows read the padding
    plain = model(tokens)[:, -1]
    alone = model(torch.tensor([prompts[0]]))[0, -1]
    assert (plain[0] - alone).abs().max() > 1e-3


@torch.inference_mode()
def test_ragged_batch_after_a_shared_prefix_equals_each_prompt_alone(family_lm):
    """A prefix of 11 tokens run once and copied into every row (a task's instruction), then each row's own 1-9
    tokens left-padded after it and 4 decode steps: every row's logits are those of prefix + its tokens alone.
    The control: rows that cannot see the shared slots give other logits."""
    from forethought.model.ragged import RaggedBatch

    model = family_lm.model
    prefix = ids_of(11, seed=7)[0].tolist()
    own = [ids_of(n, seed=20 + n)[0].tolist() for n in (4, 9, 1)]
    shared = model.new_cache(capacity=11)
    model(torch.tensor([prefix]), cache=shared)
    batch, tokens = RaggedBatch.left_padded(own, pad_id=5, shared=11)
    assert batch.width == 20 and tokens.shape == (3, 9)
    cache = shared.repeat_prefix(3, 11, room=9 + 4)
    logits = batch.forward(model, tokens, cache, last_only=True)[:, -1]
    texts = [prefix + p for p in own]
    for _ in range(4):
        for b, text in enumerate(texts):
            assert (logits[b] - model(torch.tensor([text]))[0, -1]).abs().max() <= TOL, (b, len(text))
        nxt = logits.argmax(-1)
        for b, text in enumerate(texts):
            text.append(int(nxt[b]))
        logits = batch.forward(model, nxt[:, None], cache)[:, -1]
    blind = RaggedBatch([len(p) for p in own], shared=11)
    blind.shared = 0  # the same slots, the shared ones taken for padding
    cache = shared.repeat_prefix(3, 11, room=9)
    wrong = model.forward_tree(tokens, cache, blind.positions(11, 9), blind.visible(11, 9), last_only=True)[:, -1]
    assert (wrong[1] - model(torch.tensor([prefix + own[1]]))[0, -1]).abs().max() > 1e-3


def tiny_gemma(window: int = 24):
    """A Gemma-style model whose first and last layers are local (rings of `window` slots)."""
    from forethought.model.random_init import random_model, tiny_config

    config = tiny_config("gemma3", n_layers=3, vocab_size=384, sliding_window=window, sliding_layers=(0, 2))
    return random_model(config, seed=5)


@torch.inference_mode()
def test_gemma_ragged_batch_within_the_window_equals_each_prompt_alone():
    """Gemma's tree attention reads at most its window's slots: there the slot visibility alone is exact for the
    local layers too, so a ragged batch (prompts of 3, 17, 9, 1 tokens, 6 decode steps, 23 slots) gives every row
    the logits of its prompt alone, through the rings of a SlidingKVCache; one slot past the window is refused."""
    from forethought.model.kv_cache import SlidingKVCache
    from forethought.model.ragged import RaggedBatch

    model = tiny_gemma(window=24)
    assert model.tree_fits(24) and not model.tree_fits(25)
    prompts = [ids_of(n, seed=n)[0].tolist() for n in (3, 17, 9, 1)]
    batch, tokens = RaggedBatch.left_padded(prompts, pad_id=5)
    cache = model.new_cache(capacity=batch.width + 6, batch_size=len(prompts))
    assert isinstance(cache, SlidingKVCache) and cache.n_local == 2
    logits = batch.forward(model, tokens, cache, last_only=True)[:, -1]
    texts = [list(p) for p in prompts]
    for _ in range(6):
        for b, text in enumerate(texts):
            assert (logits[b] - model(torch.tensor([text]))[0, -1]).abs().max() <= TOL, (b, len(text))
        nxt = logits.argmax(-1)
        for b, text in enumerate(texts):
            text.append(int(nxt[b]))
        logits = batch.forward(model, nxt[:, None], cache)[:, -1]
    assert cache.length == 23
    batch.forward(model, torch.tensor([[1], [2], [3], [4]]), cache)  # the window's last slot
    with pytest.raises(ValueError, match="at most 24 slots"):
        batch.forward(model, torch.tensor([[1], [2], [3], [4]]), cache)


@torch.inference_mode()
def test_gemma_copy_slots_carries_the_rings():
    """A prefix run once and copied into another row's slots (the causal tests' edited rows) continues as a
    cache-free pass: the rings of the local layers move with the global layers' keys and values."""
    model = tiny_gemma(window=32)
    ids = ids_of(12, seed=3)
    source = model.new_cache(capacity=12)
    model(ids, cache=source)
    cache = model.new_cache(capacity=16, batch_size=2)
    cache.copy_slots(1, 0, source, 0, 0, 12)
    cache.length = 12
    visible = torch.zeros(2, 1, 13, dtype=torch.bool)
    visible[1, 0, :] = True
    visible[0, 0, 12] = True  # row 0 holds nothing: its token reads only itself
    logits = model.forward_tree(torch.tensor([[7], [7]]), cache, torch.tensor([[0], [12]]), visible)[:, 0]
    assert (logits[1] - model(torch.cat([ids[0], torch.tensor([7])])[None])[0, -1]).abs().max() <= TOL
    assert (logits[0] - model(torch.tensor([[7]]))[0, -1]).abs().max() <= TOL
