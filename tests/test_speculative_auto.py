"""`--speculative auto` measures what its drafts yield and backs off to plain decoding where they lose."""

import pytest

from forethought.model.generate import GREEDY, generate
from forethought.model.random_init import random_model, tiny_config
from forethought.model.speculative import AutoDrafter, PromptLookup, make_drafter

REPEATING = [7, 8, 9, 10, 11, 12] * 4  # prompt lookup always finds a 3-token match here

PLAIN_S = 0.010  # seconds of a plain forward in the synthetic runs below


def drive(auto: AutoDrafter, forwards: int, accepted_of, seconds_of) -> list[int]:
    """Run `forwards` draft/observe rounds on a repeating text; returns the draft length of each round.
    accepted_of(n_drafted) and seconds_of(n_drafted) play the model and the clock."""
    lengths = []
    for _ in range(forwards):
        drafts = auto.draft(REPEATING, None, 4)
        auto.observe(len(drafts), accepted_of(len(drafts)) if drafts else 0, seconds_of(len(drafts)))
        lengths.append(len(drafts))
    return lengths


def test_a_losing_source_is_benched_and_retried_ever_less_often():
    """Drafts that are never kept, verified at 1.5x a step: the lookup loses to plain, so it is benched,
    and each return that loses again benches it twice as long."""
    auto = AutoDrafter(None, window=4, calibrate=2, recalibrate=1000, bench=8)
    lengths = drive(auto, 200, lambda n: 0, lambda n: PLAIN_S * (1.5 if n else 1.0))
    assert lengths[:3] == [0, 0, 0]  # calibration: plain first (the first one untimed)
    assert auto.benchings >= 3
    drafted = sum(1 for n in lengths if n)
    assert drafted <= 4 * (auto.benchings + 1)  # only the trial windows drafted
    assert sum(1 for n in lengths[100:] if n) < sum(1 for n in lengths[:100] if n)  # ever rarer
    assert auto.usage["lookup"] == drafted and auto.usage["plain"] == 200 - drafted


def test_a_winning_source_keeps_drafting():
    """Control: the same drafts, all kept (5 tokens for 1.5x a step), are never benched."""
    auto = AutoDrafter(None, window=4, calibrate=2, recalibrate=1000, bench=8)
    lengths = drive(auto, 200, lambda n: n, lambda n: PLAIN_S * (1.5 if n else 1.0))
    assert auto.benchings == 0
    assert all(n == 4 for n in lengths[3:])


def test_break_even_is_judged_by_rate_not_acceptance_alone():
    """One of four drafts kept pays when verifying is nearly free (2 tokens for 1.1 steps), and loses when
    it costs 2.5 steps: acceptance alone cannot tell these apart, the measured rate does."""
    cheap = AutoDrafter(None, window=4, calibrate=2, recalibrate=1000, bench=8)
    drive(cheap, 100, lambda n: 1, lambda n: PLAIN_S * (1.1 if n else 1.0))
    dear = AutoDrafter(None, window=4, calibrate=2, recalibrate=1000, bench=8)
    drive(dear, 100, lambda n: 1, lambda n: PLAIN_S * (2.5 if n else 1.0))
    assert cheap.benchings == 0 and dear.benchings > 0


def test_a_losing_source_is_benched_though_its_median_forward_wins():
    """All 4 drafts kept in 3 of 5 forwards, each drafted forward costing 3.6 steps: the median forward
    (5 tokens in 3.6 steps) beats plain, but the throughput (17 tokens in 18 steps) does not. Judged by
    tokens per second over the window, the source is benched."""
    auto = AutoDrafter(None, window=5, calibrate=2, recalibrate=1000, bench=8)
    turn = iter(range(10_000))
    drive(auto, 60, lambda n: 4 if next(turn) % 5 < 3 else 0, lambda n: PLAIN_S * (3.6 if n else 1.0))
    assert auto.benchings > 0


def test_plain_rate_is_recalibrated():
    """One forward in every `recalibrate` is plain even while drafting pays, so a change in load shows."""
    auto = AutoDrafter(None, window=4, calibrate=2, recalibrate=10, bench=8)
    lengths = drive(auto, 50, lambda n: n, lambda n: PLAIN_S * (1.5 if n else 1.0))
    assert [i + 1 for i, n in enumerate(lengths) if n == 0] == [1, 2, 3, 10, 20, 30, 40, 50]


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_auto_without_heads_is_lookup_with_backoff_and_token_identical(int8):
    """A model with no shipped heads: `auto` drafts by lookup alone (no error), and greedy output equals
    plain decoding whatever it decides; `heads` still says none ship."""
    model = random_model(tiny_config(), seed=2, std=0.3)
    if int8:
        model.quantize_int8_()
    drafter = make_drafter(model, "auto")
    assert isinstance(drafter, AutoDrafter) and drafter.heads is None and not drafter.needs_state
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    plain = generate(model, prompt, 40, GREEDY)
    spec = generate(model, prompt, 40, GREEDY, speculative=drafter, draft_len=4)
    assert spec.new_ids == plain.new_ids
    assert sum(drafter.usage.values()) == spec.speculative.forwards
    assert drafter.usage["plain"] >= drafter.calibrate + 1
    lookup = generate(model, prompt, 40, GREEDY, speculative=PromptLookup(), draft_len=4)
    assert lookup.new_ids == plain.new_ids


def test_a_clear_loser_is_benched_after_two_forwards():
    """Drafts never kept, verified at 2x a step (0.5x plain's rate): benched after 2 forwards, not 6. A close
    loser (0.95x) is judged over the whole window."""
    clear = AutoDrafter(None, window=6, calibrate=2, recalibrate=1000, bench=8)
    lengths = drive(clear, 8, lambda n: 0, lambda n: PLAIN_S * (2.0 if n else 1.0))
    assert lengths[3:5] == [4, 4] and lengths[5:8] == [0, 0, 0] and clear.benchings == 1
    close = AutoDrafter(None, window=6, calibrate=2, recalibrate=1000, bench=8)
    lengths = drive(close, 12, lambda n: 0, lambda n: PLAIN_S * (1.05 if n else 1.0))
    assert lengths[3:9] == [4] * 6 and close.benchings == 1 and lengths[9] == 0
