"""One training loop for every architecture: AdamW, warmup + cosine, masked cross-entropy, safetensors checkpoints
that a rerun resumes from, and a held-out evaluation."""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from forethought.arch import checkpoint
from forethought.arch.config import ArchConfig
from forethought.arch.models import ArchModel, build_model
from forethought.arch.tasks import Task
from forethought.errors import ForethoughtError

CHECKPOINT = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
ENGINE = "engine"  # the trained model as a model folder (arch/export.py)
MAX_STEPS = 1_000_000
MAX_LR = 10.0
# What torch.load(weights_only=True) and load_state_dict raise on a file that is not a saved optimizer state
UNREADABLE_PICKLE = (
    pickle.UnpicklingError,
    struct.error,
    RuntimeError,
    ValueError,
    LookupError,
    TypeError,
    OSError,
    EOFError,
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 100
    eval_every: int = 0  # also evaluate every this many steps (0: only at the end), for loss-vs-FLOPs curves

    def __post_init__(self) -> None:
        for name, flag in (("steps", "--steps"), ("batch_size", "--batch"), ("eval_batches", "--eval-batches")):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ForethoughtError(f"--steps, --batch and --eval-batches must be >= 1, got {flag} {value!r}")
        if self.steps > MAX_STEPS:
            # state.json keeps one history entry per step and is rewritten at every checkpoint
            raise ForethoughtError(f"--steps {self.steps} is more than the lab's {MAX_STEPS:,} steps")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ForethoughtError(f"--{name.replace('_', '-')} must be finite and > 0, got {value}")
        if self.lr > MAX_LR:  # AdamW moves every weight by about lr per step: past this it only diverges
            raise ForethoughtError(f"--lr must be at most {MAX_LR:g} (AdamW), got {self.lr}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ForethoughtError(f"--seed must be a whole number in 0..{2**32 - 1}, got {self.seed}")
        for name in ("warmup", "checkpoint_every", "eval_every"):
            value = getattr(self, name)
            least = 1 if name == "checkpoint_every" else 0
            if not _is_int(value) or value < least:
                raise ForethoughtError(f"--{name.replace('_', '-')} must be a whole number >= {least}, got {value!r}")


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    by_position: list[float]  # accuracy at each scored position (NaN where nothing was scored)
    tokens: int


@dataclass
class TrainResult:
    config: ArchConfig
    task: dict
    settings: TrainSettings
    steps_done: int
    train_seconds: float
    train_tokens: int
    history: list[dict] = field(default_factory=list)  # {step, train_loss, flops}
    evals: list[dict] = field(default_factory=list)  # {step, flops, loss, accuracy} on the held-out split
    final: Evaluation | None = None

    @property
    def train_tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["train_tokens_per_second"] = self.train_tokens_per_second
        return out


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[mask], targets[mask])


def lr_at(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(
    model: ArchModel, task: Task, batches: int = 4, batch_size: int = 64, length: int | None = None
) -> Evaluation:
    """Held-out loss and accuracy (argmax == target) on the scored positions, plus accuracy per position."""
    model.eval()
    total_loss, hits, count = 0.0, None, None
    n = 0
    for index in range(batches):
        b = task.batch("test", index, batch_size, length)
        logits = model(b.inputs)
        total_loss += F.cross_entropy(logits[b.mask], b.targets[b.mask], reduction="sum").item()
        correct = (logits.argmax(-1) == b.targets) & b.mask
        hits = correct.sum(0) if hits is None else hits + correct.sum(0)
        count = b.mask.sum(0) if count is None else count + b.mask.sum(0)
        n += int(b.mask.sum())
    model.train()
    if n == 0:  # e.g. repeat at a length no period fits in: nothing to score
        raise ForethoughtError(f"{task.name} at length {length or task.length} has no scored positions")
    by_position = torch.where(count > 0, hits / count.clamp(min=1), torch.nan).tolist()
    return Evaluation(total_loss / n, float(hits.sum() / count.sum()), by_position, n)


def _save(out: Path, model: ArchModel, optimizer: torch.optim.Optimizer, result: TrainResult) -> None:
    """A new checkpoint folder made current in one step (arch/checkpoint.py): weights, optimizer with the RNG
    state, and the run's state are either all the new ones or all the previous ones."""
    from safetensors.torch import save

    def fill(folder: Path) -> None:
        # Serialized in memory, then written as plain bytes: a full disk is then an OSError like any other
        # (torch.save straight to a file reports it as a RuntimeError from its zip writer).
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        (folder / CHECKPOINT).write_bytes(save(tensors, metadata={"arch": model.config.arch}))
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, buffer)
        (folder / OPTIMIZER).write_bytes(buffer.getvalue())
        (folder / STATE).write_text(json.dumps(result.to_dict(), indent=1, default=float))

    checkpoint.save(out, fill, result.steps_done)


def read_state(out: Path) -> dict | None:
    """The verified state.json of the current checkpoint in `out` (None: no checkpoint), its values checked."""
    folder = checkpoint.current(out)
    if folder is None:
        return None
    state = checkpoint.read_json(folder / STATE, "training state")
    check_state(state, folder / STATE)
    return state


def load_checkpoint(folder: Path) -> tuple[ArchModel, dict]:
    """The model of the current checkpoint in `folder` (written by `train`), and its state.json."""
    model, state, _ = _load(folder)
    return model, state


def _load(out: Path) -> tuple[ArchModel, dict, Path]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(out)
    if state is None:
        raise ForethoughtError(f"{out}: not an arch checkpoint (no {checkpoint.POINTER})")
    folder = checkpoint.current(out)
    config = ArchConfig(**state["config"])
    model = build_model(config, state["settings"]["seed"])
    try:
        model.load_state_dict(load_file(str(folder / CHECKPOINT)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ForethoughtError(f"{folder / CHECKPOINT}: does not hold this run's weights ({_first_line(e)})") from None
    return model, state, folder


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]


def check_state(state: dict, source: Path) -> None:
    """The values a resumed run or a comparison reads from state.json, checked before any of them is used: an
    impossible accuracy or loss must never reach a table."""

    def bad(what: str) -> ForethoughtError:
        return ForethoughtError(f"{source}: {what}")

    try:
        config = ArchConfig(**state["config"])
        settings = TrainSettings(**state["settings"])
    except (KeyError, TypeError, ForethoughtError) as e:
        raise bad(f"no valid config or settings ({_first_line(e)})") from None
    del config
    steps = state.get("steps_done")
    if not _is_int(steps) or not 0 <= steps <= settings.steps:
        raise bad(f"steps_done must be a whole number in 0..{settings.steps}")
    history = state.get("history")
    if not isinstance(history, list) or len(history) != steps:
        raise bad("history must list one entry per step done")
    for name in ("train_seconds", "train_tokens"):
        if not _is_number(state.get(name)) or not 0 <= state[name] < math.inf:
            raise bad(f"{name} must be a finite number >= 0")
    for entry in history:
        if not isinstance(entry, dict) or not _is_number(entry.get("train_loss")) or not _is_number(entry.get("flops")):
            raise bad("a history entry lacks a numeric train_loss or flops")
    evals = state.get("evals", [])
    if not isinstance(evals, list):
        raise bad("evals must be a list")
    for e in evals:
        if not isinstance(e, dict):
            raise bad("an evaluation is not an object")
        _check_scores(e, bad)
        if not _is_number(e.get("flops")) or not 0 <= e["flops"] < math.inf:
            raise bad("an evaluation has no finite flops")
    final = state.get("final")
    if final is not None:
        if not isinstance(final, dict) or steps != settings.steps:
            raise bad("final must be an evaluation, and only of a finished run")
        _check_scores(final, bad)
        by_position = final.get("by_position")
        if not isinstance(by_position, list) or not all(
            _is_number(a) and (math.isnan(a) or 0 <= a <= 1) for a in by_position
        ):
            raise bad("final.by_position must list accuracies in 0..1 (NaN where nothing was scored)")


def _check_scores(e: dict, bad: Callable[[str], ForethoughtError]) -> None:
    accuracy, loss = e.get("accuracy"), e.get("loss")
    if not _is_number(accuracy) or not 0 <= accuracy <= 1:
        raise bad(f"accuracy {accuracy!r} is not in 0..1")
    if not _is_number(loss) or not 0 <= loss < math.inf:
        raise bad(f"loss {loss!r} is not a finite number >= 0")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resumable(out: Path, config: ArchConfig, task: Task) -> None:
    """Refuse to resume a run in `out` that was started with another config or task (or whose checkpoint fails
    its hashes)."""
    state = read_state(out)
    if state is not None:
        # Through ArchConfig, so a field added since the run was saved compares as its default.
        if ArchConfig(**state["config"]).to_dict() != config.to_dict() or state.get("task") != task.describe():
            raise ForethoughtError(f"{out} holds a run with another config or task; choose a new --out")


def _resume(out: Path, settings: TrainSettings) -> tuple[ArchModel, torch.optim.Optimizer, dict]:
    """Model, optimizer and RNG exactly as they were after the checkpoint's last step."""
    import warnings

    model, state, folder = _load(out)
    if state["settings"] != asdict(settings):
        raise ForethoughtError(f"{out} holds a run with other training settings; choose a new --out")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            saved = torch.load(folder / OPTIMIZER, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
    except UNREADABLE_PICKLE as e:
        raise ForethoughtError(f"{folder / OPTIMIZER}: not this run's optimizer state ({_first_line(e)})") from None
    return model, optimizer, state


def train(
    config: ArchConfig,
    task: Task,
    settings: TrainSettings,
    out: Path | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    export: bool = True,
) -> tuple[ArchModel, TrainResult]:
    """Train `config.arch` on `task`; with `out`, checkpoint there and resume from what is there, and (with
    `export`) write the trained model as a model folder `out/engine` for `--model` / `load_model`.

    `on_step(step, loss, tokens_per_second)` is called after every step (for progress bars).
    """
    torch.manual_seed(settings.seed)
    model = build_model(config, settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    result = TrainResult(config, task.describe(), settings, 0, 0.0, 0)
    if out is not None:
        check_resumable(out, config, task)
        if checkpoint.current(out) is not None:
            model, optimizer, state = _resume(out, settings)
            result.steps_done, result.train_seconds = state["steps_done"], state["train_seconds"]
            result.train_tokens, result.history = state["train_tokens"], state["history"]
            result.evals = state.get("evals", [])
    flops_per_token = 3 * model.forward_flops_per_token(task.length)  # forward + backward
    model.train()
    for step in range(result.steps_done, settings.steps):
        b = task.batch("train", settings.seed * 1_000_003 + step, settings.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        started = time.perf_counter()
        loss = masked_loss(model(b.inputs), b.targets, b.mask)
        if not torch.isfinite(loss):  # diverged (e.g. a huge --lr): stop before the weights are saved
            raise ForethoughtError(f"training diverged at step {step + 1} (loss {loss.item()}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds = time.perf_counter() - started
        tokens = b.inputs.numel()
        result.train_seconds += seconds
        result.train_tokens += tokens
        result.steps_done = step + 1
        result.history.append(
            {"step": step + 1, "train_loss": loss.item(), "flops": result.train_tokens * flops_per_token}
        )
        if settings.eval_every and result.steps_done % settings.eval_every == 0 and result.steps_done < settings.steps:
            e = evaluate(model, task, settings.eval_batches)
            result.evals.append(
                {"step": step + 1, "flops": result.history[-1]["flops"], "loss": e.loss, "accuracy": e.accuracy}
            )
        if out is not None and (
            result.steps_done % settings.checkpoint_every == 0 or result.steps_done == settings.steps
        ):
            _save(out, model, optimizer, result)
        if on_step is not None:
            on_step(step + 1, loss.item(), tokens / seconds)
    result.final = evaluate(model, task, settings.eval_batches)
    if not math.isfinite(result.final.loss):  # the last step's update can still make the weights non-finite
        raise ForethoughtError(f"training diverged (held-out loss {result.final.loss}); lower --lr")
    if not result.evals or result.evals[-1]["step"] != result.steps_done:
        flops = result.history[-1]["flops"] if result.history else 0.0
        result.evals.append(
            {"step": result.steps_done, "flops": flops, "loss": result.final.loss, "accuracy": result.final.accuracy}
        )
    if out is not None:
        _save(out, model, optimizer, result)
        if export:
            from forethought.arch.export import export_engine_folder

            write = lambda tmp: export_engine_folder(model, task, tmp)  # noqa: E731
            checkpoint.replace_folder(out / ENGINE, write, "the model folder")
    return model, result
