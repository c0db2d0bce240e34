"""Load a GGUF file: metadata -> ModelConfig, tensors dequantized to float, tokenizer from its vocab."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path

import numpy as np
import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.weights import kquants, validate
from forethought.weights.gguf_file import GGUFFile, TensorInfo
from forethought.weights.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2", "gemma3")


def read_metadata(gguf: GGUFFile) -> dict:
    """The metadata fields small enough for manifests and `--json` output (vocabularies skipped)."""
    return {k: v for k, v in gguf.fields.items() if not (isinstance(v, list) and len(v) > 64)}


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    path = gguf.path
    arch = gguf.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ForethoughtError(
            f"{path.name}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    if arch == "gemma3":
        from forethought.weights.gemma import config_from_gguf_gemma3

        return config_from_gguf_gemma3(gguf)

    def need(key: str):
        value = gguf.get(f"{arch}.{key}")
        if value is None:
            raise ForethoughtError(f"{path.name}: metadata key {arch}.{key} is missing")
        return value

    scaling = gguf.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ForethoughtError(f"{path.name}: RoPE scaling {scaling!r} is not supported")
    d_model = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    if n_heads <= 0:
        raise ForethoughtError(f"{path.name}: {arch}.attention.head_count must be positive, got {n_heads}")
    head_dim = int(gguf.get(f"{arch}.attention.key_length", d_model // n_heads))
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = int(gguf.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    if vocab == 0:
        vocab = next((t.shape[0] for t in gguf.tensors if t.name == "token_embd.weight"), 0)
    has_output = any(t.name == "output.weight" for t in gguf.tensors)
    gpt2 = arch == "gpt2"
    eps_key = "attention.layer_norm_epsilon" if gpt2 else "attention.layer_norm_rms_epsilon"
    return ModelConfig(
        family="gpt2" if gpt2 else "llama",
        n_layers=int(need("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(gguf.get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(need("context_length")),
        norm_eps=float(need(eps_key)),
        rope_theta=float(gguf.get(f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias=arch == "qwen2",
        tie_embeddings=not has_output,
        name=str(gguf.get("general.name", path.stem)),
    )


def _dequantize(gguf: GGUFFile, tensor: TensorInfo) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(tensor.type_id)
    raw = gguf.raw_bytes(tensor)
    try:
        if kind == GGMLQuantizationType.F32:
            array = raw.view(np.float32).astype(np.float32)  # a copy: the memmap is read-only
        elif kind == GGMLQuantizationType.F16:
            array = raw.view(np.float16).astype(np.float32)
        elif kind.name in kquants.SUPPORTED:
            array = kquants.dequantize(raw, kind.name)
        else:
            with np.errstate(all="ignore"):  # NaN/inf from broken scales: validate.tensors names the tensor
                array = quants.dequantize(raw, kind)
    except NotImplementedError:
        raise ForethoughtError(f"tensor {tensor.name}: GGUF type {kind.name} cannot be dequantized") from None
    return array.reshape(tensor.shape)


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
# Gemma 3's extra norms (llama.cpp names -> canonical).
_GEMMA3_NAMES = {
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_mlp_norm",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
}


def canonical_tensors(gguf: GGUFFile, config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Every tensor dequantized now, by canonical name."""
    lazy = LazyTensors(gguf, config, arch)
    return {name: lazy[name] for name in lazy}


