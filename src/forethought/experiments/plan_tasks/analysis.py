"""Is the target already in the state at the planning site, beyond what the prompt's text says -- and is it used?

One `TaskRun` (prompts, the model's greedy completions, a label per prompt read from the completion, the residual
stream at the site) gives, per target, these numbers:

- **behaviour**: the share of prompts where the model did the task at all (rhymed, answered right, ...), with a
  95% interval from a bootstrap over prompt groups. Below `behaviour_floor`, or with fewer than `min_prompts`
  labelled prompts, or one class only, the verdict is "task not done": there is nothing to read.
- **labels**: prompts whose completion has no label are dropped; classes with fewer than `min_class` prompts are
  merged into "other".
- **B, the prompt-text baseline**: a ridge classifier (least squares on one-hot labels, closed form; top class
  = argmax) on the prompt's token unigram and bigram counts (log1p; every n-gram held by at least two prompts)
  plus a one-hot of the task's `baseline_hints` (facts any reader of the prompt has, e.g. line 1's rhyme family).
  It sees exactly the prompt text. Each feature block is scaled to mean squared norm 1; the hints' weight
  relative to the n-grams (0.25, 1, 4) and the penalty are chosen on validation.
- **B + h**: B's chosen text features plus the site's residual stream after one block (standardised on the
  training rows), its weight (0.25 to 16), the layer and the penalty chosen on validation: the excess is what the
  state adds to the best B validation found. **h alone**: the state only (layer and penalty chosen).
- **cross-fitting**: prompts are split into `folds` folds by `TaskPrompt.group` (no test prompt has a near-copy in
  training), stratified by label; each fold is scored by readouts fitted on the others, every choice made by the
  squared error on an inner cross-validation over the training folds only. The test fold never takes part in any
  choice. Readouts are solved in the kernel of the training rows (exact for ridge), for every penalty at once:
  seconds for a few hundred prompts at d = 1536 and eight layers.
- **accuracies** (share of held-out prompts whose label is the readout's top class) and the **excess** (B + h) - B,
  per prompt 0/1 differences, with a 95% bootstrap over prompt groups. An excess interval above 0 says the state
  holds something about the model's own future output that the prompt text, read by this baseline, does not.
- **MDE**: the smallest excess this run could have detected at 5% two-sided with 80% power,
  (1.96 + 0.84) x the excess's bootstrap standard error (read off its 95% interval: width / 3.92). A null with an
  MDE of 15 points says only that no effect of 15+ points is there.
- **shuffled control**: the whole pipeline on labels permuted within the run (folds re-stratified), the per-prompt
  excess averaged over `control_permutations` permutations (one permutation's fitted readouts add their own
  noise, which a bootstrap over prompts does not see); its interval must contain 0 (the readouts cannot make
  information out of nothing; if they could, the excess above would mean nothing).
- **causal tests** (causal.py) at the layer B + h chose most often: steering along the class direction, as a
  dose-response against a random direction of the same norm, and patching the site's state from a donor prompt
  with another label against a donor with the recipient's own label.
- **verdict**: "planned" (excess above 0 and a causal effect above its control), "encoded, not shown used" (excess
  above 0, every causal interval containing 0), "not found" (the excess interval reaches 0), "task not done".
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from forethought.errors import ForethoughtError
from forethought.experiments.baselines import Interval, bootstrap_by_document, minimum_detectable_effect
from forethought.experiments.plan_tasks.types import (
    Patching,
    Steering,
    TargetResult,
    TaskPrompt,
    TaskRun,
    paired_effect_text,
)
from forethought.progress import Progress, tell

VERSION = 6  # bumped whenever the numbers a saved analysis holds would change (pipeline.py keys its cache on it)
OTHER = "other"
READOUTS = ("baseline", "stacked", "probe")  # B, B + h, h alone
HINT_WEIGHTS = (0.25, 1.0, 4.0)  # B: the hints' weight relative to the n-grams, chosen on validation
# B + h: the state's weight relative to the text; at 16 the text barely counts (B + h can do what h alone does)
STATE_WEIGHTS = (0.25, 1.0, 4.0, 16.0)
NAN = Interval(float("nan"), float("nan"), float("nan"))


class PlanTask(Protocol):
    """What the analysis reads of a task (tasks.py's `TaskSpec` has it)."""

    name: str
    targets: Sequence[str]
    max_new_tokens: int
    stop_texts: Sequence[str]

    def labels(self, prompt: TaskPrompt, completion: str) -> dict[str, str | None]: ...

    def baseline_hints(self, prompt: TaskPrompt) -> dict[str, str]: ...


@dataclass(frozen=True)
class AnalysisSettings:
    folds: int = 5
    min_class: int = 10  # classes with fewer labelled prompts merge into "other"
    min_prompts: int = 40  # fewer labelled prompts than this: too few to read anything
    behaviour_floor: float = 0.2  # the model does the task on fewer prompts than this: "task not done"
    penalties: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # ridge, x n_train; on validation
    layers: tuple[int, ...] | None = None  # the captured layers that compete (None: all of the run's)
    min_ngram_prompts: int = 2  # an n-gram enters B when at least this many prompts hold it
    n_boot: int = 1000
    seed: int = 0
    control_permutations: int = 3  # shuffled-label runs averaged for the control (0: none)
    causal: bool = True
    causal_needs_excess: bool = False  # run the causal tests only where the excess is above 0 (a budget choice:
    #                                    elsewhere the verdict is "not found" whatever they say)
    doses: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)  # steering norm / the site state's RMS norm
    causal_prompts: int = 64  # steered / patched prompts per target (sampled)
    kept_labelled: float = 0.8  # a dose keeps the task done while the random control leaves this share labelled
    kl_prompts: int = 16  # prompts with the teacher-forced KL curve
    causal_batch_size: int = 64  # edited prompts decoded together (every dose and control in one decode)

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ForethoughtError(f"folds must be >= 2, got {self.folds}")
        if not self.penalties or min(self.penalties) <= 0:
            raise ForethoughtError("penalties must be positive")
        if not self.doses or min(self.doses) <= 0:
            raise ForethoughtError("steering doses must be positive")


