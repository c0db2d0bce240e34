"""What an architecture family is to the rest of the engine: its block, its forward pass, its cache, and what
one token costs (parameters, FLOPs, state bytes). One subclass per family module (llama.py, gpt2.py,
gemma3.py, feedback.py, recurrent.py); `families.py` is the registry the Transformer and the config ask.

The defaults are the Llama family's (a decoder with one K/V pair per layer per token); a family overrides
what differs, so adding a family is adding a module, not a branch in every caller.
"""

from __future__ import annotations

import torch
from torch import nn

from forethought.model.config import ModelConfig
from forethought.model.kv_cache import Cache, KVCache
from forethought.model.layers import BLOCK_POINTS, Hooks


class Family:
    name: str = ""
    block: type[nn.Module]
    block_points: tuple[str, ...] = BLOCK_POINTS  # named points inside each block
    model_points: tuple[str, ...] = ()  # named points besides embed, final_norm and logits
    has_attention = True  # False: no attention pattern, q, k or v to show
    shared_rope = False  # reads the Transformer's rotate-half RoPE table (config.use_rope permitting)
    learned_positions = False  # a position embedding added to the token embedding (GPT-2)
    layer_norm = False  # LayerNorm with bias instead of RMSNorm (GPT-2)
    shared_memory = False  # one memory key/value map shared by all layers (the Feedback Transformer)
    compiled_decode = False  # kernels.DecodeStep runs its decode steps; else op by op
    tree_attention = False  # forward_tree: tokens at given positions reading given slots of a BranchCache
    mlp_matrices = 3  # gated MLP: gate, up, down
    residual_fits_float16 = True  # False: the residual stream outgrows float16 (stored activations stay float32)
    hf_model_type: str | None = None  # the HF `model_type` the lab's export writes it as, where HF has a class
    # The canonical tensors of a lab folder of this family (weights/validate.py checks a folder holds exactly
    # these): per block, under `blocks.{i}.`, and once per model, besides embed, unembed and the final norm.
    lab_block_tensors: tuple[str, ...] = ()
    lab_model_tensors: tuple[str, ...] = ()

    def check(self, config: ModelConfig) -> str | None:
        """What is wrong with `config` for this family (a user error), or None."""
        return None

    def shared_module(self, config: ModelConfig) -> nn.Module | None:
        """A module all blocks share (the Feedback Transformer's memory), or None."""
        return None

    def forward(
        self,
        model,
        tokens: torch.Tensor,
        cache: Cache | None,
        hooks: Hooks | None,
        last_only: bool,
        causal: bool,
        start: int,
    ) -> torch.Tensor:
        """Transformer.forward's op-by-op path: logits [batch, positions, vocab] for `tokens` after `start`."""
        raise NotImplementedError

    def forward_tree(self, model, tokens, cache: Cache, positions, visible, hooks, last_only) -> torch.Tensor:
        """Transformer.forward_tree, where `tree_attention` says the family has it."""
        raise NotImplementedError(f"the {self.name} family has no tree attention")

    def tree_slots(self, config: ModelConfig) -> int | None:
        """The most cache slots one forward_tree may read (None: no bound beyond memory)."""
        return None

    def new_cache(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        minimal: bool = False,
    ) -> Cache:
        """An empty cache; `minimal` keeps only what the next token reads (no room to rewind), for measuring:
        it also allocates exactly `capacity` tokens, never fewer (KVCache's `exact`)."""
        return KVCache(config, batch_size, capacity, dtype, device, exact=minimal)

    # ---- what a token costs ------------------------------------------------------------------------------

    def kv_layers(self, config: ModelConfig) -> int:
        """How many K/V pairs a token adds to the cache."""
        return config.n_layers

    def state_bytes(self, config: ModelConfig, n_tokens: int, element_bytes: int = 4) -> int:
        """The state held after `n_tokens` tokens: K and V of global layers grow with every token,
        sliding-window layers stop growing at the window."""
        c = config
        per_layer_token = 2 * c.n_kv_heads * c.head_dim * element_bytes
        local = min(n_tokens, c.sliding_window) if c.sliding_layers else 0
        global_layers = self.kv_layers(c) - len(c.sliding_layers)
        return per_layer_token * (global_layers * n_tokens + len(c.sliding_layers) * local)

    def attention_weights(self, config: ModelConfig) -> int:
        """Weights of one layer's q, k, v and output projections."""
        c = config
        return c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)

    def matmul_weights(self, config: ModelConfig) -> int:
        """Weights of every projection one token goes through below the unembedding (the embedding is a lookup)."""
        c = config
        return c.n_layers * (self.attention_weights(c) + self.mlp_matrices * c.d_model * c.d_ff)

    def matmul_flops(self, config: ModelConfig, with_unembed: bool = True) -> int:
        """2 FLOPs per weight of every projection a token goes through (the embedding lookup is free)."""
        unembed = 2 * config.d_model * config.vocab_size if with_unembed else 0
        return 2 * self.matmul_weights(config) + unembed

    def attention_flops(self, config: ModelConfig, n_keys: float) -> float:
        """QK^T and AV of one query over `n_keys` keys at every layer: 4 * keys * (heads * head_dim)."""
        return 4 * n_keys * config.n_heads * config.head_dim * config.n_layers

    def n_params(self, config: ModelConfig) -> int:
        c = config
        embed = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return self.matmul_weights(c) + embed
