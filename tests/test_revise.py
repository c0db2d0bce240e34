"""revise: an off-plan token leaves earlier columns bit-identical, changes every later one, and moves the
next-token distributions only from the step after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from forethought.cli import main
from forethought.errors import ForethoughtError
from forethought.experiments.revise import find_rejoin, revise, single_token
from forethought.model.generate import generate
from forethought.model.random_init import random_model, tiny_config

PROMPT = [5, 17, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config(), seed=3)


def off_plan(model, at: int) -> int:
    greedy = generate(model, PROMPT, at + 1).new_ids[at]
    return (greedy + 1) % model.config.vocab_size


def test_forced_token_changes_only_what_comes_after(tiny) -> None:
    at, n = 3, 6
    r = revise(tiny, PROMPT, at, n, force_id=off_plan(tiny, at))
    assert r.how == "forced" and r.off_plan_id != r.greedy_id
    assert r.revised_ids[:at] == r.original_ids[:at] and r.revised_ids[at] == r.off_plan_id
    assert [s.step for s in r.steps] == list(range(at + n + 1))
    # causality: every layer's state at every earlier position is bit-identical
    assert r.causal_max_diff == 0.0
    assert len(r.position_max_diff) == len(PROMPT) + at + n
    assert all(d > 0 for d in r.position_max_diff[r.off_plan_position :])
    # the distributions agree exactly up to and including the off-plan step, and move after it
    assert all(s.kl == 0.0 and s.top1_agree for s in r.steps[: at + 1])
    assert r.steps[at + 1].kl > 0 and r.steps[at + 1].kl_substituted > 0
    assert r.steps[at + 1].kl_substituted == r.steps[at + 1].kl  # same prefix at the first step after
    assert max(v for row in r.substituted_rel_diff for v in row[: r.off_plan_position]) == 0.0
    json.dumps(r.to_dict())


def test_sampled_off_plan_token_is_reproducible_and_never_the_greedy_one(tiny) -> None:
    runs = [revise(tiny, PROMPT, 2, 3, temperature=1.5, seed=s) for s in (0, 0, 1, 2, 3)]
    assert runs[0].off_plan_id == runs[1].off_plan_id
    assert all(r.how == "sampled" and r.off_plan_id != r.greedy_id for r in runs)
    assert all(r.causal_max_diff == 0.0 for r in runs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of"),
        (dict(force_id=1, temperature=1.0, seed=0), "exactly one of"),
        (dict(temperature=1.0), "--seed"),
        (dict(force_id=1, at=-1), "--at must be"),
        (dict(force_id=10**6), "outside the vocabulary"),
        (dict(force_id=1, at=200), "context length"),
    ],
)
def test_bad_requests_are_user_errors(tiny, kwargs, message) -> None:
    at = kwargs.pop("at", 1)
    with pytest.raises(ForethoughtError, match=message):
        revise(tiny, PROMPT, at, 3, **kwargs)


def test_forcing_the_greedy_token_is_refused(tiny) -> None:
    greedy = generate(tiny, PROMPT, 2).new_ids[1]
    with pytest.raises(ForethoughtError, match="greedy choice"):
        revise(tiny, PROMPT, 1, 3, force_id=greedy)


def test_at_beyond_a_generation_that_stops(tiny) -> None:
    ids = generate(tiny, PROMPT, 3).new_ids
    with pytest.raises(ForethoughtError, match="beyond the generation"):
        revise(tiny, PROMPT, 5, 3, force_id=1, stop_ids=(ids[1],))


def test_find_rejoin() -> None:
    original = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    # an inserted token: the revised text is the original one position later
    revised = [1, 2, 99, 3, 4, 5, 6, 7, 8, 9]
    r = find_rejoin(original, revised, at=2, end=9)
    assert (r.step, r.original_step, r.shift, r.window, r.matched_after) == (3, 2, -1, 5, 7)
    # a skipped token: revised jumps ahead
    r = find_rejoin(original, [1, 2, 4, 5, 6, 7, 8, 9, 10], at=2, end=8)
    assert r.shift == +1 and r.step == 3 and r.matched_after == 6
    # no rejoin
    assert find_rejoin(original, [1, 2, 50, 51, 52, 53, 54, 55], at=2, end=7) is None


class FakeTokenizer:
    add_bos, bos_id = False, None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_str(self, i: int) -> str:
        return chr(i)


def test_single_token() -> None:
    assert single_token(FakeTokenizer(), "a") == ord("a")
    with pytest.raises(ForethoughtError, match="2 tokens"):
        single_token(FakeTokenizer(), "ab")
    with pytest.raises(ForethoughtError, match="0 tokens"):
        single_token(FakeTokenizer(), "")


def write_probe(folder: Path, layer: int, d: int, vocab: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "mean": torch.zeros(d),
        "std": torch.ones(d),
        "columns": torch.arange(vocab, dtype=torch.int32),
        "probe.1": torch.randn(d + 1, vocab, generator=g).half(),
        "probe.2": torch.randn(d + 1, vocab, generator=g).half(),
    }
    meta = {"layer": layer, "cells": [{"offset": 1, "probe_temperature": 2.0}, {"offset": 2, "probe_temperature": 2.0}]}
    save_file(tensors, str(folder / f"probe-layer{layer:02d}.safetensors"), metadata={"forethought": json.dumps(meta)})


def test_probe_predictions_move_only_after_the_off_plan_token(tiny, tmp_path: Path) -> None:
    write_probe(tmp_path, 1, tiny.config.d_model, tiny.config.vocab_size)
    r = revise(tiny, PROMPT, 2, 5, force_id=off_plan(tiny, 2), probes_dir=tmp_path)
    cells = r.probes["cells"]
    assert [(c["layer"], c["offset"]) for c in cells] == [(1, 1), (1, 2)]
    assert all(c["changed_before"] == 0.0 and c["kl"] > 0 for c in cells)
    assert revise(tiny, PROMPT, 2, 2, force_id=off_plan(tiny, 2), probes_dir=tmp_path / "nope").probes["skipped"]
    bad = tmp_path / "wide"
    bad.mkdir()
    write_probe(bad, 0, 7, 10)
    assert "width" in revise(tiny, PROMPT, 2, 2, force_id=off_plan(tiny, 2), probes_dir=bad).probes["skipped"]


def test_cli_json_and_plot(llama_dir: Path, tmp_path: Path, capsys) -> None:
    plot = tmp_path / "revise.png"
    args = ["revise", "Once upon a time", "--at", "1", "--temperature", "2", "--seed", "0", "-n", "4"]
    assert main(args + ["--model", str(llama_dir), "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["causal_max_diff"] == 0.0 and out["how"] == "sampled" and plot.stat().st_size > 10_000
    assert main(args[:4] + ["--model", str(llama_dir), "-n", "3"] + args[4:8]) == 0
    assert "earlier columns" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of"),
        (["--force", "x", "--temperature", "1", "--seed", "0"], "exactly one of"),
        (["--force", "time upon once"], "tokens"),
        (["--at", "500", "--force", "x"], "context length"),
    ],
)
def test_cli_errors_exit_2_with_one_line(llama_dir: Path, capsys, extra, message) -> None:
    at = [] if "--at" in extra else ["--at", "1"]
    assert main(["revise", "Once upon a time", *at, *extra, "--model", str(llama_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


@pytest.mark.slow
def test_real_model_off_plan_token(real_lm) -> None:
    tok = real_lm.tokenizer
    with pytest.raises(ForethoughtError, match="2 tokens"):
        single_token(tok, "hello world")
    prompt = tok.encode("Once upon a time, there was a little")
    r = revise(real_lm.model, prompt, 2, 4, force_id=single_token(tok, " dragon"), stop_ids=(tok.eos_id,))
    assert r.causal_max_diff == 0.0
    assert all(s.kl == 0.0 for s in r.steps[:3]) and all(s.kl > 0 for s in r.steps[3:])
    assert all(d > 0 for d in r.position_max_diff[r.off_plan_position :])
    # the reported probabilities, against a plain forward over the same prefix (an independent computation)
    assert r.greedy_id == r.original_ids[2]
    probs = torch.softmax(real_lm.model(torch.tensor([prompt + r.original_ids[:2]]))[0, -1].double(), -1)
    assert r.off_plan_prob == pytest.approx(float(probs[r.off_plan_id]), rel=1e-3)
    assert r.greedy_prob == pytest.approx(float(probs.max()), rel=1e-3)


# --------------------------------------------------------------------------------------------------- at scale


def test_bucket_tokens_pick_the_named_ranks_and_a_tiny_probability() -> None:
    from forethought.experiments.revise_scale import TINY_BUCKET, _bucket_tokens

    probs = torch.full((2000,), 1e-7, dtype=torch.float64)
    probs[:1100] = torch.linspace(0.5, 1e-5, 1100, dtype=torch.float64)
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    probs = probs[perm] / probs.sum()  # shuffled, so ranks are not ids
    chosen = _bucket_tokens(probs, torch.Generator().manual_seed(1))
    for name, rank in (("rank 2", 2), ("rank 10", 10), ("rank 1000", 1000)):
        assert 1 + int((probs > probs[chosen[name]]).sum()) == rank
    assert probs[chosen[TINY_BUCKET]] < 1e-6
    # a distribution with no token under 1e-6 has no such bucket, and ranks past the vocabulary are left out
    assert set(_bucket_tokens(torch.full((50,), 0.02, dtype=torch.float64), torch.Generator())) == {
        "rank 2",
        "rank 10",
    }


def test_draw_prompts_is_deterministic_round_robin_and_refuses_too_few() -> None:
    from forethought.data.corpus import Corpus, Document
    from forethought.experiments.revise_scale import draw_prompts

    def corpus(name: str, n: int) -> Corpus:
        docs = [Document(f"{name}{i}", " ".join(f"w{i}_{j}" for j in range(30))) for i in range(n)]
        return Corpus(name, "/", "folder", docs)

    def encode(text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    a = draw_prompts([corpus("a", 3), corpus("b", 5)], encode, 6, 8, seed=0)
    assert [p.corpus for p in a] == ["a", "b", "a", "b", "a", "b"] and all(len(p.ids) == 8 for p in a)
    assert a == draw_prompts([corpus("a", 3), corpus("b", 5)], encode, 6, 8, seed=0)
    assert [p.corpus for p in draw_prompts([corpus("a", 1), corpus("b", 5)], encode, 4, 8)] == ["a", "b", "b", "b"]
    with pytest.raises(ForethoughtError, match="only 2"):
        draw_prompts([corpus("a", 2)], encode, 3, 8)


def test_revise_at_scale_buckets_ranks_and_intervals(tiny) -> None:
    from forethought.experiments.revise_scale import ScalePrompt, revise_at_scale

    prompts = [ScalePrompt("t", str(i), [(11 * i + 7 * j) % 256 for j in range(6)]) for i in range(3)]
    at = 1
    r = revise_at_scale(tiny, prompts, at=at, n_after=3, temperature=1.0, seed=0)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["prompts_used"] == 3 and not r.skipped
    # vocabulary 256: no rank-1000 bucket; a random tiny model gives no token p < 1e-6
    assert [b.bucket for b in r.buckets] == ["rank 2", "rank 10", "T=1 sample"] and all(b.n == 3 for b in r.buckets)
    for t in r.trials:
        # independent check of the rank: a full forward pass over the prompt and the greedy prefix
        prefix = generate(tiny, prompts[t.prompt_index].ids, at).new_ids
        probs = torch.softmax(tiny(torch.tensor([prompts[t.prompt_index].ids + prefix]))[0, -1].double(), -1)
        rank = 1 + int((probs > probs[t.token_id]).sum())
        assert rank == t.rank and rank > 1  # never the greedy token
        if t.bucket.startswith("rank "):
            assert rank == int(t.bucket.split()[1])
        assert abs(float(probs[t.token_id]) - t.prob) < 1e-6
        assert t.kl_after_mean >= 0 and t.state_last > 0 and t.state_last_swap > 0
    for b in r.buckets:
        rows = [t for t in r.trials if t.bucket == b.bucket]
        assert b.rejoin_rate.estimate == pytest.approx(sum(t.rejoined for t in rows) / len(rows))
        for iv in (b.rejoin_rate, b.kl_after_mean, b.state_mid, b.state_last, b.state_mid_swap, b.state_last_swap):
            assert iv.low <= iv.estimate <= iv.high


def test_revise_scale_cli(llama_dir: Path, tmp_path: Path, capsys) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(f"Once upon a time, there was a little girl number {i} in a village. " * 3)
    plot = tmp_path / "scale.png"
    args = ["revise-scale", "--corpus", str(texts), "--prompts", "2", "--prompt-tokens", "8", "-n", "3"]
    assert main(args + ["--model", str(llama_dir), "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts_used"] == 2 and out["buckets"] and plot.stat().st_size > 10_000
    assert main(args[:3] + ["--prompts", "9", "--model", str(llama_dir)]) == 2
    assert capsys.readouterr().err.strip().startswith("error:")