# ------------------------------------------------------------------------------------------------ the features


def ngram_features(prompt_ids: Sequence[Sequence[int]], min_prompts: int = 2) -> np.ndarray:
    """[n, features] log1p counts of every token unigram and bigram that at least `min_prompts` prompts hold.

    The vocabulary is built from the prompts' text alone (no labels), so building it on all prompts leaks nothing."""
    grams: list[Counter] = []
    for ids in prompt_ids:
        ids = list(ids)
        grams.append(Counter([(t,) for t in ids] + list(zip(ids[:-1], ids[1:], strict=True))))
    df = Counter(g for c in grams for g in c)
    vocab = {g: j for j, g in enumerate(sorted(g for g, k in df.items() if k >= min_prompts))}
    x = np.zeros((len(grams), len(vocab)), dtype=np.float32)
    for i, c in enumerate(grams):
        for g, k in c.items():
            j = vocab.get(g)
            if j is not None:
                x[i, j] = np.log1p(k)
    return x


def hint_features(hints: Sequence[dict[str, str]]) -> np.ndarray:
    """[n, values] one-hot of every (hint, value) pair the prompts have."""
    pairs = sorted({(str(k), str(v)) for h in hints for k, v in h.items()})
    col = {p: j for j, p in enumerate(pairs)}
    x = np.zeros((len(hints), len(pairs)), dtype=np.float32)
    for i, h in enumerate(hints):
        for k, v in h.items():
            x[i, col[(str(k), str(v))]] = 1.0
    return x


def merge_rare(labels: Sequence[str | None], min_class: int) -> tuple[list[str | None], list[str]]:
    """Labels with classes of fewer than `min_class` prompts renamed "other"; and the classes left, sorted."""
    counts = Counter(x for x in labels if x is not None)
    keep = {c for c, k in counts.items() if k >= min_class}
    merged = [None if x is None else (x if x in keep else OTHER) for x in labels]
    return merged, sorted({x for x in merged if x is not None})


