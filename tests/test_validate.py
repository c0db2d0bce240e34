"""The issue's table of hostile model files, row by row, on the tiny checkpoints: one clean error naming the field
and value, or a load whose logits are finite -- and nothing sized by the declared context."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from fuzzing import KV, STRING, _encode, parse_gguf

from forethought.errors import ForethoughtError
from forethought.model.random_init import random_model, tiny_config
from forethought.weights import load_model

U32, I32, F32, U64, ARRAY = 4, 5, 6, 10, 9


def _with_kv(src: Path, dst: Path, key: str, type_id: int, payload: bytes) -> Path:
    header = parse_gguf(src)
    header.kvs = [kv for kv in header.kvs if kv.key != key.encode()] + [KV(key.encode(), type_id, payload)]
    dst.write_bytes(header.to_bytes())
    return dst


def _array(item_type: int, values: list) -> bytes:
    return struct.pack("<IQ", item_type, len(values)) + b"".join(_encode(item_type, v) for v in values)


GGUF_ROWS = {
    "alignment 0": ("general.alignment", U32, _encode(U32, 0), "general.alignment"),
    "alignment negative": ("general.alignment", I32, _encode(I32, -32), "general.alignment"),
    "alignment not a power of two": ("general.alignment", U32, _encode(U32, 48), "power of two"),
    "alignment a string": ("general.alignment", STRING, _encode(STRING, "32"), "general.alignment"),
    "rms eps a string": ("llama.attention.layer_norm_rms_epsilon", STRING, _encode(STRING, "1e-5"), "epsilon"),
    "rope base an array": ("llama.rope.freq_base", ARRAY, _array(F32, [1.0, 2.0]), "freq_base"),
    "rope base NaN": ("llama.rope.freq_base", F32, _encode(F32, math.nan), "freq_base"),
    "block_count 1e6": ("llama.block_count", U32, _encode(U32, 10**6), "block_count"),
    "block_count 2^40": ("llama.block_count", U64, _encode(U64, 2**40), "block_count"),
    "block_count 3 (the file has 2)": ("llama.block_count", U32, _encode(U32, 3), "layers"),
    "embedding_length 1e6": ("llama.embedding_length", U32, _encode(U32, 10**6), "shape"),
    "heads do not divide d_model": ("llama.attention.head_count", U32, _encode(U32, 6), "head_count"),
    "kv heads do not divide heads": ("llama.attention.head_count_kv", U32, _encode(U32, 3), "n_kv_heads"),
    "tokens of the wrong type": ("tokenizer.ggml.tokens", ARRAY, _array(U32, [1, 2, 3]), "tokenizer.ggml.tokens"),
    "merges of the wrong type": ("tokenizer.ggml.merges", U32, _encode(U32, 7), "tokenizer.ggml.merges"),
    "eos id outside the vocabulary": ("tokenizer.ggml.eos_token_id", U32, _encode(U32, 10**6), "eos_token_id"),
}


@pytest.mark.parametrize("row", sorted(GGUF_ROWS))
def test_gguf_rows_are_one_error_naming_the_field(tiny_gguf: Path, tmp_path: Path, row: str) -> None:
    key, type_id, payload, words = GGUF_ROWS[row]
    path = _with_kv(tiny_gguf, tmp_path / "m.gguf", key, type_id, payload)
    with pytest.raises(ForethoughtError, match=words) as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


def test_flipped_vocabulary_byte_is_a_clean_error(tiny_gguf: Path, tmp_path: Path) -> None:
    header = parse_gguf(tiny_gguf)
    tokens = next(kv for kv in header.kvs if kv.key == b"tokenizer.ggml.tokens")
    payload = bytearray(tokens.payload)
    payload[-1] = ord("x") if payload[-1] != ord("x") else ord("y")  # the last token's last character
    tokens.payload = bytes(payload)
    (tmp_path / "m.gguf").write_bytes(header.to_bytes())
    with pytest.raises(ForethoughtError, match="merge|twice"):
        load_model(str(tmp_path / "m.gguf"))


def _tensor_edit(src: Path, dst: Path, edit) -> Path:
    header = parse_gguf(src)
    edit({t.name.decode(): t for t in header.tensors})
    dst.write_bytes(header.to_bytes())
    return dst


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda ts: ts["blk.0.attn_q.weight"].dims.__setitem__(0, 0), "dimension of 0"),
        (lambda ts: ts["blk.0.attn_q.weight"].dims.__setitem__(1, 2**62), "dimension|truncated"),
        (lambda ts: setattr(ts["blk.0.attn_q.weight"], "dims", [2**30, 2**30, 2**30, 2**30]), "truncated"),
        (lambda ts: setattr(ts["blk.1.ffn_up.weight"], "offset", 2**40), "truncated"),
        (lambda ts: setattr(ts["blk.1.ffn_up.weight"], "offset", ts["blk.1.ffn_down.weight"].offset), "overlap"),
        (lambda ts: setattr(ts["blk.1.ffn_up.weight"], "name", b"blk.1.ffn_down.weight"), "twice"),
        (lambda ts: ts["blk.1.ffn_up.weight"].dims.reverse(), "shape"),
    ],
    ids=["dim 0", "dim 2^62", "product overflows", "offset past the end", "overlap", "duplicate name", "transposed"],
)
def test_gguf_tensor_index_rows(tiny_gguf: Path, tmp_path: Path, edit, words: str) -> None:
    path = _tensor_edit(tiny_gguf, tmp_path / "m.gguf", edit)
    with pytest.raises(ForethoughtError, match=words):
        load_model(str(path))


@pytest.mark.parametrize("new_type", [2, 16, 34])  # Q4_0, IQ2_XXS, TQ1_0: other valid types of other sizes
def test_tensor_type_swap_is_an_error_or_finite(gguf_files, tmp_path: Path, new_type: int) -> None:
    path = _tensor_edit(
        gguf_files["Q4_1"], tmp_path / "m.gguf", lambda ts: setattr(ts["blk.0.ffn_up.weight"], "type_id", new_type)
    )
    try:
        lm = load_model(str(path))
    except ForethoughtError:
        return
    assert torch.isfinite(lm.model(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.parametrize("context", [10**8, 2**31 - 1])
def test_huge_declared_context_allocates_nothing(tiny_gguf: Path, tmp_path: Path, context: int) -> None:
    path = _with_kv(tiny_gguf, tmp_path / "m.gguf", "llama.context_length", U64, _encode(U64, context))
    lm = load_model(str(path))
    assert lm.config.context_length == context
    assert lm.model.rope_cos.shape[0] <= 256  # the table covers what has been used, not what is declared
    assert lm.model.new_cache(capacity=16).capacity == 16
    assert torch.isfinite(lm.model(torch.tensor([[1, 2, 3]]))).all()


# --- HF config.json ------------------------------------------------------------------------------------------

HF_ROWS = {
    "num_attention_heads 0": ('"num_attention_heads"', "0", "num_attention_heads"),
    "an integer of 5000 digits": ('"hidden_size"', "1" * 5000, "config.json"),
    "100k nested arrays": ('"hidden_size"', "[" * 100_000 + "]" * 100_000, "config.json"),
    "rope_scaling a string": ('"rope_scaling"', '"linear"', "rope_scaling"),
    "rope_theta a string": ('"rope_theta"', '"10000"', "rope_theta"),
    "rms_norm_eps NaN": ('"rms_norm_eps"', "NaN", "rms_norm_eps"),
    "hidden_size 1e6": ('"hidden_size"', "1000000", "shape"),
    "vocab_size 1e10": ('"vocab_size"', "10000000000", "vocab_size"),
    "num_hidden_layers 1e6": ('"num_hidden_layers"', "1000000", "num_hidden_layers"),
    "heads do not divide hidden": ('"num_attention_heads"', "3", "n_kv_heads|divide"),
    "tie_word_embeddings a string": ('"tie_word_embeddings"', '"yes"', "tie_word_embeddings"),
}


def _hf_copy(llama_dir: Path, tmp_path: Path, key: str, raw_value: str) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[json.loads(key)] = "__V__"
    (folder / "config.json").write_text(json.dumps(config).replace('"__V__"', raw_value))
    return folder


@pytest.mark.parametrize("row", sorted(HF_ROWS))
def test_hf_rows_are_one_error_naming_the_field(llama_dir: Path, tmp_path: Path, row: str) -> None:
    key, value, words = HF_ROWS[row]
    with pytest.raises(ForethoughtError, match=words) as info:
        load_model(str(_hf_copy(llama_dir, tmp_path, key, value)))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_hf_huge_max_positions_loads_lazily(llama_dir: Path, tmp_path: Path) -> None:
    lm = load_model(str(_hf_copy(llama_dir, tmp_path, '"max_position_embeddings"', "1000000000")))
    assert lm.model.rope_cos.shape[0] <= 256 and torch.isfinite(lm.model(torch.tensor([[1, 2, 3]]))).all()


def test_hf_transposed_tensor_and_overriding_shard(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "t"
    shutil.copytree(llama_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].t().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ForethoughtError, match="blocks.0.up.weight has shape"):
        load_model(str(folder))
    folder = tmp_path / "s"
    shutil.copytree(llama_dir, folder)
    save_file({"model.norm.weight": torch.ones(3)}, str(folder / "model-2.safetensors"))
    with pytest.raises(ForethoughtError, match="also in another shard"):
        load_model(str(folder))


# --- the RoPE table grows with use, and gives the same numbers as one built at once ---------------------------


def test_rope_grows_with_use_and_matches_an_eager_table() -> None:
    torch.manual_seed(0)
    model = random_model(tiny_config(context_length=2048), seed=4)
    assert model.rope_cos.shape[0] == 256
    ids = torch.randint(0, model.config.vocab_size, (1, 300))
    cache = model.new_cache(capacity=8)
    stepped = [model(ids[:, :250], cache=cache)[0, -1]]
    for t in range(250, 300):  # decode steps across the table's first growth (256 -> 512)
        stepped.append(model(ids[:, t : t + 1], cache=cache)[0, -1])
    assert model.rope_cos.shape[0] == 512
    full = model(ids)[0, 249:]
    torch.testing.assert_close(torch.stack(stepped), full, atol=2e-4, rtol=1e-4)
    c = model.config
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    angles = torch.outer(torch.arange(512, dtype=torch.float32), inv_freq)
    assert torch.equal(model.rope_cos, torch.cat((angles, angles), -1).cos())


def test_kv_cache_preallocation_is_capped_and_grows_with_use(monkeypatch) -> None:
    from forethought.model.kv_cache import KVCache

    model = random_model(tiny_config(context_length=10**9), seed=5)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x float32
    monkeypatch.setattr(KVCache, "PREALLOCATE_BYTES", 8 * per_token)
    cache = model.new_cache(capacity=10**9)  # would be 256 GB up front
    assert cache.capacity == 8
    model(torch.randint(0, 256, (1, 20)), cache=cache)
    assert cache.length == 20 and cache.capacity >= 20
    assert cache.copy().length == 20
