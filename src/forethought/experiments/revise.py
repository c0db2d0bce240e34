"""Plan revision after an off-plan token: what an unexpected token changes, and what it cannot.

The thread's question: if the sampler makes an "unreasonable" choice, can the model's plan adapt, or
is it stuck with activations it cannot update? The experiment runs the greedy continuation of a
prompt, then the same run with one off-plan token at step `at` (forced, or sampled at a temperature
with the greedy choice excluded), and compares the two runs:

- every earlier column (positions before the off-plan token) is bit-for-bit the same: causal
  attention means nothing later can reach back and change them;
- from the off-plan position on, every layer's state differs, and so do the next-token
  distributions (KL(original || revised) per aligned step, top-1 agreement);
- whether the revised greedy text rejoins the original's tokens (the same window of tokens,
  possibly shifted by a few positions), i.e. whether the "plan" survives the detour;
- optionally, how future-token probes read the two runs' states (`revise_probes.py`).

The same comparison over many prompts and rank buckets is `revise_scale.py`.

Token choices come from `generate` (KV cache); distributions and states come from one traced full
pass over each sequence, so both runs are measured by exactly the same computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forethought.errors import ForethoughtError
from forethought.experiments.revise_probes import kl_rows as _kl
from forethought.experiments.revise_probes import probe_shift
from forethought.model.generate import check_prompt, generate
from forethought.model.sampling import SamplingParams, sampling_distribution
from forethought.model.transformer import Transformer
from forethought.trace import act_name, run_with_trace

REJOIN_WINDOW = 5  # tokens that must match for the revised text to count as back on the original's track
MAX_SHIFT = 8  # the rejoined text may sit up to this many positions earlier or later than the original's


@dataclass
class ReviseStep:
    """Step `step` chooses the new token at absolute position `position`, from the state one before it."""

    step: int
    position: int
    original_id: int
    revised_id: int
    kl: float  # KL(original || revised) of the two next-token distributions (temperature 1), nats
    top1_agree: bool  # the two distributions' argmax is the same token
    original_top1_prob: float
    revised_top1_prob: float
    # The original's own tokens with only the off-plan one swapped in: how long one token's detour
    # stays in the predictions when the text then goes on exactly as planned.
    kl_substituted: float
    top1_agree_substituted: bool


@dataclass
class Rejoin:
    """Where the revised greedy text is back on the original's tokens."""

    step: int  # revised step where a matching window starts
    original_step: int  # the original step it matches
    shift: int  # original_step - step: >0 the revised text skipped ahead, <0 it inserted tokens
    window: int  # tokens in the matching window
    matched_after: int  # consecutive matching tokens from `step` on (>= window)


@dataclass
class ReviseResult:
    model: str
    prompt_ids: list[int]
    at: int
    how: str  # "forced" or "sampled"
    off_plan_id: int
    greedy_id: int  # what the original chose at step `at`
    off_plan_prob: float  # the model's probability (temperature 1) of the off-plan token at step `at`
    greedy_prob: float
    original_ids: list[int]  # new tokens of the original run (a few beyond the compared steps, for rejoin)
    revised_ids: list[int]
    n_after: int  # compared steps after the off-plan one
    temperature: float | None = None
    seed: int | None = None
    steps: list[ReviseStep] = field(default_factory=list)
    # max |diff| per layer ("embed", then each block's resid_post) and position, aligned by position
    state_diff: list[list[float]] = field(default_factory=list)
    state_rel_diff: list[list[float]] = field(default_factory=list)  # divided by max |original state| there
    # the same for the run that only swaps the off-plan token into the original's tokens
    substituted_rel_diff: list[list[float]] = field(default_factory=list)
    # ||original - revised|| / ||original|| of the whole residual vector, per layer and position (L2 norms)
    state_rel_norm: list[list[float]] = field(default_factory=list)
    substituted_rel_norm: list[list[float]] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    rejoin: Rejoin | None = None
    probes: dict | None = None

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def off_plan_position(self) -> int:
        return self.prompt_length + self.at

    @property
    def position_max_diff(self) -> list[float]:
        """Per position, the largest |diff| over every layer and dimension."""
        return [max(col) for col in zip(*self.state_diff)] if self.state_diff else []

    @property
    def causal_max_diff(self) -> float:
        """Largest |diff| anywhere before the off-plan token: 0 when earlier columns are untouched."""
        return max(self.position_max_diff[: self.off_plan_position], default=0.0)

    @property
    def after(self) -> list[ReviseStep]:
        return [s for s in self.steps if s.step > self.at]

    def summary(self) -> dict:
        after = self.after
        before = [s for s in self.steps if s.step <= self.at]
        return {
            "causal_max_diff": self.causal_max_diff,
            "changed_positions": sum(d > 0 for d in self.position_max_diff[self.off_plan_position :]),
            "compared_positions_after": len(self.position_max_diff) - self.off_plan_position,
            "kl_before_max": max((s.kl for s in before), default=0.0),
            "kl_after_mean": sum(s.kl for s in after) / len(after) if after else 0.0,
            "kl_after_max": max((s.kl for s in after), default=0.0),
            "kl_first_after": after[0].kl if after else 0.0,
            "kl_last_after": after[-1].kl if after else 0.0,
            "top1_agreement_after": sum(s.top1_agree for s in after) / len(after) if after else 1.0,
            "kl_substituted_first_after": after[0].kl_substituted if after else 0.0,
            "kl_substituted_last_after": after[-1].kl_substituted if after else 0.0,
            "top1_agreement_substituted_after": (
                sum(s.top1_agree_substituted for s in after) / len(after) if after else 1.0
            ),
            "rejoined": self.rejoin is not None,
            "rejoin_step": self.rejoin.step if self.rejoin else None,
            "rejoin_shift": self.rejoin.shift if self.rejoin else None,
        }

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "prompt_ids": self.prompt_ids,
            "at": self.at,
            "off_plan_position": self.off_plan_position,
            "how": self.how,
            "temperature": self.temperature,
            "seed": self.seed,
            "off_plan_id": self.off_plan_id,
            "greedy_id": self.greedy_id,
            "off_plan_prob": self.off_plan_prob,
            "greedy_prob": self.greedy_prob,
            "n_after": self.n_after,
            "original_ids": self.original_ids,
            "revised_ids": self.revised_ids,
            **self.summary(),
            "rejoin": asdict(self.rejoin) if self.rejoin else None,
            "steps": [asdict(s) for s in self.steps],
            "layer_names": self.layer_names,
            "position_max_diff": self.position_max_diff,
            "state_diff": self.state_diff,
            "state_rel_diff": self.state_rel_diff,
            "substituted_rel_diff": self.substituted_rel_diff,
            "state_rel_norm": self.state_rel_norm,
            "substituted_rel_norm": self.substituted_rel_norm,
            "probes": self.probes,
        }


