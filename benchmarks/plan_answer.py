"""Does SmolLM2-135M plan? The answer run: probes vs context-matched baselines, horizon, knockout, steering, ceiling.

    python -m benchmarks.plan_answer            # full: code (stdlib) and prose (pydocs), <= 60 min on 2 idle cores
    python -m benchmarks.plan_answer --quick    # the same pipeline at a toy size, <= 5 min

Per corpus, into OUT/<corpus>/: `store/` (extract; resumable by shard), `probes/` (the probe run: results.json,
per_position.npz, fitted maps), `causal.json` (+ a checkpoint, resumable by position). Then OUT/answer.md (the
tables), OUT/plan_horizon.png and OUT/plan_causal.png. A phase whose output exists is not rerun; delete it to redo.
Prints each phase's wall and CPU time (CPU well below wall means other processes had the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Config:
    tokens: dict[str, int]
    test_fraction: dict[str, float]
    max_doc_tokens: int
    layers: tuple[int, ...]
    offsets: tuple[int, ...]
    eval_tokens: int
    lens_eval_tokens: int
    causal_positions: int
    from_layers: tuple[int, ...]
    steer_layers: tuple[int, ...]
    steer_offsets: tuple[int, ...]
    ceiling_offsets: tuple[int, ...]
    rollouts: int
    n_boot: int
    max_prefix: int = 255
    ceiling_positions: int | None = None
    causal_corpora: tuple[str, ...] = ("stdlib", "pydocs")
    min_context: int = 128  # held-out positions have >= this many tokens of their own document before them
    steer_scales: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)


FULL = Config(
    # >= 200 held-out documents after the near-duplicate filter, each cut to 256 tokens, so that its positions
    # 128..255 (>= 128 tokens of its own text read) fall deep in a window
    tokens={"stdlib": 110_000, "pydocs": 125_000},  # prose documents run longer: 110k held out only 192 of them
    test_fraction={"stdlib": 0.55, "pydocs": 0.55},
    max_doc_tokens=256,
    layers=(0, 8, 15, 19, 22, 29),
    offsets=(1, 2, 3, 4, 6, 8, 12, 16),
    eval_tokens=8192,
    lens_eval_tokens=512,
    causal_positions=500,
    # the ceiling alone is cheap (no conditions): ~2,000 positions from every held-out window give its interval
    # +-3 points (500 positions from 63 documents gave +-5)
    ceiling_positions=2400,
    from_layers=(0, 15, 22),
    steer_layers=(15,),
    steer_offsets=(2,),
    ceiling_offsets=(1, 2, 3, 4),
    rollouts=8,
    n_boot=1000,
)
# What ran on the shared, loaded machine (load average 15-21 on 2 cores, ~8 CPU-seconds a minute for this job):
# documents cut to their first 48 tokens (so that >= 200 of them are held out from 25k tokens), five layers, the
# causal tests on the code corpus only and at positions <= 48 into their window.
SHARED = Config(
    tokens={"stdlib": 25_000, "pydocs": 25_000},
    test_fraction={"stdlib": 0.45, "pydocs": 0.45},
    max_doc_tokens=48,
    layers=(0, 8, 15, 22, 29),
    offsets=(1, 2, 3, 4, 6, 8, 12, 16),
    eval_tokens=4096,
    lens_eval_tokens=512,
    causal_positions=500,
    from_layers=(0, 15, 22),
    steer_layers=(15,),
    steer_offsets=(2,),
    ceiling_offsets=(1, 2, 3, 4, 8),
    rollouts=4,
    n_boot=1000,
    max_prefix=48,
    ceiling_positions=120,
    causal_corpora=("stdlib",),
    min_context=0,  # its documents are 48 tokens long: it cannot discriminate (see the discriminability line)
    steer_scales=(1.0,),
)
QUICK = Config(
    tokens={"stdlib": 12_000, "pydocs": 12_000},
    test_fraction={"stdlib": 0.5, "pydocs": 0.5},
    max_doc_tokens=320,
    layers=(0, 15, 29),
    offsets=(1, 2, 4, 8),
    eval_tokens=1024,
    lens_eval_tokens=256,
    causal_positions=16,
    from_layers=(0, 15),
    steer_layers=(15,),
    steer_offsets=(2,),
    ceiling_offsets=(1, 2, 4, 8),
    rollouts=4,
    n_boot=200,
    causal_corpora=("stdlib", "pydocs"),
)


PER_WINDOW = 8  # causal positions drawn per window (one prefix pass serves them all)
CEILING_PER_WINDOW = 12  # beyond the conditions' positions: the ceiling alone, from every further window


class Phases:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        self.rows[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        print(f"{name:<24} {self.rows[name]['wall_s']:8.1f} s wall  {self.rows[name]['cpu_s']:8.1f} s cpu", flush=True)
        return value


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _with_bar(label: str, enabled: bool, work, unit: str | None = None):
    """`work(progress)` under the CLI's bar (compute code only reports (done, total)); no bar when not enabled."""
    from forethought.commands.common import progress_bar

    with progress_bar(label, unit=unit, quiet=not enabled) as bar:
        return work(bar)


