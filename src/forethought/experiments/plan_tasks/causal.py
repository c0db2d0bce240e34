"""Does the output follow the site's state? Steering and patching at the planning site, each against a control.

Both edit the residual stream after one block at the prompt's last token during the prompt's pass, regenerate
greedily, and read the label of the new completion with the task's own labeller (classes merged as the readouts
merged them):

- **steering**: add, at the site, the target class's direction -- the mean state of training prompts with that
  label minus the mean of the rest (cross-fitted: a prompt is steered by the direction of the folds it is not
  in) -- with norm dose x the site's state size at that layer (the states' root-mean-square norm), on prompts
  whose label is another class. The unit is the state's own size, not how much prompts differ there: where
  every prompt ends in the same token (a chat template's last token, the colon of a `def` line) the states
  differ by 1-6% of their norm, and a dose in those units never leaves the neighbourhood the model already
  sees -- a null there would say nothing. The doses run up to twice the state's norm; the random control
  says where the edit merely breaks the output. Outcome: the share whose label becomes the steered class.
  Control: a random Gaussian direction of the same norm, on the same prompts, toward the same class. Both per dose (a
  dose-response); the effect (steered minus random share, paired per prompt) is read at the largest dose at which
  the random control still leaves `kept_labelled` of the prompts with a label (the task still done): the dose is
  chosen on the control alone, never on the outcome.
- **first KL jump**: teacher-forced on the plain completion, one forward with and one without the steering edit
  (the chosen dose); KL(steered || plain) of the next-token distribution at each completion position; the jump is
  the first position whose KL is at least half the completion's largest and at least 0.05 nats. The median over
  prompts: 0 means the edit moves the very next token; a later position means it moves a later one first.
- **patching**: put in place of the site's state a donor prompt's state (another group, another label d).
  Outcome: the share whose label becomes d. Control: a donor with the recipient's own label (another group),
  counting the same event (the label becomes d): what replacing the state by any same-kind state does by chance.
  The effect is the paired difference. (Unpatched greedy regeneration is deterministic, so "the rate of changing
  to d without a patch" is 0 by construction; the same-label donor is the stronger control.)

Intervals: 95% bootstrap over prompt groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forethought.experiments.baselines import Interval, bootstrap_by_document
from forethought.experiments.plan_tasks.generate import SiteEdit, completion_texts, greedy_completions, ragged_batches
from forethought.experiments.plan_tasks.types import Patching, Steering, TaskRun
from forethought.model.decode import generate_steps, greedy_rows
from forethought.model.kv_cache import KVCache
from forethought.model.ragged import RaggedBatch
from forethought.trace import act_name

OTHER = "other"
KL_FLOOR = 0.05  # nats: below this a position has not moved


@dataclass
class CausalInputs:
    """One target's labels (merged) and the cross-fitting folds (-1: the prompt has no label)."""

    run: TaskRun
    task: object  # a PlanTask (analysis.py)
    target: str
    labels: list[str | None]
    classes: list[str]
    layer: int  # a captured layer: the edits happen after this block
    folds: np.ndarray
    stop_ids: Sequence[int] = ()

    @property
    def groups(self) -> np.ndarray:
        return np.array([p.group for p in self.run.prompts])

    def states(self) -> np.ndarray:
        return self.run.states[:, self.run.layers.index(self.layer)].astype(np.float64)

    def merge(self, label: str | None) -> str | None:
        if label is None or label in self.classes:
            return label
        return OTHER if OTHER in self.classes else label


def regenerate(lm, x: CausalInputs, rows: np.ndarray, edit: SiteEdit, settings) -> tuple[list, list[list[int]]]:
    """The merged labels and the new completions' ids of `rows` (repeats allowed) with `edit` at the site."""
    ids = edited_completions(
        lm.model, x.run.prompt_ids, rows, edit, x.task.max_new_tokens, x.stop_ids, settings.causal_batch_size
    )
    texts = completion_texts(lm.tokenizer, ids)
    labels = [x.merge(x.task.labels(x.run.prompts[i], t).get(x.target)) for i, t in zip(rows, texts, strict=True)]
    return labels, ids


