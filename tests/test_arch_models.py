"""Known-answer tests of the architectures lab that need no training: myopic gradients, caches, state sizes, export."""

from __future__ import annotations

import pytest
import torch

from forethought.arch.config import ArchConfig
from forethought.arch.models import FeedbackLM, StandardLM, build_model
from forethought.arch.tasks import build_task


class LeafAtEmbed:
    """A trace hook that swaps the embedding output for a leaf tensor, so autograd reports d loss / d input."""

    points = frozenset({"embed"})

    def __call__(self, name, tensor):
        self.leaf = tensor.detach().requires_grad_(True)
        return self.leaf


def input_gradient(model: StandardLM, tokens: torch.Tensor, position: int) -> torch.Tensor:
    hooks = LeafAtEmbed()
    logits = model.net(tokens, hooks=hooks)
    torch.nn.functional.cross_entropy(logits[0, position], tokens[0, position + 1]).backward()
    return hooks.leaf.grad[0].abs().sum(-1)  # one number per input position


@pytest.mark.parametrize("n_layers", [1, 3])
def test_myopic_loss_sends_no_gradient_to_earlier_positions(n_layers):
    config = ArchConfig("myopic", vocab_size=32, d_model=32, n_layers=n_layers, n_heads=4, d_ff=64)
    myopic = build_model(config, seed=1)
    tokens = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(0))
    s = 8
    grad = input_gradient(myopic, tokens, s)
    assert torch.all(grad[:s] == 0)  # exactly zero: nothing from the loss at s reaches t < s
    assert grad[s] > 0
    assert torch.all(grad[s + 1 :] == 0)  # causality
    # The control: the same weights trained the standard way pass gradient to every earlier position.
    myopic.set_myopic(False)
    grad = input_gradient(myopic, tokens, s)
    assert torch.all(grad[:s] > 0)


def test_myopic_forward_equals_standard_forward():
    """Myopic training changes gradients only: the logits of the training forward are the standard ones."""
    config = ArchConfig("myopic", vocab_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    model = build_model(config, seed=2)
    tokens = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    myopic_logits = model(tokens)
    model.set_myopic(False)
    torch.testing.assert_close(myopic_logits, model(tokens), rtol=1e-5, atol=1e-6)


def sharpen(model: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale weights up so a random model's greedy choices are decided by margins, not by rounding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(factor)


@pytest.mark.parametrize("arch", ["feedback", "standard", "recurrent"])
def test_cache_equals_recompute(arch):
    """Greedy decoding with the model's own cache gives the tokens and logits of recomputing the whole prefix."""
    config = ArchConfig(arch, vocab_size=24, d_model=32, n_layers=2, n_heads=4, d_ff=64, context_length=64)
    model = build_model(config, seed=3).eval()
    sharpen(model)
    prompt = [3, 7, 1, 20]
    with torch.no_grad():
        state = model.new_state(1, 64)
        cached_tokens, cached_logits = list(prompt), []
        for t in prompt[:-1]:
            model.step(torch.tensor([[t]]), state)
        for _ in range(20):
            logits = model.step(torch.tensor([[cached_tokens[-1]]]), state)[0, -1]
            cached_logits.append(logits)
            cached_tokens.append(int(logits.argmax()))
        tokens, recomputed = list(prompt), []
        for _ in range(20):
            logits = model(torch.tensor([tokens]))[0, -1]
            recomputed.append(logits)
            tokens.append(int(logits.argmax()))
    assert cached_tokens == tokens
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(recomputed), rtol=1e-5, atol=1e-5)
    # Greedy runs of a random model settle on one token; a random sequence exercises every position's memory.
    sequence = torch.randint(0, 24, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        state = model.new_state(2, 64)
        stepped = torch.cat([model.step(sequence[:, t : t + 1], state) for t in range(40)], dim=1)
        full = model(sequence)
    # float32 rounding, relative to the size of the logits (the sharpened weights make them large)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))


def test_state_bytes_per_token():
    d, L = 32, 3
    shape = dict(vocab_size=16, d_model=d, n_layers=L, n_heads=4, d_ff=64)
    standard = build_model(ArchConfig("standard", **shape))
    feedback = build_model(ArchConfig("feedback", **shape))
    recurrent = build_model(ArchConfig("recurrent", **shape))
    with torch.no_grad():
        kv, memory = standard.new_state(1, 64), feedback.new_state(1, 64)
        for t in range(10):
            standard.step(torch.tensor([[t]]), kv)
            feedback.step(torch.tensor([[t]]), memory)
    # A K and a V per layer per token, vs one K and one V per token, vs a fixed GRU state.
    assert kv.nbytes == standard.state_bytes(10) == 10 * 2 * L * d * 4
    assert memory.nbytes == feedback.state_bytes(10) == 10 * 2 * d * 4
    assert recurrent.state_bytes(10) == recurrent.state_bytes(1000) == L * d * 4


def test_feedback_memory_sees_the_top_layer_of_earlier_tokens():
    """The point of feedback: a change in an earlier token's top layer reaches a later token's first layer.
    Zeroing the weight of every layer but the embedding (the memory = embeddings only) must cut that path."""
    config = ArchConfig("feedback", vocab_size=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    model: FeedbackLM = build_model(config, seed=4)
    tokens = torch.tensor([[1, 2, 3, 4]])
    base = model(tokens)[0, -1]
    with torch.no_grad():
        model.net.blocks[1].down.weight_t.mul_(3.0)  # changes every token's top-layer state
    assert (model(tokens)[0, -1] - base).abs().max() > 1e-4
    with torch.no_grad():
        model.net.memory.layer_logits.copy_(torch.tensor([50.0, -50.0, -50.0]))  # memory = embedding only
    before = model(tokens)[0, 0]
    with torch.no_grad():
        model.net.blocks[1].down.weight_t.mul_(3.0)
    # Token 0 has no past, so only its own path changes; token 3's memory inputs stay the embeddings.
    assert (model(tokens)[0, 0] - before).abs().max() > 1e-4


def test_export_loads_in_engine_with_identical_logits(tmp_path):
    from forethought.arch.export import export_engine_folder
    from forethought.trace import act_name, run_with_trace
    from forethought.weights import load_model

    task = build_task("recall")
    model = build_model(ArchConfig("myopic", vocab_size=task.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64))
    sharpen(model, 4.0)
    export_engine_folder(model, task, tmp_path / "engine")
    lm = load_model(str(tmp_path / "engine"))
    ids = lm.tokenizer.encode("k3 v1 k0 v7 k3")
    assert ids == [3, 9, 0, 15, 3]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))
        engine = lm.model(torch.tensor([ids]))
    torch.testing.assert_close(engine[..., : task.vocab_size], ours, rtol=1e-5, atol=1e-5)
    _, trace = run_with_trace(lm.model, [ids], names=[act_name(1, "resid_post")])
    with torch.no_grad():
        lens = lm.model.lens_logits(trace[act_name(1, "resid_post")])
    torch.testing.assert_close(lens[..., : task.vocab_size], ours[0], rtol=1e-4, atol=1e-4)
