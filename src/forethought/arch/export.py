"""Write a trained model as a model folder (config.json, model.safetensors, tokenizer.json), so
`forethought.weights.load_model(folder)` -- and with it `lens`, `probe`, the trace API and the viewer -- runs it on
the engine unchanged. Standard and myopic models are written as Hugging Face Llama folders (HF transformers loads
them too); the Feedback Transformer, the GRU and models trained without positional encoding, which HF has no class
for, as `forethought_feedback` / `forethought_recurrent` / `forethought_llama` folders holding the engine's
canonical tensor names (weights/tensors.py).

Synthetic tasks get a word-level tokenizer over their own symbols (space-separated). A text model was trained on
the embedded tokenizer's most frequent tokens plus <unk>; the export restores the full vocabulary so the engine
tokenizes text exactly as in training: every token outside the kept set gets <unk>'s embedding and <unk>'s
unembedding row. Hidden states, and the ranking of kept tokens, are the trained model's exactly; probabilities
differ in that <unk>'s mass is repeated once per rare token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from forethought.arch.models import ArchModel, EngineLM
from forethought.arch.tasks import Task, TextTask
from forethought.errors import ForethoughtError
from forethought.model.transformer import Transformer


def token_names(task: Task) -> list[str]:
    """One printable, space-free name per synthetic token id."""
    name = task.name
    if name == "recall":
        keys = task.keys
        return [f"k{i}" for i in range(keys)] + [f"v{i}" for i in range(task.vocab_size - keys)]
    if name.startswith("perm"):
        from forethought.arch.tasks import _permutations

        perms, _ = _permutations(task.elements)
        return ["p" + "".join(map(str, p)) for p in perms]
    return [str(i) for i in range(task.vocab_size)]


def _word_level_tokenizer(names: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {n: i for i, n in enumerate(names)} | {"<unk>": len(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok.to_str()


def export_engine_folder(model: ArchModel, task: Task, folder: Path) -> Path:
    """Write `model` where `load_model(folder)` reads it; returns the folder."""
    from safetensors.torch import save

    if not isinstance(model, EngineLM):
        raise ForethoughtError(f"{type(model).__name__} does not run on the engine")
    net = model.net
    c = net.config
    embed = net.embed.detach()
    unembed = net.unembed.weight_t.detach().t()  # [vocab, d]
    vocab_size = c.vocab_size
    if isinstance(task, TextTask):
        from forethought.arch.tasks import embedded_tokenizer

        tokenizer = embedded_tokenizer()
        vocab_size = tokenizer.vocab_size
        full = torch.full((vocab_size,), task.vocab_size - 1, dtype=torch.long)  # <unk> everywhere ...
        full[torch.from_numpy(task.kept_ids)] = torch.arange(len(task.kept_ids))  # ... but the kept tokens
        embed, unembed = embed[full], unembed[full]
        tokenizer_json = tokenizer.backend.to_str()
    else:
        names = token_names(task)
        # One extra row for the tokenizer's <unk>, never produced by the task: zero embedding, zero logit.
        embed = torch.cat((embed, embed.new_zeros(1, c.d_model)))
        unembed = torch.cat((unembed, unembed.new_zeros(1, c.d_model)))
        vocab_size += 1
        tokenizer_json = _word_level_tokenizer(names)
    if c.family_spec.hf_model_type and c.use_rope:  # HF's own class loads it
        tensors, model_type = _llama_tensors(net), c.family_spec.hf_model_type
    else:  # HF has no class for these (a Llama without RoPE would load in HF as one with it)
        tensors, model_type = _canonical_tensors(net), f"forethought_{c.family}"
    tensors |= (
        {"embed": embed, "unembed": unembed}
        if model_type != "llama"
        else {
            "model.embed_tokens.weight": embed,
            "lm_head.weight": unembed,
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    weights = save({k: v.contiguous().float() for k, v in tensors.items()})  # bytes: a full disk is an OSError
    (folder / "model.safetensors").write_bytes(weights)
    config = {
        "model_type": model_type,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": c.n_layers,
        "vocab_size": vocab_size,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": False,
        "forethought_arch": {"arch": model.config.arch, "task": task.describe()},
    }
    if model_type == "llama":
        config |= {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
    elif c.family_spec.has_attention:  # a GRU has no positions to encode
        config["use_rope"] = c.use_rope
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    return folder


def _llama_tensors(net: Transformer) -> dict[str, torch.Tensor]:
    """The blocks and final norm under HF Llama's names."""
    c = net.config
    hd, nq, ff = c.head_dim, c.n_heads, c.d_ff
    tensors = {"model.norm.weight": net.final_norm.weight.detach()}
    for i, block in enumerate(net.blocks):
        p = f"model.layers.{i}"
        qkv = block.qkv.weight_t.detach()
        gate_up = block.gate_up.weight_t.detach()
        tensors |= {
            f"{p}.input_layernorm.weight": block.attn_norm.weight.detach(),
            f"{p}.post_attention_layernorm.weight": block.mlp_norm.weight.detach(),
            f"{p}.self_attn.q_proj.weight": qkv[:, : nq * hd].t(),
            f"{p}.self_attn.k_proj.weight": qkv[:, nq * hd : (nq + c.n_kv_heads) * hd].t(),
            f"{p}.self_attn.v_proj.weight": qkv[:, (nq + c.n_kv_heads) * hd :].t(),
            f"{p}.self_attn.o_proj.weight": block.o.weight_t.detach().t(),
            f"{p}.mlp.gate_proj.weight": gate_up[:, :ff].t(),
            f"{p}.mlp.up_proj.weight": gate_up[:, ff:].t(),
            f"{p}.mlp.down_proj.weight": block.down.weight_t.detach().t(),
        }
    return tensors


def _canonical_tensors(net: Transformer) -> dict[str, torch.Tensor]:
    """The blocks, final norm and (Feedback Transformer) memory under the engine's canonical names, [out, in]:
    the format for the lab's models HF cannot load (feedback, GRU, a Llama without RoPE)."""
    c = net.config
    tensors = {"final_norm.weight": net.final_norm.weight.detach()}
    for i, block in enumerate(net.blocks):
        p = f"blocks.{i}"
        if hasattr(block, "gru"):  # a GRU layer
            for leaf in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                tensors[f"{p}.gru.{leaf}"] = getattr(block.gru, f"{leaf}_l0").detach()
            continue
        gate, up = block.gate_up.weight_t.detach().t().chunk(2, dim=0)
        if hasattr(block, "qkv"):
            q, k, v = (
                block.qkv.weight_t.detach()
                .t()
                .split((c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim))
            )
            tensors |= {f"{p}.k.weight": k, f"{p}.v.weight": v}
        else:  # the Feedback Transformer's keys and values come from the shared memory map
            q = block.q.weight_t.detach().t()
        tensors |= {
            f"{p}.attn_norm.weight": block.attn_norm.weight.detach(),
            f"{p}.mlp_norm.weight": block.mlp_norm.weight.detach(),
            f"{p}.q.weight": q,
            f"{p}.o.weight": block.o.weight_t.detach().t(),
            f"{p}.gate.weight": gate,
            f"{p}.up.weight": up,
            f"{p}.down.weight": block.down.weight_t.detach().t(),
        }
    if net.memory is not None:  # the Feedback Transformer's shared key/value map
        k, v = net.memory.kv.weight_t.detach().t().chunk(2, dim=0)
        tensors |= {
            "memory.norm.weight": net.memory.norm.weight.detach(),
            "memory.k.weight": k,
            "memory.v.weight": v,
            "memory.layer_logits": net.memory.layer_logits.detach(),
        }
    return tensors