def single_token(tokenizer, text: str) -> int:
    """The id of `text` if it is exactly one token (mind the leading space: ' the' differs from 'the')."""
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    if len(ids) != 1:
        shown = " ".join(repr(tokenizer.token_str(i)) for i in ids) or "nothing"
        raise ForethoughtError(f"--force {text!r} is {len(ids)} tokens ({shown}); give text that is exactly one token")
    return ids[0]


def find_rejoin(
    original: list[int], revised: list[int], at: int, end: int, window: int = REJOIN_WINDOW, max_shift: int = MAX_SHIFT
) -> Rejoin | None:
    """First revised step s in (at, end] whose next `window` tokens equal the original's at s + shift.

    `end` is the last revised step that may be used; the window shrinks to what is left when fewer
    than `window` tokens follow the off-plan one (never below 1). Smaller |shift| wins at the same s.
    """
    available = end - at
    window = max(1, min(window, available))
    shifts = sorted(range(-max_shift, max_shift + 1), key=lambda k: (abs(k), -k))
    for s in range(at + 1, end - window + 2):
        for k in shifts:
            o = s + k
            if o < at or o + window > len(original):
                continue  # must match the original's own continuation, from its choice at `at` on
            if revised[s : s + window] == original[o : o + window]:
                n = 0
                while s + n <= end and o + n < len(original) and revised[s + n] == original[o + n]:
                    n += 1
                return Rejoin(step=s, original_step=o, shift=k, window=window, matched_after=n)
    return None


def _sample_off_plan(logits: torch.Tensor, greedy_id: int, temperature: float, seed: int) -> int:
    if not temperature > 0:
        raise ForethoughtError(f"--temperature must be > 0 to sample an off-plan token, got {temperature}")
    probs = sampling_distribution(logits, SamplingParams(temperature=temperature)).double()
    probs[greedy_id] = 0.0
    total = float(probs.sum())
    if not total > 0:
        raise ForethoughtError(
            f"at temperature {temperature} every token but the greedy one has probability 0; raise --temperature"
        )
    generator = torch.Generator().manual_seed(seed)
    return int(torch.multinomial((probs / total).float(), 1, generator=generator))


