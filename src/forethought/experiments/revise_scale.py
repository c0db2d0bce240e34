"""Plan revision at scale. One example per condition (`revise.py`) shows what can happen, not how often.
`revise_at_scale` runs the same comparison over many prompts drawn from corpora, with the off-plan token taken
from fixed rank buckets of the model's own distribution (plus a temperature sample), and reports each measure
per bucket with a 95% bootstrap interval over prompts."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from forethought.data.corpus import _hash_unit
from forethought.errors import ForethoughtError
from forethought.experiments.baselines import Interval, bootstrap_by_document
from forethought.experiments.revise import MAX_SHIFT, REJOIN_WINDOW, revise
from forethought.model.generate import check_prompt, generate
from forethought.model.transformer import Transformer
from forethought.trace import act_name

RANK_BUCKETS = {"rank 2": 2, "rank 10": 10, "rank 1000": 1000}
TINY_BUCKET = "p<1e-6"
TINY_PROB = 1e-6
SAMPLE_BUCKET = "T={t:g} sample"


@dataclass
class ScalePrompt:
    corpus: str
    doc_id: str
    ids: list[int]


@dataclass
class ScaleTrial:
    """One prompt, one bucket: the off-plan token's rank and probability at step `at`, and what followed."""

    prompt_index: int
    corpus: str
    bucket: str
    token_id: int
    rank: int  # 1 + number of tokens the model (temperature 1) gives a higher probability
    prob: float
    rejoined: bool
    rejoin_shift: int | None
    kl_after_mean: float  # mean KL(original || revised) over the steps after the off-plan one, nats
    kl_first_after: float
    # mean over positions after the off-plan one of ||h_orig - h_rev|| / ||h_orig||, at a middle and the last layer
    state_mid: float
    state_last: float
    # the same when only the off-plan token is swapped into the original's tokens (no change of continuation)
    state_mid_swap: float
    state_last_swap: float


@dataclass
class BucketSummary:
    bucket: str
    n: int
    rejoin_rate: Interval
    kl_after_mean: Interval
    state_mid: Interval
    state_last: Interval
    state_mid_swap: Interval
    state_last_swap: Interval
    median_prob: float
    max_prob: float


