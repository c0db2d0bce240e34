"""The "does it plan?" machinery on cases whose answers are worked out by hand: context baselines, the bootstrap
over documents, the balanced split, the near-duplicate filter, the probe file, the KL direction and the knockout /
steering hooks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from forethought.data.corpus import Corpus, Document, balanced_order, near_duplicates, split_of
from forethought.errors import ForethoughtError
from forethought.experiments.baselines import (
    NgramTable,
    backoff_predict,
    bootstrap_by_document,
    context_keys,
    copy_predict,
)
from forethought.experiments.causal import (
    CausalSettings,
    Interventions,
    SinkMeter,
    attention_sinks,
    measure_position,
    random_control_key,
    window_ceiling,
    window_prefix,
)
from forethought.experiments.probe_file import ProbeLayer, load_probe_folder, load_probe_layer, save_probe_layer
from forethought.experiments.revise import _kl
from forethought.model.random_init import random_model, tiny_config


def test_context_keys_stop_at_the_window_start() -> None:
    tokens = np.array([5, 6, 7, 8, 9, 10])
    keys = context_keys(tokens, np.arange(6), order=2, window=3, vocab=100)
    # (x_{t-1}, x_t) packs as 100 * x_t + x_{t-1}; the first position of each window has no 2-token context
    assert keys.tolist() == [-1, 605, 706, -1, 908, 1009]


def test_backoff_prefers_the_longest_context_seen_often_enough() -> None:
    # order 1: after 1 comes 2 (twice) or 3 (once); order 2: after (9, 1) comes 3 (once)
    ctx1 = np.array([1, 1, 1, 4])
    ctx2 = np.array([-1, 501, 901, -1])  # vocab 100: (5, 1) and (9, 1)
    target = np.array([2, 2, 3, 7])
    t1, t2 = NgramTable.fit(ctx1, target), NgramTable.fit(ctx2, target)
    assert t1.lookup(np.array([1, 4, 8]), 1).tolist() == [2, 7, -1]
    query = [np.array([1, 1]), np.array([901, 501])]
    assert backoff_predict([t1, t2], query, 1, unigram_best=0).tolist() == [3, 2]  # (9, 1) -> 3 wins over 1 -> 2
    assert backoff_predict([t1, t2], query, 2, unigram_best=0).tolist() == [2, 2]  # seen once: back off
    assert backoff_predict([t1, t2], [np.array([8]), np.array([808])], 1, unigram_best=0).tolist() == [0]


def test_copy_predicts_what_followed_the_latest_earlier_match() -> None:
    #                 0  1  2  3  4  5  6  7
    seq = np.array([1, 2, 3, 4, 1, 2, 5, 1])
    # at t = 5 (x_t = 2, preceded by 1): the match (1, 2) ending at 1 was followed 1 later by 3, 2 later by 4
    assert copy_predict(seq, np.array([5]), 1, 2, window=8).tolist() == [3]
    assert copy_predict(seq, np.array([5]), 2, 2, window=8).tolist() == [4]
    # at t = 7 (x_t = 1): latest earlier 1 usable for offset 2 is at 4 (4 + 2 <= 7): predicts x_6 = 5
    assert copy_predict(seq, np.array([7]), 2, 1, window=8).tolist() == [5]
    # no earlier match: no prediction; and windows do not see each other
    assert copy_predict(seq, np.array([3]), 1, 1, window=8).tolist() == [-1]
    assert copy_predict(seq, np.array([5]), 1, 2, window=4).tolist() == [-1]


def test_bootstrap_over_documents_is_wider_than_over_tokens_when_documents_differ() -> None:
    rng = np.random.default_rng(0)
    docs = np.repeat(np.arange(40), 50)
    per_doc = rng.uniform(0, 1, 40)  # each document has its own rate
    values = (rng.uniform(0, 1, len(docs)) < per_doc[docs]).astype(float)
    by_doc = bootstrap_by_document(values, docs, n_boot=500)
    by_token = bootstrap_by_document(values, np.arange(len(values)), n_boot=500)
    assert by_doc.estimate == pytest.approx(values.mean())
    assert by_doc.low < by_doc.estimate < by_doc.high
    assert (by_doc.high - by_doc.low) > 2 * (by_token.high - by_token.low)
    # a constant difference has a zero-width interval at that constant
    const = bootstrap_by_document(np.full(100, 0.25), np.repeat(np.arange(10), 10), n_boot=100)
    assert const.low == const.high == pytest.approx(0.25)


def test_balanced_order_gives_every_side_early_tokens() -> None:
    docs = [Document(f"doc{i}", "x " * 50) for i in range(400)]
    corpus = Corpus("t", "/", "folder", docs)
    sides = []
    for _, (index, _ids) in zip(range(40), balanced_order(corpus, lambda text: [1] * 20, 0.1), strict=False):
        sides.append(split_of(docs[index].doc_id, 0.1))
    # 40 documents of 20 tokens: the test side holds about its share from the start
    assert 2 <= sides.count("test") <= 6 and sides[:12].count("test") >= 1


def test_near_duplicates_catch_copies_not_strangers() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 1000, 300).tolist()
    train = {0: base, 1: rng.integers(0, 1000, 300).tolist()}
    edited = list(base)
    edited[150] = 5  # one token changed: still a copy
    test = {10: edited, 11: rng.integers(0, 1000, 300).tolist()}
    removed = near_duplicates(train, test)
    assert list(removed) == [10] and removed[10] > 0.9


def test_kl_direction_by_hand() -> None:
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    # KL(p || q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108; KL(q || p) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.3681
    assert float(_kl(p, q)[0]) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0), abs=1e-7)
    assert float(_kl(p, q)[0]) == pytest.approx(0.5108256, abs=1e-6)
    assert float(_kl(q, p)[0]) == pytest.approx(0.3680642, abs=1e-6)


def _probe_file(folder: Path, layer: int, d: int, columns: list[int]) -> ProbeLayer:
    g = torch.Generator().manual_seed(layer)
    tensors = {
        "mean": torch.randn(d, generator=g),
        "std": torch.rand(d, generator=g) + 0.5,
        "columns": torch.tensor(columns, dtype=torch.int32),
        "probe.2": torch.randn(d + 1, len(columns), generator=g).half(),
        "lens.2": torch.randn(d + 1, d, generator=g),
    }
    meta = {"cells": [{"offset": 2, "probe_temperature": 3.0, "lens_temperature": 1.5}]}
    save_probe_layer(folder, layer, tensors, meta)
    return load_probe_layer(folder / f"probe-layer{layer:02d}.safetensors", d)


def test_probe_file_round_trip_apply_and_clean_errors(tmp_path: Path) -> None:
    probe = _probe_file(tmp_path, 3, 8, [5, 9, 11])
    assert probe.layer == 3 and probe.offsets == [2] and probe.temperature(2) == 3.0
    h = torch.randn(4, 8)
    z = torch.cat([(h - probe.tensors["mean"]) / probe.tensors["std"], torch.ones(4, 1)], 1)
    assert torch.allclose(probe.token_scores(h, 2), z @ probe.tensors["probe.2"].float(), atol=1e-5)
    # the direction raises exactly its token's score, by |direction . w / std| per unit step
    direction = probe.direction(9, 2)
    step = probe.token_scores(h + 1e-2 * direction, 2) - probe.token_scores(h, 2)
    assert torch.allclose(
        step[:, 1],
        torch.full((4,), 1e-2 * float((probe.tensors["probe.2"][:-1, 1] / probe.tensors["std"]).pow(2).sum())),
        rtol=1e-3,
    )
    assert probe.direction(4, 2) is None
    assert list(load_probe_folder(tmp_path, 8)) == [3]
    with pytest.raises(ForethoughtError, match="probe-layer03.safetensors.*width"):
        load_probe_folder(tmp_path, 9)
    (tmp_path / "probe-layer04.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ForethoughtError, match="probe-layer04.safetensors is not readable") as e:
        load_probe_folder(tmp_path, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(ForethoughtError, match="not a folder"):
        load_probe_folder(tmp_path / "none")


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config(vocab_size=64, context_length=64), seed=3)


def test_knockout_leaves_position_t_alone_and_moves_later_ones(tiny) -> None:
    window = torch.randint(3, 60, (40,), generator=torch.Generator().manual_seed(0))
    settings = CausalSettings(
        horizon=4, from_layers=(0, 1, 5), steer_layers=(), ceiling_offsets=(1, 2, 3), top_m=64, rollouts=64
    )
    g = torch.Generator().manual_seed(0)
    out = measure_position(tiny, window, 20, settings, {}, g, torch.arange(3, 60))
    for label in ("t", "t-1", "t-2", "random"):
        for low in (0, 1):
            name = f"knockout_{label}@{low}"
            # the readers are the positions after t: t's own prediction cannot move (beyond float rounding)
            assert abs(out[name][0]) < 1e-5, name
            assert np.abs(out[name][1:]).max() > 1e-4, name
        assert np.abs(out[f"knockout_{label}@5"]).max() == 0.0  # from a layer the model does not have: nothing
    assert np.abs(out["embed_swap"][0]) > 0  # a different token at t changes t's own prediction


def test_ceiling_at_one_step_is_the_greedy_top1(tiny) -> None:
    """Reference: a plain forward over the window through t, its argmax against x_{t+1}; the window is edited so
    that both outcomes occur."""
    settings = CausalSettings(horizon=2, from_layers=(0,), steer_layers=(), ceiling_offsets=(1,))
    hits = []
    for seed, p in ((0, 12), (1, 20), (2, 25)):
        window = torch.randint(3, 60, (40,), generator=torch.Generator().manual_seed(seed))
        greedy = int(tiny(window[None, : p + 1])[0, -1].argmax())
        for follow, expected in ((greedy, 1.0), ((greedy + 1) % 64, 0.0)):
            window[p + 1] = follow
            prefix = window_prefix(tiny, window, settings)
            out = window_ceiling(tiny, window, [p], settings, torch.Generator().manual_seed(0), prefix)[0]
            assert out["ceiling@1"] == expected, (seed, p, follow)
            hits.append(out["ceiling@1"])
    assert set(hits) == {0.0, 1.0}


@torch.inference_mode()
def test_ceiling_two_steps_is_the_exact_marginal_and_tree_equals_batches(tiny, monkeypatch) -> None:
    """k = 2 against a cache-free reference: sum over the top_m next tokens y of p(y) p(x | y), each term its own
    full pass; positions of one window in chunks through tree attention give the per-position batches' answers
    (k > 2 included: the same rollouts from the same generator), and rows follow their positions."""
    settings = CausalSettings(from_layers=(0,), steer_layers=(), ceiling_offsets=(1, 2, 3, 4), top_m=8, rollouts=4)
    window = torch.randint(3, 60, (40,), generator=torch.Generator().manual_seed(5))
    ps = [6, 30, 13, 21, 35, 37]  # 37: x_{t+3} and x_{t+4} lie past the window

    def marginal(p: int) -> torch.Tensor:
        top = torch.softmax(tiny(window[None, : p + 1])[0, -1], -1).topk(8)
        return sum(
            w * torch.softmax(tiny(torch.cat([window[: p + 1], y[None]])[None])[0, -1], -1)
            for w, y in zip(top.values, top.indices)
        )

    for p in (6, 21):  # x_{t+2} set to the marginal's top-1 (the marginal reads only x_{..t}): two hits
        window[p + 2] = int(marginal(p).argmax())
    prefix = window_prefix(tiny, window, settings)
    tree = window_ceiling(tiny, window, ps, settings, torch.Generator().manual_seed(1), prefix, chunk_rows=24)
    for p, out in zip(ps, tree):
        assert out["ceiling@2"] == float(int(marginal(p).argmax()) == int(window[p + 2])), p
        assert ("ceiling@4" in out) == (p + 4 < 40)
    assert {out["ceiling@2"] for out in tree} == {0.0, 1.0}  # the window holds hits and misses
    monkeypatch.setattr(type(tiny.family), "tree_attention", False)
    batches = window_ceiling(tiny, window, ps, settings, torch.Generator().manual_seed(1), prefix)
    assert batches == tree


def test_planted_attention_sink_is_detected_and_the_random_key_avoids_it() -> None:
    """Attention where key 0 and key 9 draw half of every later query's weight: both are sinks, no other key is,
    and the random control key never lands on either."""
    n, heads = 40, 3
    pattern = torch.zeros(1, heads, n, n)
    for q in range(n):
        keys = torch.arange(q + 1)
        row = torch.full((q + 1,), 1.0)
        if q > 9:
            row[9] = float(q)  # about half the row's mass
        row[0] += float(q) / 2
        pattern[0, :, q, : q + 1] = (row / row.sum())[None]
        assert torch.allclose(pattern[0, 0, q, keys].sum(), torch.tensor(1.0))
    meter = SinkMeter(2)
    for layer in range(2):
        meter(f"blocks.{layer}.attn_pattern", pattern)
    sinks = attention_sinks(meter.scores(), ratio=5.0)
    assert sinks.nonzero()[:, 0].tolist() == [0, 9]
    g = torch.Generator().manual_seed(0)
    draws = [random_control_key(20, sinks, 16, g) for _ in range(600)]
    assert 9 not in draws and 0 not in draws
    assert set(draws) == {20 - d for d in range(3, 17)} - {9}  # every other candidate 3..16 back is drawn
    # uniform attention: only position 0 (always treated as the sink a window's first token is)
    flat = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    meter = SinkMeter(1)
    meter("blocks.0.attn_pattern", flat[None, None])
    assert attention_sinks(meter.scores(), ratio=5.0).nonzero()[:, 0].tolist() == [0]


def test_interventions_hook_masks_one_key_exactly(tiny) -> None:
    """Reference: an explicit mask in a plain attention computation over the same q, k, v."""
    from forethought.trace import run_with_trace

    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(1))
    _, tr = run_with_trace(tiny, ids, ["blocks.0.q", "blocks.0.k", "blocks.0.v", "blocks.0.attn_pattern"])
    hooks = Interventions(tiny.config.n_layers, 0)
    hooks.knockout[0] = (4, 0)
    pattern = hooks("blocks.0.attn_pattern", tr["blocks.0.attn_pattern"].reshape(1, -1, 12, 12))
    q = tr["blocks.0.q"].reshape(1, 12, -1, tiny.config.head_dim).transpose(1, 2)
    k = tr["blocks.0.k"].reshape(1, 12, -1, tiny.config.head_dim).transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(12, 12).tril().bool()
    allowed[5:, 4] = False  # later positions may not read key 4; position 4 still reads itself
    reference = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    assert torch.allclose(pattern, reference, atol=1e-5)


def test_steering_along_the_probe_direction_raises_its_token(tiny, tmp_path: Path) -> None:
    d = tiny.config.d_model
    window = torch.randint(3, 60, (40,), generator=torch.Generator().manual_seed(2))
    y = int(window[20 + 2])
    probe = _probe_file(tmp_path, 1, d, list(range(64)))
    # make the probe's direction for y the direction that raises y's logit through the final layer: the
    # unembedding row of y, so that steering along it at the last layer must raise log p(y) at position t
    probe.tensors["probe.2"][:-1, y] = tiny.unembed.weight_t[:, y].float() * probe.tensors["std"]
    settings = CausalSettings(
        horizon=3,
        from_layers=(0,),
        steer_layers=(1,),
        steer_offsets=(2,),
        ceiling_offsets=(1,),
        steer_scales=(0.05, 0.2, 1.0, 4.0),
    )
    out = measure_position(tiny, window, 20, settings, {1: probe}, torch.Generator().manual_seed(0), torch.arange(60))
    # at t itself the added direction is read out directly, more with every dose
    dose = [out[f"steer_probe@1k2x{scale:g}:next"] for scale in settings.steer_scales]
    assert 0 < dose[0] < dose[1] < dose[2] < dose[3], dose
    # a flip is counted only where the unsteered greedy token at t+k (predicted at t+1) was not already y
    base_greedy = int(tiny(window[None, :22])[0, -1].argmax())
    for scale in settings.steer_scales:
        flip = out[f"steer_probe@1k2x{scale:g}:flip"]
        assert math.isnan(flip) == (base_greedy == y) and (math.isnan(flip) or flip in (0.0, 1.0))


def test_ridge_solves_a_gram_that_rounding_left_slightly_indefinite():
    """Few tokens and a tiny lambda: the float32-summed Gram can be a hair short of positive definite (a
    Cholesky factor then fails). The solve must still be the ridge solution."""
    from forethought.experiments.probes import Ridge

    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64)
    x[:, 7] = x[:, 6]  # rank-deficient: one zero eigenvalue
    g = x.T @ x
    g[7, 7] -= 1e-6  # ... pushed just below zero, as rounding does
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(g + 1e-9 * torch.eye(8, dtype=torch.float64))
    b = torch.randn(8, 3, dtype=torch.float64)
    w = Ridge(g, 0.1 * g, 45).solve(b, 1e-3)
    ref = torch.linalg.solve(g + 1e-3 * 45 * torch.eye(8, dtype=torch.float64), b)
    assert torch.isfinite(w).all()
    assert torch.allclose(w.double(), ref, rtol=1e-4, atol=1e-4)


def test_stacked_candidates_and_the_conditional_logit() -> None:
    """Candidates: every named token once (a token outside any list too) plus the top tokens. The conditional logit,
    on rows where feature a names the target 80% of the time and feature b names a random token, learns a large
    weight for a and a small one for b, and predicts a's token."""
    from forethought.experiments.stacked import Features, LogLinearStack, candidate_features, candidate_set

    named = Features(["a", "b"], [np.array([[5], [7]]), np.array([[5], [-1]])], [np.ones((2, 1)), np.ones((2, 1))])
    cand = candidate_set(named, np.array([1, 5]))
    assert [sorted(int(c) for c in row if c >= 0) for row in cand] == [[1, 5], [1, 5, 7]]
    x = candidate_features(named, cand, [np.zeros(cand.shape)])
    row0 = {int(c): x[0, i].tolist() for i, c in enumerate(cand[0]) if c >= 0}
    assert row0 == {1: [0.0, 0.0, 0.0], 5: [1.0, 1.0, 0.0]}  # token 5 named by both a and b

    rng = np.random.default_rng(0)
    n, vocab = 2000, 50
    y = rng.integers(0, vocab, n)
    a = np.where(rng.uniform(size=n) < 0.8, y, rng.integers(0, vocab, n))[:, None]
    b = rng.integers(0, vocab, n)[:, None]
    feats = Features(["a", "b"], [a, b], [np.ones((n, 1)), np.ones((n, 1))])
    cand = candidate_set(feats, np.arange(10))
    x = candidate_features(feats, cand, [])
    fitted = LogLinearStack.fit(x, cand, y, feats.names)
    assert fitted.theta[0] > 2.0 and abs(fitted.theta[1]) < 0.5, fitted.theta
    assert np.array_equal(fitted.predict(x, cand), a[:, 0])


def test_minimum_detectable_effect_is_2_8_standard_errors_read_off_the_interval():
    from forethought.viz.plan import mde

    # a 95% interval of half-width 1.96 is one standard error: 80% power at 5% two-sided needs 2.8 of them
    assert abs(mde({"estimate": 0.0, "low": -1.96, "high": 1.96}) - 2.8) < 1e-9
    assert abs(mde({"estimate": 5.0, "low": 4.0, "high": 6.0}) - 2.8 / 1.96) < 1e-9
    assert mde({"estimate": 0.0, "low": float("nan"), "high": 1.0}) is None
    assert mde(None) is None
    # a zero-width interval measured no spread: it cannot say what was detectable (never "0: anything")
    assert mde({"estimate": 0.0, "low": 0.0, "high": 0.0}) is None
