"""Speculative decoding keeps the output exact: same greedy tokens, same sampling distribution, same cache."""

from __future__ import annotations

import json
import random

import pytest
import torch

from forethought.errors import ForethoughtError
from forethought.model import kernels, speculative
from forethought.model.generate import GREEDY, generate
from forethought.model.heads import DraftHeads, load_heads
from forethought.model.random_init import random_model, tiny_config
from forethought.model.sampling import SamplingParams, sampling_distribution
from forethought.model.speculative import PromptLookup, generate_speculative


class NoisyOracle:
    """Proposes the true greedy continuation with each token wrong with probability `noise`: every
    acceptance length from 0 to K occurs, which real drafters on a random model would rarely give."""

    name = "oracle"
    needs_state = False

    def __init__(self, truth: list[int], vocab: int, noise: float, seed: int) -> None:
        self.truth, self.vocab, self.noise, self.rng = truth, vocab, noise, random.Random(seed)

    def draft(self, ids, state, k):
        out = []
        for token in self.truth[len(ids) : len(ids) + k]:
            out.append(self.rng.randrange(self.vocab) if self.rng.random() < self.noise else token)
        return out


class FixedDraft:
    """Always proposes the same tokens (for the distribution test: both acceptance branches occur)."""

    name = "fixed"
    needs_state = False

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def draft(self, ids, state, k):
        return self.tokens[:k]


def tiny(variant: str, seed: int = 0):
    if variant == "gpt2":  # no compiled step: the op-by-op path verifies
        return random_model(tiny_config("gpt2"), seed=seed, std=0.3)
    model = random_model(tiny_config(), seed=seed, std=0.3)  # std 0.3: peaked, text-like distributions
    return model.quantize_int8_() if variant == "int8" else model


@pytest.mark.parametrize("variant", ["llama", "int8", "gpt2"])
def test_greedy_is_token_identical_over_many_prompts(variant):
    model = tiny(variant)
    rng = random.Random(1)
    accepted = set()
    for trial in range(12):
        prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 20))]
        plain = generate(model, prompt, 30, GREEDY)
        drafter = NoisyOracle(plain.ids, 256, noise=0.3, seed=trial) if trial % 2 else PromptLookup()
        spec = generate(model, prompt, 30, GREEDY, speculative=drafter, draft_len=1 + trial % 5)
        assert spec.new_ids == plain.new_ids, f"trial {trial}"
        assert spec.speculative.forwards < len(plain.new_ids) or trial % 2 == 0
        accepted.update(spec.speculative.accepted)
    assert {0, 1, 2, 3} <= accepted  # rejections at every depth were exercised


def test_speculative_decoding_past_the_rope_tables_first_size():
    """Verification grows the rope tables as plain forwards do: 600 tokens from a short prompt cross position
    256 (the tables' first size), still token-identical to plain decoding (it used to stop there: 'positions
    256..260 are outside the context'). Speculative runs first, on a fresh model: a plain run would have grown
    the tables already."""
    prompt = [5, 17, 200, 42, 99, 3, 250, 5, 17, 200]
    fresh = random_model(tiny_config(context_length=1024), seed=2, std=0.2)
    assert fresh.rope_cos.shape[0] < len(prompt) + 600
    drafted = generate(fresh, prompt, 600, speculative="lookup")
    plain = generate(random_model(tiny_config(context_length=1024), seed=2, std=0.2), prompt, 600)
    assert drafted.new_ids == plain.new_ids


