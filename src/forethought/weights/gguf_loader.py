"""Load a GGUF file: metadata -> ModelConfig, tensors dequantized to float, tokenizer from its vocab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.weights.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")
GGUF_MAGIC = b"GGUF"


def _reader(path: Path):
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ForethoughtError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises whatever numpy/struct raise on a damaged file
        raise ForethoughtError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def read_metadata(reader) -> dict:
    """Every scalar/string metadata field, for manifests and `--json` output (big arrays skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model" and key != "tokenizer.ggml.pre":
            continue
        try:
            value = field.contents()
        except Exception:
            continue
        if isinstance(value, list) and len(value) > 64:
            continue
        out[key] = value
    return out


def config_from_gguf(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ForethoughtError(
            f"{path.name}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ForethoughtError(f"{path.name}: metadata key {arch}.{key} is missing")
        return value

    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ForethoughtError(f"{path.name}: RoPE scaling {scaling!r} is not supported")
    d_model = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    if vocab == 0:
        vocab = next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    gpt2 = arch == "gpt2"
    eps_key = "attention.layer_norm_epsilon" if gpt2 else "attention.layer_norm_rms_epsilon"
    return ModelConfig(
        family="gpt2" if gpt2 else "llama",
        n_layers=int(need("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(need("context_length")),
        norm_eps=float(need(eps_key)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias=arch == "qwen2",
        tie_embeddings=not has_output,
        name=str(_field(reader, "general.name", path.stem)),
    )


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    try:
        if kind == GGMLQuantizationType.F32:
            array = np.array(tensor.data, dtype=np.float32)  # a copy: the memmap is read-only
        elif kind == GGMLQuantizationType.F16:
            array = np.asarray(tensor.data).view(np.float16).astype(np.float32)
        else:
            array = quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise ForethoughtError(f"tensor {tensor.name}: GGUF type {kind.name} cannot be dequantized") from None
    except Exception as e:
        raise ForethoughtError(f"tensor {tensor.name} ({kind.name}) is damaged: {e}") from None
    if array.size != int(np.prod(shape)):
        raise ForethoughtError(f"tensor {tensor.name} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order for RoPE.

    llama.cpp rotates adjacent pairs (0,1),(2,3)...; HF checkpoints rotate halves (i, i+d/2). Its
    converter therefore interleaves each head's rows; we restore the halves layout so one RoPE
    implementation serves both formats.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LLAMA_NAMES = {
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}


def canonical_tensors(reader, config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = t.name
        w = torch.from_numpy(np.ascontiguousarray(_dequantize(t), dtype=np.float32))
        if name.startswith("blk."):
            _, layer, kind, leaf = name.split(".", 3)
            if kind == "attn_qkv":  # GPT-2 stores Q, K, V fused
                for part, chunk in zip("qkv", w.chunk(3, dim=0)):
                    out[f"blocks.{layer}.{part}.{leaf}"] = chunk
                continue
            if kind not in _LLAMA_NAMES:
                raise ForethoughtError(f"unexpected tensor {name} in a {arch} GGUF")
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                heads = config.n_heads if kind == "attn_q" else config.n_kv_heads
                w = _unpermute_rope_rows(w, heads)
            out[f"blocks.{layer}.{_LLAMA_NAMES[kind]}.{leaf}"] = w
        elif name == "token_embd.weight":
            out["embed"] = w
        elif name == "position_embd.weight":
            out["pos_embed"] = w
        elif name == "output.weight":
            out["unembed"] = w
        elif name.startswith("output_norm."):
            out[f"final_norm.{name.split('.', 1)[1]}"] = w
        elif name == "rope_freqs.weight":
            raise ForethoughtError("RoPE frequency factors (Llama 3.1 style scaling) are not supported")
    return out


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    reader = _reader(path)
    config = config_from_gguf(reader, path)
    arch = _field(reader, "general.architecture")
    tensors = canonical_tensors(reader, config, arch)
    tokenizer = Tokenizer.from_gguf_fields(
        model=_field(reader, "tokenizer.ggml.model"),
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=_field(reader, "tokenizer.ggml.tokens"),
        merges=_field(reader, "tokenizer.ggml.merges"),
        token_types=_field(reader, "tokenizer.ggml.token_type"),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        source=path.name,
    )
    return config, tensors, tokenizer, read_metadata(reader)
