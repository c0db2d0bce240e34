"""The trace API on a tiny random model: capture by name, globs, save/load, patches."""

from __future__ import annotations

import pytest
import torch

from forethought.errors import ForethoughtError
from forethought.model.random_init import random_model, tiny_config
from forethought.trace import Patch, Trace, resolve_names, run_with_trace, trace

TOKENS = [5, 17, 42, 7, 99, 3, 250, 11]


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config(), seed=1)


@pytest.fixture(scope="module")
def tiny64():
    # float64 so that "unchanged" can be tested as exactly equal, not merely close.
    return random_model(tiny_config(), seed=1, dtype=torch.float64)


def test_capture_shapes(tiny):
    c = tiny.config
    T = len(TOKENS)
    logits, tr = run_with_trace(tiny, TOKENS, "embed,resid_post,blocks.1.q,blocks.0.attn_pattern,logits")
    assert tr["resid_post"].shape == (c.n_layers, T, c.d_model)
    assert tr["blocks.1.resid_post"].shape == (T, c.d_model)
    assert tr["embed"].shape == (T, c.d_model)
    assert tr["blocks.1.q"].shape == (T, c.n_heads, c.head_dim)
    assert tr["blocks.0.attn_pattern"].shape == (c.n_heads, T, T)
    assert torch.equal(tr["logits"], logits[0])
    assert torch.allclose(tr["blocks.0.attn_pattern"].sum(-1), torch.ones(c.n_heads, T), atol=1e-5)
    assert "resid_post" in tr and "mlp_out" not in tr
    with pytest.raises(KeyError):
        tr["mlp_out"]


def test_capture_does_not_change_the_output(tiny):
    plain = tiny(torch.tensor([TOKENS]))
    logits, _ = run_with_trace(tiny, TOKENS, "resid_pre,attn_out,resid_mid,mlp_out,resid_post,q,k,v,attn_pattern")
    assert torch.allclose(plain, logits, atol=1e-6)


def test_glob_resolution():
    config = tiny_config(n_layers=12)
    assert resolve_names(config, "blocks.*.q") == [f"blocks.{i}.q" for i in range(12)]
    assert resolve_names(config, "blocks.1?.q") == ["blocks.10.q", "blocks.11.q"]
    assert resolve_names(config, "resid_post") == resolve_names(config, "blocks.*.resid_post")
    # Network order whatever the order asked, and no duplicates.
    assert resolve_names(config, "logits, blocks.3.v, embed, blocks.3.v") == ["embed", "blocks.3.v", "logits"]


@pytest.mark.parametrize("bad", ["blocks.99.q", "resid", "blocks.*.nope", "logit"])
def test_unknown_name_is_a_user_error(tiny, bad):
    with pytest.raises(ForethoughtError, match="no activation matches"):
        trace(tiny, TOKENS, bad)


def test_unknown_patch_name_is_a_user_error(tiny):
    with pytest.raises(ForethoughtError):
        run_with_trace(tiny, TOKENS, patches=[Patch("blocks.7.resid_post", torch.zeros(64))])


def test_save_load_round_trip(tiny, tmp_path):
    tr = trace(tiny, TOKENS, "embed,resid_post,blocks.1.attn_pattern")
    path = tr.save(tmp_path / "t.safetensors", model="tiny", text="hello")
    loaded = Trace.load(path)
    assert loaded.names == tr.names
    for name in tr.names:
        assert torch.equal(loaded.tensors[name], tr.tensors[name])
    assert loaded.token_ids == [TOKENS]
    assert loaded.metadata["model"] == "tiny" and loaded.metadata["text"] == "hello"
    assert torch.equal(loaded["resid_post"], tr["resid_post"])


def test_load_of_a_non_trace_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ForethoughtError, match="not a readable trace"):
        Trace.load(bad)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_patch_changes_later_positions_only(tiny64, mode):
    at = 4
    clean = trace(tiny64, TOKENS, "resid_post,logits")
    value = torch.full((tiny64.config.d_model,), 3.0, dtype=torch.float64)
    _, patched = run_with_trace(
        tiny64, TOKENS, "resid_post,logits", patches=[Patch("blocks.0.resid_post", value, [at], mode)]
    )
    # Causal attention: nothing before the patched position can see it...
    assert torch.equal(patched["logits"][:at], clean["logits"][:at])
    assert torch.equal(patched["resid_post"][:, :at], clean["resid_post"][:, :at])
    # ...while the patched position and every later one change, at the last layer too.
    expected = value if mode == "replace" else clean["blocks.0.resid_post"][at] + value
    assert torch.equal(patched["blocks.0.resid_post"][at], expected)
    after = (patched["blocks.1.resid_post"][at:] - clean["blocks.1.resid_post"][at:]).abs().amax(-1)
    assert bool((after > 1e-6).all())


def test_patch_positions_are_absolute_with_a_cache(tiny64):
    cache = tiny64.new_cache()
    run_with_trace(tiny64, TOKENS[:5], cache=cache)
    value = torch.zeros(tiny64.config.d_model, dtype=torch.float64)
    _, tr = run_with_trace(
        tiny64, TOKENS[5:], "blocks.1.resid_post", cache=cache, patches=[Patch("blocks.1.resid_post", value, [6])]
    )
    assert tr.start == 5
    assert torch.equal(tr["blocks.1.resid_post"][1], value)
    assert not torch.equal(tr["blocks.1.resid_post"][0], value)
    with pytest.raises(ForethoughtError, match="outside this pass"):
        run_with_trace(tiny64, [1], cache=cache, patches=[Patch("blocks.1.resid_post", value, [0])])


def test_cached_trace_continues_the_full_one(tiny64):
    full = trace(tiny64, TOKENS, "resid_post")
    cache = tiny64.new_cache()
    run_with_trace(tiny64, TOKENS[:6], cache=cache)
    tail = trace(tiny64, TOKENS[6:], "resid_post", cache=cache)
    assert torch.allclose(tail["resid_post"], full["resid_post"][:, 6:], atol=1e-12)


def test_empty_tokens_are_a_user_error(tiny):
    with pytest.raises(ForethoughtError):
        trace(tiny, [])
