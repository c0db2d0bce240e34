"""The plan-tasks run for one model x task, cached like the report's sections: `OUT/<model>/<task>/` holds the
run (`run/`, TaskRun.save) and the measured answer (`result.json`), each keyed by the sha256 of everything it
depends on (the model file's identity, the task's word list, the sizes, the analysis settings, the code's
version). A folder with the same key is reused, a changed setting redoes it; a run cut after collection resumes at
the analysis (the collection's own key says the saved run is still the right one).

`run_model` is one model's whole list of tasks without drawing or writing anything: what a Ray worker runs
(`forethought plan-tasks --ray`), the driver saving what it returns."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from forethought.errors import ForethoughtError
from forethought.experiments.baselines import Interval
from forethought.experiments.plan_tasks.collect import collect, spread_layers
from forethought.experiments.plan_tasks.tasks import TASKS
from forethought.experiments.plan_tasks.types import Patching, Steering, TargetResult, TaskRun
from forethought.progress import Progress

VERSION = 1  # bump when the collection or the layout of result.json changes: old folders are then redone
RESULT = "result.json"


@dataclass(frozen=True)
class PlanSettings:
    """The sizes of one plan-tasks run. `analysis` holds AnalysisSettings fields that differ from its defaults."""

    prompts: int = 200
    seed: int = 0
    layers: int = 8  # site states after this many blocks, spread from the first to the last
    batch_size: int = 16  # rows decoded together (same output as one at a time; not part of the key)
    dtype: str = "float32"
    device: str = "cpu"
    analysis: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **changes) -> PlanSettings:
        """Minutes on the embedded model: fewer prompts, doses, causal prompts and bootstrap draws, and the causal
        tests only where the probe found an excess (elsewhere the verdict is "not found" whatever they say)."""
        analysis = {"doses": (0.25, 1.0), "causal_prompts": 16, "kl_prompts": 4, "n_boot": 300}
        analysis |= {"causal_needs_excess": True}
        return cls(**({"prompts": 120, "analysis": analysis} | changes))

    def collect_inputs(self) -> dict:
        return {"prompts": self.prompts, "seed": self.seed, "layers": self.layers, "dtype": self.dtype}

    def to_dict(self) -> dict:
        return asdict(self)


def model_identity(model: str) -> dict:
    """Name, path and a fingerprint of the weights' bytes on disk (size and time), without loading them; an
    unknown name or a missing path is the user's error, said before any work."""
    from forethought.weights.registry import resolve_path

    name, path = resolve_path(model)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    fingerprint = hashlib.sha256()
    for p in files:
        stat = p.stat()
        fingerprint.update(f"{p.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return {"name": name, "path": str(path.resolve()), "fingerprint": fingerprint.hexdigest()[:16]}


def model_slug(model: str) -> str:
    """The folder name of a model's results: its registry name, or its file's stem."""
    from forethought.weights.registry import REGISTRY

    return model if model in REGISTRY else Path(model).expanduser().name.removesuffix(".gguf")


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def collect_key(identity: dict, task: str, settings: PlanSettings) -> str:
    spec = TASKS[task]
    return _sha(
        {
            "version": VERSION,
            "model": identity,
            "task": task,
            "spec": [spec.max_new_tokens, list(spec.stop_texts), spec.chat, type(spec).__name__],
            "words": spec.word_list(),
            "settings": settings.collect_inputs() | {"device": settings.device},
        }
    )


def result_key(identity: dict, task: str, settings: PlanSettings) -> str:
    from forethought.experiments.plan_tasks import analysis

    return _sha(
        {
            "collect": collect_key(identity, task, settings),
            "analysis": settings.analysis,
            "analysis_version": getattr(analysis, "VERSION", 1),
        }
    )


@dataclass
class TaskOutcome:
    """One model x task: its measured targets, and the run they came from (None when read back from a folder)."""

    model: str
    task: str
    results: list[TargetResult]
    n_params: int
    n_layers: int
    behaviour: float  # share of prompts where the model did the task
    collect_seconds: float
    analysis_seconds: float
    new_tokens: int
    run: TaskRun | None = None
    cached: bool = False
    key: str = ""

    def summary(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("run", "results")}
        return d | {"results": [r.to_dict() for r in self.results]}


def _interval(d) -> Interval:
    return Interval(float(d["estimate"]), float(d["low"]), float(d["high"]))


def target_result_from_dict(d: dict) -> TargetResult:
    """A TargetResult read back from result.json (every Interval and the causal records rebuilt)."""
    d = dict(d)
    for name in ("behaviour_rate", "baseline_acc", "stacked_acc", "probe_acc", "excess", "control_excess"):
        d[name] = _interval(d[name])
    if d.get("steering"):
        s = dict(d["steering"])
        s["probe_share"] = [_interval(x) for x in s["probe_share"]]
        s["random_share"] = [_interval(x) for x in s["random_share"]]
        s["effect"] = _interval(s["effect"])
        d["steering"] = Steering(**s)
    if d.get("patching"):
        p = dict(d["patching"])
        for name in ("follow", "control", "effect"):
            p[name] = _interval(p[name])
        d["patching"] = Patching(**p)
    return TargetResult(**d)


def read_outcome(folder: Path, key: str | None = None) -> TaskOutcome | None:
    """The outcome saved in `folder`, or None when it is missing, damaged or (with `key`) made with other
    settings."""
    try:
        saved = json.loads((Path(folder) / RESULT).read_text())
        if key is not None and saved.get("key") != key:
            return None
        results = [target_result_from_dict(r) for r in saved["results"]]
        plain = {f.name: saved[f.name] for f in fields(TaskOutcome) if f.name not in ("run", "results", "cached")}
        return TaskOutcome(**plain, results=results, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_run(run: TaskRun, folder: Path, key: str) -> None:
    """The collected run, then its key: a folder with the key holds a whole run."""
    from forethought.paths import atomic_write_text

    run.save(Path(folder) / "run")
    atomic_write_text(Path(folder) / "collect_key.json", json.dumps({"key": key}), "--out")


def save_outcome(outcome: TaskOutcome, folder: Path) -> Path:
    from forethought.paths import atomic_write_text

    return atomic_write_text(Path(folder) / RESULT, json.dumps(outcome.summary(), default=float), "--out")


def _saved_run(folder: Path, key: str) -> TaskRun | None:
    """A collected run in `folder/run` made with the same collection key (a cut run resumes from it)."""
    try:
        if json.loads((folder / "collect_key.json").read_text()).get("key") != key:
            return None
        return TaskRun.load(folder / "run")
    except (OSError, ValueError, ForethoughtError):
        return None


def _n_params(lm) -> int:
    """The model's parameter count as its family counts it (tied embeddings once): the scale figure's x."""
    return int(lm.config.n_params())


def run_task(
    lm,
    task: str,
    settings: PlanSettings,
    identity: dict,
    folder: Path | None = None,
    progress: Progress | None = None,
    analysis_progress: Progress | None = None,
) -> TaskOutcome:
    """Collect (or reuse a saved collection), analyse, and save both into `folder` when one is given."""
    from forethought.experiments.plan_tasks.analysis import AnalysisSettings, analyze_run

    spec = TASKS[task]
    ckey, rkey = collect_key(identity, task, settings), result_key(identity, task, settings)
    run = _saved_run(folder, ckey) if folder is not None else None
    if run is None:
        prompts = spec.prompts(lm.tokenizer, settings.prompts, settings.seed)
        layers = spread_layers(lm.config.n_layers, settings.layers)
        run = collect(lm, spec, prompts, layers, settings.batch_size, progress)
        run.model = lm.source
        if folder is not None:
            save_run(run, folder, ckey)
    started = time.perf_counter()
    results = analyze_run(lm, run, spec, AnalysisSettings(**settings.analysis), analysis_progress)
    outcome = TaskOutcome(
        model=model_slug(identity["name"]),
        task=task,
        results=results,
        n_params=_n_params(lm),
        n_layers=lm.config.n_layers,
        behaviour=float(np.mean(run.behaved)) if len(run) else float("nan"),
        collect_seconds=run.seconds,
        analysis_seconds=time.perf_counter() - started,
        new_tokens=int(run.settings.get("new_tokens", 0)),
        run=run,
        key=rkey,
    )
    if folder is not None:
        save_outcome(outcome, folder)
    return outcome


@dataclass(frozen=True)
class ModelJob:
    """One model's tasks, for a Ray worker (or the local loop): which model, which tasks, with what settings."""

    model: str
    tasks: tuple[str, ...]
    settings: PlanSettings


def run_model(job: ModelJob) -> list[TaskOutcome]:
    """Every task of `job` on its model, nothing drawn or written (the caller saves what comes back)."""
    from forethought.weights import load_model

    identity = model_identity(job.model)
    lm = load_model(job.model, job.settings.device, job.settings.dtype)
    return [run_task(lm, task, job.settings, identity) for task in job.tasks]
