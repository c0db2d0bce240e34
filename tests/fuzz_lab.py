"""Hostile use of the architectures lab, case by case: flags and paths of `arch train`, damaged checkpoints, SIGKILL
anywhere (inside the checkpoint write included), `arch compare` over hostile results, mutated lab model folders, and
a full or read-only disk.

Every case runs the real CLI in a forked child (torch is imported once, in the parent) under an address-space limit
and a time limit (60 CPU seconds, and five times that in wall time, for a machine shared by many jobs), and is judged
against what it should do:
  error    exit 2 and exactly one stderr line starting with `error:`
  ok       exit 0 (and, for kills and full disks, the run then resumes to the weights of an uninterrupted run)
Defects: traceback (any other ending), hang (past the time limit), crash (a signal nobody sent), silent (exit 0 where
the input had to be refused), refused (a clean input turned away), data loss (a resumed run ends with other weights).

Run a table (the lead's re-run of the hardening table):  python tests/fuzz_lab.py --cases 40
The 20-kill test alone:                                  python tests/fuzz_lab.py --kill-test 20
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFECTS = ("traceback", "hang", "crash", "silent", "refused", "data loss")
GIB = 2**30
ADDRESS_LIMIT = 12 * GIB  # the cap, on top of what the parent already maps
TIME_LIMIT = 60.0  # CPU seconds per case
WALL_FACTOR = 5  # wall-clock seconds allowed per CPU second of the limit

# The tiny run every case starts from: trains in about a second on one thread.
SHAPE = ["--d-model", "16", "--heads", "2", "--d-ff", "32", "--batch", "4"]
TRAIN = ["arch", "train", "--task", "repeat", "--steps", "6", "--checkpoint-every", "2", *SHAPE, "--json"]


def fuzz_cases(default: int) -> int:
    """Cases per group: `default` in CI, more with FORETHOUGHT_FUZZ_CASES=N."""
    return int(os.environ.get("FORETHOUGHT_FUZZ_CASES", default))


# --- one CLI run in a forked child ----------------------------------------------------------------------------


@dataclass
class Run:
    rc: int | None  # None: killed by a signal
    signal: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_cli(
    argv: list[str],
    time_limit: float = TIME_LIMIT,
    address_limit: int = ADDRESS_LIMIT,
    file_size_limit: int | None = None,
    kill_at: int | None = None,
    count_to: Path | None = None,
    kill_after: float | None = None,
) -> Run:
    """`forethought argv` in a forked child. `kill_at=k`: the child SIGKILLs itself at its k-th file-system event
    (see `_install_kill_points`); `count_to`: it writes how many events it saw there."""
    _warm()
    import forethought.cli

    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 1
            try:
                out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT)
                err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT)
                os.dup2(out_fd, 1)
                os.dup2(err_fd, 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's whole life
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                vm = _status_kb("VmSize") * 1024
                resource.setrlimit(resource.RLIMIT_AS, (vm + address_limit, vm + address_limit))
                # The limit is on CPU seconds (a busy loop ends in SIGXCPU); the wall-clock limit, five times
                # longer, catches a process that sleeps forever. On a shared machine (load 20-30 on 2 cores here) a
                # 2-second case can take a minute of wall time without being stuck.
                cpu = int(time_limit)
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
                if file_size_limit is not None:  # an injected full disk: writes past this size fail (EFBIG)
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
                # The optional C++ kernels are not what these cases test, and a child killed while compiling
                # them (~40 s) would leave torch's build lock behind for every later process: torch's matmul.
                os.environ["FORETHOUGHT_KERNELS"] = "0"
                events = _install_kill_points(kill_at, count_to) if kill_at is not None or count_to else None
                try:
                    code = forethought.cli.main(argv)
                except BaseException:  # noqa: BLE001 - escaping the CLI is the defect we look for
                    traceback.print_exc()
                    code = 1
                if count_to is not None and events is not None:
                    with contextlib.suppress(OSError):
                        count_to.write_text(str(events[0]))
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        deadline, timed_out = started + WALL_FACTOR * time_limit, False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if kill_after is not None and time.perf_counter() > started + kill_after:
                os.kill(pid, signal.SIGKILL)  # a kill from outside, at whatever the run was doing
                _, status = os.waitpid(pid, 0)
                break
            if time.perf_counter() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        stdout = out_path.read_text(errors="replace") if out_path.exists() else ""
        stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    if os.WIFSIGNALED(status):
        timed_out = timed_out or os.WTERMSIG(status) == signal.SIGXCPU
        return Run(None, os.WTERMSIG(status), stdout, stderr, seconds, timed_out)
    return Run(os.WEXITSTATUS(status), None, stdout, stderr, seconds, timed_out)


_WARM: list[bool] = []


def _warm() -> None:
    """Import, once in the parent, what every child would otherwise import again (AdamW's first construction
    alone imports torch._dynamo: seconds), so a case costs its own work."""
    if _WARM:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - arch compare plots
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import torch

    import forethought.arch.compare  # noqa: F401
    import forethought.arch.export  # noqa: F401
    import forethought.cli
    import forethought.weights.registry  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    forethought.cli._register_commands()
    _WARM.append(True)


def _install_kill_points(kill_at: int | None, note: Path | None = None) -> list[int]:
    """Count the file-system events of a checkpoint or folder write, and SIGKILL this process at event `kill_at`.

    The events are the calls the writers make: mkdir, each file written (safetensors, torch.save, write_text,
    open-for-writing), fsync, rename/replace, unlink and rmtree. A kill at a write_text or write_bytes event writes
    half of the data first: a file cut mid-write, as a kill or a power cut leaves it."""
    import builtins
    import pathlib

    import safetensors.torch
    import torch

    count = [0]

    def event(what: str, half_write: Callable[[], None] | None = None) -> None:
        count[0] += 1
        if kill_at is not None and count[0] == kill_at:
            if note is not None:  # which call the kill interrupted, for the table
                note.write_bytes(what.encode())
            if half_write is not None:
                half_write()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            paths = [Path(a) for a in args if isinstance(a, str | Path)]
            event(f"{name} {paths[0].parent.name}/{paths[0].name}" if paths else name)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    for owner, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"), (os, "unlink")):
        wrap(owner, name)
    wrap(shutil, "rmtree")
    wrap(safetensors.torch, "save_file")
    wrap(torch, "save")
    original_write_text = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        half = lambda: original_write_text(self, data[: len(data) // 2], *args, **kwargs)  # noqa: E731
        event(f"half of write_text {self.parent.name}/{self.name}", half)
        return original_write_text(self, data, *args, **kwargs)

    pathlib.Path.write_text = write_text
    original_write_bytes = pathlib.Path.write_bytes

    def write_bytes(self, data):
        half = lambda: original_write_bytes(self, data[: len(data) // 2])  # noqa: E731
        event(f"half of write_bytes {self.parent.name}/{self.name}", half)
        return original_write_bytes(self, data)

    pathlib.Path.write_bytes = write_bytes
    original_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, str | Path) and any(c in mode for c in "wax+"):
            event(f"open {Path(file).parent.name}/{Path(file).name}")
        return original_open(file, mode, *args, **kwargs)

    builtins.open = open_
    return count


# --- judging ----------------------------------------------------------------------------------------------------


def kind_of(run: Run) -> str:
    if run.timed_out:
        return "hang"
    if run.rc is None:
        return "crash"
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    if run.rc == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "error"
    if run.rc == 0 and "Traceback" not in run.stderr:
        return "ok"
    return "traceback"


def judge(run: Run, expect: str) -> tuple[str, str]:
    """(outcome, detail): `expect` is error, ok or either."""
    kind = kind_of(run)
    detail = run.stderr.strip().splitlines()[-1][:200] if run.stderr.strip() else ""
    if kind == "traceback":
        detail = run.stderr[-800:]
    if kind == "ok" and expect == "error":
        return "silent", "exit 0 where a refusal was due"
    if kind == "error" and expect == "ok":
        return "refused", detail
    return kind, detail


@dataclass
class Table:
    """Per surface: cases tried, clean ones, and each defect with its case."""

    rows: dict[str, Counter] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def add(self, surface: str, label: str, outcome: str, detail: str = "", seconds: float = 0.0) -> None:
        self.rows.setdefault(surface, Counter())[outcome] += 1
        line = f"[{surface}] {label}: {outcome} {detail[:160]} ({seconds:.1f} s)"
        self.lines.append(line)
        if os.environ.get("FORETHOUGHT_FUZZ_VERBOSE"):
            print(line, flush=True)
        if outcome in DEFECTS:
            self.defects.append(f"[{surface}] {label}: {outcome} {detail}")

    def markdown(self) -> str:
        out = ["| surface | tried | clean | defects |", "|---|---|---|---|"]
        for surface, counts in self.rows.items():
            tried = sum(counts.values())
            bad = {k: v for k, v in counts.items() if k in DEFECTS}
            text = ", ".join(f"{v} {k}" for k, v in bad.items()) or "none"
            out.append(f"| {surface} | {tried} | {tried - sum(bad.values())} | {text} |")
        total = sum(sum(c.values()) for c in self.rows.values())
        out.append(f"| **all** | {total} | {total - len(self.defects)} | {len(self.defects)} |")
        return "\n".join(out)


def sample(items: list, n: int, rng: random.Random) -> list:
    return items if n >= len(items) else rng.sample(items, n)


# --- a tiny trained run, and the hash of its final weights --------------------------------------------------------


def final_hashes(out: Path) -> tuple[str, str]:
    """sha256 of the current checkpoint's weights and of the exported folder's weights."""
    pointer = json.loads((out / "checkpoint.json").read_text())
    weights = out / pointer["folder"] / "model.safetensors"
    engine = out / "engine" / "model.safetensors"
    return _sha(weights), _sha(engine)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_argv(out: Path, *extra: str) -> list[str]:
    return [*TRAIN, "--out", str(out), *extra]


def reference(work: Path, arch: str = "standard") -> tuple[Path, tuple[str, str]]:
    """An uninterrupted tiny run: its folder and its final hashes."""
    out = work / f"reference-{arch}"
    if not (out / "checkpoint.json").exists():
        run = run_cli(train_argv(out, "--arch", arch))
        assert kind_of(run) == "ok", run.stderr[-2000:]
    return out, final_hashes(out)


# --- group 1: flags and paths of `arch train` -------------------------------------------------------------------

BIG = str(10**12)
FLAG_CASES: list[tuple[list[str], str]] = [
    (["--length", "1"], "error"),
    (["--length", "-5"], "error"),
    (["--length", "0"], "ok"),  # 0: the task's default
    (["--length", "2"], "error"),  # repeat needs room for a period
    (["--length", str(10**7)], "error"),
    (["--layers", "1000000000"], "error"),
    (["--layers", "0"], "error"),
    (["--layers", "-1"], "error"),
    (["--steps", BIG], "error"),
    (["--steps", "0"], "error"),
    (["--steps", "-3"], "error"),
    (["--d-model", BIG], "error"),
    (["--d-model", "0"], "error"),
    (["--d-model", "18", "--heads", "4"], "error"),
    (["--batch", "1000000000"], "error"),
    (["--batch", "0"], "error"),
    (["--lr", "inf"], "error"),
    (["--lr", "nan"], "error"),
    (["--lr", "0"], "error"),
    (["--lr", "-1"], "error"),
    (["--lr", "1e308"], "error"),  # finite, yet more than float32 holds
    (["--lr", "9"], "either"),  # allowed; if training diverges, that is one line and nothing saved
    (["--lr", "1e-300"], "ok"),
    (["--seed", "-1"], "error"),
    (["--seed", str(2**64)], "error"),
    (["--heads", "0"], "error"),
    (["--heads", BIG], "error"),
    (["--d-ff", BIG], "error"),
    (["--threads", "0"], "error"),
    (["--threads", "100000"], "error"),
    (["--checkpoint-every", "0"], "error"),
    (["--eval-lengths", "0"], "error"),
    (["--eval-lengths", "1,2,3"], "error"),
    (["--eval-lengths", "x"], "error"),
    (["--eval-lengths", "9" * 5000], "error"),
    (["--eval-lengths", "12,48"], "ok"),
    (["--task", "sum-mod", "--modulus", BIG], "error"),
    (["--task", "sum-mod", "--modulus", "1"], "error"),
    (["--task", "perm", "--elements", "9"], "error"),
    (["--task", "recall", "--pairs", "0"], "error"),
    (["--task", "recall", "--pairs", "99"], "error"),
    (["--task", "parity", "--length", "1"], "error"),
    (["--task", "parity", "--eval-lengths", "1"], "error"),
    (["--positions", "alibi"], "error"),
    (["--arch", "recurrent", "--layers", "300"], "error"),
    (["--arch", "feedback"], "ok"),
    (["--arch", "recurrent", "--positions", "none"], "ok"),
]


def group_flags(table: Table, work: Path, n: int, rng: random.Random) -> None:
    for i, (flags, expect) in enumerate(sample(FLAG_CASES, n, rng)):
        out = work / f"flags-{i}"
        run = run_cli([*TRAIN, *flags, "--out", str(out)])
        table.add("arch train flags and paths", " ".join(flags)[:60], *judge(run, expect), run.seconds)
    for label, prepare, expect in _path_cases(work):
        out = prepare()
        run = run_cli(train_argv(out))
        table.add("arch train flags and paths", label, *judge(run, expect), run.seconds)


def _path_cases(work: Path) -> list[tuple[str, Callable[[], Path], str]]:
    def onto_file() -> Path:
        (work / "a-file").write_text("x")
        return work / "a-file"

    def under_file() -> Path:
        (work / "b-file").write_text("x")
        return work / "b-file" / "run"

    def other_config() -> Path:
        out = work / "other-config"
        run_cli([*TRAIN[:-1], "--layers", "1", "--json", "--out", str(out)])
        return out

    def dev_null() -> Path:
        return Path("/dev/null")

    return [
        ("--out onto a file", onto_file, "error"),
        ("--out under a file", under_file, "error"),
        ("--out /dev/null", dev_null, "error"),
        ("--out holding another config", other_config, "error"),
    ]


# --- group 2: resume from a damaged checkpoint ------------------------------------------------------------------


def _current(out: Path) -> Path:
    return out / json.loads((out / "checkpoint.json").read_text())["folder"]


def _flip(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def _rehash(out: Path) -> None:
    """Make the pointer agree with whatever the folder now holds: a forged, consistent checkpoint."""
    pointer = json.loads((out / "checkpoint.json").read_text())
    folder = out / pointer["folder"]
    pointer["files"] = {p.name: _sha(p) for p in sorted(folder.iterdir())}
    (out / "checkpoint.json").write_text(json.dumps(pointer))


def _edit_state(out: Path, edit: Callable[[dict], None]) -> None:
    path = _current(out) / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    _rehash(out)


def _interrupted(work: Path, name: str) -> Path:
    """A copy of a run stopped with its step-4 checkpoint current (of 6 steps): resuming it has work left."""
    partial = work / "partial"
    if not (partial / "checkpoint.json").exists():
        _stop_after_step_4(partial)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(partial, out)
    return out


def _pointer_step(out: Path) -> int:
    pointer = out / "checkpoint.json"
    return json.loads(pointer.read_text())["step"] if pointer.exists() else 0


def _stop_after_step_4(out: Path) -> None:
    """Kill the 6-step run at the last event before its step-6 checkpoint becomes current (a binary search over
    kill points: the pointer's step only grows with the kill point)."""
    lo, hi = 1, count_events(out.parent)
    while lo < hi:  # the smallest kill point that leaves step 6 current
        mid = (lo + hi) // 2
        shutil.rmtree(out, ignore_errors=True)
        run_cli(train_argv(out, "--arch", "standard"), kill_at=mid)
        lo, hi = (lo, mid) if _pointer_step(out) >= 6 else (mid + 1, hi)
    shutil.rmtree(out, ignore_errors=True)
    run_cli(train_argv(out, "--arch", "standard"), kill_at=lo - 1)
    assert _pointer_step(out) == 4, _pointer_step(out)


CHECKPOINT_MUTATIONS: list[tuple[str, Callable[[Path, random.Random], None], str]] = [
    ("flip a byte in model.safetensors", lambda o, r: _flip(_current(o) / "model.safetensors", r), "error"),
    ("flip a byte in optimizer.pt", lambda o, r: _flip(_current(o) / "optimizer.pt", r), "error"),
    ("flip a byte in state.json", lambda o, r: _flip(_current(o) / "state.json", r), "error"),
    ("cut state.json at 4096 bytes (or half)", lambda o, r: _cut(_current(o) / "state.json", 4096), "error"),
    ("truncate model.safetensors", lambda o, r: _truncate(_current(o) / "model.safetensors", None, r), "error"),
    ("truncate optimizer.pt", lambda o, r: _truncate(_current(o) / "optimizer.pt", None, r), "error"),
    ("delete optimizer.pt", lambda o, r: (_current(o) / "optimizer.pt").unlink(), "error"),
    ("delete model.safetensors", lambda o, r: (_current(o) / "model.safetensors").unlink(), "error"),
    ("delete the checkpoint folder", lambda o, r: shutil.rmtree(_current(o)), "error"),
    ("checkpoint.json garbage", lambda o, r: (o / "checkpoint.json").write_bytes(b"\x00{]"), "error"),
    ("checkpoint.json points outside", lambda o, r: _repoint(o, "../../etc"), "error"),
    ("checkpoint.json points at a missing folder", lambda o, r: _repoint(o, "ckpt-00000099-deadbeef"), "error"),
    ("an extra file in the checkpoint", lambda o, r: (_current(o) / "notes.txt").write_text("x"), "error"),
    ("forged: steps_done 10**9", lambda o, r: _edit_state(o, lambda s: s.update(steps_done=10**9)), "error"),
    ("forged: history cut", lambda o, r: _edit_state(o, lambda s: s.update(history=s["history"][:1])), "error"),
    ("forged: config a string", lambda o, r: _edit_state(o, lambda s: s.update(config="standard")), "error"),
    ("forged: lr nan in settings", lambda o, r: _edit_state(o, lambda s: s["settings"].update(lr="nan")), "error"),
    ("forged: weights of another shape", lambda o, r: _other_weights(o), "error"),
    ("forged: optimizer.pt not a pickle", lambda o, r: _forge_file(o, "optimizer.pt", b"junk"), "error"),
    ("forged: optimizer.pt a code pickle", lambda o, r: _forge_file(o, "optimizer.pt", _code_pickle()), "error"),
    ("forged: state.json a list", lambda o, r: _forge_file(o, "state.json", b"[1, 2]"), "error"),
    ("forged: accuracy 7.5 in an eval", lambda o, r: _edit_state(o, _bad_eval), "error"),
    ("older layout: a top-level state.json", lambda o, r: _older_layout(o), "error"),
    ("stale folders from a killed write", lambda o, r: (o / "ckpt-00000006-00000000").mkdir(), "ok"),
    ("pointer deleted (no checkpoint: starts over)", lambda o, r: (o / "checkpoint.json").unlink(), "ok"),
]


def _truncate(path: Path, size: int | None, rng: random.Random | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: size if size is not None else rng.randrange(len(data))])


