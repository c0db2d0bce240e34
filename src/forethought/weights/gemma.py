"""Gemma 3 (text): config from GGUF metadata or an HF config.json, HF weight names, chat format.

Gemma 3 interleaves sliding-window (local) layers with global ones: five local, then one global.
llama.cpp's GGUF does not store that pattern, the local RoPE base or the attention scale; it fixes
them for the architecture (pattern 6, base 10000, 1/sqrt(head_dim)) and so do we, while an HF
config states them (`layer_types`, `rope_local_base_freq`, `query_pre_attn_scalar`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.weights.files import hf_shape
from forethought.weights.gguf_file import GGUFFile

SLIDING_PATTERN = 6  # every sixth layer is global
LOCAL_ROPE_BASE = 10000.0
HF_MODEL_TYPES = ("gemma3_text", "gemma3")

# Gemma's turn markers; the 270M GGUF ships without a template, so this is the one from Gemma's
# tokenizer_config, reduced to what `Tokenizer.apply_chat_template` renders (user turns, then the model's).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def sliding_layers(n_layers: int, pattern: int = SLIDING_PATTERN) -> tuple[int, ...]:
    return tuple(i for i in range(n_layers) if (i + 1) % pattern)


def config_from_gguf_gemma3(gguf: GGUFFile) -> ModelConfig:
    name = gguf.path.name

    def need(key: str):
        value = gguf.get(f"gemma3.{key}")
        if value is None:
            raise ForethoughtError(f"{name}: metadata key gemma3.{key} is missing")
        return value

    scaling = gguf.get("gemma3.rope.scaling.type")
    if scaling not in (None, "none"):
        # The 4B+ models scale global RoPE linearly; the 270M and 1B do not.
        raise ForethoughtError(f"{name}: RoPE scaling {scaling!r} is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if gguf.get(f"gemma3.{key}"):
            raise ForethoughtError(f"{name}: gemma3.{key} is not supported")
    n_layers = int(need("block_count"))
    n_heads = int(need("attention.head_count"))
    head_dim = int(need("attention.key_length"))
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else next(t.shape[0] for t in gguf.tensors if t.name == "token_embd.weight")
    return ModelConfig(
        family="gemma3",
        n_layers=n_layers,
        d_model=int(need("embedding_length")),
        n_heads=n_heads,
        n_kv_heads=int(gguf.get("gemma3.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(need("context_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(gguf.get("gemma3.rope.freq_base", 1_000_000.0)),
        tie_embeddings=not any(t.name == "output.weight" for t in gguf.tensors),
        name=str(gguf.get("general.name", gguf.path.stem)),
        sliding_window=int(need("attention.sliding_window")),
        sliding_layers=sliding_layers(n_layers),
        rope_local_theta=LOCAL_ROPE_BASE,
        query_scale=head_dim**-0.5,
    )


def config_from_hf_gemma3(raw: dict, folder: Path) -> ModelConfig:
    if raw.get("model_type") == "gemma3":  # the multimodal wrapper: its text part
        raw = raw.get("text_config") or {}
    rope = raw.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", {})
    scaling = raw.get("rope_scaling") or {}
    for params in (full, local, scaling):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise ForethoughtError(f"{folder}: RoPE scaling {kind!r} is not supported")
    if raw.get("attn_logit_softcapping"):
        raise ForethoughtError(f"{folder}: attention logit soft-capping is not supported")
    if raw.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ForethoughtError(f"{folder}: activation {raw['hidden_activation']!r} is not supported")
    n_layers = raw["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None:
        local_layers = sliding_layers(n_layers, raw.get("sliding_window_pattern", SLIDING_PATTERN))
    else:
        local_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return ModelConfig(
        family="gemma3",
        **hf_shape(raw, folder, context_length=32768, norm_eps=1e-6),
        rope_theta=full.get("rope_theta", raw.get("rope_theta", 1_000_000.0)),
        qkv_bias=bool(raw.get("attention_bias", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        sliding_window=raw.get("sliding_window") or 4096,
        sliding_layers=local_layers,
        rope_local_theta=local.get("rope_theta", raw.get("rope_local_base_freq", LOCAL_ROPE_BASE)),
        query_scale=raw.get("query_pre_attn_scalar", 256) ** -0.5,
        final_logit_softcap=raw.get("final_logit_softcapping") or 0.0,
    )


_HF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attn_norm",  # Gemma: after attention, not before the MLP
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_BLOCK_RE = re.compile(r"(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")


def canonical_tensors_hf_gemma3(raw: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Gemma 3 names -> canonical ones. HF stores each norm gain as (gain - 1); add the 1 back in
    float32, as HF's forward does, so both give the same multiplier."""
    out: dict[str, torch.Tensor] = {}
    for name, w in raw.items():
        m = _BLOCK_RE.match(name.removeprefix("model."))
        if m:
            layer, module, leaf = m.groups()
            if module in _HF_BLOCK:
                target = _HF_BLOCK[module]
                out[f"blocks.{layer}.{target}.{leaf}"] = w.float() + 1.0 if target.endswith("norm") else w
            continue
        short = name.removeprefix("model.").removeprefix("language_model.").removeprefix("model.")
        if short == "embed_tokens.weight":
            out["embed"] = w
        elif short == "norm.weight":
            out["final_norm.weight"] = w.float() + 1.0
        elif name == "lm_head.weight" and not config.tie_embeddings:
            out["unembed"] = w
    return out