def assign_folds(groups: Sequence[str], folds: int, seed: int, labels: Sequence | None = None) -> np.ndarray:
    """A fold per row, whole groups kept together and, given labels, the classes spread evenly over the folds.

    Stratifying matters under the null: with folds of uneven class mix, a readout that falls back on the training
    folds' majority scores *below* chance on the test fold (its majority is the training folds' minority), more so
    the more it is regularised -- so B (often just the prior) would lose to B + h on labels that carry nothing.
    Groups go, largest first (seeded order among equals), to the fold where they leave the per-class counts
    closest to an even share."""
    names = sorted(set(groups))
    if len(names) < folds:
        raise ForethoughtError(f"{len(names)} prompt groups cannot fill {folds} folds")
    classes = sorted({str(x) for x in labels}) if labels is not None else [""]
    col = {c: j for j, c in enumerate(classes)}
    counts = {g: np.zeros(len(classes)) for g in names}
    for i, g in enumerate(groups):
        counts[g][col[str(labels[i])] if labels is not None else 0] += 1
    target = sum(counts.values()) / folds
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(names)), key=lambda k: -counts[names[k]].sum())
    filled = np.zeros((folds, len(classes)))
    fold_of = {}
    for k in order:
        g = names[k]
        cost = ((filled + counts[g] - target) ** 2).sum(1) - ((filled - target) ** 2).sum(1)
        best = min(range(folds), key=lambda f: (cost[f], filled[f].sum(), f))
        filled[best] += counts[g]
        fold_of[g] = best
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- the readouts


def ridge_scores(k_all: torch.Tensor, train: np.ndarray, y: np.ndarray, rows: np.ndarray, penalties) -> torch.Tensor:
    """Class scores [penalties, len(rows), classes] of ridge classifiers (least squares on one-hot labels, with
    an intercept) fitted on `train`, from the linear kernel of centred features [n, n_train] against the training
    rows: W = X_T^T (K_TT + lambda I)^-1 (Y - mean), in closed form for every penalty at once (through the
    eigenbasis of K_TT). Penalty lambda = p x n_train: the blocks are scaled to mean squared norm 1."""
    n_classes = int(y.max()) + 1
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y[train]), n_classes).double()
    mean = onehot.mean(0)
    eig, u = torch.linalg.eigh(k_all[train])
    eig = eig.clamp(min=0)
    left = k_all[rows] @ u  # [rows, r]
    right = u.T @ (onehot - mean)  # [r, classes]
    lam = torch.tensor([p * len(train) for p in penalties], dtype=torch.float64)
    return torch.einsum("nr,pr,rc->pnc", left, 1.0 / (eig[None] + lam[:, None]), right) + mean


class Kernels:
    """The linear kernels of B's feature blocks and of each layer's standardised state, for one training set. Each
    block is scaled to mean squared norm 1 on the training rows; their relative weights are chosen on validation."""

    def __init__(self, text: np.ndarray | Sequence[np.ndarray], states: np.ndarray, train: np.ndarray) -> None:
        self.train = train
        blocks = [text] if isinstance(text, np.ndarray) else list(text)
        self.blocks = [k for k in (self._block(b, standardise=False) for b in blocks) if k is not None]
        self.states = [self._block(states[:, j], standardise=True) for j in range(states.shape[1])]

    def _block(self, x: np.ndarray, standardise: bool) -> torch.Tensor | None:
        if x.shape[1] == 0:
            return None
        x = torch.from_numpy(np.asarray(x, dtype=np.float64))
        t = x[self.train]
        x = x - t.mean(0)
        if standardise:  # per dimension; a constant dimension stays 0
            x = x / t.std(0).clamp(min=1e-6)
        scale = x[self.train].square().sum(1).mean().clamp(min=1e-12)  # equal mean squared norm per block
        x = x / scale.sqrt()
        return x @ x[self.train].T

    def text_weights(self) -> list[tuple[float, ...]]:
        """The candidate weights of B's blocks: the first (the n-grams) 1, every other one from HINT_WEIGHTS."""
        if not self.blocks:
            return [()]
        return [(1.0, *w) for w in itertools.product(HINT_WEIGHTS, repeat=len(self.blocks) - 1)]

    def of(self, readout: str, layer: int = 0, text: tuple[float, ...] = (), state: float = 1.0) -> torch.Tensor:
        parts = []
        if readout in ("baseline", "stacked"):
            parts += [w * k for w, k in zip(text or (1.0,) * len(self.blocks), self.blocks, strict=True)]
        if readout in ("stacked", "probe"):
            parts.append(state * self.states[layer])
        if not parts:  # no text feature at all: B is the class prior
            return torch.zeros(len(self.states[0]), len(self.train), dtype=torch.float64)
        return sum(parts)