def probe_phase(model, store_dir: Path, out: Path, cfg: Config, progress: bool) -> dict:
    """`model()` gives the loaded model (loaded only when the phase has work to do)."""
    from forethought.data.store import ActivationStore
    from forethought.experiments.probes import run_probes
    from forethought.viz.future import write_report

    done = out / "results.json"
    if done.is_file() and (out / "per_position.npz").is_file():
        return json.loads(done.read_text())
    store = ActivationStore(store_dir)
    lm = model()
    result = _with_bar(
        "probe layers",
        progress,
        lambda bar: run_probes(
            store,
            lm.model,
            list(cfg.offsets),
            list(cfg.layers),
            eval_tokens=cfg.eval_tokens,
            lens_eval_tokens=cfg.lens_eval_tokens,
            control_eval_tokens=min(512, cfg.eval_tokens),
            save_dir=out,
            progress=bar,
            n_boot=cfg.n_boot,
            min_context=cfg.min_context,
        ),
    )
    arrays = {k: np.asarray(v) for k, v in result.per_position.items() if not isinstance(v, str)}
    np.savez(out / "per_position.npz", **arrays)
    write_report(result, out)
    return json.loads(done.read_text())


def causal_phase(model, store_dir: Path, out: Path, cfg: Config, progress: bool, part: tuple[int, int] | None) -> dict:
    """Knockout, steering and the ceiling at held-out positions of the probe run's evaluation sample.

    Needs only the store: the positions are recomputed exactly as the probe run draws them, and the steering
    directions come from probes fitted here for the steering layers and offsets alone (so this phase can run
    beside the probe phase). `part` = (i, n): only every n-th window from the i-th, into its own checkpoint (parallel
    processes on a loaded machine); a run without `part` merges the parts' rows once they are all complete."""
    from forethought.data.store import ActivationStore
    from forethought.experiments.causal import CausalSettings, run_causal, summarize_causal
    from forethought.experiments.probe_file import load_probe_folder
    from forethought.experiments.probes import run_probes, split_positions

    done = out / "causal.json"
    if done.is_file():
        return json.loads(done.read_text())
    store = ActivationStore(store_dir)
    steer_dir = out / "steer_probes"
    parts = sorted(out.glob("causal.part*of*.ckpt"))
    if part is None and parts:  # merge the parts' rows (each part's positions are its windows of this list)
        import torch

        saved = [torch.load(p, weights_only=False) for p in parts]
        rows = [r for s in saved for r in s["rows"]]
        merged = [t for s in saved for t in s["positions"][: len(s["rows"])]]
        missing = sum(len(s["positions"]) - len(s["rows"]) for s in saved)
        if missing:  # a run cut short: say so in the results, never silently
            print(f"{out.name}: causal parts incomplete, {missing} planned positions not measured", flush=True)
        settings = CausalSettings(**{k: v for k, v in saved[0]["settings"].items() if k != "seed"})
        doc_of = store.array("doc_ids").long()
        result = summarize_causal(None, store, merged, rows, doc_of, settings, cfg.n_boot, 0.0)
        return _write_causal(result, out, {"parts": len(parts), "planned_positions_not_measured": missing})
    lm = model()
    while part and part[0] > 0 and not (steer_dir / "done").is_file():
        time.sleep(10)  # part 0 fits the steering probes
    if not (steer_dir / "done").is_file():
        run_probes(
            store,
            lm.model,
            list(cfg.steer_offsets),
            list(cfg.steer_layers),
            eval_tokens=256,
            lens_eval_tokens=64,
            control_eval_tokens=64,
            save_dir=steer_dir,
            progress=False,
            n_boot=10,
            min_context=cfg.min_context,
            stacked=False,
        )
        (steer_dir / "done").write_text("")
    probes = load_probe_folder(steer_dir, lm.config.d_model)
    evaluation = split_positions(
        store,
        max(cfg.offsets),
        cfg.eval_tokens,
        cfg.lens_eval_tokens,
        min(512, cfg.eval_tokens),
        0.1,
        0,
        min_context=cfg.min_context,
    ).evaluation.numpy()
    rng = np.random.default_rng(0)
    window = store.window
    # the probe's own held-out positions (deep in their window when min_context is set), a random subset
    usable = evaluation[(evaluation % window >= 3) & (evaluation % window <= min(cfg.max_prefix, window - 6))]
    # random windows, up to PER_WINDOW random positions in each (one prefix pass serves a window's positions); the
    # first causal_positions get the knockout and steering, the first ceiling_positions the ceiling. Windows past
    # the conditions' give CEILING_PER_WINDOW positions each; the first causal_positions stay the same list whatever
    # the ceiling asks for, so a checkpoint of the conditions is extended, never redone.
    by_window: dict[int, list[int]] = {}
    for t in rng.permutation(usable).tolist():
        by_window.setdefault(t // window, []).append(t)
    wanted = max(cfg.causal_positions, cfg.ceiling_positions or 0)
    positions: list[int] = []
    for ts in by_window.values():
        positions += ts[: PER_WINDOW if len(positions) < cfg.causal_positions else CEILING_PER_WINDOW]
    positions = positions[:wanted]
    seed = 0
    if part is not None:
        windows = list(dict.fromkeys(t // window for t in positions))
        mine = set(windows[part[0] :: part[1]])
        positions = [t for t in positions if t // window in mine]
        seed = part[0]
    settings = CausalSettings(
        from_layers=cfg.from_layers,
        steer_layers=cfg.steer_layers,
        steer_offsets=cfg.steer_offsets,
        ceiling_offsets=cfg.ceiling_offsets,
        rollouts=cfg.rollouts,
        max_prefix=cfg.max_prefix,
        ceiling_positions=cfg.ceiling_positions,
        condition_positions=cfg.causal_positions,
        top_m=16 if cfg.max_prefix < 255 else 32,
        steer_scales=cfg.steer_scales,
        seed=seed,
    )
    name = f"causal.part{part[0]}of{part[1]}.ckpt" if part else "causal.ckpt"
    result = _with_bar(
        "causal positions",
        progress,
        lambda bar: run_causal(
            lm.model, store, positions, probes, settings, checkpoint=out / name, progress=bar, n_boot=cfg.n_boot
        ),
    )
    if part is not None:
        return {}
    return _write_causal(result, out)


def _write_causal(result, out: Path, extra: dict | None = None) -> dict:
    np.savez(out / "causal_per_position.npz", **{k: np.asarray(v) for k, v in result.per_position.items()})
    d = _jsonable(result.to_dict()) | (extra or {})
    (out / "causal.json").write_text(json.dumps(d, indent=1))
    return d


def _override(cfg: Config, args: argparse.Namespace) -> Config:
    """The config with --tokens/--layers/--offsets applied (a smaller run for another model on a loaded machine)."""
    changes: dict = {}
    if args.tokens:
        changes["tokens"] = {k: args.tokens for k in cfg.tokens}
    if args.layers:
        changes["layers"] = tuple(int(x) for x in args.layers.split(","))
    if args.offsets:
        changes["offsets"] = tuple(int(x) for x in args.offsets.split(","))
        changes["ceiling_offsets"] = tuple(k for k in cfg.ceiling_offsets if k in changes["offsets"])
    if args.from_layers:
        changes["from_layers"] = tuple(int(x) for x in args.from_layers.split(","))
    if args.steer_layers:
        changes["steer_layers"] = tuple(int(x) for x in args.steer_layers.split(","))
    if args.causal_positions:  # fewer: also the first positions of a longer run's checkpoint (its summary)
        changes["causal_positions"] = args.causal_positions
        changes["ceiling_positions"] = min(cfg.ceiling_positions or args.causal_positions, args.causal_positions)
    return replace(cfg, **changes) if changes else cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: the whole pipeline in <= 5 min")
    parser.add_argument("--shared", action="store_true", help="the reduced size run on the loaded shared machine")
    parser.add_argument("--out", type=Path, default=None, help="default /tmp/plan_answer (or /tmp/plan_quick)")
    parser.add_argument("--corpora", default="stdlib,pydocs", help="comma list of 'stdlib', 'pydocs' or paths")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--only", default="extract,probe,causal,report", help="phases to run (to run them as parallel processes)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path (e.g. gemma3-270m)")
    parser.add_argument("--tokens", type=int, default=0, help="override the config's tokens per corpus")
    parser.add_argument("--layers", default="", help="override the config's layers, e.g. 0,6,12,17")
    parser.add_argument("--offsets", default="", help="override the config's offsets, e.g. 1,2,4,8")
    parser.add_argument("--from-layers", default="", help="override the knockout layers, e.g. 0,6,12")
    parser.add_argument("--steer-layers", default="", help="override the steering layers, e.g. 6")
    parser.add_argument("--causal-positions", type=int, default=0, help="override the causal test's positions")
    parser.add_argument(
        "--causal-part", default="", help="I/N: the causal phase on every N-th window from the I-th (parallel runs)"
    )
    args = parser.parse_args(argv)
    part = tuple(int(x) for x in args.causal_part.split("/")) if args.causal_part else None
    cfg = QUICK if args.quick else SHARED if args.shared else FULL
    cfg = _override(cfg, args)
    out = args.out or Path("/tmp/plan_quick" if args.quick else "/tmp/plan_answer")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from forethought.experiments.future import run_extract
    from forethought.viz.plan import discriminability_line, write_answer
    from forethought.weights import load_model

    progress = not args.no_progress
    title = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}.get(args.model, args.model)
    phases = Phases()
    load_before = os.getloadavg()
    loaded: dict = {}

    def lm_once():
        """The model, loaded on first use (a run that only merges and reports never loads it)."""
        if "lm" not in loaded:
            loaded["lm"] = phases.run("load", lambda: load_model(args.model))
        return loaded["lm"]

    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    probe_results, causal_results, stores = {}, {}, {}
    only = {p.strip() for p in args.only.split(",")}
    for corpus in corpora:
        name = Path(corpus).name if corpus not in cfg.tokens else corpus
        base = out / name
        stores[name] = base / "store"
        if "extract" not in only and not (stores[name] / "manifest.json").is_file():
            continue
        if "extract" in only:
            phases.run(
                f"{name}: extract",
                lambda corpus=corpus, name=name: _with_bar(
                    "extract",
                    progress,
                    lambda bar: run_extract(
                        lm_once(),
                        corpus,
                        stores[name],
                        list(cfg.layers),
                        tokens=cfg.tokens.get(corpus, max(cfg.tokens.values())),
                        # Gemma's residual stream reaches ~1e5, beyond float16's range: float32 for it.
                        float16=args.model == "smollm2-135m",
                        test_fraction=cfg.test_fraction.get(corpus, 0.4),
                        max_doc_tokens=cfg.max_doc_tokens,
                        progress=bar,
                    ),
                    unit="tok",
                ),
            )
        if "probe" not in only and not (base / "probes" / "results.json").is_file():
            continue
        probe_results[name] = phases.run(
            f"{name}: probe", lambda name=name: probe_phase(lm_once, stores[name], out / name / "probes", cfg, progress)
        )
        line = discriminability_line(probe_results[name])
        if line:  # every run says at once whether its setting can tell the model from the statistics
            print(f"{name}: {line}", flush=True)
    for name in stores:
        if name not in cfg.causal_corpora or not (stores[name] / "manifest.json").is_file():
            continue
        if "causal" not in only and not (out / name / "causal.json").is_file():
            continue
        causal_results[name] = phases.run(
            f"{name}: causal",
            lambda name=name: causal_phase(lm_once, stores[name], out / name, cfg, progress, part),
        )
    if part is not None:
        return 0
    if "report" not in only:
        return 0
    paths = phases.run("report", lambda: write_answer(out, probe_results, causal_results, cfg.n_boot, title))
    total = sum(r["wall_s"] for r in phases.rows.values())
    summary = {
        "config": "quick" if args.quick else "shared" if args.shared else "full",
        "model": args.model,
        "tokens": cfg.tokens,
        "layers": cfg.layers,
        "offsets": cfg.offsets,
        "phases": phases.rows,
        "total_wall_s": total,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "files": {k: str(v) for k, v in paths.items()},
    }
    (out / "timings.json").write_text(json.dumps(summary, indent=1))
    print(Path(paths["markdown"]).read_text())
    print(f"total {total:.0f} s wall (load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
