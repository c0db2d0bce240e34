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

Targets are the model's own greedy continuations, so a head learns what the model will say, not what a
corpus says; the training data is produced directly with the engine (batched greedy decoding, the hidden
states captured by `run_with_trace` as the tokens are made) instead of the activation store, which holds
corpus text rather than the model's continuations.

A heads file is safetensors: `w` [K, d, d] float16, `vocab` int32 [V'], metadata naming the model, the
layer read and the training run, a fingerprint of the model's weights it was trained for, and the sha256 of
all of it. It is written whole or not at all, and read back only when every one of these checks out; any
problem is a one-line `ForethoughtError` (`verify_heads`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------- training


@dataclass
class HeadsData:
    """Block outputs at positions whose next tokens the model itself chose (greedy), and those tokens."""

    states: dict[int, torch.Tensor]  # layer -> [N, d] float32
    targets: torch.Tensor  # [N, K]: token t+1+k for head k (k = 1..K), -1 where there is none
    rows: torch.Tensor  # [N] which continuation each position belongs to (to split train / test by row)
    tokens_generated: int = 0
    seconds: float = 0.0


def seed_prompts(tokenizer, n_code: int = 64, seed: int = 0) -> list[list[int]]:
    """Varied prompt beginnings (stories, chat questions, code from the standard library), none of them the
    benchmark's prompts. The model's own continuations of these are the training targets."""
    rng = random.Random(seed)
    who = ["a small robot", "an old fisherman", "a curious girl", "a lonely dragon", "two brothers", "a young wizard",
           "a cat named Milo", "the village baker", "a lost puppy", "an astronaut"]  # fmt: skip
    where = ["in a quiet town", "by the sea", "in a dark forest", "on a faraway planet", "in a busy city",
             "in the mountains"]  # fmt: skip
    topics = ["photosynthesis", "the water cycle", "how vaccines work", "black holes", "the French revolution",
              "compound interest", "how a CPU works", "why the sky is blue", "machine learning", "the stock market",
              "climate change", "the immune system", "gravity", "how to bake bread", "recursion in programming",
              "the history of the internet", "healthy sleep habits", "how to learn a language", "volcanoes",
              "the moon landing"]  # fmt: skip
    asks = ["Explain {t} in simple terms.", "What is {t}?", "Give me three facts about {t}.",
            "Write a short paragraph about {t}.", "Why does {t} matter?"]  # fmt: skip
    texts = []
    for w in who:
        for p in rng.sample(where, 4):
            texts.append(f"Once upon a time, {w} lived {p}. One day,")
    for t in topics:
        for a in rng.sample(asks, 4):
            texts.append(tokenizer.apply_chat_template(a.format(t=t)))
    prompts = [tokenizer.encode(t) for t in texts]
    from forethought.data.corpus import load_corpus

    docs = [d for d in load_corpus("stdlib").documents if d.doc_id.endswith(".py")]
    rng.shuffle(docs)
    for d in docs[:n_code]:
        ids = tokenizer.encode(d.text[:2000])
        if len(ids) >= 64:
            prompts.append(ids[16:56])  # past the license header, mid-code
    return prompts


@torch.inference_mode()
def make_training_data(
    model: Transformer,
    prompts: list[list[int]],
    new_tokens: int,
    n_heads: int,
    layers: list[int],
    stop_id: int | None,
    progress: Callable[[int], None] | None = None,
) -> HeadsData:
    """Greedy continuations of `prompts`, batched by prompt length, with the block outputs at every generated
    position captured as they are made."""
    from forethought.trace import act_name, run_with_trace

    started = time.perf_counter()
    names = [act_name(layer, "resid_post") for layer in layers]
    # Batched by length: prompts are cut from the left to a multiple of 8 tokens (a chat prompt loses a
    # few tokens of its system preamble at most), so a handful of batches of up to 32 cover them all.
    by_length: dict[int, list[list[int]]] = {}
    for p in prompts:
        keep = max(8, len(p) // 8 * 8)
        by_length.setdefault(min(keep, len(p)), []).append(p[-keep:])
    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    targets, rows = [], []
    row_id, made = 0, 0
    for length, group in sorted(by_length.items()):
        for first in range(0, len(group), 32):
            batch = group[first : first + 32]
            B = len(batch)
            cache = model.new_cache(capacity=length + new_tokens, batch_size=B)
            logits, trace = run_with_trace(model, batch, names, cache=cache, last_only=True)
            seq = [trace.tensors[n][:, -1:].float() for n in names]  # states that predict the first new token
            per_layer = [[s] for s in seq]
            generated = []
            for step in range(new_tokens):
                nxt = logits[:, -1].argmax(-1)
                generated.append(nxt)
                if step + 1 == new_tokens:
                    break
                logits, trace = run_with_trace(model, nxt[:, None], names, cache=cache)
                for i, n in enumerate(names):
                    per_layer[i].append(trace.tensors[n].float())
                made += B
                if progress is not None:
                    progress(B)
            gen = torch.stack(generated, 1)  # [B, new_tokens]
            # Position j's state predicts gen[:, j]; head k's target is gen[:, j + k].
            alive = torch.ones_like(gen, dtype=torch.bool)
            if stop_id is not None:
                alive = (gen == stop_id).cumsum(1) - (gen == stop_id).long() == 0  # up to and with the stop
            tgt = torch.full((B, new_tokens, n_heads), -1, dtype=torch.long)
            for k in range(1, n_heads + 1):
                ok = alive[:, k:]
                tgt[:, : new_tokens - k, k - 1] = torch.where(ok, gen[:, k:], -1)
            keep = alive.reshape(-1)
            for i, layer in enumerate(layers):
                s = torch.cat(per_layer[i][:new_tokens], 1).reshape(B * new_tokens, -1)
                states[layer].append(s[keep])
            targets.append(tgt.reshape(-1, n_heads)[keep])
            rows.append(torch.arange(row_id, row_id + B)[:, None].expand(B, new_tokens).reshape(-1)[keep])
            row_id += B
    return HeadsData(
        {layer: torch.cat(v) for layer, v in states.items()},
        torch.cat(targets),
        torch.cat(rows),
        tokens_generated=made,
        seconds=time.perf_counter() - started,
    )


@dataclass
class HeadsReport:
    """Held-out top-1 accuracy of each head (offset k = 2..K+1 tokens ahead of the state), per layer read."""

    layers: list[int]
    offsets: list[int]
    accuracy: dict[int, list[float]]  # layer -> per head
    coverage: float  # share of test targets inside the drafter's vocabulary
    vocab_size: int
    n_train: int
    n_test: int
    tokens_generated: int
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def choose_vocab(targets: torch.Tensor, size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent target tokens (plus `always`, e.g. EOS), sorted."""
    t = targets[targets >= 0]
    counts = torch.bincount(t)
    top = counts.argsort(descending=True)[:size]
    top = top[counts[top] > 0]
    return torch.unique(torch.cat([top, torch.tensor(always, dtype=torch.long)]))


def train_heads(
    model: Transformer,
    data: HeadsData,
    layer: int,
    vocab: torch.Tensor,
    epochs: int = 3,
    batch_size: int = 256,
    lr: float = 2e-3,
    test_share: float = 0.15,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[DraftHeads, list[float]]:
    """Train K heads on one layer's states (split by continuation); return them and their held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    n_rows = int(data.rows.max()) + 1
    test_rows = torch.randperm(n_rows, generator=g)[: max(1, math.ceil(n_rows * test_share))]
    is_test = torch.isin(data.rows, test_rows)
    remap = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    targets = torch.where(data.targets >= 0, remap[data.targets.clamp(min=0)], -1)
    states = data.states[layer]
    K = data.targets.shape[1]
    heads = DraftHeads(model.config.d_model, K, vocab, layer)
    unembed = heads.unembed_columns(model).detach()
    with torch.no_grad():
        states = torch.cat([heads.normed(model, s) for s in states.split(4096)])  # once, not every epoch
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    train_idx = torch.nonzero(~is_test).squeeze(1)
    steps_total = epochs * math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps_total, pct_start=0.1)

    def head_logits(normed: torch.Tensor) -> torch.Tensor:
        return heads.hidden(normed) @ unembed

    with torch.enable_grad():
        for _ in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=g)]
            for first in range(0, len(order), batch_size):
                idx = order[first : first + batch_size]
                logits = head_logits(states[idx])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[idx].reshape(-1), ignore_index=-1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if progress is not None:
                    progress(len(idx))
    test_idx = torch.nonzero(is_test).squeeze(1)
    with torch.no_grad():
        pred = torch.cat([head_logits(states[i]).argmax(-1) for i in test_idx.split(1024)])
        raw = data.targets[test_idx]
        hit = (vocab[pred] == raw) & (raw >= 0)
        acc = (hit.sum(0).float() / (raw >= 0).sum(0).clamp(min=1)).tolist()
    heads.requires_grad_(False)
    return heads, acc
