"""Families as modules: the registry, one cache interface, FLOPs counted by the family and checked against the
modules themselves, and the one decode loop (generate_steps) against a hand-written loop."""

import re
from pathlib import Path

import pytest
import torch

from forethought import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.decode import GREEDY, generate_steps, sampler
from forethought.model.families import FAMILIES, family_of
from forethought.model.generate import generate
from forethought.model.kv_cache import Cache
from forethought.model.layers import Linear
from forethought.model.random_init import random_model, tiny_config
from forethought.model.sampling import SamplingParams

SRC = Path(__file__).resolve().parents[1] / "src" / "forethought"
GEMMA = dict(n_kv_heads=2, sliding_window=4, sliding_layers=(0,), query_scale=0.25, final_logit_softcap=30.0)
PROMPT = [5, 17, 200, 42, 99, 3]


def family_model(name: str, seed: int = 0):
    return random_model(tiny_config(name, **(GEMMA if name == "gemma3" else {})), seed=seed, std=0.2)


def weights_one_token_multiplies(model) -> int:
    """Counted from the modules, not the config: every Linear a token goes through once, the Feedback memory's
    key/value map once per layer plus once for the memory, a GRU layer's two weight matrices."""
    total = 0
    for block in model.blocks:
        if hasattr(block, "gru"):
            total += block.gru.weight_ih_l0.numel() + block.gru.weight_hh_l0.numel()
        total += sum(m.weight_t.numel() for m in block.modules() if isinstance(m, Linear))
    if model.memory is not None:
        total += (len(model.blocks) + 1) * model.memory.kv.weight_t.numel()
    return total + model.unembed.weight_t.numel()


def test_no_family_name_tests_outside_the_registry():
    """Behaviour that differs between families is asked of the family, never decided by its name."""
    pattern = re.compile(r"family\s*(==|!=|in\b)|family\s+not\s+in\b")
    found = [
        f"{path.relative_to(SRC)}:{i}"
        for path in SRC.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
    assert pattern.search('if c.family == "gpt2":')  # the control: the pattern does catch one


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_matmul_flops_are_twice_the_weights_a_token_multiplies(name):
    model = family_model(name)
    c = model.config
    assert c.family_spec is family_of(name) is model.family
    assert c.family_spec.matmul_flops(c) == 2 * weights_one_token_multiplies(model)


def test_a_wrong_family_count_is_caught():
    """The control for the test above: a Llama counted as if its MLP had two matrices no longer matches."""
    model = family_model("llama")
    c = model.config
    wrong = type("TwoMatrixLlama", (type(c.family_spec),), {"mlp_matrices": 2})()
    assert wrong.matmul_flops(c) != 2 * weights_one_token_multiplies(model)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_cache_is_a_cache_that_rewinds_and_copies(name):
    model = family_model(name)
    cache = model.new_cache(capacity=4)
    assert isinstance(cache, Cache)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache=cache)
        before = model(torch.tensor([[7]]), cache=cache.copy())[0, -1]
        copy = cache.copy()
        model(torch.tensor([[9, 11]]), cache=cache)  # moves the original on ...
        assert copy.length == len(PROMPT) and cache.length == len(PROMPT) + 2
        cache.truncate(len(PROMPT))  # ... and back
        torch.testing.assert_close(model(torch.tensor([[7]]), cache=cache)[0, -1], before, rtol=0, atol=0)
        torch.testing.assert_close(model(torch.tensor([[7]]), cache=copy)[0, -1], before, rtol=0, atol=0)
    assert cache.nbytes == model.config.kv_bytes(cache.length) and cache.allocated_nbytes >= cache.nbytes
    with pytest.raises(ValueError):
        cache.truncate(cache.length + 1)


def test_an_unknown_family_is_a_user_error():
    with pytest.raises(ForethoughtError, match="unknown model family 'mamba'"):
        ModelConfig("mamba", 1, 8, 2, 2, 4, 16, 32, 16)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_steps_is_the_hand_written_loop(name):
    """Sampled tokens, the logits each came from and the cache they leave, against a loop written out here."""
    model = family_model(name, seed=1)
    params = SamplingParams(temperature=1.0, seed=5)
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(torch.tensor([PROMPT]), cache=cache)[0, -1]
        steps = list(generate_steps(model, PROMPT, logits, 6, sampler(params, params.generator()), cache))

        by_hand, rows, generator = [], [], params.generator()
        ref_cache = model.new_cache()
        ref = model(torch.tensor([PROMPT]), cache=ref_cache)[0, -1]
        for i in range(6):
            rows.append(ref)
            by_hand.append(int(torch.multinomial(torch.softmax(ref.float(), -1), 1, generator=generator)))
            if i < 5:
                ref = model(torch.tensor([[by_hand[-1]]]), cache=ref_cache)[0, -1]
    assert [s.token for s in steps] == by_hand
    for step, row in zip(steps, rows, strict=True):
        torch.testing.assert_close(step.logits, row, rtol=0, atol=0)
    assert cache.length == ref_cache.length == len(PROMPT) + 5  # the last token is chosen, never run
    assert steps[-1].next_logits is None and all(s.next_logits is not None for s in steps[:-1])


def test_feed_last_and_stop_ids(tiny_lm):
    """A stop token ends the steps; with feed_last the cache holds it too and its next logits are a fresh
    forward's."""
    model = tiny_lm.model
    plain = generate(model, PROMPT, 12).new_ids
    stop = plain[4]
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(torch.tensor([PROMPT]), cache=cache)[0, -1]
        greedy = sampler(GREEDY, GREEDY.generator())
        steps = list(generate_steps(model, PROMPT, logits, 12, greedy, cache, (stop,), feed_last=True))
        fresh = model(torch.tensor([PROMPT + plain[: len(steps)]]))[0, -1]
    assert [s.token for s in steps] == plain[: plain.index(stop) + 1] and steps[-1].stop
    assert cache.length == len(PROMPT) + len(steps)
    torch.testing.assert_close(steps[-1].next_logits, fresh, rtol=1e-5, atol=1e-5)


def test_without_a_cache_the_steps_recompute_the_text():
    model = family_model("gemma3", seed=2)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0, -1]
        cached = model.new_cache()
        model(torch.tensor([PROMPT]), cache=cached)
        greedy = sampler(GREEDY, GREEDY.generator())
        a = [s.token for s in generate_steps(model, PROMPT, logits, 8, greedy)]
        b = [s.token for s in generate_steps(model, PROMPT, logits, 8, greedy, cached)]
    assert a == b
