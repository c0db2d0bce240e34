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
layer read and the training run, a fingerprint of the model's weights it was trained for, and the sha256 of
all of it. It is written whole or not at all, and read back only when every one of these checks out; any
problem is a one-line `ForethoughtError` (`verify_heads`).
"""

from __future__ import annotations

import hashlib
import json
import math
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

    def save(self, path: str | Path, model: Transformer, flag: str = "--out") -> Path:
        """Written whole or not at all (temp file + rename), with the payload's sha256 and the model's
        fingerprint in the metadata, so a flipped byte or another model's file is refused on load."""
        from safetensors.torch import save

        from forethought.paths import atomic_write_bytes

        c = model.config
        meta = {
            "format": FORMAT,
            "model": c.name,
            "d_model": str(c.d_model),
            "vocab_size": str(c.vocab_size),
            "n_layers": str(c.n_layers),
            "layer": str(self.layer),
            "model_fingerprint": json.dumps(model_fingerprint(model)),
            "training": json.dumps(self.meta),
        }
        tensors = {
            "w": self.w.detach().half().contiguous().cpu(),
            "vocab": self.vocab.to(torch.int32).contiguous().cpu(),
        }
        meta["sha256"] = payload_sha256(tensors, meta)
        return atomic_write_bytes(path, save(tensors, metadata=meta), flag)


# ------------------------------------------------------------------------------------- reading a heads file

MAX_HEADS = 15  # `heads train --heads` allows 1..15; a file claiming more was not written by it
FINGERPRINT_POINTS = 64
FINGERPRINT_TOLERANCE = 0.05  # of the values' mean magnitude: int8 / bfloat16 copies of one model agree far closer


def payload_sha256(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes and every metadata entry but the hash itself."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: Transformer) -> list[float]:
    """A few of the model's own final-norm weights and unembedding entries at fixed places: heads read this
    norm and decode with this unembedding, so a model of the same shape with other weights differs here."""
    norm = model.final_norm.weight.detach().float().cpu().reshape(-1)
    u = model.unembed
    d, v = u.d_in, u.d_out
    at = torch.linspace(0, d - 1, FINGERPRINT_POINTS).long()
    cols = torch.linspace(0, v - 1, FINGERPRINT_POINTS).long()
    unembed = u.dequantized(torch.float32) if u.quantized else u.weight_t  # [d, V]
    values = torch.cat([norm[at], unembed.detach()[at.to(unembed.device), cols.to(unembed.device)].float().cpu()])
    return [round(float(x), 5) for x in values]


def fingerprints_match(saved: object, mine: list[float]) -> bool:
    if not isinstance(saved, list) or len(saved) != len(mine):
        return False
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in saved):
        return False
    a, b = torch.tensor(saved, dtype=torch.float64), torch.tensor(mine, dtype=torch.float64)
    n = len(mine) // 2  # norm weights and unembedding entries have different scales: judged apart
    return all(
        float((x - y).abs().mean()) <= FINGERPRINT_TOLERANCE * max(float(y.abs().mean()), 1e-6)
        for x, y in ((a[:n], b[:n]), (a[n:], b[n:]))
    )


def load_heads(model: Transformer, path: str | Path | None = None) -> DraftHeads:
    """Heads for `model` from `path`, or the ones shipped for it; one-line errors for anything wrong."""
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
    meta, tensors = _read(path)
    w, vocab, layer, training = verify_heads(path, meta, tensors, model)
    heads = DraftHeads(model.config.d_model, w.shape[0], vocab, layer, training)
    with torch.no_grad():
        heads.w.copy_(w.float())
    return heads.to(model.device).requires_grad_(False)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open has no iterator
    except Exception as exc:  # noqa: BLE001 -- any parse failure of a user's file is a user error
        raise ForethoughtError(f"heads file {path} is not readable safetensors ({type(exc).__name__})") from None
    return meta, tensors


def verify_heads(
    path: Path, meta: dict, tensors: dict[str, torch.Tensor], model: Transformer
) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    """Everything a heads file promises, checked against `model`: (w, vocab, layer, training metadata)."""

    def bad(what: str) -> ForethoughtError:
        return ForethoughtError(f"heads file {path}: {what}")

    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    c = model.config
    for key, want in (("d_model", c.d_model), ("vocab_size", c.vocab_size), ("n_layers", c.n_layers)):
        if meta.get(key) != str(want):
            raise ForethoughtError(
                f"heads file {path} was trained for {key}={meta.get(key)}, this model has {key}={want} "
                f"(model {meta.get('model')!r} vs {c.name!r})"
            )
    if sorted(tensors) != ["vocab", "w"]:
        raise bad(f"tensors {sorted(tensors)}, expected exactly 'w' and 'vocab'")
    w, vocab = tensors["w"], tensors["vocab"]
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise bad(f"'w' is {str(w.dtype).removeprefix('torch.')}, expected float16, bfloat16 or float32 weights")
    if vocab.dtype not in (torch.int32, torch.int64):
        raise bad(f"'vocab' is {str(vocab.dtype).removeprefix('torch.')}, expected int32 token ids")
    if w.dim() != 3 or tuple(w.shape[1:]) != (c.d_model, c.d_model) or not 1 <= w.shape[0] <= MAX_HEADS:
        raise bad(f"'w' has shape {list(w.shape)}, expected [K, {c.d_model}, {c.d_model}] with K in 1..{MAX_HEADS}")
    if vocab.dim() != 1 or not 1 <= vocab.numel() <= c.vocab_size:
        raise bad(f"'vocab' has shape {list(vocab.shape)}, expected [V] with V in 1..{c.vocab_size}")
    if not bool(torch.isfinite(w.float()).all()):
        raise bad("non-finite weights")
    if not (0 <= int(vocab.min()) and int(vocab.max()) < c.vocab_size):
        raise bad(f"vocabulary ids outside 0..{c.vocab_size - 1}")
    if torch.unique(vocab).numel() != vocab.numel():
        raise bad("vocabulary ids repeat (each drafted token must be one id)")
    try:
        layer = int(meta.get("layer", c.n_layers - 1))
        training = json.loads(meta.get("training", "{}"))
        saved_fingerprint = json.loads(meta["model_fingerprint"]) if "model_fingerprint" in meta else None
    except (ValueError, TypeError):
        raise bad("unreadable metadata") from None
    if not isinstance(training, dict):
        raise bad("unreadable metadata ('training' is not an object)")
    if layer != c.n_layers - 1:
        raise ForethoughtError(
            f"heads file {path} reads layer {layer}; drafting reads the last block ({c.n_layers - 1})"
        )
    if "sha256" not in meta:
        raise bad(
            "no sha256 of its contents (written by an older forethought?): retrain with `forethought heads train`"
        )
    if payload_sha256(tensors, meta) != meta["sha256"]:
        raise bad("contents do not match the sha256 written with them (the file was changed or damaged)")
    if saved_fingerprint is None:
        raise bad("records no fingerprint of the model it was trained for: retrain with `forethought heads train`")
    if not fingerprints_match(saved_fingerprint, model_fingerprint(model)):
        raise ForethoughtError(
            f"heads file {path} was trained for another model ({meta.get('model')!r}): its weights differ from "
            f"{c.name!r}'s; train heads for this model with `forethought heads train`"
        )
    return w, vocab, layer, training
