"""`--speculative model`: a smaller model of the same vocabulary drafts, the target verifies -- same output."""

from __future__ import annotations

import json
import random

import pytest
import torch

from forethought.errors import ForethoughtError
from forethought.model.generate import GREEDY, generate
from forethought.model.random_init import random_model, tiny_config
from forethought.model.sampling import SamplingParams
from forethought.model.speculative import AutoDrafter, DraftModel, make_drafter


def tiny(seed: int, int8: bool = False):
    model = random_model(tiny_config(), seed=seed, std=0.3)  # std 0.3: peaked, text-like distributions
    return model.quantize_int8_() if int8 else model


@pytest.mark.parametrize("draft_int8", [False, True], ids=["fp32-draft", "int8-draft"])
def test_greedy_is_token_identical_with_another_model_drafting(draft_int8):
    """A draft model with other weights is often wrong; what comes out is still plain greedy decoding."""
    target, rng = tiny(0), random.Random(3)
    accepted = set()
    for trial in range(8):
        prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 20))]
        plain = generate(target, prompt, 30, GREEDY)
        drafter = DraftModel(tiny(1, draft_int8), min_prob=0.0)
        spec = generate(target, prompt, 30, GREEDY, speculative=drafter, draft_len=1 + trial % 5)
        assert spec.new_ids == plain.new_ids, f"trial {trial}"
        accepted.update(spec.speculative.accepted)
    assert 0 in accepted  # rejections happened and the draft cache followed them back


def test_the_model_drafting_for_itself_is_always_right():
    """Known positive: the target's own weights as the draft model propose exactly its greedy tokens, so every
    draft is kept (the draft cache tracks the verified text through every forward) -- K + 1 tokens a forward."""
    target = tiny(0)
    prompt = [5, 9, 2, 44, 17]
    spec = generate(target, prompt, 40, GREEDY, speculative=DraftModel(tiny(0), min_prob=0.0), draft_len=4)
    assert spec.new_ids == generate(target, prompt, 40, GREEDY).new_ids
    assert spec.speculative.accepted == spec.speculative.drafted  # nothing rejected
    assert all(n == 4 for n in spec.speculative.drafted[:-1])  # the last forward may hit the budget
    # Control: another model's drafts are not all kept.
    other = generate(target, prompt, 40, GREEDY, speculative=DraftModel(tiny(1), min_prob=0.0), draft_len=4)
    assert sum(other.speculative.accepted) < sum(other.speculative.drafted)


def test_draft_cache_equals_a_fresh_prefill_of_the_verified_text():
    target, draft = tiny(0), tiny(1)
    drafter = DraftModel(draft, min_prob=0.0)
    spec = generate(target, [7, 1, 8, 2, 8], 25, GREEDY, speculative=drafter, draft_len=5)
    n = drafter.cache.length
    assert drafter._ids == spec.ids[:n] and n >= len(spec.ids) - 6  # at most a draft's worth ahead of the text
    draft.fused_decode = False
    fresh = draft.new_cache(capacity=n)
    draft(torch.tensor([drafter._ids]), cache=fresh)
    for got, want in ((drafter.cache.k, fresh.k), (drafter.cache.v, fresh.v)):
        assert torch.allclose(got[..., :n, :], want[..., :n, :], atol=1e-5, rtol=1e-4)


def test_a_doubtful_draft_model_stops_early():
    """A near-uniform draft model (tiny weights) never reaches 0.4 on its top token: it drafts nothing, and
    the output is plain decoding; with min_prob 0 the same model drafts every time."""
    target, flat = tiny(0), random_model(tiny_config(), seed=1, std=0.001)
    doubtful = generate(target, [3, 4, 5], 12, GREEDY, speculative=DraftModel(flat, min_prob=0.4))
    assert sum(doubtful.speculative.drafted) == 0
    assert doubtful.new_ids == generate(target, [3, 4, 5], 12, GREEDY).new_ids
    eager = generate(target, [3, 4, 5], 12, GREEDY, speculative=DraftModel(flat, min_prob=0.0), draft_len=3)
    assert sum(eager.speculative.drafted) > 0


