"""Load a Hugging Face model folder: config.json, *.safetensors (sharded or not), tokenizer.json."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.weights import validate
from forethought.weights.files import hf_shape, read_json
from forethought.weights.gemma import HF_MODEL_TYPES, canonical_tensors_hf_gemma3, config_from_hf_gemma3
from forethought.weights.tokenizer import Tokenizer

LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm", "smollm2")
# Folders written by `forethought arch train` for architectures HF has no class for; their tensors are stored
# under the engine's canonical names (weights/tensors.py).
LAB_TYPES = {"forethought_feedback": "feedback", "forethought_recurrent": "recurrent", "forethought_llama": "llama"}


def config_from_hf(raw: dict, folder: Path) -> ModelConfig:
    kind = raw.get("model_type")
    if kind == "gpt2":
        return ModelConfig(
            family="gpt2",
            n_layers=raw["n_layer"],
            d_model=raw["n_embd"],
            n_heads=raw["n_head"],
            n_kv_heads=raw["n_head"],
            head_dim=raw["n_embd"] // raw["n_head"],
            d_ff=raw.get("n_inner") or 4 * raw["n_embd"],
            vocab_size=raw["vocab_size"],
            context_length=raw["n_positions"],
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=True,
            name=folder.name,
        )
    if kind in LLAMA_TYPES:
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ForethoughtError(f"{folder}: RoPE scaling {rope_type!r} is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ForethoughtError(f"{folder}: activation {raw['hidden_act']!r} is not supported")
        return ModelConfig(
            family="llama",
            **hf_shape(raw, folder, context_length=2048, norm_eps=1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            qkv_bias=kind == "qwen2" or bool(raw.get("attention_bias", False)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    if kind in HF_MODEL_TYPES:
        return config_from_hf_gemma3(raw, folder)
    if kind in LAB_TYPES:
        use_rope = raw.get("use_rope", True)
        if not isinstance(use_rope, bool):
            raise ForethoughtError(f"{folder}: use_rope must be true or false, got {use_rope!r}")
        # The lab writes every key (multi-head attention, untied unembedding); these defaults are never read.
        return ModelConfig(
            family=LAB_TYPES[kind],
            **hf_shape(raw, folder, context_length=256, norm_eps=1e-5),
            rope_theta=raw.get("rope_theta", 10000.0),
            use_rope=use_rope,
            tie_embeddings=False,
        )
    raise ForethoughtError(
        f"{folder}: model_type {kind!r} is not supported "
        f"(supported: gpt2, {', '.join(LLAMA_TYPES)}, {', '.join(HF_MODEL_TYPES)}, {', '.join(LAB_TYPES)})"
    )


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ForethoughtError(f"{folder}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            shard = load_file(str(f))
            twice = next((name for name in shard if name in tensors), None)
            if twice is not None:
                raise ForethoughtError(f"{f}: tensor {twice} is also in another shard")
            tensors.update(shard)
        except (SafetensorError, OSError, ValueError) as e:
            raise ForethoughtError(f"{f}: corrupt safetensors file ({e})") from None
    return tensors


_GPT2_BLOCK = {
    "ln_1": "attn_norm",
    "ln_2": "mlp_norm",
    "attn.c_proj": "o",
    "mlp.c_fc": "up",
    "mlp.c_proj": "down",
}
_LLAMA_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_BLOCK_NAMES = {"gpt2": _GPT2_BLOCK}  # HF's block tensor names by family; Llama's otherwise


def canonical_tensors(raw: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    table = _BLOCK_NAMES.get(config.family, _LLAMA_BLOCK)
    gpt2 = table is _GPT2_BLOCK  # GPT-2's checkpoint layout: Conv1D weights, one fused c_attn
    block_re = re.compile(r"(?:transformer\.|model\.)?(?:h|layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for name, w in raw.items():
        m = block_re.match(name)
        if m:
            layer, module, leaf = m.groups()
            if gpt2 and module.endswith(("attn.bias", "masked_bias")):
                continue
            if gpt2 and leaf == "weight" and module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                w = w.t()  # GPT-2's Conv1D stores [in, out]
            if gpt2 and module == "attn.c_attn":
                for part, chunk in zip("qkv", w.chunk(3, dim=0)):
                    out[f"blocks.{layer}.{part}.{leaf}"] = chunk
                continue
            if module in table:
                out[f"blocks.{layer}.{table[module]}.{leaf}"] = w
            continue
        short = name.removeprefix("transformer.").removeprefix("model.")
        if short in ("wte.weight", "embed_tokens.weight"):
            out["embed"] = w
        elif short == "wpe.weight":
            out["pos_embed"] = w
        elif short in ("ln_f.weight", "ln_f.bias", "norm.weight"):
            out[f"final_norm.{short.rsplit('.', 1)[1]}"] = w
        elif name == "lm_head.weight" and not config.tie_embeddings:
            out["unembed"] = w
    return out


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ForethoughtError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    raw_config = read_json(config_path)
    validate.hf_config(raw_config, config_path)
    lab = raw_config.get("model_type") in LAB_TYPES or "forethought_arch" in raw_config
    if lab:  # written by `arch train`: whole (its manifest), and labelled as what its tensors are
        validate.folder_manifest(folder)
        validate.lab_config(raw_config, config_path)
    try:
        config = config_from_hf(raw_config, folder)
    except KeyError as e:
        raise ForethoughtError(f"{config_path} lacks the key {e.args[0]!r}") from None
    except TypeError as e:
        raise ForethoughtError(f"{config_path} has a value of the wrong type ({e})") from None
    if raw_config.get("model_type") in HF_MODEL_TYPES:  # Gemma 3
        tensors = canonical_tensors_hf_gemma3(_read_safetensors(folder), config)
    elif raw_config.get("model_type") in LAB_TYPES:  # already under the canonical names
        tensors = _read_safetensors(folder)
    else:
        tensors = canonical_tensors(_read_safetensors(folder), config)
    if lab:
        validate.lab_tensors(config, tensors, folder)
    eos = raw_config.get("eos_token_id")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        generation = read_json(gen_path)
        validate.generation_eos(generation, folder)
        eos = generation.get("eos_token_id", eos)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    tokenizer = Tokenizer.from_hf_folder(folder, eos)
    return config, tensors, tokenizer, {"model_type": raw_config.get("model_type")}
