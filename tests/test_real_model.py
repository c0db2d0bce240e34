"""The embedded SmolLM2-135M (Q4_1 GGUF) against HF transformers loading the same file in float32.

Both models are loaded once per session (~10 s and ~30 s). Marked `slow` as documentation only: they run by
default with `pytest -q`.
"""

import pytest
import torch

from forethought import generate

pytestmark = pytest.mark.slow

PROMPTS = {
    "prose": "Once upon a time, there was a little girl named Lily who loved to play in the garden with her dog.",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "numbers": "Q3 revenue: $1,234,567.89 (+12.5% y/y); EPS = 0.42 -> 0.57?! See table 7, rows 3-9 [draft #2].",
}
TOKENIZER_SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "import os\n\nclass Foo(Bar):\n    def __init__(self, x: int = 3) -> None:\n        self.x = x  # comment\n",
    "spaces:    four, then  two\n\n\nthree newlines\r\nand a CRLF",
    "\ttab\t\tdouble tab",
    "Café, naïve, Ærøskøbing, São Paulo, Zürich",
    "emoji 🙂👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "中文字符和日本語のテキスト, 한국어",
    "digits 0123456789 3.14159 1e-10 2024-11-23 1,000,000",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "",
    " leading space and trailing space ",
]


@torch.inference_mode()
def test_config_matches_the_documented_architecture(real_lm):
    c = real_lm.config
    shape = (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size)
    assert shape == (30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.norm_eps == pytest.approx(1e-5)
    assert real_lm.tokenizer.eos_id == 2
    assert real_lm.model.new_cache().bytes_per_token == 2 * 30 * 3 * 64 * 4


@pytest.mark.parametrize("name", PROMPTS)
@torch.inference_mode()
def test_logits_match_hf(real_lm, hf_real, name):
    """Logits at every position equal HF's within 1e-3 (both dequantize the same Q4_1 file to float32)."""
    ids = real_lm.tokenizer.encode(PROMPTS[name])
    assert len(ids) >= 16
    tokens = torch.tensor([ids])
    ours, ref = real_lm.model(tokens), hf_real(tokens).logits
    assert (ours[0, -1] - ref[0, -1]).abs().max() <= 1e-3
    assert (ours - ref).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["prose", "code"])
@torch.inference_mode()
def test_greedy_32_tokens_match_hf_generate(real_lm, hf_real, name):
    ids = real_lm.tokenizer.encode(PROMPTS[name])
    ref = hf_real.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2)
    ours = generate(real_lm.model, ids, 32, stop_ids=(2,))
    assert ours.new_ids == ref[0, len(ids) :].tolist()


def test_cached_and_recomputed_greedy_agree(real_lm):
    """Same 32 greedy tokens with the KV cache and with the whole prefix recomputed at every step."""
    ids = real_lm.tokenizer.encode(PROMPTS["numbers"])
    cached = generate(real_lm.model, ids, 32)
    assert cached.new_ids == generate(real_lm.model, ids, 32, use_cache=False).new_ids


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES)
def test_token_ids_match_hf_tokenizer(real_lm, hf_real_tokenizer, text):
    """Same ids as HF's tokenizer built from the same GGUF (no BOS is added: the file says so)."""
    assert real_lm.tokenizer.encode(text) == hf_real_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES + list(PROMPTS.values()))
def test_decode_inverts_encode(real_lm, text):
    assert real_lm.tokenizer.decode(real_lm.tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(real_lm):
    tok = real_lm.tokenizer
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 2], skip_special=True) == ""


def test_chat_template_renders(real_lm, hf_real_tokenizer):
    """The GGUF's chat template wraps the user's text and ends ready for the assistant, as HF renders it."""
    rendered = real_lm.tokenizer.apply_chat_template("What is the capital of France?")
    assert "What is the capital of France?" in rendered
    assert rendered.rstrip("\n").endswith("<|im_start|>assistant")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert rendered == hf_real_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