class _EditSite:
    """Edit the residual stream after one block at the last position of every row (add or replace)."""

    def __init__(self, edit: SiteEdit, vectors: torch.Tensor) -> None:
        self.name = act_name(edit.layer, "resid_post")
        self.points = frozenset([self.name])
        self.mode, self.vectors = edit.mode, vectors

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name != self.name:
            return tensor
        tensor = tensor.clone()
        value = self.vectors.to(tensor.dtype)
        tensor[:, -1] = value if self.mode == "replace" else tensor[:, -1] + value
        return tensor


@torch.inference_mode()
def edited_completions(
    model,
    prompt_ids: Sequence[Sequence[int]],
    rows: np.ndarray,
    edit: SiteEdit,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int,
) -> list[list[int]]:
    """Greedy completions of prompt `rows[k]` with `edit.vectors[k]` at its site: what `greedy_completions` gives
    for the repeated prompts, computed without repeating their prefixes. An edit at the site cannot change the
    positions before it, so each distinct prompt's prefix runs once and its keys/values are copied into every row
    that edits it; only the site token and the completion run per row (a dose-response edits each prompt ten
    times). Rows of any lengths share a ragged batch; without tree attention that reaches so far, the plain path."""
    vectors = edit.vectors if edit.vectors.dim() == 2 else edit.vectors.expand(len(rows), -1)
    if not model.tree_fits(max(len(prompt_ids[i]) for i in rows) + max_new_tokens):
        plain = greedy_completions(model, [prompt_ids[i] for i in rows], max_new_tokens, stop_ids, (), edit, batch_size)
        return plain.ids
    stop_set = frozenset(stop_ids)
    stops = torch.tensor(sorted(stop_set), dtype=torch.long)
    out: list[list[int]] = [[] for _ in rows]
    # every distinct prompt's prefix (all but the site token) once, in ragged batches
    distinct = sorted({int(i) for i in rows})
    prefix: dict[int, tuple[KVCache, int, int]] = {}  # prompt -> (cache holding its prefix, its row, the width)
    for chunk in ragged_batches([prompt_ids[i][:-1] for i in distinct], batch_size):
        heads = [distinct[c] for c in chunk]
        batch, tokens = RaggedBatch.left_padded([prompt_ids[i][:-1] for i in heads], device=model.device)
        cache = model.new_cache(capacity=max(1, batch.width), batch_size=len(heads))
        if batch.width:
            batch.forward(model, tokens, cache, last_only=True)
        prefix |= {i: (cache, j, batch.width) for j, i in enumerate(heads)}
    # the edited rows, in ragged batches: the prefix copied in, then the edited site token and the completion
    for chunk in ragged_batches([prompt_ids[i] for i in rows], batch_size):
        lengths = [len(prompt_ids[rows[k]]) - 1 for k in chunk]
        batch = RaggedBatch(lengths, model.device)
        cache = model.new_cache(capacity=batch.width + 1 + max_new_tokens, batch_size=len(chunk))
        for r, (k, n) in enumerate(zip(chunk, lengths, strict=True)):
            source, j, width = prefix[int(rows[k])]
            cache.copy_slots(r, batch.width - n, source, j, width - n, n)
        cache.length = batch.width
        site = torch.tensor([[prompt_ids[rows[k]][-1]] for k in chunk], device=model.device)
        hooks = _EditSite(edit, vectors[chunk].to(model.device))
        logits = batch.forward(model, site, cache, hooks, last_only=True)[:, -1]
        finished = torch.zeros(len(chunk), dtype=torch.bool)
        made: list[torch.Tensor] = []

        def step(tokens: torch.Tensor, batch=batch, cache=cache) -> torch.Tensor:
            return batch.forward(model, tokens[:, None].to(model.device), cache)[:, -1]

        for s in generate_steps(model, [], logits, max_new_tokens, greedy_rows, cache, forward=step):
            made.append(s.token.cpu())
            finished |= torch.isin(made[-1], stops)
            if bool(finished.all()) or s.next_logits is None:
                break
        for r, k in enumerate(chunk):
            seq = [int(t[r]) for t in made]
            cut = next((n + 1 for n, t in enumerate(seq) if t in stop_set), len(seq))
            out[k] = seq[:cut]
    return out


