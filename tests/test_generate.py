"""Generation and sampling on the tiny Llama: cache on/off, seeds, top-k/top-p limits, EOS, bad values."""

import math

import pytest
import torch

from forethought import ForethoughtError, SamplingParams, generate
from forethought.model.sampling import sample, sampling_distribution

PROMPT = [5, 17, 200, 42, 99, 3, 250]


def test_cached_and_recomputed_greedy_agree(tiny_lm):
    """use_cache=False recomputes the whole prefix each step and picks the same 40 tokens."""
    cached = generate(tiny_lm.model, PROMPT, 40)
    recomputed = generate(tiny_lm.model, PROMPT, 40, use_cache=False)
    assert cached.new_ids == recomputed.new_ids and len(cached.new_ids) == 40
    assert cached.cache.length == len(PROMPT) + 39  # the last token is chosen, never fed
    assert recomputed.cache is None


def test_generation_pauses_the_garbage_collector_and_restores_it(tiny_lm):
    """The collector is off while tokens come (its passes over the loaded model cost ~0.3 ms a token) and
    as it was afterwards, also when generation fails."""
    import gc

    seen = []
    generate(tiny_lm.model, PROMPT, 3, on_token=lambda _: seen.append(gc.isenabled()))
    assert seen == [False] * 3 and gc.isenabled()
    gc.disable()
    try:
        generate(tiny_lm.model, PROMPT, 3)
        assert not gc.isenabled()
    finally:
        gc.enable()

    def fail(_):
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        generate(tiny_lm.model, PROMPT, 3, on_token=fail)
    assert gc.isenabled()


def test_cached_and_recomputed_sampling_agree(tiny_lm):
    """With the same seed, sampling with and without the cache draws the same tokens."""
    params = SamplingParams(temperature=1.0, seed=3)
    cached = generate(tiny_lm.model, PROMPT, 30, params)
    assert cached.new_ids == generate(tiny_lm.model, PROMPT, 30, params, use_cache=False).new_ids


def test_same_seed_same_tokens_different_seed_different(tiny_lm):
    model = tiny_lm.model
    runs = [generate(model, PROMPT, 30, SamplingParams(temperature=1.5, seed=s)).new_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_1_is_greedy(tiny_lm):
    greedy = generate(tiny_lm.model, PROMPT, 20).new_ids
    assert generate(tiny_lm.model, PROMPT, 20, SamplingParams(temperature=2.0, top_k=1, seed=0)).new_ids == greedy


def test_tiny_top_p_is_greedy(tiny_lm):
    greedy = generate(tiny_lm.model, PROMPT, 20).new_ids
    assert generate(tiny_lm.model, PROMPT, 20, SamplingParams(temperature=2.0, top_p=1e-6, seed=0)).new_ids == greedy


def test_eos_stops_generation(tiny_lm):
    """Generation stops right after the first stop id, with stop_reason 'eos'; on_token sees every token."""
    greedy = generate(tiny_lm.model, PROMPT, 20).new_ids
    stop = greedy[5]
    first = greedy.index(stop)
    seen = []
    result = generate(tiny_lm.model, PROMPT, 20, stop_ids=(stop,), on_token=seen.append)
    assert result.new_ids == greedy[: first + 1] == seen
    assert result.stop_reason == "eos"
    assert generate(tiny_lm.model, PROMPT, 20).stop_reason == "max_tokens"


def test_zero_new_tokens(tiny_lm):
    assert generate(tiny_lm.model, PROMPT, 0).new_ids == []


@pytest.mark.parametrize(
    ("prompt", "n", "message"),
    [([], 5, "empty"), (PROMPT, -1, ">= 0"), (list(range(100)), 29, "context length")],
)
def test_bad_prompt_or_length_raises(tiny_lm, prompt, n, message):
    with pytest.raises(ForethoughtError, match=message):
        generate(tiny_lm.model, prompt, n)


def test_prompt_filling_the_context_exactly_is_allowed(tiny_lm):
    assert len(generate(tiny_lm.model, list(range(100)), 28).new_ids) == 28


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"temperature": math.nan},
        {"top_k": -1},
        {"top_p": 0},
        {"top_p": -0.5},
        {"top_p": 1.5},
        {"top_p": math.nan},
    ],
)
def test_bad_sampling_values_raise(kwargs):
    with pytest.raises(ForethoughtError):
        SamplingParams(**kwargs)


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    probs = sampling_distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.nonzero(probs).flatten().tolist() == [1, 4]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_set_reaching_p():
    """Probabilities 0.5/0.3/0.2: top_p 0.6 keeps the first two (the one crossing 0.6 included), renormalised."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    probs = sampling_distribution(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert probs.tolist() == pytest.approx([0.625, 0.375, 0.0])
    probs = sampling_distribution(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert probs.tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = sampling_distribution(logits, SamplingParams(temperature=0.5))
    warm = sampling_distribution(logits, SamplingParams(temperature=2.0))
    assert cold[0] > torch.softmax(logits, 0)[0] > warm[0]


def test_sampling_frequencies_follow_the_distribution():
    """10 000 draws land on each token about as often as its probability says."""
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    params = SamplingParams(temperature=1.0, seed=0)
    g = params.generator()
    counts = torch.bincount(torch.tensor([sample(logits, params, g) for _ in range(10_000)]), minlength=3)
    assert (counts / 10_000 - torch.tensor([0.6, 0.3, 0.1])).abs().max() < 0.02