@dataclass
class Readouts:
    """Per-prompt correctness of each readout on its held-out fold, and what validation chose per fold."""

    correct: dict[str, np.ndarray]  # readout -> [n] 0/1 (on the rows given)
    folds: np.ndarray  # [n]
    chosen: dict[str, list[tuple]] = field(default_factory=dict)  # readout -> per fold (layer, penalty, text, state)

    def layer(self, readout: str = "stacked") -> int:
        """The layer index chosen most often over the folds (the earlier one on a tie)."""
        counts = Counter(c[0] for c in self.chosen[readout])
        return min(counts, key=lambda x: (-counts[x], x))


def _choose(inner: list, configs: list[tuple], y: np.ndarray, settings: AnalysisSettings) -> tuple:
    """The (layer, penalty, text weights, state weight) with the least squared error summed over the inner
    validation folds; `inner` holds (kernels, training rows, validation rows) per inner fold."""
    onehot = np.eye(int(y.max()) + 1)[y]
    errors = torch.zeros(len(configs), len(settings.penalties), dtype=torch.float64)
    for kernels, rows, val in inner:
        target = torch.from_numpy(onehot[val])
        for c, (readout, layer, tw, sw) in enumerate(configs):
            scores = ridge_scores(kernels.of(readout, layer, tw, sw), rows, y, val, settings.penalties)
            errors[c] += (scores - target).square().sum((1, 2))
    c, p = divmod(int(errors.argmin()), len(settings.penalties))
    _, layer, tw, sw = configs[c]
    return layer, settings.penalties[p], tw, sw


def cross_fit(
    text: np.ndarray | Sequence[np.ndarray],
    states: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    settings: AnalysisSettings,
    readouts: Sequence[str] = READOUTS,
) -> Readouts:
    """Every row scored by readouts fitted on the other folds, each with its settings chosen by the squared error
    on the inner validation folds, which are the training folds themselves (the test fold takes no part): B its
    blocks' weights and penalty; B + h B's chosen text weights plus the layer, the state's weight and the penalty
    (so the excess is what the state adds to the best B validation found); h the layer and penalty.

    text: B's feature blocks, each [n, f]; states [n, layers, d]; y [n] class indices; folds [n]."""
    out = Readouts({r: np.zeros(len(y)) for r in readouts}, folds, {r: [] for r in readouts})
    fold_ids = np.unique(folds)
    for f in fold_ids:
        train_rows, test_rows = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        inner = []  # per inner validation fold: its kernels and validation rows
        for v in fold_ids[fold_ids != f]:
            rows = np.flatnonzero((folds != f) & (folds != v))
            inner.append((Kernels(text, states, rows), rows, np.flatnonzero(folds == v)))

        text_options = inner[0][0].text_weights()
        chosen = {"baseline": _choose(inner, [("baseline", 0, tw, 1.0) for tw in text_options], y, settings)}
        best_text = chosen["baseline"][2]
        layers = range(states.shape[1])
        if "stacked" in readouts:
            configs = [("stacked", j, best_text, w) for j in layers for w in STATE_WEIGHTS]
            chosen["stacked"] = _choose(inner, configs, y, settings)
        if "probe" in readouts:
            chosen["probe"] = _choose(inner, [("probe", j, (), 1.0) for j in layers], y, settings)
        kernels = Kernels(text, states, train_rows)
        for readout in readouts:
            layer, penalty, tw, sw = chosen[readout]
            scores = ridge_scores(kernels.of(readout, layer, tw, sw), train_rows, y, test_rows, [penalty])[0]
            out.correct[readout][test_rows] = (scores.argmax(-1).numpy() == y[test_rows]).astype(np.float64)
            out.chosen[readout].append(chosen[readout])
    return out


