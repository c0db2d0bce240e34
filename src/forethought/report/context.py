"""What every section may use: the model (loaded once per dtype, on first use), the corpus, the settings."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forethought.weights.registry import DEFAULT_MODEL

STORY = "Once upon a time, there was a little"


@dataclass(frozen=True)
class ReportSettings:
    """Sizes of every experiment. `quick()` fits a loaded 2-core machine in minutes; `full()` is the thread's."""

    equivalence_steps: int = 32
    lens_steps: int = 8
    future_tokens: int = 50_000
    future_layers: int = 7  # evenly spaced layers probed (the last is always one of them)
    future_offsets: int = 4
    future_window: int = 256
    future_doc_tokens: int = 48  # first tokens of each document: many short documents, so that an interval over
    future_test_fraction: float = 0.45  # held-out documents (chosen by a hash of their name) can be narrow
    future_eval_tokens: int = 4096
    # the plan answer, on the Future Lens store: horizon offsets, causal tests at `plan_positions` held-out positions
    plan_offsets: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
    plan_positions: int = 500
    plan_max_prefix: int = 48  # causal positions at most this far into their window (a prefix's cost grows with it)
    plan_ceiling_offsets: tuple[int, ...] = (1, 2, 3, 4, 8)
    plan_ceiling_positions: int | None = 120  # the ceiling's rollouts on the first N causal positions only
    plan_rollouts: int = 4
    plan_steer_offsets: tuple[int, ...] = (2, 3)
    plan_n_boot: int = 1000
    anatomy_docs: int = 64
    anatomy_length: int = 128
    revise_steps: int = 16
    state_tokens: tuple[int, ...] = (1, 10, 100, 1000, 8192)
    speculative_tokens: int = 128  # greedy tokens per prompt, plain and with each drafter
    arch_preset: str = "reduced"  # forethought.arch.compare.PRESETS: the trained-here architecture comparison
    prompt: str = STORY

    @classmethod
    def full(cls) -> ReportSettings:
        return cls()

    @classmethod
    def quick(cls) -> ReportSettings:
        return cls(
            equivalence_steps=16,
            lens_steps=6,
            future_tokens=8_000,
            future_layers=4,
            future_offsets=3,
            future_window=128,
            future_doc_tokens=48,
            future_test_fraction=0.4,  # a small store: hold out more, or the intervals are too wide to read
            future_eval_tokens=1024,
            plan_offsets=(1, 2, 4, 8),
            plan_positions=48,
            plan_max_prefix=48,
            plan_ceiling_offsets=(1, 2, 4),
            plan_ceiling_positions=None,
            plan_rollouts=4,
            plan_steer_offsets=(2,),
            plan_n_boot=400,
            anatomy_docs=16,
            anatomy_length=64,
            revise_steps=12,
            speculative_tokens=64,
            arch_preset="quick",
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReportContext:
    model: str = DEFAULT_MODEL  # as the user gave it: a registry name or a path
    corpus: str = "stdlib"
    settings: ReportSettings = field(default_factory=ReportSettings.quick)
    device: str = "cpu"
    work_dir: Path = Path(".")  # long-lived inputs (activation stores), next to the result cache
    results_dir: Path | None = None  # another run's `second_model.json` (a Finding as JSON)
    compare: Path | None = None  # another model's report.json, shown side by side
    findings: dict = field(default_factory=dict, repr=False)  # key -> Finding of the sections run so far
    _loaded: dict = field(default_factory=dict, repr=False)

    def lm(self, dtype: str = "float32"):
        """The LoadedModel in `dtype`, loaded on first use and kept for the other sections."""
        if dtype not in self._loaded:
            from forethought.weights import load_model

            self._loaded[dtype] = load_model(self.model, self.device, dtype)
        return self._loaded[dtype]

    def release(self, dtype: str) -> None:
        """Forget a model that only one section needs (a float64 copy is 8 bytes per weight)."""
        self._loaded.pop(dtype, None)

    @property
    def loaded_any(self):
        return next(iter(self._loaded.values()), None)

    def model_flag(self) -> str:
        """` --model M` for the commands shown in the report, empty for the default model."""
        return "" if self.model == DEFAULT_MODEL else f" --model {shlex.quote(self.model)}"

    def model_identity(self) -> dict:
        """Name, path and a fingerprint of the weights' bytes on disk, without loading them."""
        from forethought.weights.registry import resolve_path

        name, path = resolve_path(self.model)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        fingerprint = hashlib.sha256()
        for p in files:
            stat = p.stat()
            fingerprint.update(f"{p.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return {"name": name, "path": str(path), "fingerprint": fingerprint.hexdigest()[:16]}


def q(text: str) -> str:
    """Quote an argument for the shell commands shown in the report."""
    return shlex.quote(text)