def test_sampling_with_a_draft_model_keeps_the_seeded_run_reproducible():
    """Sampling: a point-mass draft keeps the target's distribution (tests/test_speculative.py checks the rule);
    here, the same seed gives the same text twice, and drafts were kept and rejected along the way (the target's
    own greedy choice as the draft: kept with its probability, so both happen)."""
    target = tiny(0)
    params = SamplingParams(temperature=0.8, seed=11)
    runs = [generate(target, [1, 2, 3], 30, params, speculative=DraftModel(tiny(0), 0.0), draft_len=3) for _ in "ab"]
    assert runs[0].new_ids == runs[1].new_ids
    assert 0 < sum(runs[0].speculative.accepted) < sum(runs[0].speculative.drafted)


def test_auto_prefers_the_draft_model_and_stays_exact():
    target = tiny(0)
    prompt = [9, 8, 7, 9, 8, 7, 9, 8]  # lookup would match here too
    auto = make_drafter(target, "auto", None, tiny(0))
    assert isinstance(auto, AutoDrafter) and auto.draft_model is not None
    spec = generate(target, prompt, 40, GREEDY, speculative=auto, draft_len=4)
    assert spec.new_ids == generate(target, prompt, 40, GREEDY).new_ids
    assert auto.usage["model"] > 0 and auto.usage["model"] >= auto.usage["lookup"]


def test_draft_model_flags():
    from forethought.model.speculative import check_speculative_flags

    with pytest.raises(ForethoughtError, match="--draft-model is read by --speculative model or auto"):
        check_speculative_flags("lookup", None, None, "qwen2.5-coder-0.5b")
    with pytest.raises(ForethoughtError, match="--draft-model is read by"):
        check_speculative_flags(None, None, None, "qwen2.5-coder-0.5b")
    with pytest.raises(ForethoughtError, match="not read by --speculative model"):
        check_speculative_flags("model", None, "h.safetensors")
    with pytest.raises(ForethoughtError, match="--speculative model needs --draft-model"):
        make_drafter(tiny(0), "model")
    check_speculative_flags("model", 6, None, "qwen2.5-coder-0.5b")  # the valid neighbours pass
    check_speculative_flags("auto", 6, None, "qwen2.5-coder-0.5b")


def test_cli_draft_model_same_tokens_and_one_line_errors(capsys, tiny_gguf, gpt2_gguf, smollm2_dir):
    """The tiny GPT-2 shares the tiny Llama's tokenizer: it can draft for it (same tokens as plain). SmolLM2's
    vocabulary is another: one line, exit 2. `model` without a draft model for an unregistered file: exit 2."""
    from forethought.cli import main

    def run(*extra: str) -> tuple[int, dict | str]:
        code = main(["generate", "def add(a, b):", "-m", str(tiny_gguf), "-n", "12", "-t", "0", *extra])
        out = capsys.readouterr()
        return code, (json.loads(out.out) if code == 0 and "--json" in extra else out.err)

    code, plain = run("--json")
    code2, spec = run("--json", "--speculative", "model", "--draft-model", str(gpt2_gguf["F32"]))
    assert code == code2 == 0 and spec["new_ids"] == plain["new_ids"]
    assert spec["speculative"]["drafter"] == "model" and spec["speculative"]["forwards"] >= 1
    code, err = run("--speculative", "model")
    assert code == 2 and err.count("\n") == 1 and "needs --draft-model" in err
    code, err = run("--speculative", "model", "--draft-model", "smollm2-135m")
    assert code == 2 and err.count("\n") == 1 and "vocabulary differs" in err
    code, err = run("--speculative", "lookup", "--draft-model", "smollm2-135m")
    assert code == 2 and err.count("\n") == 1 and "--draft-model is read by" in err
