"""forethought vs HF transformers on tiny random checkpoints: same logits, same greedy text, every file format."""

import pytest
import torch
from conftest import QUANT_TYPES, VOCAB

import forethought


def random_sequences(n: int = 3, lengths=(5, 37, 100), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, length), generator=g) for length in lengths[:n]]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.inference_mode()
def test_logits_match_hf(tiny_pair):
    """Every position's logits equal HF's within 1e-4 (Llama, Qwen2 with biases, GPT-2)."""
    lm, hf = tiny_pair
    for ids in random_sequences():
        ours, ref = lm.model(ids), hf(ids).logits
        assert ref.abs().max() > 1  # the random weights give non-trivial logits, so 1e-4 means something
        assert max_diff(ours, ref) <= 1e-4


@torch.inference_mode()
def test_batched_logits_match_hf(tiny_pair):
    """A batch of 2 sequences gives each row the logits HF gives it."""
    lm, hf = tiny_pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    assert max_diff(lm.model(ids), hf(ids).logits) <= 1e-4


def test_config_read_from_folder(tiny_pair, family):
    """The HF config.json becomes the right ModelConfig."""
    lm, hf = tiny_pair
    c = lm.config
    assert (c.n_layers, c.d_model, c.n_heads, c.vocab_size, c.context_length) == (2, 64, 4, VOCAB, 128)
    assert c.n_kv_heads == (4 if family == "gpt2" else 2)
    assert c.qkv_bias == (family == "qwen2")
    assert c.tie_embeddings == (family == "gpt2")
    if family == "qwen2":
        assert c.rope_theta == 1e6 and c.norm_eps == 1e-6


def test_greedy_matches_hf_generate(tiny_pair):
    """16 greedy tokens equal HF generate(do_sample=False), stopping at the same EOS if it comes."""
    lm, hf = tiny_pair
    for ids in random_sequences(lengths=(4, 21, 50), seed=1):
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=0, pad_token_id=0)
        ours = forethought.generate(lm.model, ids[0].tolist(), 16, stop_ids=(0,))
        assert ours.new_ids == ref[0, ids.shape[1] :].tolist()


def test_tokenizer_json_matches_its_source(tiny_lm, tokenizer):
    """The HF-folder tokenizer gives the trained tokenizer's ids and finds EOS through tokenizer_config.json."""
    text = "Once upon a time, 42 foxes said: def main(): return 'hi'\n\n  x"
    assert tiny_lm.tokenizer.encode(text) == tokenizer.encode(text).ids
    assert tiny_lm.tokenizer.decode(tiny_lm.tokenizer.encode(text)) == text
    assert tiny_lm.tokenizer.eos_id == 0


# --- GGUF ------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_gguf_f32_equals_hf_llama(tiny_gguf, llama_dir):
    """The F32 GGUF (Q/K rows permuted as llama.cpp writes them) gives the safetensors model's logits."""
    from conftest import load_hf

    lm, hf = forethought.load_model(str(tiny_gguf)), load_hf(llama_dir)
    assert lm.config.n_kv_heads == 2 and not lm.config.tie_embeddings and lm.config.context_length == 128
    for ids in random_sequences():
        assert max_diff(lm.model(ids), hf(ids).logits) <= 1e-4


def test_gguf_tokenizer_matches_its_source(tiny_gguf, tokenizer):
    """The vocab + merges stored in the GGUF rebuild the same tokenizer, with EOS as a special token."""
    tok = forethought.load_model(str(tiny_gguf)).tokenizer
    text = "The lazy dog, 3.14159 <tag> and\n\tprint(i * i)" + "<|endoftext|>"
    assert tok.encode(text) == tokenizer.encode(text).ids
    assert tok.encode("<|endoftext|>") == [0] and tok.eos_id == 0


def test_gguf_folder_loads_its_single_file(tiny_gguf):
    """A folder holding exactly one .gguf loads that file."""
    assert forethought.load_model(str(tiny_gguf.parent)).path == tiny_gguf


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@torch.inference_mode()
def test_gguf_quantized_matches_hf_gguf(gguf_files, qtype):
    """F16/Q8_0/Q4_0/Q4_1 files give HF's logits for the same file, and differ from F32 only by quantization."""
    from transformers import AutoModelForCausalLM

    path = gguf_files[qtype]
    ours = forethought.load_model(str(path)).model
    f32 = forethought.load_model(str(gguf_files["F32"])).model
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    loose = {"F16": 0.05, "Q8_0": 0.5, "Q4_0": 6.0, "Q4_1": 6.0}[qtype]
    for ids in random_sequences(n=2):
        logits = ours(ids)
        assert max_diff(logits, ref(ids).logits) <= 1e-4
        assert 0 < max_diff(logits, f32(ids)) <= loose


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@torch.inference_mode()
def test_gpt2_gguf_matches_hf(gpt2_gguf, gpt2_dir, qtype):
    """A GPT-2 GGUF (fused QKV, Conv1D weights transposed by the converter) gives HF's logits."""
    from conftest import load_hf
    from transformers import AutoModelForCausalLM

    path = gpt2_gguf[qtype]
    lm = forethought.load_model(str(path))
    assert lm.config.family == "gpt2" and lm.config.context_length == 128
    if qtype == "F32":
        ref = load_hf(gpt2_dir)
    else:
        # HF maps gpt2.context_length to n_ctx, not n_positions: say the table size explicitly.
        kwargs = dict(gguf_file=path.name, dtype=torch.float32, n_positions=128)
        ref = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs).eval()
    for ids in random_sequences():
        assert max_diff(lm.model(ids), ref(ids).logits) <= 1e-4
