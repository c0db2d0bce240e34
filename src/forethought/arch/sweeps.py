"""The two sweeps of the state-tracking task: accuracy vs number of layers, and length generalisation.

The pyramidal argument predicts that a shallow standard decoder loses track of the state beyond some length while
the Feedback Transformer and the RNN do not. Two measurements test it:

- depth: held-out accuracy at the training length for 1, 2, 4... layers, per architecture (from the comparison's
  table, so it costs no extra evaluation);
- length: every trained checkpoint evaluated at other lengths than the one it was trained at (L/2, L, 2L, 4L).
  Its headline number is the accuracy on the *last quarter* of each sequence: whether the state is still right at
  the end. The accuracy over all positions mixes in the easy early positions, so it falls with length even for a
  model that never loses track after position 8 (that curve is accuracy vs position, drawn separately).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from forethought.arch.checkpoint import write_atomic_text
from forethought.arch.models import ArchModel
from forethought.arch.stats import interval
from forethought.arch.tasks import Task
from forethought.arch.train import Evaluation, evaluate
from forethought.errors import ForethoughtError

LENGTHS = "lengths.json"  # per run folder: the length sweep of that checkpoint (cached; recomputed if asked otherwise)
TAIL = 4  # the headline score is the accuracy on the last 1/TAIL of each sequence


def tail_accuracy(evaluation: Evaluation) -> float:
    """Accuracy on the last quarter of the positions (at least one): is the state still right at the end?"""
    scores = [a for a in evaluation.by_position if not math.isnan(a)]
    tail = scores[-max(1, len(scores) // TAIL) :]
    return statistics.fmean(tail) if tail else float("nan")


def sweep_lengths(train_length: int, multiples: Sequence[float]) -> list[int]:
    """Evaluation lengths as multiples of the training length (L/2, L, 2L...), rounded, at least 1, deduplicated."""
    return sorted({max(1, round(m * train_length)) for m in multiples})


def evaluate_lengths(
    model: ArchModel, task: Task, lengths: Sequence[int], batches: int = 4, batch_size: int = 64
) -> dict[int, Evaluation]:
    """Held-out evaluation of a trained model at each sequence length in `lengths` (length generalisation).

    With the default `batches` and `batch_size`, the result at the training length is the training loop's own final
    evaluation. A length beyond the model's context is refused with one line, before anything is evaluated."""
    check_lengths(lengths, model.config.context_length)
    return {n: evaluate(model, task, batches, batch_size, n) for n in lengths}


def check_lengths(lengths: Sequence[int], context: int) -> None:
    """Refuse, in one line, an evaluation length the model cannot read (checked before any training or evaluation)."""
    for n in lengths:
        if not 1 <= n <= context:
            raise ForethoughtError(f"evaluation length {n} is outside 1..{context} (the model's context length)")


def length_record(evaluations: dict[int, Evaluation]) -> dict[int, dict]:
    """What a run keeps of its length sweep: per length, accuracy (all positions), tail accuracy and loss."""
    return {
        n: {"accuracy": e.accuracy, "tail_accuracy": tail_accuracy(e), "loss": e.loss}
        for n, e in sorted(evaluations.items())
    }


def cached_lengths(folder: Path, lengths: list[int], compute: Callable[[], dict[int, dict]]) -> dict[int, dict]:
    """The length sweep saved in a run folder, or `compute()` written there when it is missing or other lengths."""
    path = folder / LENGTHS
    saved = _read_lengths(path) if path.is_file() else None
    if saved is not None and sorted(saved) == lengths:
        return saved
    # Missing, for other lengths, or damaged (a cut file, an accuracy of 7.5): measured again, never shown.
    record = compute()
    write_atomic_text(path, json.dumps({str(n): v for n, v in record.items()}, indent=1), "the length sweep")
    return record


def _read_lengths(path: Path) -> dict[int, dict] | None:
    """The cached sweep if every value is one evaluate_lengths could have produced, else None."""
    try:
        raw = json.loads(path.read_text())
        saved = {int(n): v for n, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    for v in saved.values():
        if not isinstance(v, dict):
            return None
        for key in ("accuracy", "tail_accuracy", "loss"):
            x = v.get(key)
            if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
                return None
            if key != "loss" and x > 1:
                return None
    return saved


def length_sweep(runs: Sequence, train_lengths: dict[str, int]) -> list[dict]:
    """Per (task, layers, arch): accuracy at each evaluation length, with an interval over seeds.

    `runs` are RunSummary-like objects with `task, layers, arch, by_length`; only lengths every seed has count."""
    groups: dict[tuple, list] = {}
    for r in runs:
        if r.by_length:
            groups.setdefault((r.task, r.layers, r.arch), []).append(r)
    out = []
    for (task, layers, arch), group in groups.items():
        shared = sorted(set.intersection(*(set(map(int, r.by_length)) for r in group)))
        points = []
        for n in shared:
            at = [r.by_length.get(n, r.by_length.get(str(n))) for r in group]
            points.append(
                {
                    "length": n,
                    "tail_accuracy": interval([a["tail_accuracy"] for a in at]),
                    "accuracy": interval([a["accuracy"] for a in at]),
                }
            )
        out.append(
            {"task": task, "layers": layers, "arch": arch, "train_length": train_lengths[task], "points": points}
        )
    return out


def _layers(row: dict) -> int:
    return row["layers"]


def depth_sweep(table: Sequence[dict], train_lengths: dict[str, int]) -> list[dict]:
    """Per (task, arch) trained at more than one depth: held-out accuracy at the training length vs layers."""
    groups: dict[tuple, list[dict]] = {}
    for row in table:
        if row["task"] != "text":
            groups.setdefault((row["task"], row["arch"]), []).append(row)
    return [
        {
            "task": task,
            "arch": arch,
            "length": train_lengths[task],
            "points": [{"layers": r["layers"], "accuracy": r["accuracy"]} for r in sorted(rows, key=_layers)],
        }
        for (task, arch), rows in groups.items()
        if len(rows) > 1
    ]
