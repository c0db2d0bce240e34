"""Greedy continuations of many prompts, batched, with the residual stream at each prompt's last token (the
planning site) captured -- or edited, for steering and patching -- during the prompt's pass.

Prompts are batched up to `batch_size` rows in order of length, left-padded into one ragged batch (each row at its
own positions and blind to its padding: model/ragged.py) after the prefix all of them share, which runs once;
families without tree attention batch by exact length instead. Every row decodes through the one decode loop
(`generate_steps`) on a shared batched cache until all rows have stopped or the budget is spent. Batched greedy is
token-identical to one prompt at a time (tests/test_plan_tasks.py checks it), and on a bandwidth-bound CPU decode a
row costs far less than a whole step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forethought.model.decode import generate_steps, greedy_rows
from forethought.model.ragged import RaggedBatch
from forethought.model.transformer import Transformer
from forethought.progress import Progress, tell
from forethought.trace import act_name


@dataclass(frozen=True)
class SiteEdit:
    """Change the residual stream after block `layer` at the site of every prompt: add `vectors[i]` to row i
    (steering) or put it in place (patching). `vectors` is [n_prompts, d] in prompt order, or [d] for all."""

    layer: int
    vectors: torch.Tensor
    mode: str = "add"  # add | replace


class _SiteHooks:
    """The hooks of one batch's prompt pass: edit, then capture, the site's residual stream."""

    def __init__(self, capture: Sequence[str], edits: dict[str, tuple[str, torch.Tensor]]):
        self.capture = frozenset(capture)
        self.edits = edits
        self.points = self.capture | frozenset(edits)
        self.states: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in self.edits:
            mode, value = self.edits[name]
            tensor = tensor.clone()
            value = value.to(tensor.dtype)
            tensor[:, -1] = value if mode == "replace" else tensor[:, -1] + value
        if name in self.capture:
            self.states[name] = tensor[:, -1].detach().float().cpu()
        return tensor


@dataclass
class Completions:
    ids: list[list[int]]  # per prompt, the new tokens up to and with the first stop token
    states: np.ndarray  # [n_prompts, len(layers), d] at the site (after any edit); empty if no layers


def length_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by token length, each group cut into batches of at most `batch_size`."""
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    return [idx[s : s + batch_size] for _, idx in sorted(by_length.items()) for s in range(0, len(idx), batch_size)]


def ragged_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in order of token length, cut into batches of `batch_size` (little padding in each)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many first tokens every prompt shares, short of any prompt's last token (the site runs per row)."""
    if not prompts:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def prefix_pass(model: Transformer, prompts: Sequence[Sequence[int]], extra: int):
    """(cache, length) of the prefix every prompt shares, run once, for `batch_passes`; None where there is
    none or the batches cannot start from it (no tree attention reaching so far)."""
    n = shared_prefix_length(prompts)
    if n == 0 or not model.tree_fits(max(len(p) for p in prompts) + extra):
        return None
    cache = model.new_cache(capacity=n)
    model(torch.tensor([list(prompts[0][:n])], device=model.device), cache=cache, last_only=True)
    return cache, n


def batch_passes(model: Transformer, prompts: Sequence[Sequence[int]], extra: int, prefix=None):
    """(cache, prefill, step) for decoding `prompts` as one batch: prefill(hooks) -> the last prompt token's logits
    [B, vocab]; step(tokens [B]) -> the next logits. A ragged batch where the model's tree attention reaches that
    far (starting from `prefix_pass`'s shared prefix when given: only the rest of each prompt runs), else the
    prompts must share one length."""
    device = model.device
    if model.tree_fits(max(len(p) for p in prompts) + extra):
        if prefix is not None:
            shared, n = prefix
            batch, tokens = RaggedBatch.left_padded([p[n:] for p in prompts], device=device, shared=n)
            cache = shared.repeat_prefix(len(prompts), n, room=batch.width - n + extra)
        else:
            batch, tokens = RaggedBatch.left_padded(prompts, device=device)
            cache = model.new_cache(capacity=batch.width + extra, batch_size=len(prompts))

        def prefill(hooks=None) -> torch.Tensor:
            return batch.forward(model, tokens, cache, hooks, last_only=True)[:, -1]

        def step(new: torch.Tensor) -> torch.Tensor:
            return batch.forward(model, new[:, None].to(device), cache)[:, -1]

        return cache, prefill, step
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("without tree attention a batch's prompts must share one length")
    tokens = torch.tensor([list(p) for p in prompts], device=device)
    cache = model.new_cache(capacity=tokens.shape[1] + extra, batch_size=len(prompts))

    def prefill(hooks=None) -> torch.Tensor:
        return model(tokens, cache=cache, hooks=hooks, last_only=True)[:, -1]

    def step(new: torch.Tensor) -> torch.Tensor:
        return model(new[:, None].to(device), cache=cache)[:, -1]

    return cache, prefill, step


@torch.inference_mode()
def greedy_completions(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    layers: Sequence[int] = (),
    edit: SiteEdit | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    share_prefix: bool = True,
) -> Completions:
    """Greedy continuations (each cut after its first stop token) and the site's states after `layers`
    (`share_prefix=False`: every row runs its whole prompt, for the benchmark's comparison)."""
    names = [act_name(layer, "resid_post") for layer in layers]
    stop_set = frozenset(stop_ids)
    stops = torch.tensor(sorted(stop_set), dtype=torch.long)
    out_ids: list[list[int]] = [[] for _ in prompt_ids]
    d = model.config.d_model
    states = np.zeros((len(prompt_ids), len(names), d), dtype=np.float32)
    done = 0
    longest = max((len(p) for p in prompt_ids), default=0) + max_new_tokens
    batches = ragged_batches if model.tree_fits(longest) else length_batches
    prefix = prefix_pass(model, prompt_ids, max_new_tokens) if share_prefix else None  # instruction, examples
    for rows in batches(prompt_ids, batch_size):
        edits = {}
        if edit is not None:
            value = edit.vectors if edit.vectors.dim() == 1 else edit.vectors[rows]
            edits[act_name(edit.layer, "resid_post")] = (edit.mode, value.to(model.device))
        hooks = _SiteHooks(names, edits)
        cache, prefill, step = batch_passes(model, [prompt_ids[i] for i in rows], max_new_tokens, prefix)
        logits = prefill(hooks)
        for j, name in enumerate(names):
            states[rows, j] = hooks.states[name].numpy()
        finished = torch.zeros(len(rows), dtype=torch.bool)
        made: list[torch.Tensor] = []
        for s in generate_steps(model, [], logits, max_new_tokens, greedy_rows, cache, forward=step):
            token = s.token.cpu()
            made.append(token)
            finished |= torch.isin(token, stops)
            if bool(finished.all()) or s.next_logits is None:
                break
        gen = torch.stack(made, 1) if made else torch.zeros((len(rows), 0), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = gen[r].tolist()
            cut = next((j + 1 for j, t in enumerate(seq) if t in stop_set), len(seq))
            out_ids[i] = seq[:cut]
        done += len(rows)
        tell(progress, done, len(prompt_ids))
    return Completions(out_ids, states)


def stop_token_ids(tokenizer, texts: Sequence[str] = ("\n",), eos: bool = True) -> list[int]:
    """Ids whose text contains any of `texts` (a line break ends a couplet's line), plus EOS: the stop set."""
    ids = {tokenizer.eos_id} if eos and tokenizer.eos_id is not None else set()
    if texts:
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.decode([i])
            if any(t in piece for t in texts):
                ids.add(i)
    return sorted(ids)


def completion_texts(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(x), skip_special=True) for x in ids]
