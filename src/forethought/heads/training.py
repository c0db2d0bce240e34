"""Training draft heads (model/heads.py) on the model's own greedy continuations.

Targets are the model's own greedy continuations, so a head learns what the model will say, not what a corpus
says; the training data is produced directly with the engine (batched greedy decoding through the one decode
loop, the hidden states captured by `run_with_trace` as the tokens are made) instead of the activation store,
which holds corpus text rather than the model's continuations. Training sits above the model: it reads the
corpus and the trace API, which the model layer must not import.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forethought.data.corpus import load_corpus
from forethought.model.decode import generate_steps, greedy_rows
from forethought.model.heads import DraftHeads
from forethought.model.transformer import Transformer
from forethought.trace import act_name, run_with_trace


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
    docs = [d for d in load_corpus("stdlib").documents if d.doc_id.endswith(".py")]
    rng.shuffle(docs)
    for d in docs[:n_code]:
        ids = tokenizer.encode(d.text[:2000])
        if len(ids) >= 64:
            prompts.append(ids[16:56])  # past the license header, mid-code
    return prompts


class _TracedStep:
    """One batched decode step that also keeps the chosen layers' block outputs: the `forward` that
    `generate_steps` runs for the training data."""

    def __init__(self, model: Transformer, names: list[str], cache, progress: Callable[[int], None] | None) -> None:
        self.model, self.names, self.cache, self.progress = model, names, cache, progress
        self.per_layer: list[list[torch.Tensor]] = [[] for _ in names]
        self.made = 0

    def keep(self, trace, last_only: bool = False) -> None:
        for i, name in enumerate(self.names):
            states = trace.tensors[name].float()
            self.per_layer[i].append(states[:, -1:] if last_only else states)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, trace = run_with_trace(self.model, tokens[:, None], self.names, cache=self.cache)
        self.keep(trace)
        B = len(tokens)
        self.made += B
        if self.progress is not None:
            self.progress(B)
        return logits[:, -1]


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
            step = _TracedStep(model, names, cache, progress)
            logits, trace = run_with_trace(model, batch, names, cache=cache, last_only=True)
            step.keep(trace, last_only=True)  # the states that predict the first new token
            steps = generate_steps(model, [], logits[:, -1], new_tokens, greedy_rows, cache, forward=step)
            gen = torch.stack([s.token for s in steps], 1)  # [B, new_tokens]
            made += step.made
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
                s = torch.cat(step.per_layer[i][:new_tokens], 1).reshape(B * new_tokens, -1)
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