def mde(excess: Interval) -> float:
    """The smallest excess detectable at 5% two-sided with 80% power (NaN when the interval has no width)."""
    return minimum_detectable_effect(excess.low, excess.high)


# ----------------------------------------------------------------------------------------------- the verdict


def verdict(
    behaviour: Interval,
    n_usable: int,
    n_classes: int,
    excess: Interval,
    mde_value: float,
    steering: Steering | None,
    patching: Patching | None,
    settings: AnalysisSettings,
    baseline: Interval | None = None,
    n_groups: int | None = None,
) -> tuple[str, str]:
    """The verdict and a sentence that says the numbers behind it."""
    if n_usable < settings.min_prompts:
        return "task not done", f"{n_usable} labelled prompts (fewer than {settings.min_prompts}): too few to read"
    if n_groups is not None and n_groups < settings.folds:
        return "task not done", f"the labelled prompts come from {n_groups} groups, too few for {settings.folds} folds"
    if n_classes < 2:
        return "task not done", "the model's outputs take one value here: there is nothing to read"
    if not behaviour.estimate >= settings.behaviour_floor:
        return "task not done", (
            f"the model does the task on {behaviour.estimate:.0%} of prompts "
            f"(floor {settings.behaviour_floor:.0%}): nothing to plan"
        )
    if math.isfinite(mde_value):
        ex = f"excess (B+h) - B {_pts(excess)} points (MDE {100 * mde_value:.1f})"
    else:  # every paired difference is 0: the interval has no width, the n prompts bound the effect instead
        bound = paired_effect_text(excess.estimate, excess.low, excess.high, n_usable, "B and B + h")
        ex = f"excess (B+h) - B {bound}"
    tests = [(name, t) for name, t in (("steering", steering), ("patching", patching)) if t is not None]
    causal = [(name, t.effect) for name, t in tests]
    said = "; ".join(f"{name} effect {_effect(t.effect, t.n)}" for name, t in tests)
    said = said or "no causal test run"
    if not excess.low > 0:
        if baseline is not None and baseline.estimate >= 0.98:
            why = f"the prompt text alone reads the target ({baseline.estimate:.0%}): nothing is left for h to add"
        else:
            why = "the state adds nothing detectable to the prompt text"
        return "not found", f"{ex}: {why}; {said}"
    if any(e.low > 0 for _, e in causal):
        return "planned", f"{ex}, and {said}: the site's state holds the target and the output follows it"
    return "encoded, not shown used", f"{ex}, but {said}: held in the state, no causal effect shown"


def _effect(i: Interval, n: int) -> str:
    text = paired_effect_text(i.estimate, i.low, i.high, n)
    return text if text.startswith("+0.0:") else f"{text} points"  # the bound's text names its unit


def _pts(i: Interval) -> str:
    return f"{100 * i.estimate:+.1f} [{100 * i.low:+.1f}, {100 * i.high:+.1f}]"


# ---------------------------------------------------------------------------------------------- the entry point


