"""The decoder-only transformer: one `Transformer` for every architecture family, so every one runs under the
same trace API, cache and decode loop.

The model owns what all families share -- the token embedding, the blocks, the final norm and unembedding,
the RoPE table, the compiled decode step -- and asks its family (`config.family_spec`, model/families.py) for
the rest: which block to build, the op-by-op forward, the cache. The shared layers are in model/layers.py.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from forethought.model import kernels
from forethought.model.config import ModelConfig
from forethought.model.families import family_of
from forethought.model.family import Family
from forethought.model.kv_cache import Cache, KVCache
from forethought.model.layers import (
    BLOCK_POINTS,
    GLOBAL_POINTS,
    Hooks,
    LastState,
    Linear,
    Norm,
    rope_tables,
    say_once,
    softcap,
)

__all__ = ["BLOCK_POINTS", "GLOBAL_POINTS", "Hooks", "Transformer"]

# Each model's compiled decode step with the weight addresses it was built for. Kept beside the module,
# not in it, so that copy.deepcopy / pickling a model never meets the (unpicklable) C++ object.
_DECODE_STEPS: weakref.WeakKeyDictionary[Transformer, tuple] = weakref.WeakKeyDictionary()

# Bumped whenever any module registers or replaces a parameter, buffer or submodule (`lin.weight_t =
# Parameter(...)`, a swapped block, a new rope table). Between bumps a built step is checked by its own
# pointers alone (`DecodeStep.current`, moved memory such as `param.data = ...`), not by gathering the
# ~300 weight tensors in Python: that gathering cost ~0.45 ms a token, 2% of a Qwen 0.5B int8 step.
_GENERATION = [0]


def _bump_generation(*_args) -> None:
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_module_registration_hook(_bump_generation)


class Transformer(nn.Module):
    # A batch-1 decode step of a float32 Llama-family model on the CPU (or a few tokens at once, as
    # speculative decoding verifies them), with no hook asking to see inside, runs as one compiled call
    # (kernels.DecodeStep): same numbers up to float rounding, 1.5x faster here (benchmarks/RESULTS.md).
    # Set False on an instance to force the op-by-op path (e.g. for nn.Module hooks, which the compiled
    # step does not call).
    fused_decode = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        family = family_of(c.family)
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.d_model), requires_grad=False)
        self.pos_embed = (
            nn.Parameter(torch.empty(c.context_length, c.d_model), requires_grad=False)
            if family.learned_positions
            else None
        )
        self.blocks = nn.ModuleList(family.block(c, i) for i in range(c.n_layers))
        self.memory = family.shared_module(c)
        self.final_norm = Norm(c.d_model, c.norm_eps, family.layer_norm)
        # Kept [d_model, vocab] even when tied to the embedding: the copy costs memory but makes the
        # largest matrix-vector product of a decode step read at the faster layout.
        self.unembed = Linear(c.d_model, c.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self, positions: int = 256) -> None:
        """cos/sin of the rotation angles of the first `positions` positions (at most the context), in float32
        (HF's rotate-half convention). `forward` grows the table as sequences get longer: sizing it by the
        declared context would let one edited header field (a context of 1e9) allocate tens of gigabytes."""
        c = self.config
        if not self.family.shared_rope or self.rope_cos.device.type == "meta":
            return
        positions = max(1, min(positions, c.context_length))
        # Plain tensors even when first needed inside inference_mode, so autograd may use them later.
        with torch.inference_mode(False), torch.no_grad():
            cos, sin = rope_tables(c.rope_theta, c.head_dim, 0, positions, "cpu")
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_cos.device)

    def rope(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin of positions start..end-1 from the shared table, or None where the family has no shared RoPE
        or the config turns positions off (NoPE)."""
        if not (self.family.shared_rope and self.config.use_rope):
            return None
        return self.rope_cos[start:end].to(dtype), self.rope_sin[start:end].to(dtype)

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin of the given positions (tree attention: tokens of one forward at positions of their own)."""
        if not (self.family.shared_rope and self.config.use_rope):
            return None
        cos, sin = self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)
        if positions.dim() == 2:  # per row [B, T, head_dim] -> [B, 1, T, head_dim]: one table for every head
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    @property
    def family(self) -> Family:
        return family_of(self.config.family)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, capacity: int = 256, batch_size: int = 1, minimal: bool = False) -> Cache:
        """An empty cache of this family's kind (KVCache, SlidingKVCache, RecurrentCache) for this model;
        `minimal` keeps only what the next token reads (it cannot rewind) and allocates exactly `capacity`
        tokens (no 1 GiB preallocation cap), for measuring the state."""
        return self.family.new_cache(self.config, batch_size, capacity, self.dtype, self.device, minimal)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Cache | None = None,
        hooks: Hooks | None = None,
        last_only: bool = False,
        causal: bool = True,
    ) -> torch.Tensor:
        """Logits [batch, positions, vocab] for `tokens` [batch, positions].

        With a cache, `tokens` continue the cached sequence: their K/V are appended and attention
        sees every cached token. `last_only` skips the unembedding of all but the last position
        (prefill only needs that one). `causal=False` removes the mask: a control for experiments,
        never a way to generate.
        """
        c = self.config
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        end = start + T
        if end > c.context_length:
            raise ValueError(f"{end} tokens exceed the context length {c.context_length}")
        if cache is not None:
            cache.reserve(end)
        self._rope_covers(end)
        wanted = hooks.points if hooks is not None else ()
        if T <= kernels.MAX_TOKENS and B == 1 and cache is not None and not wanted and self.fused_decode:
            # A decode step, or the verification of a few drafted tokens (forethought.model.speculative):
            # one compiled call that reads the weights once for all T tokens.
            step = self._decode_step(cache)
            if step is not None:
                logits, _ = step.forward_many(tokens[0].cpu(), start, cache.k, cache.v)
                cache.length = end
                return (logits[-1:] if last_only else logits).unsqueeze(0)
        return self.family.forward(self, tokens, cache, hooks, last_only, causal, start)

    def forward_tree(
        self,
        tokens: torch.Tensor,
        cache: Cache,
        positions: torch.Tensor,
        visible: torch.Tensor,
        hooks: Hooks | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T] stored in slots cache.length.. of `cache`, each at its own
        position and reading only the slots `visible` says: positions [T] or [B, T], visible [T, S] or [B, T, S]
        with S = cache.length + T (the slots before, and the new tokens' own).

        Two uses: tree attention (B = 1, a `BranchCache`): many continuations of many prefix lengths of one
        sequence in one forward, where a batch would copy the prefix once per row; and ragged batches (a
        `KVCache`): prompts of different lengths left-padded into one batch, each row at its own positions and
        blind to its padding, where batching by exact length leaves rows of their own."""
        B, T = tokens.shape
        S = cache.length + T
        rows_ok = visible.shape in ((T, S), (B, T, S)) and positions.shape in ((T,), (B, T))
        if not rows_ok:
            raise ValueError(
                f"forward_tree takes tokens [B, T], positions [T] or [B, T] and visible [T, S] or [B, T, S] with "
                f"S = cache.length + T = {S}; got {tuple(positions.shape)} and {tuple(visible.shape)}"
            )
        if not self.tree_fits(S):
            bound = self.family.tree_slots(self.config)
            why = "has no tree attention" if not self.family.tree_attention else f"reads at most {bound} slots"
            raise ValueError(f"the {self.family.name} family's tree attention {why}; this forward needs {S}")
        if int(positions.max()) >= self.config.context_length:
            raise ValueError(f"position {int(positions.max())} exceeds the context length {self.config.context_length}")
        cache.reserve(S)
        if self.family.shared_rope and int(positions.max()) >= self.rope_cos.shape[0]:
            self.init_rope(2 * int(positions.max()) + 2)
        return self.family.forward_tree(self, tokens, cache, positions, visible, hooks, last_only)

    def tree_fits(self, slots: int) -> bool:
        """Whether forward_tree can run a forward that reads `slots` cache slots in all."""
        bound = self.family.tree_slots(self.config)
        return self.family.tree_attention and (bound is None or slots <= bound)

    def finish(
        self, x: torch.Tensor, cache: Cache | None, end: int, hooks: Hooks | None, last_only: bool
    ) -> torch.Tensor:
        """The end of every family's forward: the cache now holds `end` tokens; the last block's output `x`
        goes through the final norm and unembedding."""
        if cache is not None:
            cache.length = end
        return self._head(x, hooks, last_only)

    def _head(self, x: torch.Tensor, hooks: Hooks | None, last_only: bool) -> torch.Tensor:
        """Final norm + unembedding (+ Gemma's soft-cap) of the last block's output, with their hook points."""
        wanted = hooks.points if hooks is not None else ()
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if "final_norm" in wanted:
            x = hooks("final_norm", x)
        logits = softcap(self.unembed(x), self.config.final_logit_softcap)
        if "logits" in wanted:
            logits = hooks("logits", logits)
        return logits

    def _rope_covers(self, end: int) -> None:
        """Grow the rope tables to cover positions 0..end-1 (doubling: O(log n) rebuilds)."""
        if self.family.shared_rope and end > self.rope_cos.shape[0]:
            self.init_rope(max(end, 2 * self.rope_cos.shape[0]))

    def forward_with_state(
        self, ids: list[int], cache: KVCache, last_only: bool = False, with_state: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [T, vocab] (float32) of `ids` continuing `cache`, and the last block's output (the residual
        before the final norm) [T, d_model], or None without `with_state`: what a drafter reads.

        A few tokens go through the compiled step when it applies (it returns the state for free); else
        the op-by-op forward, with a hook on the last block when the state is wanted.
        """
        tokens = torch.tensor([ids], device=self.device)
        T = len(ids)
        step = None
        if T <= kernels.MAX_TOKENS and self.fused_decode:
            cache.reserve(cache.length + T)
            # The compiled step reads the rope tables as they are: a verification past their end (speculative
            # decoding beyond the positions any forward had reached) must grow them first.
            if cache.length + T <= self.config.context_length:
                self._rope_covers(cache.length + T)
            step = self._decode_step(cache)
        if step is not None:
            logits, states = step.forward_many(tokens[0].cpu(), cache.length, cache.k, cache.v)
            cache.length += T
        else:
            last = LastState(self.blocks[-1].names["resid_post"]) if with_state else None
            logits = self(tokens, cache=cache, hooks=last, last_only=last_only)[0].float()
            states = last.state[0] if last is not None else None
        if last_only:
            logits = logits[-1:]
            states = None if states is None else states[-1:]
        return logits, (states if with_state else None)

    def lens_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The logit lens: this model's final norm + unembedding applied to residual states [..., d_model].

        Runs in the model's dtype on its device and returns float32 logits there; the one place experiments,
        probes and the viewer decode a hidden state into next-token logits.
        """
        first = self.final_norm.weight
        logits = self.unembed(self.final_norm(states.to(device=first.device, dtype=first.dtype))).float()
        return softcap(logits, self.config.final_logit_softcap)

    def announce_decode_path(self) -> None:
        """Say once on stderr when decoding cannot use the compiled step, so that a caller about to stream text
        can have it said first, on its own line, rather than in the middle of the text."""
        if not self.family.compiled_decode:
            family = self.config.family
            say_once(f"the compiled decode step covers Llama-family models only; {family} decodes op by op")

    def _decode_step(self, cache: KVCache):
        """The compiled step for the current weights, or None where it does not apply."""
        built = _DECODE_STEPS.get(self)
        if (
            built is not None
            and built[1] == _GENERATION[0]
            and built[2] is not None
            and not torch.is_grad_enabled()  # requires_grad flips are not hooked: the full check below
            and cache.k.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and built[2].current()
        ):
            return built[2]
        c = self.config
        if not self.family.compiled_decode:
            self.announce_decode_path()
            return None
        if (
            not c.use_rope  # the compiled step always rotates
            or self.device.type != "cpu"
            or self.dtype != torch.float32
            or cache.k.dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            return None
        model_weights, layer_weights = self._decode_step_weights()
        tensors = [t for named in (model_weights, *layer_weights) for t in named.values()]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return None  # someone is training: autograd must see every op
        # Rebuilt whenever a weight tensor is replaced (load, .to(), quantize_int8_); in-place edits
        # need nothing, since the step reads the tensors' memory directly.
        key = tuple(0 if t is None else t.data_ptr() for t in tensors)
        if built is None or built[0] != key:
            try:
                step = kernels.decode_step(
                    model_weights, layer_weights, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
                )
                if step is None:
                    kernels.announce_fallback(kernels.status())
            except RuntimeError as exc:  # weights it does not take (e.g. non-contiguous after surgery): op by op
                step = None
                kernels.announce_fallback(str(exc).splitlines()[0])
            built = (key, _GENERATION[0], step)
        else:
            built = (key, _GENERATION[0], built[2])
        _DECODE_STEPS[self] = built
        return built[2]

    def quantize_int8_(self) -> Transformer:
        """Every weight matrix to int8 with a float16 scale per run of 128 inputs (`Linear.quantize_int8_`;
        embedding, norms and cache stay float)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.quantize_int8_()
        self.forget_decode_step()
        return self

    def forget_decode_step(self) -> None:
        """Drop the compiled step built for the old weights (after they were replaced, not edited in place)."""
        _DECODE_STEPS.pop(self, None)

    def _decode_step_weights(self) -> tuple[dict[str, torch.Tensor | None], list[dict[str, torch.Tensor | None]]]:
        """The weights DecodeStep reads, by the names its constructor documents (None = absent)."""

        def linear(prefix: str, lin: Linear) -> dict[str, torch.Tensor | None]:
            fields = (lin.weight_t, lin.scale, lin.bias)
            return {f"{prefix}.{name}": t for name, t in zip(kernels.LINEAR_FIELDS, fields, strict=True)}

        model_weights = {
            "embed": self.embed,
            "final_norm": self.final_norm.weight,
            **linear("unembed", self.unembed),
            "rope_cos": self.rope_cos,
            "rope_sin": self.rope_sin,
        }
        layer_weights = [
            {
                "attn_norm": b.attn_norm.weight,
                **linear("qkv", b.qkv),
                **linear("o", b.o),
                "mlp_norm": b.mlp_norm.weight,
                **linear("gate_up", b.gate_up),
                **linear("down", b.down),
            }
            for b in self.blocks
        ]
        return model_weights, layer_weights