class LazyTensors(MutableMapping):
    """The canonical tensors of a GGUF, each dequantized when it is asked for and not kept: with
    `build_model(..., consume=True)` a load holds one float32 copy of the weights plus one tensor, not
    two copies (the 1.5B model's peak fell from 9.2 GB to about 6.5). Shapes were checked from the tensor
    index already (validate.gguf_tensor_index); each tensor's values are checked finite as it is made."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig, arch: str) -> None:
        self.gguf, self.config, self.arch = gguf, config, arch
        self._sources: dict[str, tuple[TensorInfo, int | None]] = {}  # name -> (tensor, chunk of a fused QKV)
        self._fused: tuple[str, torch.Tensor | None] = ("", None)
        names = _LLAMA_NAMES | _GEMMA3_NAMES if arch == "gemma3" else _LLAMA_NAMES
        for t in gguf.tensors:
            name = t.name
            if name.startswith("blk."):
                _, layer, kind, leaf = name.split(".", 3)
                if kind == "attn_qkv":  # GPT-2 stores Q, K, V fused
                    for i, part in enumerate("qkv"):
                        self._sources[f"blocks.{layer}.{part}.{leaf}"] = (t, i)
                    continue
                if kind not in names:
                    raise ForethoughtError(f"unexpected tensor {name} in a {arch} GGUF")
                self._sources[f"blocks.{layer}.{names[kind]}.{leaf}"] = (t, None)
            elif name in _GLOBAL_NAMES:
                self._sources[_GLOBAL_NAMES[name]] = (t, None)
            elif name.startswith("output_norm."):
                self._sources[f"final_norm.{name.split('.', 1)[1]}"] = (t, None)
            elif name == "rope_freqs.weight":
                raise ForethoughtError("RoPE frequency factors (Llama 3.1 style scaling) are not supported")

    def __getitem__(self, name: str) -> torch.Tensor:
        t, chunk = self._sources[name]
        if chunk is not None and self._fused[0] == t.name:  # Q, K and V of one fused tensor: dequantize once
            return self._fused[1].chunk(3, dim=0)[chunk]
        w = torch.from_numpy(np.ascontiguousarray(_dequantize(self.gguf, t), dtype=np.float32))
        if chunk is not None:
            self._fused = (t.name, w)
            return w.chunk(3, dim=0)[chunk]
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if self.arch == "llama" and kind in ("attn_q", "attn_k"):
            w = _unpermute_rope_rows(w, self.config.n_heads if kind == "attn_q" else self.config.n_kv_heads)
        return w

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __setitem__(self, name: str, value) -> None:
        raise TypeError("LazyTensors is read-only")

    def __delitem__(self, name: str) -> None:
        del self._sources[name]

    def pop(self, name: str, *default):  # without reading the tensor twice (MutableMapping's pop would)
        if name not in self._sources and default:
            return default[0]
        value = self[name]
        del self._sources[name]
        if value.is_floating_point() and not bool(torch.isfinite(value.sum())):
            raise ForethoughtError(f"{self.gguf.path}: tensor {name} holds NaN or infinite values")
        return value


_GLOBAL_NAMES = {"token_embd.weight": "embed", "position_embd.weight": "pos_embed", "output.weight": "unembed"}


def _default_chat_template(gguf: GGUFFile) -> str | None:
    """The family's chat format for GGUFs that do not carry one (the Gemma 3 270M file does not)."""
    if gguf.get("general.architecture") == "gemma3":
        from forethought.weights.gemma import GEMMA_CHAT_TEMPLATE

        return GEMMA_CHAT_TEMPLATE
    return None


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    gguf, config, tokenizer, meta = open_gguf(path)
    return config, canonical_tensors(gguf, config, gguf.get("general.architecture")), tokenizer, meta


def open_gguf(path: Path) -> tuple[GGUFFile, ModelConfig, Tokenizer, dict]:
    """Everything but the weights: the header checked, the config, the tokenizer, the metadata."""
    gguf = GGUFFile(path)
    validate.gguf_fields(gguf.fields, path.name)
    config = config_from_gguf(gguf)
    validate.gguf_tensor_index(config, gguf.tensors, path.name)
    tokenizer = Tokenizer.from_gguf_fields(
        model=gguf.get("tokenizer.ggml.model"),
        pre=gguf.get("tokenizer.ggml.pre"),
        tokens=gguf.get("tokenizer.ggml.tokens"),
        merges=gguf.get("tokenizer.ggml.merges"),
        token_types=gguf.get("tokenizer.ggml.token_type"),
        bos_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_id=gguf.get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=gguf.get("tokenizer.chat_template"),
        source=path.name,
        scores=gguf.get("tokenizer.ggml.scores"),
        add_space_prefix=bool(gguf.get("tokenizer.ggml.add_space_prefix", True)),
        default_chat_template=_default_chat_template(gguf),
    )
    return gguf, config, tokenizer, read_metadata(gguf)