def state_size(states: np.ndarray) -> float:
    """The states' root-mean-square norm: the unit of the steering doses."""
    return float(np.sqrt((states**2).sum(1).mean()))


def class_directions(states: np.ndarray, labels: Sequence[str | None], rows: np.ndarray, classes) -> dict:
    """Unit vectors: mean state of `rows` labelled c minus the mean of the other labelled `rows`."""
    lab = np.array([labels[i] for i in rows], dtype=object)
    out = {}
    for c in classes:
        inside, rest = rows[lab == c], rows[lab != c]
        if len(inside) and len(rest):
            v = states[inside].mean(0) - states[rest].mean(0)
            out[c] = v / max(np.linalg.norm(v), 1e-12)
    return out


def _sample(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=k, replace=False)) if len(rows) > k else rows


def steering_test(lm, x: CausalInputs, settings) -> Steering | None:
    """The dose-response of steering toward another class, against a random direction of the same norm."""
    h = x.states()
    scale = state_size(h[x.folds >= 0])
    rng = np.random.default_rng(settings.seed + 2)
    goals = [c for c in x.classes if c != OTHER]
    directions = {
        f: class_directions(h, x.labels, np.flatnonzero((x.folds >= 0) & (x.folds != f)), goals)
        for f in np.unique(x.folds[x.folds >= 0])
    }
    rows, goal = [], []
    for i in np.flatnonzero(x.folds >= 0):
        options = [c for c in goals if c != x.labels[i] and c in directions[x.folds[i]]]
        if options:
            rows.append(i)
            goal.append(options[rng.integers(len(options))])
    if not rows:
        return None
    rows = np.array(rows)
    pick = np.isin(rows, _sample(rows, settings.causal_prompts, rng))
    rows, goal = rows[pick], [g for g, p in zip(goal, pick, strict=True) if p]
    unit = np.stack([directions[x.folds[i]][c] for i, c in zip(rows, goal, strict=True)])
    noise = rng.standard_normal(unit.shape)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    groups = x.groups[rows]

    def boot(v) -> Interval:
        return bootstrap_by_document(np.asarray(v, dtype=np.float64), groups, settings.n_boot, settings.seed)

    # Every dose and both directions in one batched decode: rows of equal length share each step.
    conditions = [(dose, vectors) for dose in settings.doses for vectors in (unit, noise)]
    vectors = np.concatenate([v * dose * scale for dose, v in conditions])
    edit = SiteEdit(x.layer, torch.from_numpy(vectors).float(), "add")
    new, _ = regenerate(lm, x, np.tile(rows, len(conditions)), edit, settings)
    m = len(rows)
    hits: dict[str, list[np.ndarray]] = {"probe": [], "random": []}
    labelled: list[float] = []
    for k in range(len(settings.doses)):
        for j, kind in enumerate(("probe", "random")):
            part = new[(2 * k + j) * m : (2 * k + j + 1) * m]
            hits[kind].append(np.array([n == g for n, g in zip(part, goal, strict=True)], dtype=np.float64))
            if kind == "random":
                labelled.append(float(np.mean([n is not None for n in part])))
    kept = [k for k, share in enumerate(labelled) if share >= settings.kept_labelled]
    at = max(kept) if kept else 0
    dose = settings.doses[at]
    kl_rows = rows[: settings.kl_prompts]
    jumps = [
        first_kl_jump(
            lm.model,
            x.run.prompt_ids[i],
            x.run.completion_ids[i],
            x.layer,
            torch.from_numpy(unit[k] * dose * scale).float(),
        )
        for k, i in enumerate(kl_rows)
    ]
    jumps = [j for j in jumps if j is not None]
    return Steering(
        layer=x.layer,
        doses=list(settings.doses),
        probe_share=[boot(v) for v in hits["probe"]],
        random_share=[boot(v) for v in hits["random"]],
        effect=boot(hits["probe"][at] - hits["random"][at]),
        kl_jump_position=float(np.median(jumps)) if jumps else None,
        n=len(rows),
        effect_dose=dose,
    )


