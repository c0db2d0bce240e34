"""What the logits hide. The logit lens reads every layer's residual stream through the model's own
final norm and unembedding, showing what each column "would say" at that depth; and for generated
tokens, the alternatives the sampler did not show: the top-k, the entropy, the chosen token's rank."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from forethought.errors import ForethoughtError
from forethought.model.decode import check_prompt, generate_steps, sampler
from forethought.model.kv_cache import Cache
from forethought.model.sampling import SamplingParams, sampling_distribution
from forethought.model.transformer import Transformer
from forethought.trace import act_name, run_with_trace


def entropy_nats(probs: torch.Tensor) -> float:
    p = probs.double()
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum())


@dataclass
class LogitLensStep:
    """One generated token and the distribution it was drawn from."""

    step: int
    position: int  # where the chosen token goes
    chosen_id: int
    chosen_token: str
    top_ids: list[int]  # the model's top-k (temperature 1), whatever the sampler then did
    top_tokens: list[str]
    top_probs: list[float]
    entropy_nats: float  # of the model's distribution (temperature 1)
    entropy_bits: float
    chosen_rank: int  # 1 = the model's likeliest token
    chosen_prob: float  # under the model (temperature 1)
    sampling_prob: float  # under the distribution the sampler drew from (temperature, top-k, top-p)
    sampling_entropy_bits: float
    sampling_support: int  # tokens the sampler could have drawn


@dataclass
class LogitLensResult:
    model: str
    prompt_ids: list[int]
    prompt_tokens: list[str]
    layers: list[str]  # blocks.{l}.resid_post
    top_k: int
    # [layer][position][k] top tokens of the lens at that layer and position, with probabilities
    top_ids: list[list[list[int]]]
    top_tokens: list[list[list[str]]]
    top_probs: list[list[list[float]]]
    # [layer][position] the lens's probability of the prompt's actual next token (positions 0..T-2)
    next_token_probs: list[list[float]]
    temperature: float
    top_p: float
    sampler_top_k: int
    seed: int | None
    steps: list[LogitLensStep] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def logit_lens(
    model: Transformer, prompt_ids: list[int], top_k: int, token_str=str, cache: Cache | None = None
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(lens fields of a LogitLensResult, the prompt's last-position logits, resid_post [layer, position, d]).

    With an empty `cache`, the prompt's K/V are left in it, ready for generation to continue.
    """
    logits, tr = run_with_trace(model, prompt_ids, "resid_post", cache=cache)
    resid = tr["resid_post"]  # [layer, position, d]
    k = min(top_k, model.config.vocab_size)
    ids, probs, next_probs = [], [], []
    nxt = torch.tensor(prompt_ids[1:], dtype=torch.long, device=resid.device)
    for layer in range(resid.shape[0]):
        # One layer at a time: all layers x positions x vocab at once would be gigabytes on long prompts.
        p = torch.softmax(model.lens_logits(resid[layer]).double(), dim=-1)  # [position, vocab]
        top = torch.topk(p, k, dim=-1)
        ids.append(top.indices.tolist())
        probs.append(top.values.tolist())
        next_probs.append(p[torch.arange(len(nxt)), nxt].tolist())
    fields = {
        "layers": [act_name(layer, "resid_post") for layer in tr.layers("resid_post")],
        "top_ids": ids,
        "top_tokens": [[[token_str(i) for i in pos] for pos in layer] for layer in ids],
        "top_probs": probs,
        "next_token_probs": next_probs,
    }
    return fields, logits[0, -1], resid


@torch.inference_mode()
def run_logit_lens(
    model: Transformer,
    prompt_ids: list[int],
    n_steps: int = 8,
    top_k: int = 5,
    params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen, so sharing the default is safe
    token_str=str,
    model_name: str = "",
) -> LogitLensResult:
    """The logit lens over the prompt, then `n_steps` sampled tokens with what each draw left unseen.

    `token_str` turns an id into text for the tables (the tokenizer's `token_str`; ids by default).
    """
    check_prompt(model, prompt_ids, n_steps)
    if top_k < 1:
        raise ForethoughtError(f"--top-k must be >= 1, got {top_k}")
    cache = model.new_cache(capacity=len(prompt_ids) + n_steps)
    fields, logits, _ = logit_lens(model, prompt_ids, top_k, token_str, cache)
    result = LogitLensResult(
        model=model_name or model.config.name,
        prompt_ids=list(prompt_ids),
        prompt_tokens=[token_str(i) for i in prompt_ids],
        top_k=top_k,
        temperature=params.temperature,
        top_p=params.top_p,
        sampler_top_k=params.top_k,
        seed=params.seed,
        **fields,
    )
    k = min(top_k, model.config.vocab_size)
    for step in generate_steps(model, prompt_ids, logits, n_steps, sampler(params, params.generator()), cache):
        token, logits = step.token, step.logits
        probs = torch.softmax(logits.double(), dim=-1)
        drawn = sampling_distribution(logits, params)
        top = torch.topk(probs, k)
        h = entropy_nats(probs)
        result.steps.append(
            LogitLensStep(
                step=step.index,
                position=len(prompt_ids) + step.index,
                chosen_id=token,
                chosen_token=token_str(token),
                top_ids=top.indices.tolist(),
                top_tokens=[token_str(i) for i in top.indices.tolist()],
                top_probs=top.values.tolist(),
                entropy_nats=h,
                entropy_bits=h / math.log(2),
                chosen_rank=int((probs > probs[token]).sum()) + 1,
                chosen_prob=float(probs[token]),
                sampling_prob=float(drawn[token]),
                sampling_entropy_bits=entropy_nats(drawn) / math.log(2),
                sampling_support=int((drawn > 0).sum()),
            )
        )
    return result