@torch.inference_mode()
def revise(
    model: Transformer,
    prompt_ids: list[int],
    at: int,
    n_after: int = 16,
    force_id: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    probes_dir: str | Path | None = None,
    model_name: str = "",
    original_ids: list[int] | None = None,
) -> ReviseResult:
    """Greedy run vs the same run with an off-plan token at new-token index `at` (0-based).

    Exactly one of `force_id` (a token id) or `temperature` (sampled with `seed`, greedy choice
    excluded) picks the off-plan token. Both runs continue greedily for `n_after` more steps.
    `original_ids`, when given, is this prompt's greedy continuation from `generate` (at least the
    `at + 1 + n_after + MAX_SHIFT` tokens used here, or all up to EOS), so several off-plan tokens
    on one prompt need only one greedy run.
    """
    if (force_id is None) == (temperature is None):
        raise ForethoughtError("give exactly one of --force TOKEN or --temperature T (with --seed S)")
    if temperature is not None and seed is None:
        raise ForethoughtError("--temperature needs --seed S, so the off-plan token can be reproduced")
    if at < 0:
        raise ForethoughtError(f"--at must be >= 0, got {at}")
    if n_after < 1:
        raise ForethoughtError(f"-n must be >= 1, got {n_after}")
    vocab = model.config.vocab_size
    if force_id is not None and not 0 <= force_id < vocab:
        raise ForethoughtError(f"token id {force_id} is outside the vocabulary (0..{vocab - 1})")
    P = len(prompt_ids)
    limit = model.config.context_length
    total = min(at + 1 + n_after + MAX_SHIFT, limit - P)
    if at + 1 + n_after > total:
        raise ForethoughtError(
            f"--at {at} + -n {n_after} + 1 new tokens after a {P}-token prompt exceed the context length {limit}"
        )
    check_prompt(model, prompt_ids, total)

    if original_ids is None:
        original = generate(model, prompt_ids, total, stop_ids=stop_ids).new_ids
    else:
        original = list(original_ids[:total])
    if at >= len(original):
        raise ForethoughtError(
            f"--at {at} is beyond the generation: the greedy continuation stops (EOS) after {len(original)} tokens"
        )
    greedy_id = original[at]
    device = model.device

    # The distribution at step `at` only depends on the shared prefix; take it from a short pass.
    head_logits = model(torch.tensor([prompt_ids + original[:at]], device=device), last_only=True)[0, -1]
    if force_id is not None:
        off_plan, how = force_id, "forced"
        if off_plan == greedy_id:
            raise ForethoughtError(
                f"the forced token (id {force_id}) is the greedy choice at step {at}, so nothing is off plan"
            )
    else:
        off_plan, how = _sample_off_plan(head_logits, greedy_id, temperature, seed), "sampled"
    head_probs = torch.softmax(head_logits.double(), dim=-1)

    revised = original[:at] + [off_plan]
    if off_plan not in stop_ids:
        revised += generate(model, prompt_ids + revised, n_after, stop_ids=stop_ids).new_ids

    # Steps whose distributions both runs define: step s conditions on new tokens [:s], and a run that
    # stopped at EOS on step e defines nothing after e.
    last = min(at + n_after, len(original) - 1, len(revised) - 1)
    n_compared = last - at
    result = ReviseResult(
        model=model_name or model.config.name,
        prompt_ids=list(prompt_ids),
        at=at,
        how=how,
        off_plan_id=off_plan,
        greedy_id=greedy_id,
        off_plan_prob=float(head_probs[off_plan]),
        greedy_prob=float(head_probs[greedy_id]),
        original_ids=original,
        revised_ids=revised,
        n_after=n_compared,
        temperature=temperature,
        seed=seed,
    )

    names = ["embed", "resid_post"]
    seq_o = prompt_ids + original[:last]
    seq_r = prompt_ids + revised[:last]
    seq_s = prompt_ids + original[:at] + [off_plan] + original[at + 1 : last]
    logits_o, trace_o = run_with_trace(model, seq_o, names)
    logits_r, trace_r = run_with_trace(model, seq_r, names)
    logits_s, trace_s = run_with_trace(model, seq_s, names)
    rows = slice(P - 1, P + last)  # logits at position P-1+s choose step s
    lo, lr, ls = logits_o[0, rows], logits_r[0, rows], logits_s[0, rows]
    kl, kl_s = _kl(lo, lr), _kl(lo, ls)
    po, pr = torch.softmax(lo.double(), -1), torch.softmax(lr.double(), -1)
    for s in range(last + 1):
        result.steps.append(
            ReviseStep(
                step=s,
                position=P + s,
                original_id=original[s],
                revised_id=revised[s],
                kl=float(kl[s]),
                top1_agree=bool(lo[s].argmax() == lr[s].argmax()),
                original_top1_prob=float(po[s].max()),
                revised_top1_prob=float(pr[s].max()),
                kl_substituted=float(kl_s[s]),
                top1_agree_substituted=bool(lo[s].argmax() == ls[s].argmax()),
            )
        )

    states_o = torch.cat([trace_o["embed"][None], trace_o["resid_post"]])  # [1 + layers, position, d]
    states_r = torch.cat([trace_r["embed"][None], trace_r["resid_post"]])
    states_s = torch.cat([trace_s["embed"][None], trace_s["resid_post"]])
    diff = (states_o.double() - states_r.double()).abs().amax(-1)
    scale = states_o.double().abs().amax(-1).clamp_min(1e-30)
    result.layer_names = ["embed"] + [act_name(i, "resid_post") for i in range(model.config.n_layers)]
    result.state_diff = diff.tolist()
    result.state_rel_diff = (diff / scale).tolist()
    diff_s = (states_o.double() - states_s.double()).abs().amax(-1)
    result.substituted_rel_diff = (diff_s / scale).tolist()
    norm = states_o.double().norm(dim=-1).clamp_min(1e-30)
    result.state_rel_norm = ((states_o.double() - states_r.double()).norm(dim=-1) / norm).tolist()
    result.substituted_rel_norm = ((states_o.double() - states_s.double()).norm(dim=-1) / norm).tolist()
    result.rejoin = find_rejoin(original, revised, at, last)
    if probes_dir is not None:
        result.probes = probe_shift(probes_dir, states_o, states_r, prompt_ids + original, prompt_ids + revised, P + at)
    return result