class _EditRow:
    """Add `vector` to one row's residual stream at one position after one block (a teacher-forced forward)."""

    def __init__(self, name: str, row: int, position: int, vector: torch.Tensor) -> None:
        self.points = frozenset([name])
        self.name, self.row, self.position, self.vector = name, row, position, vector

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name != self.name:
            return tensor
        tensor = tensor.clone()
        tensor[self.row, self.position] += self.vector.to(tensor.dtype)
        return tensor


@torch.inference_mode()
def first_kl_jump(model, prompt_ids, completion_ids, layer: int, vector: torch.Tensor) -> int | None:
    """The first completion position where KL(steered || plain) jumps (see the module docstring); None when the
    completion is empty or nothing moves."""
    p, m = len(prompt_ids), len(completion_ids)
    if m == 0:
        return None
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)] * 2, device=model.device)
    hooks = _EditRow(act_name(layer, "resid_post"), 1, p - 1, vector.to(model.device))
    logp = torch.log_softmax(model(ids, hooks=hooks)[:, p - 1 : p - 1 + m].float(), -1)
    plain, steered = logp[0], logp[1]
    kl = (steered.exp() * (steered - plain)).sum(-1)
    threshold = max(KL_FLOOR, 0.5 * float(kl.max()))
    moved = torch.nonzero(kl >= threshold)
    return int(moved[0]) if len(moved) else None


def patching_test(lm, x: CausalInputs, settings) -> Patching | None:
    """Recipients patched with a donor of another label (does the label follow?) and with a donor of their own."""
    h = torch.from_numpy(x.states()).float()
    rng = np.random.default_rng(settings.seed + 3)
    groups = x.groups
    usable = np.flatnonzero(x.folds >= 0)
    goals = [c for c in x.classes if c != OTHER]
    rows, donors, controls, donor_labels = [], [], [], []
    for i in _sample(usable, settings.causal_prompts, rng):
        others = [j for j in usable if groups[j] != groups[i] and x.labels[j] in goals and x.labels[j] != x.labels[i]]
        same = [j for j in usable if groups[j] != groups[i] and x.labels[j] == x.labels[i]]
        if others and same:
            j = others[rng.integers(len(others))]
            rows.append(i)
            donors.append(j)
            donor_labels.append(x.labels[j])
            controls.append(same[rng.integers(len(same))])
    if not rows:
        return None
    rows = np.array(rows)
    both = SiteEdit(x.layer, torch.cat([h[donors], h[controls]]), "replace")  # one batched decode for both
    labels, _ = regenerate(lm, x, np.concatenate([rows, rows]), both, settings)
    patched, control = labels[: len(rows)], labels[len(rows) :]
    follow = np.array([n == d for n, d in zip(patched, donor_labels, strict=True)], dtype=np.float64)
    chance = np.array([n == d for n, d in zip(control, donor_labels, strict=True)], dtype=np.float64)
    g = groups[rows]

    def boot(v) -> Interval:
        return bootstrap_by_document(v, g, settings.n_boot, settings.seed)

    return Patching(layer=x.layer, follow=boot(follow), control=boot(chance), effect=boot(follow - chance), n=len(rows))
