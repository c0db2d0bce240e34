"""One training loop for every architecture: AdamW, warmup + cosine, masked cross-entropy, safetensors checkpoints
that a rerun resumes from, and a held-out evaluation."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from forethought.arch.config import ArchConfig
from forethought.arch.models import ArchModel, build_model
from forethought.arch.tasks import Task
from forethought.errors import ForethoughtError

CHECKPOINT = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
ENGINE = "engine"  # the trained model as a model folder (arch/export.py)


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
        if self.steps < 1 or self.batch_size < 1 or self.eval_batches < 1:
            raise ForethoughtError("--steps, --batch and --eval-batches must be >= 1")
        if not self.lr > 0:
            raise ForethoughtError(f"--lr must be > 0, got {self.lr}")


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
    by_position = torch.where(count > 0, hits / count.clamp(min=1), torch.nan).tolist()
    return Evaluation(total_loss / n, float(hits.sum() / count.sum()), by_position, n)


def _save(out: Path, model: ArchModel, optimizer: torch.optim.Optimizer, result: TrainResult) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / (CHECKPOINT + ".tmp")), metadata={"arch": model.config.arch})
    (out / (CHECKPOINT + ".tmp")).replace(out / CHECKPOINT)
    torch.save(optimizer.state_dict(), out / OPTIMIZER)
    (out / STATE).write_text(json.dumps(result.to_dict(), indent=1, default=float))


def load_checkpoint(folder: Path) -> tuple[ArchModel, dict]:
    """The model saved in `folder` by `train`, and its state.json."""
    from safetensors.torch import load_file

    state_path = folder / STATE
    if not state_path.is_file() or not (folder / CHECKPOINT).is_file():
        raise ForethoughtError(f"{folder}: not an arch checkpoint (needs {STATE} and {CHECKPOINT})")
    state = json.loads(state_path.read_text())
    config = ArchConfig(**state["config"])
    model = build_model(config, state["settings"]["seed"])
    model.load_state_dict(load_file(str(folder / CHECKPOINT)))
    return model, state


def check_resumable(out: Path, config: ArchConfig, task: Task) -> None:
    """Refuse to resume a run in `out` that was started with another config or task."""
    if (out / STATE).is_file():
        state = json.loads((out / STATE).read_text())
        # Through ArchConfig, so a field added since the run was saved compares as its default.
        try:
            saved = ArchConfig(**state["config"]).to_dict()
        except (KeyError, TypeError, ForethoughtError):  # no config, or one this version cannot read
            saved = None
        if saved != config.to_dict() or state.get("task") != task.describe():
            raise ForethoughtError(f"{out} holds a run with another config or task; choose a new --out")


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
    if out is not None and (out / STATE).is_file():
        check_resumable(out, config, task)
        model, state = load_checkpoint(out)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        optimizer.load_state_dict(torch.load(out / OPTIMIZER, weights_only=True))
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
    if not result.evals or result.evals[-1]["step"] != result.steps_done:
        flops = result.history[-1]["flops"] if result.history else 0.0
        result.evals.append(
            {"step": result.steps_done, "flops": flops, "loss": result.final.loss, "accuracy": result.final.accuracy}
        )
    if out is not None:
        _save(out, model, optimizer, result)
        if export:
            from forethought.arch.export import export_engine_folder

            export_engine_folder(model, task, out / ENGINE)
    return model, result