def test_stop_token_and_budget_match_plain():
    model = tiny("llama")
    prompt = [5, 9, 2]
    plain = generate(model, prompt, 40, GREEDY)
    stop = plain.new_ids[17]
    a = generate(model, prompt, 40, GREEDY, stop_ids=(stop,))
    b = generate(model, prompt, 40, GREEDY, stop_ids=(stop,), speculative=NoisyOracle(plain.ids, 256, 0.0, 0))
    assert a.new_ids == b.new_ids and a.stop_reason == b.stop_reason == "eos"
    for n in (0, 1, 2, 7):
        c = generate(model, prompt, n, GREEDY, speculative=NoisyOracle(plain.ids, 256, 0.0, 0), draft_len=4)
        assert c.new_ids == plain.new_ids[:n]


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_cache_after_rejections_equals_a_fresh_prefill(variant):
    model = tiny(variant)
    prompt = [7, 1, 8, 2, 8]
    plain = generate(model, prompt, 25, GREEDY)
    spec = generate(model, prompt, 25, GREEDY, speculative=NoisyOracle(plain.ids, 256, 0.5, 3), draft_len=5)
    assert 0 in spec.speculative.accepted  # some drafts were rejected and their K/V dropped
    kept = spec.ids[:-1]  # the last token is chosen but not yet run through the model
    assert spec.cache.length == len(kept)
    model.fused_decode = False
    fresh = model.new_cache(capacity=len(kept))
    model(torch.tensor([kept]), cache=fresh)
    n = len(kept)
    for got, want in ((spec.cache.k, fresh.k), (spec.cache.v, fresh.v)):
        assert torch.allclose(got[..., :n, :], want[..., :n, :], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
def test_verifying_t_tokens_is_bitwise_t_steps():
    """The compiled step on T tokens gives exactly the numbers of T single-token steps (fp32 and int8)."""
    for model in (tiny("llama"), tiny("int8")):
        ids = list(range(30, 50))
        a, b = model.new_cache(8), model.new_cache(8)
        model(torch.tensor([ids[:10]]), cache=a)
        model(torch.tensor([ids[:10]]), cache=b)
        one = torch.cat([model.forward_with_state([t], a)[0] for t in ids[10:16]])
        many, states = model.forward_with_state(ids[10:16], b)
        assert torch.equal(one, many) and torch.equal(a.k[..., :16, :], b.k[..., :16, :])
        assert states.shape == (6, model.config.d_model)


def exact_second_token(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(x2) marginalised over x1, by brute force over the vocabulary."""
    model.fused_decode = False
    with torch.inference_mode():
        p1 = sampling_distribution(model(torch.tensor([prompt]))[0, -1], params)
        support = torch.nonzero(p1).squeeze(1)
        batch = torch.tensor([prompt + [int(x)] for x in support])
        last = model(batch)[:, -1]
        p2 = torch.stack([sampling_distribution(row, params) for row in last])
    model.fused_decode = True
    return (p1[support, None] * p2).sum(0)


def sample_second_tokens(model, prompt, params, drafts, n) -> torch.Tensor:
    counts = torch.zeros(model.config.vocab_size)
    for seed in range(n):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed)
        out = generate_speculative(model, prompt, 3, p, FixedDraft(drafts), draft_len=1)
        assert out.speculative.drafted[0] == 1  # x2 went through the acceptance rule
        counts[out.new_ids[1]] += 1
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = probs * n >= 5  # lump rare outcomes into one bin
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([probs[keep], probs[~keep].sum()[None]]) * n
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(observed) - 1
    # The chi-square survival function is the regularised upper incomplete gamma function.
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic.double() / 2))


def test_sampling_distribution_equals_the_models(monkeypatch):
    """x2 drawn through the acceptance rule has the model's distribution (chi-square over 1500 seeds); the
    same test catches a rule that resamples from p instead of the residual (the control)."""
    model = tiny("llama", seed=2)
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = [11, 22, 33]
    exact = exact_second_token(model, prompt, params)
    likely = int(exact.argmax())  # drafted: accepted often, rejected often
    counts = sample_second_tokens(model, prompt, params, [likely], 1500)
    assert chi_square_p(counts, exact) > 1e-3
    assert counts[likely] > 0 and counts.sum() - counts[likely] > 0

    def biased(logits, drafts, params, generator):
        # The classic bug: on rejection, sample from p itself (so the draft gets a second chance).
        for i, d in enumerate(drafts):
            p = sampling_distribution(logits[i], params)
            if float(torch.rand((), generator=generator)) < float(p[d]):
                continue
            return i, int(torch.multinomial(p, 1, generator=generator))
        return len(drafts), int(torch.multinomial(sampling_distribution(logits[-1], params), 1, generator=generator))

    monkeypatch.setattr(speculative, "accept", biased)
    wrong = sample_second_tokens(model, prompt, params, [likely], 1500)
    assert chi_square_p(wrong, exact) < 1e-3


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    assert lookup.draft([1, 2, 3, 4, 9, 1, 2, 3], None, 3) == [4, 9, 1]
    assert lookup.last_match == 3
    assert lookup.draft([1, 2, 3, 4, 9, 1, 2, 3, 4, 7, 2, 3], None, 2) == [4, 7]  # the latest occurrence wins
    assert lookup.draft([5, 6, 7], None, 3) == []
    assert lookup.draft([5, 6, 5], None, 3) == [6, 5]  # a new text resets the index


# ---------------------------------------------------------------------------------------------- heads files


def test_heads_round_trip_and_untrained_heads_are_the_lens(tmp_path):
    model = tiny("llama")
    vocab = torch.arange(0, 256, 2)
    heads = DraftHeads(model.config.d_model, 3, vocab, layer=model.config.n_layers - 1)
    path = heads.save(tmp_path / "h.safetensors", model)
    loaded = load_heads(model, path)
    state = torch.randn(model.config.d_model)
    lens = model.lens_logits(state[None])[0][vocab]
    assert loaded.draft(model, state, 3) == [int(vocab[lens.argmax()])] * 3  # W = 0: h_k = h


@pytest.mark.parametrize(
    "case",
    ["missing", "garbage", "format", "d_model", "nan", "vocab_range", "layer"],
)
def test_heads_file_errors_are_one_line(tmp_path, case):
    from safetensors.torch import save_file

    model = tiny("llama")
    d = model.config.d_model
    path = tmp_path / "h.safetensors"
    meta = {"format": "forethought-draft-heads/1", "d_model": str(d), "vocab_size": "256", "n_layers": "2"}
    meta["layer"] = "1"
    w, vocab = torch.zeros(2, d, d, dtype=torch.float16), torch.arange(10, dtype=torch.int32)
    if case == "garbage":
        path.write_bytes(b"\x00\x01not safetensors")
    elif case != "missing":
        if case == "format":
            meta["format"] = "something-else"
        if case == "d_model":
            meta["d_model"] = "999"
        if case == "nan":
            w[0, 0, 0] = float("nan")
        if case == "vocab_range":
            vocab[3] = 10_000
        if case == "layer":
            meta["layer"] = "0"
        save_file({"w": w, "vocab": vocab}, str(path), metadata=meta)
    with pytest.raises(ForethoughtError) as err:
        load_heads(model, path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_named_weights_must_match_exactly():
    """The compiled step takes weights by name: a missing or unexpected name is an error naming it."""
    if not kernels.available():
        pytest.skip("CPU kernels unavailable")
    model = tiny("llama")
    c = model.config
    globals_, layers = model._decode_step_weights()
    args = (c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps)
    assert kernels.decode_step(globals_, layers, *args) is not None
    broken = [dict(w) for w in layers]
    del broken[1]["mlp_norm"]
    with pytest.raises(RuntimeError, match="layer 1 has no weight named 'mlp_norm'"):
        kernels.decode_step(globals_, broken, *args)
    with pytest.raises(RuntimeError, match="unexpected weight 'extra'"):
        kernels.decode_step(globals_ | {"extra": torch.zeros(1)}, layers, *args)


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")
def test_fallback_is_announced_once(monkeypatch, capsys):
    """Weights the compiled step does not take: op by op, said once on stderr (not silently 30% slower)."""
    model = tiny("llama")
    model.blocks[0].o.weight_t = torch.nn.Parameter(model.blocks[0].o.weight_t.t().contiguous().t(), False)
    monkeypatch.delitem(kernels._state, "announced", raising=False)
    for _ in range(2):
        generate(model, [1, 2, 3], 3, GREEDY)
    err = capsys.readouterr().err
    assert err.count("compiled decode step unavailable") == 1


def test_speculative_user_errors():
    model = tiny("llama")
    with pytest.raises(ForethoughtError, match="--no-cache"):
        generate(model, [1, 2], 4, GREEDY, use_cache=False, speculative="lookup")
    with pytest.raises(ForethoughtError, match="--speculative must be one of"):
        generate(model, [1, 2], 4, GREEDY, speculative="medusa")
    with pytest.raises(ForethoughtError, match="no draft heads ship"):
        generate(model, [1, 2], 4, GREEDY, speculative="heads")
    with pytest.raises(ForethoughtError, match="--draft-len"):
        generate(model, [1, 2], 4, GREEDY, speculative="lookup", draft_len=0)


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_model_greedy_identity_with_shipped_heads_and_lookup(real_lm):
    tok = real_lm.tokenizer
    prompts = [
        "The three primary colors are",
        tok.apply_chat_template("Name two uses of a paperclip."),
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    ]
    for text in prompts:
        ids = tok.encode(text)
        plain = generate(real_lm.model, ids, 24, GREEDY)
        for kind in ("lookup", "heads", "auto"):
            spec = generate(real_lm.model, ids, 24, GREEDY, speculative=kind, draft_len=4)
            assert spec.new_ids == plain.new_ids, (text, kind)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_speculative_prints_the_same_tokens_and_its_acceptance(capsys, tiny_gguf):
    from forethought.cli import main

    def run(*extra: str) -> tuple[int, dict | str]:
        code = main(["generate", "def add(a, b):", "-m", str(tiny_gguf), "-n", "12", "-t", "0", *extra])
        out = capsys.readouterr()
        return code, (json.loads(out.out) if "--json" in extra else out.err)

    code, plain = run("--json")
    code2, spec = run("--json", "--speculative", "lookup", "--draft-len", "3")
    assert code == code2 == 0 and spec["new_ids"] == plain["new_ids"]
    assert spec["speculative"]["drafter"] == "lookup" and spec["speculative"]["speedup"] > 0
    code, err = run("--speculative", "lookup")
    assert code == 0 and "tokens per forward" in err and "x plain decode" in err
    code, err = run("--speculative", "heads")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: no draft heads ship")
    code, err = run("--speculative", "lookup", "--no-cache")
    assert code == 2 and err.startswith("error:")


def test_heads_learn_the_models_continuations(tmp_path):
    """Each prompt twice, so held-out continuations have twins in training: trained heads must forecast
    t+2, t+3 far better than the untrained lens (which predicts t+1), and the saved file drafts the same."""
    from forethought.heads.training import choose_vocab, make_training_data, train_heads

    model = tiny("llama", seed=4)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(8)] for _ in range(12)] * 2
    data = make_training_data(model, prompts, 24, 2, [1], stop_id=None)
    vocab = choose_vocab(data.targets, 200, [])
    heads, acc = train_heads(model, data, 1, vocab, epochs=30, batch_size=64, lr=1e-2)
    untrained, acc0 = train_heads(model, data, 1, vocab, epochs=1, batch_size=64, lr=1e-9)
    assert len(acc) == 2 and acc[0] > acc0[0] + 0.3, (acc, acc0)
    loaded = load_heads(model, heads.save(tmp_path / "h.safetensors", model))
    state = torch.randn(model.config.d_model)
    assert loaded.draft(model, state, 2) == heads.draft(model, state, 2)


def test_heads_files_are_verified_whole(tmp_path):
    """A flipped byte, a resealed defect, another model's weights: each refused in one line; the file itself
    loads in the other dtypes of the same model (its fingerprint tolerates bfloat16 rounding)."""
    model = tiny("llama")
    c = model.config
    heads = DraftHeads(c.d_model, 2, torch.arange(0, 256, 4), layer=c.n_layers - 1)
    with torch.no_grad():
        heads.w.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    path = heads.save(tmp_path / "h.safetensors", model)
    assert torch.equal(load_heads(model, path).w, heads.w.half().float())
    assert load_heads(tiny("int8"), path).n_heads == 2  # the same weights stored as int8
    assert load_heads(model.to(torch.bfloat16), path).n_heads == 2
    model = model.float()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the tensor bytes: parses fine, only the hash can tell
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(ForethoughtError, match="do not match the sha256"):
        load_heads(model, flipped)
    with pytest.raises(ForethoughtError, match="trained for another model"):
        load_heads(tiny("llama", seed=1), path)  # same shapes, other weights


def test_heads_save_is_all_or_nothing(tmp_path, monkeypatch):
    """A failed write (here: the disk fills at the rename) leaves the previous file intact and no temp file."""
    import errno

    import forethought.paths as paths

    model = tiny("llama")
    c = model.config
    path = DraftHeads(c.d_model, 1, torch.arange(8), c.n_layers - 1).save(tmp_path / "h.safetensors", model)
    before = path.read_bytes()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paths.os, "replace", full)
    with pytest.raises(ForethoughtError, match=r"cannot write: No space left on device \(ENOSPC\)") as err:
        DraftHeads(c.d_model, 3, torch.arange(8), c.n_layers - 1).save(path, model)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["h.safetensors"]


@pytest.mark.parametrize(
    ("kind", "draft_len", "heads", "words"),
    [
        ("lookup", 0, None, "--draft-len must be in 1..15"),
        ("lookup", 16, None, "--draft-len must be in 1..15"),
        ("nope", None, None, "--speculative must be one of"),
        (None, None, "h.safetensors", "--heads is read by --speculative"),
        (None, 3, None, "--draft-len sets how many"),
        ("lookup", None, "h.safetensors", "not read by --speculative lookup"),
        ("heads", None, "missing.safetensors", "does not exist"),
    ],
)
def test_speculative_flags_are_checked_without_a_model(kind, draft_len, heads, words, tmp_path):
    from forethought.model.speculative import check_speculative_flags

    (tmp_path / "h.safetensors").write_bytes(b"x")
    with pytest.raises(ForethoughtError, match=words):
        check_speculative_flags(kind, draft_len, str(tmp_path / heads) if heads else None)
    check_speculative_flags("auto", 15, str(tmp_path / "h.safetensors"))  # the valid neighbour passes
