"""Lossless speculative decoding: draft a few tokens cheaply, verify them in one forward, keep the exact output.

Every iteration holds one *pending* token, already chosen from the target model's own distribution. A
drafter proposes up to K tokens that might follow it; one forward over [pending, d1..dK] on the KV cache
(at about the cost of one decode step: the compiled step reads the weights once for all of them) gives
the model's distribution after each. Draft i is kept while it is what the model would have produced:

- greedy: it equals the argmax -- so the output is token-identical to plain greedy decoding;
- sampling: it is accepted with probability p_i(d_i), and on rejection the next token is drawn from p_i
  with d_i removed and renormalised. For a drafter that proposes one token with certainty (both here do),
  this is the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) with q a point mass,
  so every emitted token has exactly the target model's distribution.

The first rejected position supplies the next pending token (the correction), or, when all K drafts are
kept, the position after them does (the bonus). The cache is truncated to the accepted tokens, so it
always equals a fresh prefill of the text so far.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from forethought.errors import ForethoughtError
from forethought.model import kernels
from forethought.model.decode import Generation, SpeculativeStats, Step, check_prompt
from forethought.model.heads import load_heads, shipped_path
from forethought.model.kv_cache import Cache
from forethought.model.sampling import SamplingParams, sample, sampling_distribution
from forethought.model.transformer import Transformer

DRAFTERS = ("lookup", "heads", "model", "auto")


class Drafter(Protocol):
    """Proposes up to `k` tokens to follow `ids` (whose last token is the pending one)."""

    name: str
    needs_state: bool  # whether `draft` reads the last block's output at the last verified position

    def draft(self, ids: list[int], state: torch.Tensor | None, k: int) -> list[int]: ...


class PromptLookup:
    """Prompt lookup: find the latest earlier occurrence of the text's last n tokens (n = max_ngram down
    to 1) and propose what followed it. No model, no training; pays on text that repeats its context
    (code, quoting answers, lists)."""

    name = "lookup"
    needs_state = False

    # A one-token match is right too rarely to pay for verifying what follows it.
    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._ids: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.last_match = 0  # n of the n-gram behind the last non-empty draft (0: none)

    def _update(self, ids: list[int]) -> None:
        if ids[: len(self._ids)] != self._ids:  # a different text: start over
            self._ids, self._index = [], [{} for _ in range(self.max_ngram + 1)]
        # Index every n-gram that has at least one token after it, latest start winning.
        old_end = max(0, len(self._ids) - 1)
        for n in range(1, self.max_ngram + 1):
            table = self._index[n]
            for start in range(max(0, old_end - n + 1), len(ids) - n):
                table[tuple(ids[start : start + n])] = start
        self._ids = list(ids)

    def draft(self, ids: list[int], state: torch.Tensor | None, k: int) -> list[int]:
        self._update(ids)
        self.last_match = 0
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            start = self._index[n].get(tuple(ids[-n:]))
            if start is not None:
                self.last_match = n
                return ids[start + n : start + n + k]
        return []


class HeadsDrafter:
    """Drafts from the model's own state: head i maps the last block's output at the last verified
    position to the token i places after the pending one (see forethought.model.heads)."""

    name = "heads"
    needs_state = True

    # The shipped heads forecast t+2 right ~27% of the time (held out) but t+3.. only 5-16%, and their
    # confidence barely separates right from wrong: past the first head a drafted token costs more to
    # verify than it returns, so by default only the first head drafts (benchmarks/RESULTS.md).
    def __init__(self, heads, model: Transformer, max_tokens: int = 1, min_prob: float = 0.0) -> None:
        self.heads, self.model, self.max_tokens, self.min_prob = heads, model, max_tokens, min_prob

    def prefill(self, prompt_ids: list[int]) -> None:
        """The heads' slice of the unembedding, built with the prefill: on an int8 model that dequantizes the
        whole matrix (~0.3 s on SmolLM2, 15 steps' worth), which inside the first drafted forward made `auto`
        judge the heads by it."""
        self.heads.unembed_columns(self.model)

    def draft(self, ids: list[int], state: torch.Tensor | None, k: int) -> list[int]:
        if state is None or k <= 0:
            return []
        return self.heads.draft(self.model, state, min(k, self.max_tokens), self.min_prob)


class DraftModel:
    """Drafts with a smaller model of the same vocabulary (the ladder's 0.5B for its 1.5B): greedily, on a KV
    cache of its own that follows the verified text, until it has `k` tokens or doubts the next one.

    Speculative decoding's classic drafter (Leviathan et al. 2023). It pays where the big model is slow per
    token and the small one agrees with it: on the code-continuation prompt of `benchmarks.ladder_speed` the
    0.5B in int8 predicts the 1.5B's next token at every one of 64 positions, at ~1/7 of its step's cost.
    Its weights only choose what gets verified, so int8 costs no exactness. A drafted token the draft model
    gives less than `min_prob` ends the draft: it would likely be rejected, and each drafted token costs a
    draft step and a wider verification.
    """

    name = "model"
    needs_state = False

    def __init__(self, model: Transformer, min_prob: float = 0.4) -> None:
        self.model, self.min_prob = model, min_prob
        self.cache = model.new_cache()
        self._ids: list[int] = []  # the tokens whose K/V the draft cache holds, in order

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([tokens], device=self.model.device), cache=self.cache, last_only=True)
        self._ids.extend(tokens)
        return out[0, -1]

    def prefill(self, prompt_ids: list[int]) -> None:
        """Run the prompt through the draft model with the target's prefill, not inside the first forward."""
        self.cache.truncate(0)
        self._ids = []
        self._logits(list(prompt_ids))

    def draft(self, ids: list[int], state: torch.Tensor | None, k: int) -> list[int]:
        if k <= 0 or len(ids) + k > self.model.config.context_length:
            return []
        # Keep the cached prefix the text still starts with (rejected drafts drop off) and feed the rest; the
        # last token is always fed again so its logits are at hand.
        shared = 0
        for a, b in zip(self._ids, ids[:-1]):
            if a != b:
                break
            shared += 1
        self.cache.truncate(shared)
        del self._ids[shared:]
        logits = self._logits(ids[shared:])
        drafts: list[int] = []
        while True:
            token = int(logits.argmax())
            if self.min_prob > 0 and float(torch.softmax(logits.float(), -1)[token]) < self.min_prob:
                break
            drafts.append(token)
            if len(drafts) == k:
                break
            logits = self._logits([token])
        return drafts


class _SourceRecord:
    """What one drafting source yielded in its latest forwards, and whether it is benched."""

    def __init__(self, window: int) -> None:
        self.made: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens made, seconds), one per forward
        self.benched_until = 0  # forward count before which the source does not draft
        self.strikes = 0  # benchings in a row: each doubles the next one


class AutoDrafter:
    """A draft model where there is one; else prompt lookup where the context has a match of at least
    `min_match` tokens (long, often right), the heads elsewhere (lookup alone for a model with neither) --
    each only while it pays (a benched draft model hands over to lookup and the heads).

    Whether drafting pays depends on acceptance and on what verifying costs, which differ by model, dtype
    and machine load (verifying 4 tokens cost 1.66 steps in fp32 and 2.13 in int8 on the embedded model,
    where `auto` ran at 0.70-0.98x plain on int8). So it measures both as it goes: the tokens each forward
    made per second (drafting and verifying included, `observe`), per source, against the same for plain
    forwards. The first forwards (the very first, a warm-up, untimed; then `calibrate` timed ones), and
    one in every `recalibrate`, are plain, so the plain rate is always current. A source whose throughput
    over its last `window` forwards (tokens made / seconds spent: a mean, so a few lucky forwards cannot
    hide many losing ones) falls below plain's (the median forward, robust to a preempted one) is benched
    for `bench` forwards, doubling each time it is benched again, so a losing source costs a shrinking
    share of the text; one below `clear_loss` x plain's rate after only `quick_window` forwards is benched
    then. The output is unaffected: drafts are only ever verified.
    """

    name = "auto"

    def __init__(
        self,
        heads: HeadsDrafter | None,
        draft_model: DraftModel | None = None,
        min_match: int = 2,
        window: int = 6,
        calibrate: int = 3,
        recalibrate: int = 20,
        bench: int = 16,
        quick_window: int = 2,
        clear_loss: float = 0.9,
    ) -> None:
        self.lookup, self.heads, self.draft_model, self.min_match = PromptLookup(), heads, draft_model, min_match
        self.needs_state = heads is not None
        self.window, self.calibrate, self.recalibrate, self.bench = window, calibrate, recalibrate, bench
        self.quick_window, self.clear_loss = min(quick_window, window), clear_loss
        self.plain_seconds: deque[float] = deque(maxlen=window)
        self.sources = {name: _SourceRecord(window) for name in ("lookup", "model", "heads")}
        self.forwards = 0
        self.usage = {"plain": 0, "lookup": 0, "model": 0, "heads": 0}  # forwards by who drafted (plain: nobody)
        self.benchings = 0
        self._drafted_by: str | None = None

    def prefill(self, prompt_ids: list[int]) -> None:
        for source in (self.draft_model, self.heads):
            if source is not None:
                source.prefill(prompt_ids)

    def _usable(self, source: str) -> bool:
        return self.forwards >= self.sources[source].benched_until

    def draft(self, ids: list[int], state: torch.Tensor | None, k: int) -> list[int]:
        self.forwards += 1
        self._drafted_by = None
        if k <= 0 or len(self.plain_seconds) < self.calibrate or self.forwards % self.recalibrate == 0:
            return []  # a plain forward, timed
        # A draft model first where there is one: on the ladder's code prompt it made 4.9 tokens a forward
        # where lookup made 1.4 (benchmarks/RESULTS.md); lookup next, free but right less often; heads last.
        for name, source in (("model", self.draft_model), ("lookup", self.lookup), ("heads", self.heads)):
            if source is None or not self._usable(name):
                continue
            proposal = source.draft(ids, state, k)
            if name == "lookup" and self.lookup.last_match < self.min_match:
                continue
            if proposal:
                self._drafted_by = name
                return proposal
        return []

    def observe(self, drafted: int, accepted: int, seconds: float) -> None:
        """The forward after the last `draft`: `drafted` tokens verified, `accepted` kept, `seconds` spent
        drafting and verifying."""
        source = self._drafted_by if drafted else None
        self.usage[source or "plain"] += 1
        if source is None:
            if self.forwards > 1:  # the first forward after prefill runs cold: not a fair plain time
                self.plain_seconds.append(seconds)
            return
        record = self.sources[source]
        record.made.append((1 + accepted, seconds))
        if len(record.made) < self.quick_window or not self.plain_seconds:
            return
        rate = sum(n for n, _ in record.made) / max(sum(t for _, t in record.made), 1e-9)
        plain_rate = 1.0 / statistics.median(self.plain_seconds)
        # A clear loser is benched after `quick_window` forwards, a close call judged over the whole window:
        # trials cost little where drafting clearly loses (int8 heads on SmolLM2: trial forwards at ~0.7x plain).
        if len(record.made) < self.window and rate >= self.clear_loss * plain_rate:
            return
        if rate < plain_rate:
            record.benched_until = self.forwards + self.bench * 2**record.strikes
            record.strikes += 1
            record.made.clear()  # judged afresh when it comes back
            self.benchings += 1
        else:
            record.strikes = 0


# kernels.MAX_TOKENS - 1: one verifying forward takes the pending token and the drafts (checked there too).
MAX_DRAFT_LEN = 15


def check_speculative_flags(
    kind: str | None, draft_len: int | None, heads_path: str | None, draft_model: str | None = None
) -> None:
    """The flags' own sense, before any model loads: a wrong one fails in milliseconds, not after the load."""
    if draft_model is not None and kind not in ("model", "auto"):
        raise ForethoughtError("--draft-model is read by --speculative model or auto: add one, or drop --draft-model")
    if kind is None:
        if heads_path is not None:
            raise ForethoughtError("--heads is read by --speculative heads or auto: add one, or drop --heads")
        if draft_len is not None:
            raise ForethoughtError("--draft-len sets how many tokens --speculative drafts: add --speculative")
        return
    if kind not in DRAFTERS:
        raise ForethoughtError(f"--speculative must be one of {', '.join(DRAFTERS)}, got {kind!r}")
    if draft_len is not None and not 1 <= draft_len <= MAX_DRAFT_LEN:
        raise ForethoughtError(f"--draft-len must be in 1..{MAX_DRAFT_LEN}, got {draft_len}")
    if heads_path is not None:
        if kind in ("lookup", "model"):
            raise ForethoughtError(f"--heads is not read by --speculative {kind}: use heads or auto, or drop --heads")
        if not Path(heads_path).is_file():
            what = "is a folder" if Path(heads_path).is_dir() else "does not exist"
            raise ForethoughtError(f"--heads {heads_path} {what}: give a heads file from `forethought heads train`")


def make_drafter(
    model: Transformer, kind: str, heads_path: str | None = None, draft_model: Transformer | None = None
) -> Drafter:
    """`lookup`, `heads`, `model` or `auto` for this model; heads come from `heads_path` or the shipped file,
    `model` drafts with `draft_model` (same vocabulary: `weights.registry.load_draft_model` checks it).
    `auto` uses whichever of the heads and the draft model it has (lookup alone with neither)."""
    check_speculative_flags(kind, None, heads_path)
    if kind == "lookup":
        return PromptLookup()
    if kind == "model":
        if draft_model is None:
            raise ForethoughtError("--speculative model needs --draft-model: a smaller model with the same vocabulary")
        return DraftModel(draft_model)
    drafts = DraftModel(draft_model) if draft_model is not None else None
    if kind == "auto" and heads_path is None and (not shipped_path(model).exists() or model.unembed.quantized):
        # On int8 weights a 2-token verification costs ~1.3-1.4 steps and the shipped heads' draft is kept
        # ~27% of the time: they cannot pay there (measured 0.90x plain even with auto's backoff), so auto
        # leaves them out unless asked for by --heads.
        return AutoDrafter(None, drafts)
    heads = HeadsDrafter(load_heads(model, heads_path), model)
    return heads if kind == "heads" else AutoDrafter(heads, drafts)


def accept(
    logits: torch.Tensor, drafts: list[int], params: SamplingParams, generator: torch.Generator
) -> tuple[int, int]:
    """(how many drafts to keep, the token that follows them) given logits [len(drafts) + 1, vocab],
    row i being the model's prediction for the position of drafts[i]."""
    for i, d in enumerate(drafts):
        if params.greedy:
            choice = int(logits[i].argmax())
            if choice != d:
                return i, choice
            continue
        p = sampling_distribution(logits[i], params)
        if float(torch.rand((), generator=generator)) < float(p[d]):
            continue
        residual = p.clone()
        residual[d] = 0  # a point-mass draft: max(0, p - q) is p without d
        return i, int(torch.multinomial(residual.cpu() / residual.sum(), 1, generator=generator))
    return len(drafts), sample(logits[len(drafts)], params, generator)


def speculative_steps(
    model: Transformer,
    prompt_ids: list[int],
    logits: torch.Tensor,
    states: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator,
    drafter: Drafter,
    draft_len: int,
    stats: SpeculativeStats,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[Step]:
    """The decode loop of speculative decoding, as `generate_steps`' records: each verifying forward yields the
    drafts it kept ("draft") and the model's own token after them ("model"), the forward's time shared among
    them. `logits`/`states` are the prefill's last position; see the module doc for the rule."""
    ids = list(prompt_ids)
    made = 0
    if max_new_tokens == 0:
        return

    def batch(tokens: list[tuple[int, str, torch.Tensor]], seconds: float) -> Iterator[Step]:
        """The tokens of one forward (with the logits each was chosen from) up to the first stop token or the
        budget, as Steps."""
        nonlocal made
        kept = []
        for token, origin, row in tokens:
            kept.append((token, origin, row))
            if token in stop_ids or made + len(kept) >= max_new_tokens:
                break
        for token, origin, row in kept:
            ids.append(token)
            made += 1
            yield Step(made - 1, token, row, seconds / len(kept), token in stop_ids, origin=origin)

    observe = getattr(drafter, "observe", None)  # drafters that adapt to what their drafts yield
    started = time.perf_counter()
    pending = sample(logits[-1], params, generator)
    state = states[-1]
    yield from batch([(pending, "model", logits[-1])], time.perf_counter() - started)
    while made < max_new_tokens and ids[-1] not in stop_ids:
        started = time.perf_counter()
        k = min(draft_len, max_new_tokens - made - 1)
        drafts = drafter.draft(ids, state if drafter.needs_state else None, k)[:k] if k > 0 else []
        start = cache.length
        logits, states = model.forward_with_state([pending, *drafts], cache, with_state=drafter.needs_state)
        n_ok, following = accept(logits, drafts, params, generator)
        if observe is not None:
            observe(len(drafts), n_ok, time.perf_counter() - started)
        cache.truncate(start + 1 + n_ok)  # pending + the kept drafts; the rest is forgotten
        stats.drafted.append(len(drafts))
        stats.accepted.append(n_ok)
        state = states[n_ok] if states is not None else None
        pending = following
        tokens = [(d, "draft", logits[i]) for i, d in enumerate(drafts[:n_ok])] + [(pending, "model", logits[n_ok])]
        yield from batch(tokens, time.perf_counter() - started)


@torch.inference_mode()
def generate_speculative(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    drafter: Drafter,
    draft_len: int = 4,
    stop_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Like `generate`, with each forward verifying up to `draft_len` drafted tokens; see the module doc."""
    check_prompt(model, prompt_ids, max_new_tokens)
    if not 1 <= draft_len < kernels.MAX_TOKENS:
        raise ForethoughtError(f"--draft-len must be in 1..{kernels.MAX_TOKENS - 1}, got {draft_len}")
    if model.device.type == "cpu":
        kernels.module()  # a first-run compile is not prefill
    result = Generation(list(prompt_ids))
    stats = SpeculativeStats(drafter.name, draft_len)
    result.speculative = stats
    generator = params.generator()
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens)
    result.cache = cache

    started = time.perf_counter()
    logits, states = model.forward_with_state(prompt_ids, cache, last_only=True)
    # Drafters that prepare with the prompt: a draft model's own cache, the heads' unembedding slice.
    if (prefill := getattr(drafter, "prefill", None)) is not None:
        prefill(prompt_ids)
    result.prefill_seconds = time.perf_counter() - started
    steps = speculative_steps(
        model, prompt_ids, logits, states, cache, max_new_tokens, params, generator, drafter, draft_len, stats, stop_ids
    )
    return result.collect(steps, on_token)


@torch.inference_mode()
def plain_step_seconds(model: Transformer, cache, repeats: int = 5) -> float:
    """Median seconds of one plain decode step at the cache's current length (the cache is left as it was)."""
    length = cache.length
    if length >= model.config.context_length:
        return float("nan")  # no free position to time a step at without overwriting the cache
    cache.reserve(length + 1)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(torch.tensor([[0]], device=model.device), cache=cache)
        times.append(time.perf_counter() - started)
        cache.truncate(length)
    return sorted(times)[len(times) // 2]