def analyze_target(
    run: TaskRun,
    target: str,
    text: Sequence[np.ndarray],
    settings: AnalysisSettings,
    lm=None,
    task: PlanTask | None = None,
    stop_ids: Sequence[int] = (),
) -> TargetResult:
    """Every number of one target; the causal tests need the model (`lm`) and the task."""
    groups = np.array([p.group for p in run.prompts])
    behaviour = bootstrap_by_document(run.behaved.astype(np.float64), groups, settings.n_boot, settings.seed)
    labels, classes = merge_rare(run.labels[target], settings.min_class)
    usable = np.array([x is not None for x in labels])
    n_usable = int(usable.sum())
    layer_idx = _layer_indices(run, settings)
    result = TargetResult(
        task=run.task,
        model=run.model,
        target=target,
        n_prompts=len(run),
        behaviour_rate=behaviour,
        n_usable=n_usable,
        n_classes=len(classes),
        layer=None,
        baseline_acc=NAN,
        stacked_acc=NAN,
        probe_acc=NAN,
        excess=NAN,
        mde=float("nan"),
        control_excess=NAN,
    )
    n_groups = len(set(groups[usable]))
    if n_usable < settings.min_prompts or len(classes) < 2 or n_groups < settings.folds:
        result.verdict, result.why = verdict(
            behaviour, n_usable, len(classes), NAN, float("nan"), None, None, settings, n_groups=n_groups
        )
        return result
    rows = np.flatnonzero(usable)
    index = {c: j for j, c in enumerate(classes)}
    y = np.array([index[labels[i]] for i in rows], dtype=np.int64)
    g = groups[rows]
    folds = assign_folds(list(g), settings.folds, settings.seed, y)
    states = run.states[rows][:, layer_idx]
    text = [block[rows] for block in text]
    fitted = cross_fit(text, states, y, folds, settings)

    def boot(v: np.ndarray) -> Interval:
        return bootstrap_by_document(v, g, settings.n_boot, settings.seed)

    result.baseline_acc = boot(fitted.correct["baseline"])
    result.stacked_acc = boot(fitted.correct["stacked"])
    result.probe_acc = boot(fitted.correct["probe"])
    result.excess = boot(fitted.correct["stacked"] - fitted.correct["baseline"])
    result.mde = mde(result.excess)
    result.layer = run.layers[layer_idx[fitted.layer("stacked")]]
    if settings.control_permutations:
        differences = []
        for k in range(settings.control_permutations):
            shuffled = np.random.default_rng(settings.seed + 1 + k).permutation(y)
            shuffled_folds = assign_folds(list(g), settings.folds, settings.seed, shuffled)
            control = cross_fit(text, states, shuffled, shuffled_folds, settings, ("baseline", "stacked"))
            differences.append(control.correct["stacked"] - control.correct["baseline"])
        result.control_excess = boot(np.mean(differences, 0))
    task_done = behaviour.estimate >= settings.behaviour_floor
    wanted = settings.causal and (result.excess.low > 0 or not settings.causal_needs_excess)
    if wanted and lm is not None and task is not None and task_done:
        from forethought.experiments.plan_tasks import causal

        all_folds = np.full(len(run), -1, dtype=np.int64)
        all_folds[rows] = folds
        test = causal.CausalInputs(run, task, target, labels, classes, result.layer, all_folds, stop_ids)
        result.steering = causal.steering_test(lm, test, settings)
        result.patching = causal.patching_test(lm, test, settings)
    result.verdict, result.why = verdict(
        behaviour,
        n_usable,
        len(classes),
        result.excess,
        result.mde,
        result.steering,
        result.patching,
        settings,
        result.baseline_acc,
    )
    return result


def _layer_indices(run: TaskRun, settings: AnalysisSettings) -> list[int]:
    if settings.layers is None:
        return list(range(len(run.layers)))
    missing = [x for x in settings.layers if x not in run.layers]
    if missing:
        raise ForethoughtError(f"layers {missing} were not captured in this run (captured: {run.layers})")
    return [run.layers.index(x) for x in settings.layers]


def analyze_run(
    lm, run: TaskRun, task: PlanTask, settings: AnalysisSettings, progress: Progress | None = None
) -> list[TargetResult]:
    """Every target of one task run: behaviour, readouts against the prompt baseline, causal tests, verdict."""
    if run.states.shape[1] == 0:
        raise ForethoughtError(f"the {run.task} run holds no states at the site: collect it with layers")
    text = [
        ngram_features(run.prompt_ids, settings.min_ngram_prompts),
        hint_features([task.baseline_hints(p) for p in run.prompts]),
    ]
    stop_ids = None
    if settings.causal and lm is not None:
        stop_ids = run.settings.get("stop_ids")
        if stop_ids is None:
            from forethought.experiments.plan_tasks.generate import stop_token_ids

            stop_ids = stop_token_ids(lm.tokenizer, tuple(task.stop_texts))
    results = []
    for i, target in enumerate(task.targets):
        results.append(analyze_target(run, target, text, settings, lm, task, stop_ids or ()))
        tell(progress, i + 1, len(task.targets))
    return results
