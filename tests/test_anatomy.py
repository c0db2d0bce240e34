"""anatomy: each share recovers a known answer on synthetic states, the controls behave, and the command
runs end to end on a tiny model and on the real one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from forethought.cli import main
from forethought.errors import ForethoughtError
from forethought.experiments.anatomy import (
    anatomy,
    cosine_by_distance,
    d_e,
    fit_decay,
    position_share,
    slow_share,
    token_share,
)
from forethought.model.random_init import random_model, tiny_config

G = torch.Generator().manual_seed(0)


def noise(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def test_position_share_recovers_the_position_part_and_the_shuffle_removes_it() -> None:
    N, T, d = 40, 50, 16
    template = noise(1, T, d) * 2.0  # variance 4 per dim vs noise 1 -> share 0.8
    x = template + noise(N, T, d)
    assert position_share(x) == pytest.approx(0.8, abs=0.03)
    shuffled = torch.gather(x, 1, torch.argsort(torch.rand(N, T, generator=G), 1)[:, :, None].expand_as(x))
    assert abs(position_share(shuffled)) < 0.02
    assert abs(position_share(noise(N, T, d))) < 0.01  # no position part: about 0, not +1/N


def test_token_share_is_held_out() -> None:
    N, T, d, vocab = 20, 40, 8, 30
    tokens = torch.randint(0, vocab, (N, T), generator=G)
    table = noise(vocab, d) * 3.0  # variance 9 vs noise 1 -> share 0.9
    share, coverage = token_share(table[tokens] + noise(N, T, d), tokens)
    assert share == pytest.approx(0.9, abs=0.03) and coverage == 1.0
    share, _ = token_share(noise(N, T, d), tokens)
    assert share < 0  # fit on other documents: pure noise cannot score above 0


def test_slow_share_sees_slow_changes_and_not_white_noise() -> None:
    N, T, d = 8, 200, 8
    walk = noise(N, T, d).cumsum(1) * 0.3  # slowly drifting memory
    assert slow_share(walk + 0.1 * noise(N, T, d), 16) > 0.8
    white = noise(N, T, d)
    assert slow_share(white, 16) == pytest.approx(-1 / 16, abs=0.02)  # leave-self-out: white noise scores < 0
    constant = noise(N, 1, d).expand(N, T, d) + noise(N, T, d)  # a per-document constant + noise: share 0.5
    assert slow_share(constant, None) == pytest.approx(0.5, abs=0.05)


def test_cosine_decay_and_fit() -> None:
    tau = 6.0
    d = torch.arange(1, 41, dtype=torch.float64)
    fitted_tau, a, b = fit_decay((0.7 * torch.exp(-d / tau) + 0.1).tolist())
    assert fitted_tau == pytest.approx(tau, rel=0.03) and a == pytest.approx(0.7, rel=0.03)
    assert b == pytest.approx(0.1, abs=0.005)
    assert d_e([0.9, 0.5, 0.3, 0.1]) == 3 and d_e([0.9, 0.8]) is None
    # an AR(1) sequence with coefficient r has cosine ~ r^d at distance d
    r, N, T, dim = 0.8, 16, 400, 32
    x = torch.zeros(N, T, dim)
    for t in range(1, T):
        x[:, t] = r * x[:, t - 1] + math.sqrt(1 - r * r) * noise(N, dim)
    cos = cosine_by_distance(x[:, 50:], 10)
    assert cos[0] == pytest.approx(r, abs=0.04) and cos[2] == pytest.approx(r**3, abs=0.05)


def test_strong_learned_positions_give_a_high_position_share() -> None:
    model = random_model(tiny_config("gpt2"), seed=0)
    with torch.no_grad():
        model.pos_embed.mul_(4.0)  # positions dominate the embedding: share ~ 16 / 17
    docs = torch.randint(0, 256, (12, 40), generator=G).tolist()
    r = anatomy(model, docs, random_control=random_model(tiny_config("gpt2"), seed=1))
    embed = r.layers[0]
    assert embed.layer == "embed" and embed.position_share > 0.85 and abs(embed.position_shuffled) < 0.05
    assert len(r.random) == len(r.layers) == 3 and r.excluded_positions == [0]
    assert len(embed.cosine) == 38 and len(embed.position_profile) == 39
    data = json.loads(json.dumps(r.to_dict()))
    assert "Position part" in data["verdict"]


def test_rope_model_embedding_is_all_token() -> None:
    docs = torch.randint(0, 40, (8, 24), generator=G).tolist()  # small vocab: every id seen in both halves
    r = anatomy(random_model(tiny_config(), seed=0), docs, layers=[1])
    assert [l.layer for l in r.layers] == ["embed", "blocks.1.resid_post"]
    assert r.layers[0].token_share == pytest.approx(1.0, abs=1e-5)  # the embedding is a function of the token
    assert abs(r.layers[0].position_share) < 0.05  # and RoPE adds no position to it


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(docs=[[1] * 10] * 3), "at least 4"),
        (dict(docs=[[1] * 10] * 3 + [[1] * 9]), "same number"),
        (dict(docs=[[1] * 5] * 4), ">= 8"),
        (dict(layers=[7]), "outside"),
        (dict(normalize="zscore"), "normalization"),
        (dict(window=1), "--window"),
    ],
)
def test_bad_input(kwargs, message) -> None:
    model = random_model(tiny_config(), seed=0)
    docs = kwargs.pop("docs", [[1] * 10] * 4)
    with pytest.raises(ForethoughtError, match=message):
        anatomy(model, docs, **kwargs)


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on a mat while dogs ran over hills and fox jumps quick brown lazy".split()
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        picks = torch.randint(0, len(words), (120,), generator=g).tolist()
        (folder / f"doc{i}.txt").write_text(" ".join(words[j] for j in picks))
    return folder


def test_cli_json_table_and_plots(llama_dir: Path, text_corpus: Path, tmp_path: Path, capsys) -> None:
    common = ["anatomy", "--corpus", str(text_corpus), "--docs", "6", "--length", "24", "--model", str(llama_dir)]
    assert main([*common, "--json", "--plot-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_docs"] == 6 and len(out["layers"]) == 3
    assert [Path(p).name for p in out["plots"]] == ["anatomy_shares.png", "anatomy_cosine.png", "anatomy_pca.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in out["plots"])
    assert main([*common, "--layers", "1", "--no-random-control"]) == 0
    text = capsys.readouterr().out
    assert "Anatomy of a column" in text and "Position part" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--corpus", "/nonexistent/corpus"], "does not exist"),
        (["--docs", "50"], "documents of >= 24 tokens"),
        (["--layers", "a,b"], "--layers"),
        (["--docs", "2"], "--docs must be"),
    ],
)
def test_cli_errors_exit_2_with_one_line(llama_dir: Path, text_corpus: Path, capsys, extra, message) -> None:
    args = ["anatomy", "--corpus", str(text_corpus), "--length", "24", "--model", str(llama_dir)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


@pytest.mark.slow
def test_real_model_small(real_lm) -> None:
    from forethought.experiments.anatomy import corpus_documents

    docs, described = corpus_documents(real_lm.tokenizer, "stdlib", 6, 24)
    assert len(docs) == 6 and described["kind"] == "stdlib"
    r = anatomy(real_lm.model, docs, layers=[15, 29])
    assert r.position0_norm > 20 * r.other_norm  # the attention sink at position 0, left out
    assert r.layers[0].token_share == pytest.approx(1.0, abs=1e-4)  # the embedding is a function of the token
    for l in r.layers[1:]:
        # real text has slow structure that shuffling positions destroys (this can fail: a model whose states
        # were position-independent noise would score the same either way). Not the embedding: it sees no
        # context, so its "slow part" is only what nearby tokens share, with no margin to demand.
        assert l.slow_shuffled < l.slow_share - 0.02, l


def test_trailing_mean_and_causal_slow_share_by_hand() -> None:
    from forethought.experiments.anatomy import causal_slow_share, trailing_mean

    x = torch.tensor([1.0, 2.0, 4.0, 8.0])[None, :, None]
    # t=0: nothing before (predicted 0); t=1: 1; t=2: (1+2)/2; t=3: (2+4)/2 with a window of 2
    assert trailing_mean(x, 2)[0, :, 0].tolist() == [0.0, 1.0, 1.5, 3.0]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 128, 8, generator=g)
    walk = noise.cumsum(1) / 10
    assert causal_slow_share(walk, 4) > 0.5  # a slowly drifting state is predicted by its own past
    assert -0.4 < causal_slow_share(noise, 4) < 0  # white noise: -1/w and a bit worse from the first positions


def test_decay_fit_quality_separates_an_exponential_from_a_step() -> None:
    from forethought.experiments.anatomy import decay_fit_r2, fit_decay

    d = torch.arange(1, 41, dtype=torch.float64)
    curve = (0.7 * torch.exp(-d / 6.0) + 0.1).tolist()
    assert decay_fit_r2(curve, *fit_decay(curve)) > 0.999
    step = [0.8] * 20 + [0.1] * 20  # no single time constant describes a cliff
    assert decay_fit_r2(step, *fit_decay(step)) < 0.9