def _cut(path: Path, size: int) -> None:
    """Cut at `size` bytes as a full disk left it, or at half where the file is not that long."""
    _truncate(path, min(size, path.stat().st_size // 2))


def _repoint(out: Path, folder: str) -> None:
    pointer = json.loads((out / "checkpoint.json").read_text())
    pointer["folder"] = folder
    (out / "checkpoint.json").write_text(json.dumps(pointer))


def _forge_file(out: Path, name: str, data: bytes) -> None:
    (_current(out) / name).write_bytes(data)
    _rehash(out)


def _code_pickle() -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    return pickle.dumps(Evil())


def _other_weights(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"embed": torch.zeros(3, 3)}, str(_current(out) / "model.safetensors"))
    _rehash(out)


def _bad_eval(state: dict) -> None:
    state["evals"] = [{"step": 1, "flops": 1.0, "loss": 1.0, "accuracy": 7.5}]


def _older_layout(out: Path) -> None:
    (out / "state.json").write_text((_current(out) / "state.json").read_text())
    (out / "checkpoint.json").unlink()


def group_checkpoints(table: Table, work: Path, n: int, rng: random.Random, ref: tuple[str, str]) -> None:
    for i, (label, mutate, expect) in enumerate(sample(CHECKPOINT_MUTATIONS, n, rng)):
        out = _interrupted(work, f"damaged-{i}")
        mutate(out, rng)
        run = run_cli(train_argv(out, "--arch", "standard"))
        outcome, detail = judge(run, expect)
        if outcome == "ok" and final_hashes(out) != ref:
            outcome, detail = "data loss", "resumed to other weights than an uninterrupted run"
        table.add("resume from a damaged checkpoint", label, outcome, detail, run.seconds)


# --- group 3: SIGKILL anywhere, then resume ---------------------------------------------------------------------


def count_events(work: Path, arch: str = "standard") -> int:
    out, counter = work / f"count-{arch}", work / f"count-{arch}.txt"
    shutil.rmtree(out, ignore_errors=True)
    run = run_cli(train_argv(out, "--arch", arch), count_to=counter)
    assert kind_of(run) == "ok", run.stderr[-2000:]
    return int(counter.read_text())


def kill_test(table: Table, work: Path, kills: int, rng: random.Random, arch: str = "standard") -> list[str]:
    """`kills` runs, each SIGKILLed at a different file-system event spread over a whole run (so most land inside a
    checkpoint or export write), every other one killed a second time while resuming; each must resume to the
    uninterrupted run's final weights (sha256 of the checkpoint's and the exported folder's model.safetensors)."""
    _, ref = reference(work, arch)
    total = count_events(work, arch)
    points = sorted({1 + round(i * (total - 1) / max(1, kills - 1)) for i in range(kills)})
    rows = []
    for i, k in enumerate(points):
        out = work / f"killed-{arch}-{k}"
        shutil.rmtree(out, ignore_errors=True)
        note = work / f"killed-{arch}-{k}.txt"
        note.unlink(missing_ok=True)
        first = run_cli(train_argv(out, "--arch", arch), kill_at=k, count_to=note)
        where = note.read_text() if note.exists() else "?"
        label = f"{arch}: SIGKILL at event {k}/{total} ({where})"
        if first.signal != signal.SIGKILL:
            table.add("SIGKILL during arch train, resume", label, *judge(first, "ok"), first.seconds)
            continue
        if i % 2:  # killed again while resuming
            again = run_cli(train_argv(out, "--arch", arch), kill_at=rng.randrange(1, max(2, total // 2)))
            label += " + again on resume" if again.signal == signal.SIGKILL else ""
        resumed = run_cli(train_argv(out, "--arch", arch))
        outcome, detail = judge(resumed, "ok")
        if outcome == "ok":
            hashes = final_hashes(out)
            if hashes != ref:
                outcome, detail = "data loss", f"final weights {hashes[0][:12]} != {ref[0][:12]}"
            else:
                detail = f"sha256 {hashes[0][:16]} equal"
        table.add("SIGKILL during arch train, resume", label, outcome, detail, first.seconds + resumed.seconds)
        rows.append(f"{label}: {outcome} {detail}")
    return rows


def timed_kills(table: Table, work: Path, kills: int, rng: random.Random, arch: str = "standard") -> None:
    """SIGKILL from outside after a random delay (inside a step, an evaluation, a write: wherever it lands)."""
    _, ref = reference(work, arch)
    for i in range(kills):
        out = work / f"timed-{arch}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        delay = rng.uniform(0.05, 1.5)
        first = run_cli(train_argv(out, "--arch", arch), kill_after=delay)
        label = f"{arch}: SIGKILL after {delay:.2f} s" + ("" if first.signal else " (finished first)")
        resumed = run_cli(train_argv(out, "--arch", arch))
        outcome, detail = judge(resumed, "ok")
        if outcome == "ok" and final_hashes(out) != ref:
            outcome, detail = "data loss", "resumed to other weights"
        table.add("SIGKILL during arch train, resume", label, outcome, detail, first.seconds + resumed.seconds)


# --- group 4: arch compare --------------------------------------------------------------------------------------

# Two 3-step runs (seeds 0 and 1) of parity, with their length sweeps: seconds.
COMPARE = ["arch", "compare", "--preset", "smoke", "--archs", "standard", "--tasks", "parity", "--layers", "1"]
COMPARE.append("--json")


def _compare_base(work: Path) -> Path:
    base = work / "compare-base"
    if not (base / "compare.json").exists():
        run = run_cli([*COMPARE, "--out", str(base)], time_limit=300)
        assert kind_of(run) == "ok", run.stderr[-2000:]
    return base


def _run0(base: Path) -> Path:
    return base / "runs" / "parity-L1-standard-s0"


COMPARE_CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("accuracy 7.5 in a run", lambda b, w: _with(b, lambda r: _edit_state(r, _final("accuracy", 7.5))), "error"),
    ("loss -3 in a run", lambda b, w: _with(b, lambda r: _edit_state(r, _final("loss", -3))), "error"),
    ("loss NaN in a run", lambda b, w: _with(b, lambda r: _edit_state(r, _final("loss", float("nan")))), "error"),
    ("by_position 2.0", lambda b, w: _with(b, lambda r: _edit_state(r, _final("by_position", [2.0]))), "error"),
    ("accuracy a string", lambda b, w: _with(b, lambda r: _edit_state(r, _final("accuracy", "1"))), "error"),
    ("a flipped byte in a run",
     lambda b, w: _with(b, lambda r: _flip(_current(r) / "state.json", random.Random(1))), "error"),
    ("a run's pointer cut", lambda b, w: _with(b, lambda r: _truncate(r / "checkpoint.json", 10)), "error"),
    ("a run from another preset", lambda b, w: _with(b, lambda r: _edit_state(r, _settings_steps)), "error"),
    ("--only-finished with no runs", lambda b, w: ["--out", str(w / "empty"), "--only-finished"], "error"),
    ("--only-finished over finished runs", lambda b, w: ["--out", str(b), "--only-finished"], "ok"),
    ("--out onto a file", lambda b, w: ["--out", str(_file(w / "cmp-file"))], "error"),
    ("--plot-dir onto a file",
     lambda b, w: ["--out", str(b), "--only-finished", "--plot-dir", str(_file(w / "p"))], "error"),
    ("--threads 0", lambda b, w: ["--out", str(b), "--threads", "0"], "error"),
    ("--layers 99", lambda b, w: ["--out", str(b), "--layers", "99"], "error"),
    ("--layers x", lambda b, w: ["--out", str(b), "--layers", "x"], "error"),
    ("--preset nope", lambda b, w: ["--out", str(b), "--preset", "nope"], "error"),
]  # fmt: skip


def _with(base: Path, mutate: Callable[[Path], None]) -> list[str]:
    target = base.parent / f"compare-{time.monotonic_ns()}"
    shutil.copytree(base, target)
    mutate(_run0(target))
    return ["--out", str(target), "--only-finished"]


def _final(key: str, value) -> Callable[[dict], None]:
    return lambda state: state["final"].update({key: value})


def _settings_steps(state: dict) -> None:
    state["settings"]["steps"] = 7


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def group_compare(table: Table, work: Path, n: int, rng: random.Random) -> None:
    base = _compare_base(work)
    for label, prepare, expect in sample(COMPARE_CASES, n, rng):
        run = run_cli([*COMPARE, *prepare(base, work)], time_limit=120)
        outcome, detail = judge(run, expect)
        if outcome == "ok":  # nothing impossible may reach the table
            table_rows = json.loads(run.stdout)["table"]
            if any(not 0 <= row["accuracy"]["mean"] <= 1 for row in table_rows):
                outcome, detail = "silent", "an impossible accuracy in the table"
        table.add("arch compare", label, outcome, detail, run.seconds)
    # A damaged length-sweep cache is measured again, never shown.
    for label, text in (
        ("lengths.json: accuracy 7.5, loss -3", '{"8": {"accuracy": 7.5, "tail_accuracy": 7.5, "loss": -3}}'),
        ("lengths.json cut", '{"8": {"accuracy": 0.5, "tai'),
    ):
        args = _with(base, lambda r, text=text: (r / "lengths.json").write_text(text))
        run = run_cli([*COMPARE, *args], time_limit=120)
        outcome, detail = judge(run, "ok")
        if outcome == "ok":
            sweeps = [p for row in json.loads(run.stdout)["length_sweep"] for p in row["points"]]
            if not sweeps or any(not 0 <= p["tail_accuracy"]["mean"] <= 1 for p in sweeps):
                outcome, detail = "silent", "a damaged length sweep reached the table"
        table.add("arch compare", label, outcome, detail, run.seconds)


# --- group 5: exported lab model folders ------------------------------------------------------------------------

PROMPTS = {"standard": "1 2 3 1 2", "feedback": "1 2 3 1 2", "recurrent": "1 2 3 1 2"}


def _config_edit(edit: Callable[[dict], None]) -> Callable[[Path, random.Random], None]:
    def mutate(folder: Path, rng: random.Random) -> None:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))

    return mutate


def _tensor_edit(edit: Callable[[dict], None]) -> Callable[[Path, random.Random], None]:
    def mutate(folder: Path, rng: random.Random) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"))

    return mutate


def _tokenizer_id(folder: Path, rng: random.Random) -> None:
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab[next(iter(vocab))] = 99 * len(vocab)
    path.write_text(json.dumps(tok))


def _first(tensors: dict, prefix: str) -> str:
    return next(name for name in sorted(tensors) if name.startswith(prefix))


def _as(dtype_name: str, prefix: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        import torch

        name = _first(tensors, prefix)
        tensors[name] = tensors[name].to(getattr(torch, dtype_name))

    return edit


def _safetensors_header(folder: Path, rng: random.Random) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack_from("<Q", data, 0)
    data[8 + rng.randrange(n)] ^= 0x5A
    path.write_bytes(bytes(data))


# (label, the architectures it applies to, mutation, keep the manifest?, expected)
FOLDER_CASES: list[tuple[str, tuple[str, ...], Callable[[Path, random.Random], None], bool, str]] = [
    ("intact", ("standard", "feedback", "recurrent"), lambda f, r: None, True, "ok"),
    ("intact, no manifest", ("standard", "feedback", "recurrent"), lambda f, r: None, False, "ok"),
    ("flipped weight byte (manifest)", ("standard", "feedback", "recurrent"),
     lambda f, r: _flip(f / "model.safetensors", r), True, "error"),
    ("config edited (manifest)", ("feedback",), _config_edit(lambda c: c.update(rope_theta=500.0)), True, "error"),
    ("manifest garbage", ("standard",), lambda f, r: (f / "manifest.json").write_text("{{"), True, "error"),
    ("an extra file (manifest)", ("recurrent",), lambda f, r: (f / "x.safetensors").write_bytes(b""), True, "error"),
    ("feedback labelled recurrent", ("feedback",),
     _config_edit(lambda c: c.update(model_type="forethought_recurrent")), False, "error"),
    ("feedback labelled recurrent, arch too", ("feedback",),
     _config_edit(lambda c: c.update(model_type="forethought_recurrent",
                                     forethought_arch=c["forethought_arch"] | {"arch": "recurrent"})), False, "error"),
    ("recurrent labelled feedback", ("recurrent",),
     _config_edit(lambda c: c.update(model_type="forethought_feedback",
                                     forethought_arch=c["forethought_arch"] | {"arch": "feedback"})), False, "error"),
    ("standard labelled forethought_feedback", ("standard",),
     _config_edit(lambda c: c.update(model_type="forethought_feedback")), False, "error"),
    ("forethought_arch a string", ("feedback", "standard"),
     _config_edit(lambda c: c.update(forethought_arch="feedback")), False, "error"),
    ("forethought_arch missing", ("recurrent",), _config_edit(lambda c: c.pop("forethought_arch")), False, "error"),
    ("forethought_arch.arch unknown", ("feedback",),
     _config_edit(lambda c: c["forethought_arch"].update(arch="lstm")), False, "error"),
    ("use_rope on a GRU", ("recurrent",), _config_edit(lambda c: c.update(use_rope=True)), False, "error"),
    ("use_rope a string", ("feedback",), _config_edit(lambda c: c.update(use_rope="yes")), False, "error"),
    ("int32 GRU weights", ("recurrent",), _tensor_edit(_as("int32", "blocks.0.gru.weight_ih")), False, "error"),
    ("bool layer_logits", ("feedback",), _tensor_edit(_as("bool", "memory.layer_logits")), False, "error"),
    ("int8 embedding", ("standard",), _tensor_edit(_as("int8", "model.embed_tokens")), False, "error"),
    ("float16 weights (a real float type)", ("feedback",), _tensor_edit(_as("float16", "blocks.0.q")), False, "ok"),
    ("a tensor missing", ("feedback",), _tensor_edit(lambda t: t.pop("memory.k.weight")), False, "error"),
    ("an extra tensor", ("recurrent",), _tensor_edit(lambda t: t.update(extra=t["embed"].clone())), False, "error"),
    ("NaN in a weight", ("standard",),
     _tensor_edit(lambda t: t[_first(t, "model.norm")].fill_(float("nan"))), False, "error"),
    ("tokenizer id out of the vocab", ("standard", "recurrent"), _tokenizer_id, False, "error"),
    ("num_hidden_layers a bool", ("feedback",),
     _config_edit(lambda c: c.update(num_hidden_layers=True)), False, "error"),
    ("num_hidden_layers 10**9", ("recurrent",),
     _config_edit(lambda c: c.update(num_hidden_layers=10**9)), False, "error"),
    ("hidden_size a string", ("standard",), _config_edit(lambda c: c.update(hidden_size="16")), False, "error"),
    ("vocab_size 3", ("feedback",), _config_edit(lambda c: c.update(vocab_size=3)), False, "error"),
    ("rms_norm_eps -1", ("recurrent",), _config_edit(lambda c: c.update(rms_norm_eps=-1)), False, "error"),
    ("safetensors header byte", ("feedback",), _safetensors_header, False, "error"),
    ("model.safetensors truncated", ("recurrent",), lambda f, r: _truncate(f / "model.safetensors", None, r),
     False, "error"),
    ("tokenizer.json missing", ("standard",), lambda f, r: (f / "tokenizer.json").unlink(), False, "error"),
    ("config.json a list", ("feedback",), lambda f, r: (f / "config.json").write_text("[]"), False, "error"),
]  # fmt: skip


def lab_folders(work: Path) -> dict[str, Path]:
    folders = {}
    for arch in ("standard", "feedback", "recurrent"):
        out, _ = reference(work, arch)
        folders[arch] = out / "engine"
    return folders


def group_folders(table: Table, work: Path, n: int, rng: random.Random) -> None:
    folders = lab_folders(work)
    cases = [(label, arch, m, keep, e) for label, archs, m, keep, e in FOLDER_CASES for arch in archs]
    for i, (label, arch, mutate, keep_manifest, expect) in enumerate(sample(cases, n, rng)):
        target = work / f"folder-{i}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folders[arch], target)
        if not keep_manifest:
            (target / "manifest.json").unlink()
        mutate(target, rng)
        run = run_cli(["generate", "-m", str(target), "-n", "2", "-t", "0", "--json", PROMPTS[arch]])
        outcome, detail = judge(run, expect)
        table.add("exported lab model folders", f"{arch}: {label}", outcome, detail, run.seconds)


# --- group 6: a full or read-only disk --------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int, read_only: bool = False):
    """A real tmpfs of `size_kb` at `path` (needs root); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    allowed = not os.environ.get("FORETHOUGHT_FUZZ_NO_MOUNT")  # =1: the injected per-file limit even as root
    if allowed and os.geteuid() == 0 and shutil.which("mount"):
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        command = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
        mounted = subprocess.run(command, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def group_disk(table: Table, work: Path, n: int, rng: random.Random, ref: tuple[str, str]) -> None:
    """A disk that fills at different points of the run (first checkpoint, a later one, the export, the pointer),
    and a read-only one: one line naming the path and the reason, exit 2, and what is left resumes (on a roomy
    disk) to the uninterrupted run's weights."""
    sizes = sample([16, 48, 96, 160, 200, 240, 280, 320, 400, 480], n, rng)
    for size in sizes:
        mount = work / f"disk-{size}"
        with small_disk(mount, size) as mounted:
            out = mount / "run"
            limit = None if mounted else size * 1024  # without root: an injected per-file limit (EFBIG)
            run = run_cli(train_argv(out, "--arch", "standard"), file_size_limit=limit)
            label = f"{'tmpfs' if mounted else 'RLIMIT_FSIZE'} {size} KB"
            outcome, detail = judge(run, "either")
            if outcome == "error" and ("cannot write" not in detail or str(mount) not in detail):
                outcome, detail = "traceback", f"the line names no path or reason: {detail}"
            if outcome in ("ok", "error"):
                rescued = work / f"rescued-{size}"
                shutil.rmtree(rescued, ignore_errors=True)
                if out.exists():
                    shutil.copytree(out, rescued)
        if outcome in ("ok", "error"):
            resumed = run_cli(train_argv(rescued, "--arch", "standard"))
            if kind_of(resumed) != "ok":
                outcome, detail = "data loss", f"unresumable after the full disk: {resumed.stderr[-300:]}"
            elif final_hashes(rescued) != ref:
                outcome, detail = "data loss", "resumed to other weights"
        table.add("full disk / read-only filesystem", label, outcome, detail, run.seconds)
    for i, (label, argv_of, read_only) in enumerate(
        (
            ("read-only: arch train", lambda m: train_argv(m / "run", "--arch", "standard"), True),
            ("read-only: arch compare", lambda m: [*COMPARE, "--out", str(m / "cmp")], True),
            ("full: arch compare", lambda m: [*COMPARE, "--out", str(m / "cmp")], False),
        )
    ):
        mount = work / f"disk-other-{i}"
        with small_disk(mount, 64, read_only=read_only) as mounted:
            if not mounted and read_only and os.geteuid() == 0:
                continue  # root writes through chmod 0555: no read-only folder to be had without a mount
            if not mounted and read_only:
                mount.chmod(0o555)
            # injected: a per-file limit below the smallest run's optimizer state (~20 KB)
            run = run_cli(argv_of(mount), file_size_limit=None if mounted else 4096, time_limit=120)
            outcome, detail = judge(run, "error")
            if not mounted and read_only:
                mount.chmod(0o755)
        table.add("full disk / read-only filesystem", label, outcome, detail, run.seconds)


# --- the whole table --------------------------------------------------------------------------------------------


def run_all(work: Path, n: int, kills: int, seed: int = 25) -> Table:
    import torch

    torch.set_num_threads(1)
    rng, table = random.Random(seed), Table()
    _, ref = reference(work)
    group_flags(table, work, n, rng)
    group_checkpoints(table, work, n, rng, ref)
    kill_test(table, work, kills, rng)
    kill_test(table, work, max(2, kills // 4), rng, arch="feedback")
    kill_test(table, work, max(2, kills // 4), rng, arch="recurrent")
    timed_kills(table, work, max(2, kills // 2), rng)
    group_compare(table, work, n, rng)
    group_folders(table, work, n, rng)
    group_disk(table, work, max(2, n // 3), rng, ref)
    os.environ["FORETHOUGHT_FUZZ_NO_MOUNT"] = "1"  # the same through an injected per-file limit (no root)
    group_disk(table, work / "injected", max(2, n // 6), rng, ref)
    del os.environ["FORETHOUGHT_FUZZ_NO_MOUNT"]
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40, help="cases per group (every listed case when larger)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLed runs")
    parser.add_argument("--kill-test", type=int, default=0, help="only the kill test, with this many kills")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.kill_test:
            table = Table()
            rows = kill_test(table, work, args.kill_test, random.Random(25))
            print("\n".join(rows))
        else:
            table = run_all(work, args.cases, args.kills)
            print("\n".join(table.lines))
        print(table.markdown())
        print("\n".join(table.defects) or "no defects")
    return 1 if table.defects else 0


if __name__ == "__main__":
    sys.exit(main())
