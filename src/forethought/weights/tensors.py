"""Turn a flat dict of weights in one canonical naming into a Transformer.

Every file-format loader translates its own names into these, in the usual [out, in] orientation:
  embed, pos_embed (GPT-2), final_norm.weight/.bias, unembed (absent when tied),
  blocks.{i}.attn_norm.weight/.bias, blocks.{i}.mlp_norm.weight/.bias,
  blocks.{i}.{q,k,v,o}.weight/.bias, blocks.{i}.{gate,up,down}.weight/.bias,
  and for Gemma 3: blocks.{i}.{post_attn_norm,post_mlp_norm,q_norm,k_norm}.weight (norm gains as
  multipliers, i.e. HF's stored value + 1); for the Feedback Transformer no blocks.{i}.k/v but
  memory.norm.weight, memory.k.weight, memory.v.weight, memory.layer_logits; for a GRU stack only the norms
  outside the blocks and blocks.{i}.gru.{weight_ih,weight_hh,bias_ih,bias_hh} (torch's layout).
Keeping the fusing and transposing here means no loader knows about the engine's layout.
"""

from __future__ import annotations

import torch

from forethought.errors import ForethoughtError
from forethought.model.config import ModelConfig
from forethought.model.layers import Linear
from forethought.model.transformer import Transformer


def build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str, consume: bool = False
) -> Transformer:
    """`consume=True` removes each tensor from `tensors` once it is copied into the model, so a loader that
    hands over its only reference holds one copy of the weights at a time, not two (6 GB at 1.5B in float32)."""
    with torch.device("meta"):
        model = Transformer(config)
    # Built on the meta device so no memory is spent on random weights that are overwritten anyway.
    model = model.to_empty(device=device)
    model.init_rope()

    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ForethoughtError(f"the model file lacks the tensor {name!r} needed by a {config.family} model")
        used.add(name)
        return (tensors.pop(name) if consume else tensors[name]).float()

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in tensors else None

    def set_linear(lin: Linear, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        shape = (sum(w.shape[0] for w in weights), *weights[0].shape[1:])  # [out, in]
        expected = tuple(lin.weight_t.shape[::-1])
        if tuple(shape) != expected or any(w.shape[1:] != weights[0].shape[1:] for w in weights):
            shown = tuple(shape) if len(weights) == 1 else [tuple(w.shape) for w in weights]
            raise ForethoughtError(f"weight shape {shown} does not match the config's {expected}")
        # Each part transposed straight into its columns: one copy, where cat + transpose made two.
        weight_t = torch.empty(expected[::-1], dtype=dtype, device=device)
        column = 0
        for w in weights:
            weight_t[:, column : column + w.shape[0]].copy_(w.t())
            column += w.shape[0]
        lin.weight_t.data = weight_t
        if lin.bias is not None:
            parts = [b if b is not None else torch.zeros(wi.shape[0]) for b, wi in zip(biases, weights)]
            lin.bias.data = torch.cat(parts).to(dtype=dtype, device=device)

    def set_norm(norm, prefix: str) -> None:
        norm.weight.data = take(f"{prefix}.weight").to(dtype=dtype, device=device)
        if norm.bias is not None:
            norm.bias.data = take(f"{prefix}.bias").to(dtype=dtype, device=device)

    embed = take("embed")
    if tuple(embed.shape) != (config.vocab_size, config.d_model):
        raise ForethoughtError(f"embedding shape {tuple(embed.shape)} does not match the config")
    model.embed.data = embed.to(dtype=dtype, device=device)
    if model.pos_embed is not None:
        model.pos_embed.data = take("pos_embed")[: config.context_length].to(dtype=dtype, device=device)
    set_norm(model.final_norm, "final_norm")
    # A copy even when tied (671 MB for Gemma's 262k vocabulary in float32): a decode step's unembedding
    # reads the [d_model, vocab] copy 1.6-1.9x faster than a transposed view of the embedding (measured here).
    unembed = embed if config.tie_embeddings else take("unembed")
    set_linear(model.unembed, [unembed], [None])

    # Each block is filled with what its family built (model/families.py): the loader asks the modules, not the
    # family's name.
    if model.memory is not None:  # the Feedback Transformer's shared memory
        set_norm(model.memory.norm, "memory.norm")
        set_linear(model.memory.kv, [take("memory.k.weight"), take("memory.v.weight")], [None, None])
        model.memory.layer_logits.data = take("memory.layer_logits").to(dtype=dtype, device=device)

    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        if hasattr(block, "gru"):  # a GRU layer
            for leaf in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                # Shapes were checked against the config (validate.expected_shapes) before the model was built.
                param = getattr(block.gru, f"{leaf}_l0")
                param.data = take(f"{p}.gru.{leaf}").to(dtype=dtype, device=device)
            block.gru.flatten_parameters()
            continue
        set_norm(block.attn_norm, f"{p}.attn_norm")
        set_norm(block.mlp_norm, f"{p}.mlp_norm")
        if not hasattr(block, "qkv"):  # Feedback: keys and values come from the shared memory map
            set_linear(block.q, [take(f"{p}.q.weight")], [None])
        else:
            set_linear(
                block.qkv,
                [take(f"{p}.{n}.weight") for n in "qkv"],
                [maybe(f"{p}.{n}.bias") for n in "qkv"],
            )
        set_linear(block.o, [take(f"{p}.o.weight")], [maybe(f"{p}.o.bias")])
        if hasattr(block, "up"):  # GPT-2's ungated MLP
            set_linear(block.up, [take(f"{p}.up.weight")], [maybe(f"{p}.up.bias")])
        else:
            set_linear(block.gate_up, [take(f"{p}.gate.weight"), take(f"{p}.up.weight")], [None, None])
        set_linear(block.down, [take(f"{p}.down.weight")], [maybe(f"{p}.down.bias")])
        if block.post_attn_norm is not None:  # Gemma 3's extra norms
            for norm in ("post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"):
                set_norm(getattr(block, norm), f"{p}.{norm}")
    return model.eval()
