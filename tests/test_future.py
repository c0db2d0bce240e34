"""Future Lens probes where the answer is known.

A tiny transformer is trained (a few hundred Adam steps, seconds) on sequences whose token t+2 is a fixed
permutation of token t. Probes at offset 2 must then recover the token two ahead far above chance, and the same
probes on sequences with random tokens (so nothing about t+2 is knowable) must stay near chance; probes trained on
shuffled targets must fall to chance too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forethought.data.corpus import split_of
from forethought.data.store import ActivationStore, ExtractSettings, extract
from forethought.experiments.probes import run_probes
from forethought.model.random_init import random_model, tiny_config

N_SYMBOLS = 24  # tokens used by the data (the model's vocabulary is larger): chance is 1/24
SEQ = 32


def permutation_sequences(n: int, perm: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x_0, x_1 random; x_t = perm[x_{t-2}]: token t+2 is a deterministic function of token t."""
    x = torch.empty(n, SEQ, dtype=torch.long)
    x[:, :2] = torch.randint(0, N_SYMBOLS, (n, 2), generator=g)
    for t in range(2, SEQ):
        x[:, t] = perm[x[:, t - 2]]
    return x + 3  # keep clear of special ids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds synchronization, which costs seconds per step on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread) -> tuple:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(N_SYMBOLS, generator=g)
    model = random_model(tiny_config(vocab_size=64, context_length=64), seed=0, std=0.1)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    for _ in range(250):
        x = permutation_sequences(32, perm, g)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return model, perm, float(loss.detach())


def build_store(model, sequences: torch.Tensor, out: Path) -> ActivationStore:
    docs = [(i, s.tolist()) for i, s in enumerate(sequences)]
    ids = [f"seq{i}" for i in range(len(docs))]
    splits = [0 if split_of(i, 0.2) == "train" else 1 for i in ids]
    settings = ExtractSettings(layers=(0, 1), tokens=sequences.numel(), window=SEQ, batch=32, shard_windows=256)
    info = {"name": "tiny-trained", "config": model.config.to_dict()}
    extract(
        model, iter(docs), splits, ids, out, settings, info, {"vocab_size": 64}, {"spec": "synthetic"}, progress=False
    )
    return ActivationStore(out)


def test_model_learned_the_task(trained) -> None:
    _, _, loss = trained
    # the first two tokens of a sequence are unpredictable, the rest are determined: the loss floor is
    # ln(24) * 2/31 ~ 0.2
    assert loss < 0.6


def test_probes_find_a_deterministic_token_two_ahead(trained, tmp_path: Path) -> None:
    model, perm, _ = trained
    g = torch.Generator().manual_seed(1)
    store = build_store(model, permutation_sequences(600, perm, g), tmp_path / "perm")
    result = run_probes(
        store,
        model,
        [1, 2, 3],
        eval_tokens=1500,
        lens_eval_tokens=1000,
        save_dir=tmp_path / "p",
        progress=False,
        dedup_threshold=None,
    )
    chance = 1 / N_SYMBOLS
    # the token at t is in the residual stream at layer 0, and t+2 is a function of it
    assert result.cell(0, 2).probe.top1 > 0.85, result.cell(0, 2).probe
    assert result.cell(1, 2).probe.top1 > 5 * chance, result.cell(1, 2).probe
    for layer in (0, 1):
        cell = result.cell(layer, 2)
        # the control: the same probe on shuffled targets knows nothing
        assert cell.probe_control.top1 < 3 * chance + 0.05, cell.probe_control
        assert cell.lens_control.top1 < 3 * chance + 0.05, cell.lens_control
    # the Future Lens from the last layer at k = 1 decodes the model's own next-token state: it agrees with
    # the model's greedy prediction
    last = result.cell(1, 1)
    assert last.lens.agreement > 0.95
    assert max(result.cell(layer, 2).lens.top1 for layer in (0, 1)) > 0.6
    # the k-step bigram baseline sees the permutation too (it is a function of the current token)
    assert result.baselines[2]["bigram"].top1 > 0.85
    assert result.baselines[2]["unigram"].top1 < 3 * chance
    assert (tmp_path / "p" / "probe-layer01.safetensors").is_file()