@dataclass
class ReviseScaleResult:
    model: str
    corpora: list[str]
    n_prompts: int
    prompt_tokens: int
    at: int
    n_after: int
    temperature: float
    seed: int
    mid_layer: str
    last_layer: str
    rejoin_window: int
    max_shift: int
    trials: list[ScaleTrial] = field(default_factory=list)
    buckets: list[BucketSummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why a prompt or a bucket was left out
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prompts_used"] = len({t.prompt_index for t in self.trials})
        return out


def draw_prompts(corpora, encode, n: int, length: int, seed: int = 0) -> list[ScalePrompt]:
    """`n` prompts of exactly `length` tokens, taken round-robin from the corpora (documents in the corpus's
    fixed hash order), each from an offset in its document fixed by the document's id and `seed`.

    Only the first few thousand characters of a document are tokenized; documents too short are passed over.
    ForethoughtError when the corpora hold fewer than `n` usable documents.
    """
    if n < 1 or length < 1:
        raise ForethoughtError(f"need at least 1 prompt of at least 1 token, got {n} prompts of {length}")
    queues = [iter(c.documents) for c in corpora]
    prompts: list[ScalePrompt] = []
    live = list(range(len(corpora)))
    while len(prompts) < n and live:
        for ci in list(live):
            if len(prompts) >= n:
                break
            for doc in queues[ci]:
                ids = encode(doc.text[: 40 * length + 2000])
                if len(ids) < length:
                    continue
                start = int(_hash_unit(doc.doc_id, f"revise-prompt:{seed}") * (len(ids) - length + 1))
                prompts.append(ScalePrompt(corpora[ci].spec, doc.doc_id, ids[start : start + length]))
                break
            else:
                live.remove(ci)
    if len(prompts) < n:
        raise ForethoughtError(f"the corpora give only {len(prompts)} documents of >= {length} tokens; asked for {n}")
    return prompts


def _rank(probs: torch.Tensor, token: int) -> int:
    return 1 + int((probs > probs[token]).sum())


def _bucket_tokens(probs: torch.Tensor, generator: torch.Generator) -> dict[str, int]:
    """Token per rank bucket (ranks past the vocabulary are left out) and one drawn among those with p < 1e-6."""
    order = torch.argsort(probs, descending=True, stable=True)
    chosen = {name: int(order[rank - 1]) for name, rank in RANK_BUCKETS.items() if rank <= len(order)}
    tiny = torch.nonzero(probs < TINY_PROB).flatten()
    if len(tiny):
        chosen[TINY_BUCKET] = int(tiny[torch.randint(len(tiny), (1,), generator=generator)])
    return chosen


def _mean_after(rows: list[list[float]], layer: int, first: int) -> float:
    values = rows[layer][first:]
    return sum(values) / len(values) if values else 0.0


def summarize_buckets(trials: list[ScaleTrial], seed: int = 0) -> list[BucketSummary]:
    """Per bucket (in first-seen order), each measure's mean with a 95% percentile bootstrap over prompts."""
    out = []
    for bucket in dict.fromkeys(t.bucket for t in trials):
        rows = [t for t in trials if t.bucket == bucket]
        units = np.array([t.prompt_index for t in rows])

        def interval(values, rows=rows, units=units) -> Interval:
            return bootstrap_by_document(np.asarray(values, dtype=np.float64), units, n_boot=2000, seed=seed)

        probs = sorted(t.prob for t in rows)
        out.append(
            BucketSummary(
                bucket=bucket,
                n=len(rows),
                rejoin_rate=interval([float(t.rejoined) for t in rows]),
                kl_after_mean=interval([t.kl_after_mean for t in rows]),
                state_mid=interval([t.state_mid for t in rows]),
                state_last=interval([t.state_last for t in rows]),
                state_mid_swap=interval([t.state_mid_swap for t in rows]),
                state_last_swap=interval([t.state_last_swap for t in rows]),
                median_prob=probs[len(probs) // 2],
                max_prob=probs[-1],
            )
        )
    return out


@torch.inference_mode()
def revise_at_scale(
    model: Transformer,
    prompts: list[ScalePrompt],
    at: int = 2,
    n_after: int = 12,
    temperature: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    model_name: str = "",
    on_trial=None,
    index_offset: int = 0,
) -> ReviseScaleResult:
    """`revise` on every prompt, once per bucket: forced tokens of rank 2, 10 and 1000 and one with p < 1e-6 at
    new-token step `at`, and one sampled at `temperature` with the greedy choice excluded.

    A prompt whose greedy run stops before `at`, or is too long, is skipped with its reason. `on_trial()` is
    called after every `revise` run (for a progress bar). `index_offset` numbers the prompts from there, so that
    a list split into parts (run in parallel, trials merged, then `summarize_buckets`) gives the same trials.
    """
    start = time.perf_counter()
    n_layers = model.config.n_layers
    mid, last = (n_layers - 1) // 2, n_layers - 1
    result = ReviseScaleResult(
        model=model_name or model.config.name,
        corpora=list(dict.fromkeys(p.corpus for p in prompts)),
        n_prompts=len(prompts),
        prompt_tokens=max((len(p.ids) for p in prompts), default=0),
        at=at,
        n_after=n_after,
        temperature=temperature,
        seed=seed,
        mid_layer=act_name(mid, "resid_post"),
        last_layer=act_name(last, "resid_post"),
        rejoin_window=REJOIN_WINDOW,
        max_shift=MAX_SHIFT,
    )
    sample_bucket = SAMPLE_BUCKET.format(t=temperature)
    for index, prompt in enumerate(prompts, start=index_offset):
        try:
            check_prompt(model, prompt.ids, at + 1 + n_after + MAX_SHIFT)
            original = generate(model, prompt.ids, at + 1 + n_after + MAX_SHIFT, stop_ids=stop_ids).new_ids
            if len(original) <= at:
                raise ForethoughtError(f"the greedy run stops (EOS) after {len(original)} tokens, before step {at}")
            prefix = original[:at]
            logits = model(torch.tensor([prompt.ids + prefix], device=model.device), last_only=True)[0, -1]
        except ForethoughtError as e:
            result.skipped.append(f"prompt {index} ({prompt.corpus}:{prompt.doc_id}): {e}")
            continue
        probs = torch.softmax(logits.double().cpu(), dim=-1)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        runs: list[tuple[str, dict]] = [(b, {"force_id": t}) for b, t in _bucket_tokens(probs, generator).items()]
        runs.append((sample_bucket, {"temperature": temperature, "seed": seed * 1_000_003 + index}))
        for bucket, how in runs:
            try:
                r = revise(
                    model,
                    prompt.ids,
                    at,
                    n_after,
                    stop_ids=stop_ids,
                    model_name=result.model,
                    original_ids=original,
                    **how,
                )
            except ForethoughtError as e:
                result.skipped.append(f"prompt {index} ({prompt.corpus}:{prompt.doc_id}) {bucket}: {e}")
                continue
            finally:
                if on_trial is not None:
                    on_trial()
            summary = r.summary()
            after = r.off_plan_position + 1  # positions that read the off-plan token through attention
            result.trials.append(
                ScaleTrial(
                    prompt_index=index,
                    corpus=prompt.corpus,
                    bucket=bucket,
                    token_id=r.off_plan_id,
                    rank=_rank(probs, r.off_plan_id),
                    prob=r.off_plan_prob,
                    rejoined=r.rejoin is not None,
                    rejoin_shift=r.rejoin.shift if r.rejoin else None,
                    kl_after_mean=summary["kl_after_mean"],
                    kl_first_after=summary["kl_first_after"],
                    state_mid=_mean_after(r.state_rel_norm, mid + 1, after),
                    state_last=_mean_after(r.state_rel_norm, last + 1, after),
                    state_mid_swap=_mean_after(r.substituted_rel_norm, mid + 1, after),
                    state_last_swap=_mean_after(r.substituted_rel_norm, last + 1, after),
                )
            )
    result.buckets = summarize_buckets(result.trials, seed)
    result.seconds = time.perf_counter() - start
    return result
