"""The records the plan-tasks stages share: a prompt, one task's run on one model (what it wrote, its states at
the site), and the measured answer for one target."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from forethought.errors import ForethoughtError
from forethought.experiments.baselines import Interval

VERDICTS = ("planned", "encoded, not shown used", "not found", "task not done")


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt of a task. The planning site is always the prompt's last token."""

    task: str  # rhyme | answer | response | code | article (or a lab task)
    index: int
    text: str  # exactly what the model reads (a chat prompt already rendered through the model's template)
    group: str  # prompts sharing a group share their key content (one couplet's first line, one question):
    #             cross-fitting splits by group, so no held-out prompt has a near-copy in training
    meta: dict = field(default_factory=dict)  # task facts: the gold answer, line 1's rhyme family, ...


@dataclass
class TaskRun:
    """One task on one model: the prompts, the model's greedy completions, the labels read from them, and the
    residual stream at the site (the last prompt token) after the captured blocks."""

    task: str
    model: str  # registry name or absolute path (what load_model needs)
    prompts: list[TaskPrompt]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    labels: dict[str, list[str | None]]  # target -> one label per prompt (None: the completion has none)
    behaved: np.ndarray  # [n] bool: the model did the task on this prompt (rhymed, answered right, ...)
    layers: list[int]
    states: np.ndarray  # [n, len(layers), d_model] float32
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def save(self, folder: Path) -> Path:
        """`run.json` (text, labels) + `states.npy`; the JSON is written last, so a folder with it is whole."""
        from forethought.paths import atomic_write_bytes, output_dir

        folder = output_dir(folder, "--out")
        buf = _npy_bytes(self.states.astype(np.float32))
        atomic_write_bytes(folder / "states.npy", buf, "--out")
        d = {
            "task": self.task,
            "model": self.model,
            "prompts": [asdict(p) for p in self.prompts],
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "completions": self.completions,
            "labels": self.labels,
            "behaved": self.behaved.astype(bool).tolist(),
            "layers": self.layers,
            "seconds": self.seconds,
            "settings": self.settings,
        }
        return atomic_write_bytes(folder / "run.json", json.dumps(d).encode(), "--out")

    @classmethod
    def load(cls, folder: Path) -> TaskRun:
        folder = Path(folder)
        try:
            d = json.loads((folder / "run.json").read_text())
            states = np.load(folder / "states.npy", allow_pickle=False)
            run = cls(
                task=d["task"],
                model=d["model"],
                prompts=[TaskPrompt(**p) for p in d["prompts"]],
                prompt_ids=d["prompt_ids"],
                completion_ids=d["completion_ids"],
                completions=d["completions"],
                labels=d["labels"],
                behaved=np.asarray(d["behaved"], dtype=bool),
                layers=list(d["layers"]),
                states=states,
                seconds=float(d.get("seconds", 0.0)),
                settings=d.get("settings", {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ForethoughtError(f"{folder}: not a readable plan-tasks run ({type(e).__name__}: {e})") from None
        n = len(run.prompts)
        if states.shape[:2] != (n, len(run.layers)) or any(len(v) != n for v in run.labels.values()):
            raise ForethoughtError(f"{folder}: plan-tasks run is inconsistent (states {states.shape}, {n} prompts)")
        return run


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass
class Steering:
    """Steering at the site along the target's direction, as a dose-response, with a random direction of the
    same norm as the control."""

    layer: int
    doses: list[float]  # added norm in units of the site state's RMS norm at that layer
    probe_share: list[Interval]  # share of steered prompts whose label becomes the steered target
    random_share: list[Interval]  # the same with a random direction of the same norm
    effect: Interval  # probe minus random share at the strongest dose that keeps the task done (or the largest)
    kl_jump_position: float | None = None  # median first completion position where KL(steered || plain) jumps
    n: int = 0
    effect_dose: float | None = None  # the dose `effect` was read at (chosen on the random control alone)


@dataclass
class Patching:
    """The site's state replaced by a donor prompt's (another target): does the output follow the donor?"""

    layer: int
    follow: Interval  # share of patched prompts whose label becomes the donor's
    control: Interval  # the same with a donor of the same label as the recipient (changes by chance)
    effect: Interval  # follow minus control (unpatched greedy output cannot change: a same-label donor is the base)
    n: int = 0


def paired_effect_text(estimate: float, low: float, high: float, n: int, between: str = "the arms") -> str:
    """A paired effect (a causal test's arms, or B + h against B) in points with its interval. Where no prompt
    differed between the two (every paired difference is 0, so a bootstrap interval has no width) the interval
    says nothing; say instead how large an effect this many prompts rule out: with 0 of n discordant pairs the
    discordant rate is below 3 / n at 95% (the rule of three), and so is the effect."""
    if low == high == estimate == 0 and n > 0:
        return f"+0.0: no prompt of {n} differed between {between} (effect < {300 / n:.1f} points, 95%)"
    return f"{100 * estimate:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


@dataclass
class TargetResult:
    """The measured answer for one task x model x target."""

    task: str
    model: str
    target: str
    n_prompts: int
    behaviour_rate: Interval  # share of prompts where the model did the task
    n_usable: int  # prompts with a label, used by the readouts
    n_classes: int
    layer: int | None  # chosen on validation folds
    baseline_acc: Interval  # prompt-text baseline (B), cross-fitted
    stacked_acc: Interval  # B + h at the site
    probe_acc: Interval  # h alone
    excess: Interval  # (B + h) - B, bootstrap over prompt groups
    mde: float  # the smallest excess this run could have detected (two-sided 5%, power 80%)
    control_excess: Interval  # the same pipeline on shuffled labels: must contain 0
    steering: Steering | None = None
    patching: Patching | None = None
    verdict: str = "not found"
    why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)