def test_probes_stay_at_chance_when_the_future_is_random(trained, tmp_path: Path) -> None:
    model, _, _ = trained
    g = torch.Generator().manual_seed(2)
    sequences = torch.randint(0, N_SYMBOLS, (600, SEQ), generator=g) + 3
    store = build_store(model, sequences, tmp_path / "rand")
    result = run_probes(
        store, model, [2], eval_tokens=1500, lens_eval_tokens=1000, save_dir=None, progress=False, dedup_threshold=None
    )
    chance = 1 / N_SYMBOLS
    for layer in (0, 1):
        cell = result.cell(layer, 2)
        assert cell.probe.top1 < 2.5 * chance, cell.probe
        assert cell.lens.top1 < 2.5 * chance, cell.lens
        # and its cross-entropy is no better than knowing the symbol set
        assert cell.probe.ce > 0.9 * torch.log(torch.tensor(float(N_SYMBOLS)))


def test_negative_case_the_probe_does_not_beat_the_bigram(trained, tmp_path: Path) -> None:
    """x_{t+2} = perm(x_t): everything h_t knows about t+2 is in x_t, so the probe cannot beat the n-grams."""
    model, perm, _ = trained
    store = build_store(model, permutation_sequences(600, perm, torch.Generator().manual_seed(3)), tmp_path / "neg")
    result = run_probes(
        store, model, [2], eval_tokens=1500, lens_eval_tokens=200, save_dir=None, progress=False, dedup_threshold=None
    )
    head = result.headline[2]
    assert head["strongest"].startswith(("ngram", "copy")) and head["strongest_top1"].estimate > 0.85
    assert head["probe"].estimate > 0.85  # the probe does read the token two ahead ...
    assert head["excess"].low <= 0.01 and head["excess"].high < 0.05  # ... but no better than the context does
    # the stacked readout: h_t adds nothing to the baseline features; the interval contains zero
    stacked = head["stacked"]
    assert stacked["B"].estimate > 0.85
    assert stacked["excess"].low <= 0 <= stacked["excess"].high and abs(stacked["excess"].estimate) < 0.02, stacked[
        "excess"
    ]
    # the answer report draws from the JSON alone
    import json

    from forethought.viz.plan import write_answer

    paths = write_answer(tmp_path / "report", {"perm": json.loads(json.dumps(result.to_dict()))}, {})
    assert "(B + h) − B" in paths["markdown"].read_text()
    assert paths["horizon"].stat().st_size > 10_000


def pair_sequences(n: int, perm: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Tokens in doubled pairs (y_0 y_0 y_1 y_1 ...) with y_i = perm[y_{i-3}]: at the second token of a pair,
    x_{t+1} = x_{t+2} = perm[x_{t-4}], a token the last four do not contain, and the model must compute it at t
    to predict x_{t+1}."""
    pairs = SEQ // 2
    y = torch.empty(n, pairs, dtype=torch.long)
    y[:, :3] = torch.randint(0, N_SYMBOLS, (n, 3), generator=g)
    for i in range(3, pairs):
        y[:, i] = perm[y[:, i - 3]]
    return y.repeat_interleave(2, dim=1) + 3


def test_positive_case_the_probe_beats_every_context_baseline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(N_SYMBOLS, generator=g)
    model = random_model(tiny_config(vocab_size=64, context_length=64), seed=0, std=0.1)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(250):
        x = pair_sequences(32, perm, g)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    store = build_store(model, pair_sequences(600, perm, torch.Generator().manual_seed(1)), tmp_path / "pos")
    result = run_probes(
        store, model, [2], eval_tokens=1500, lens_eval_tokens=200, save_dir=None, progress=False, dedup_threshold=None
    )
    head = result.headline[2]
    # every n-gram of context 1..4 and the in-window copy: near chance at the pair's second token
    assert all(iv.estimate < 0.3 for name, iv in result.context[2].items()), result.context[2]
    assert head["excess"].low > 0.1, head  # the probe's lead over the strongest baseline, interval above 0
    # and what h_t adds to a readout of every baseline feature: the interval is above zero
    stacked = head["stacked"]
    assert stacked["B"].estimate < 0.3 and stacked["excess"].low > 0.1, stacked
    # the strata split every held-out position by whether its 4-token context occurs in training
    assert sum(v["share"] for v in stacked["strata"].values()) == pytest.approx(1.0)
