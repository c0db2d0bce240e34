"""Draft heads: the model's own hidden state, read as a forecast of the tokens after the next one.

Head k (k = 1..K) is one small residual block on a block's output x at position t, after the model's
own final norm n = final_norm(x):
    h_k = n + SiLU(W_k n),
decoded by the model's own unembedding (so n alone is the logit lens; the unembedding is restricted to
the drafter's vocabulary: the few thousand tokens that carry almost all of the model's own text) into
token t+1+k. (Medusa also reads the normalised last hidden state: the raw residual stream has a few
huge dimensions, which a small residual update could not move.)
W_k starts at zero, so an untrained head is the lens itself (it predicts token t+1); training moves it to
the token k places further on. This is Medusa's recipe (Cai et al. 2024) on a 135M model.

Training lives above the model (forethought.heads.training): it needs the corpus and the trace API.

A heads file is safetensors: `w` [K, d, d] float16, `vocab` int32 [V'], metadata naming the model, the
layer read and the training run. Any problem reading one is a one-line `ForethoughtError`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from forethought.errors import ForethoughtError
from forethought.model.transformer import Transformer

FORMAT = "forethought-draft-heads/1"
SHIPPED_DIR = Path(__file__).parent / "heads"


def shipped_path(model: Transformer) -> Path:
    """Where the heads shipped for this model live: named after the model's own name, as a file-safe slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.config.name.lower()).strip("-") or "model"
    return SHIPPED_DIR / f"{slug}.safetensors"


class DraftHeads(torch.nn.Module):
    def __init__(self, d_model: int, n_heads: int, vocab: torch.Tensor, layer: int, meta: dict | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n_heads, d_model, d_model))
        self.register_buffer("vocab", vocab.to(torch.long))
        self.layer = layer
        self.meta = dict(meta or {})
        self._unembed_key: tuple | None = None
        self._unembed: torch.Tensor | None = None

    @property
    def n_heads(self) -> int:
        return self.w.shape[0]

    def hidden(self, normed: torch.Tensor) -> torch.Tensor:
        """[N, d] final-normed block outputs -> [N, K, d], one state per head (unembed these directly)."""
        return normed[:, None, :] + F.silu(torch.einsum("nd,ked->nke", normed, self.w))

    @staticmethod
    def normed(model: Transformer, states: torch.Tensor) -> torch.Tensor:
        """The model's own final norm of block outputs [..., d], float32."""
        first = model.final_norm.weight
        return model.final_norm(states.to(device=first.device, dtype=first.dtype)).float()

    def unembed_columns(self, model: Transformer) -> torch.Tensor:
        """The model's unembedding restricted to the drafter's vocabulary, [d, V'] float32 (cached)."""
        u = model.unembed
        key = (u.weight_t.data_ptr(), model.final_norm.weight.data_ptr())
        if self._unembed_key != key:
            self._unembed = u.dequantized(torch.float32)[:, self.vocab.to(u.weight_t.device)].contiguous()
            self._unembed_key = key
        return self._unembed

    def logits(self, model: Transformer, states: torch.Tensor) -> torch.Tensor:
        """[N, d] block outputs -> [N, K, V'] logits over the drafter's vocabulary."""
        return self.hidden(self.normed(model, states)) @ self.unembed_columns(model)

    @torch.inference_mode()
    def draft(self, model: Transformer, state: torch.Tensor, k: int, min_prob: float = 0.0) -> list[int]:
        """The argmax of the first k heads for one state [d], cut where the heads' joint confidence (the
        product of their top probabilities) falls below `min_prob`: each drafted token costs part of a
        step to verify, so a token that is likely rejected is not worth proposing."""
        h = self.hidden(self.normed(model, state[None]))[0, : min(k, self.n_heads)]
        top, best = torch.softmax(h @ self.unembed_columns(model), dim=-1).max(-1)
        keep = int((top.cumprod(0) >= min_prob).sum()) if min_prob > 0 else len(best)
        return self.vocab[best[:keep]].tolist()

    def save(self, path: str | Path, model: Transformer) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        c = model.config
        meta = {
            "format": FORMAT,
            "model": c.name,
            "d_model": str(c.d_model),
            "vocab_size": str(c.vocab_size),
            "n_layers": str(c.n_layers),
            "layer": str(self.layer),
            "training": json.dumps(self.meta),
        }
        tensors = {"w": self.w.detach().half().contiguous(), "vocab": self.vocab.to(torch.int32).contiguous()}
        save_file(tensors, str(path), metadata=meta)
        return path


def load_heads(model: Transformer, path: str | Path | None = None) -> DraftHeads:
    """Heads for `model` from `path`, or the ones shipped for it; one-line errors for anything wrong."""
    from safetensors import safe_open

    if path is None:
        path = shipped_path(model)
        if not path.exists():
            raise ForethoughtError(
                f"no draft heads ship for model {model.config.name!r}: train them with `forethought heads train` "
                "and pass --heads, or use --speculative lookup"
            )
    path = Path(path)
    if not path.is_file():
        raise ForethoughtError(f"heads file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open has no iterator
    except Exception as exc:  # noqa: BLE001 -- any parse failure of a user's file is a user error
        raise ForethoughtError(f"heads file {path} is not readable safetensors ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ForethoughtError(f"heads file {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    c = model.config
    for key, want in (("d_model", c.d_model), ("vocab_size", c.vocab_size), ("n_layers", c.n_layers)):
        if meta.get(key) != str(want):
            raise ForethoughtError(
                f"heads file {path} was trained for {key}={meta.get(key)}, this model has {key}={want} "
                f"(model {meta.get('model')!r} vs {c.name!r})"
            )
    w, vocab = tensors.get("w"), tensors.get("vocab")
    if w is None or vocab is None or w.dim() != 3 or w.shape[1:] != (c.d_model, c.d_model) or vocab.dim() != 1:
        raise ForethoughtError(f"heads file {path}: tensors 'w' [K, {c.d_model}, {c.d_model}] and 'vocab' [V] expected")
    if (
        not torch.isfinite(w.float()).all()
        or vocab.numel() == 0
        or not (0 <= vocab.min() and vocab.max() < c.vocab_size)
    ):
        raise ForethoughtError(f"heads file {path}: non-finite weights or vocabulary ids outside 0..{c.vocab_size - 1}")
    try:
        layer = int(meta.get("layer", c.n_layers - 1))
        training = json.loads(meta.get("training", "{}"))
    except ValueError:
        raise ForethoughtError(f"heads file {path}: unreadable metadata") from None
    if layer != c.n_layers - 1:
        raise ForethoughtError(
            f"heads file {path} reads layer {layer}; drafting reads the last block ({c.n_layers - 1})"
        )
    heads = DraftHeads(c.d_model, w.shape[0], vocab, layer, training)
    with torch.no_grad():
        heads.w.copy_(w.float())
    return heads.to(model.device).requires_grad_(False)
