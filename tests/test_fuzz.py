"""Fuzzed model files through the CLI: every case is a clean one-line error or a load with finite logits.

CI runs a few dozen seeded cases; FORETHOUGHT_FUZZ_CASES=N runs N per corpus (FORETHOUGHT_FUZZ_SEED picks
another sequence). Each case runs in a forked child with a time limit and its peak memory measured; the budget
is twice the peak of loading the intact file (a Q4 GGUF dequantizes to ~5x its size, so the intact load, not
the file size, is the yardstick).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fuzzing import (
    COMPARE_GARBAGE,
    HEADS_MUTATIONS,
    RESULTS_GARBAGE,
    Case,
    Report,
    absent,
    fill,
    fuzz_cases,
    generate_argv,
    limit_file_size,
    mutate_cache_entry,
    mutate_gguf,
    mutate_heads,
    mutate_hf,
    parse_gguf,
    recomputed_check,
    report_argv,
    report_numbers,
    run_case,
    speculative_argv,
    speculative_flag_cases,
    store_not_complete,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks and reads /proc")

SEED = int(os.environ.get("FORETHOUGHT_FUZZ_SEED", "17"))
SLACK = 64 * 2**20  # allocator and import noise, so a tiny model's budget is not a few kilobytes


def _report(name: str, report: Report) -> None:
    print(f"{name}: {report.summary()}")
    if os.environ.get("FORETHOUGHT_FUZZ_VERBOSE"):
        print("\n".join(report.lines))
    out = os.environ.get("FORETHOUGHT_FUZZ_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(f"{name}: {report.summary()}\n" + "".join(f"  {d}\n" for d in report.defects))


@pytest.mark.slow
def test_fuzzed_real_gguf_headers(tmp_path: Path):
    from forethought.weights.registry import DEFAULT_MODEL, REGISTRY

    real = REGISTRY[DEFAULT_MODEL].locate()
    _warm_kernels()
    header = parse_gguf(real)
    assert len(header.to_bytes()) == real.stat().st_size  # the test's writer reproduces the file's layout
    baseline = run_case(generate_argv(real), time_limit=600, address_limit=16 * 2**30)
    assert baseline.kind == "loaded", baseline.detail
    budget = 2 * baseline.peak_bytes + SLACK
    time_limit = max(60.0, 6 * baseline.seconds)
    rng, report = random.Random(SEED), Report()
    for _ in range(fuzz_cases(10)):
        label, data = mutate_gguf(header, rng)
        path = tmp_path / "mutated.gguf"
        path.write_bytes(data)
        report.add(label, run_case(generate_argv(path), time_limit, 3 * budget), budget)
        path.unlink()
    _report("gguf", report)
    assert not report.defects, "\n".join(report.defects)
    assert report.counts["error"] > 0


def test_fuzzed_hf_folders(llama_dir: Path, tmp_path: Path):
    _warm_kernels()
    baseline = run_case(generate_argv(llama_dir), time_limit=120, address_limit=8 * 2**30)
    assert baseline.kind == "loaded", baseline.detail
    budget = 2 * baseline.peak_bytes + SLACK
    rng, report = random.Random(SEED), Report()
    for i in range(fuzz_cases(40)):
        target = tmp_path / f"case-{i}"
        label = mutate_hf(llama_dir, target, rng)
        argv = generate_argv(target)
        if label.startswith("chat_template"):
            argv.insert(1, "--chat")
        report.add(label, run_case(argv, 60.0, 3 * budget), budget)
    _report("hf", report)
    assert not report.defects, "\n".join(report.defects)
    assert report.counts["error"] > 0  # (the intact folder, run first, is the case that must load)


# --- issue 25's surfaces ------------------------------------------------------------------------------------
BUDGET = 2 * 2**30  # a tiny model's case: far above any clean run, far below a runaway allocation


def _warm_kernels() -> None:
    """The CPU kernels built (or loaded) here, once: every forked case inherits them. A case killed at its time
    limit while it compiled would leave torch's build lock behind, and every later build would wait for ever."""
    from forethought.model import kernels

    kernels.module()


def _run_all(name: str, cases: list[Case], report: Report | None = None, quiet: bool = False) -> Report:
    _warm_kernels()
    report = report or Report()
    for case in cases:
        outcome = run_case(case.argv, case.time_limit, 4 * BUDGET, setup=case.setup, check=case.check)
        left = case.after() if case.after is not None and outcome.kind == "error" else ""
        if left:
            outcome.kind, outcome.detail = "half-written", left
        report.add(case.label, outcome, BUDGET, case.expect)
    if not quiet:
        _report(name, report)
    return report


@pytest.fixture(scope="module")
def heads_files(llama_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(heads trained-for the tiny model, the same kind of file made for another model of the same shape)."""
    import torch

    from forethought.model.heads import DraftHeads
    from forethought.weights import load_model

    folder = tmp_path_factory.mktemp("heads")
    model = load_model(str(llama_dir), "cpu", "float32").model
    c = model.config
    heads = DraftHeads(c.d_model, 3, torch.arange(0, c.vocab_size, 3), c.n_layers - 1, {"seed": 0})
    with torch.no_grad():
        heads.w.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    mine = heads.save(folder / "mine.safetensors", model)
    with torch.no_grad():  # another model: same shapes, other weights
        model.final_norm.weight.mul_(1.7).add_(0.3)
        model.unembed.weight_t.mul_(-1.3)
    other = heads.save(folder / "other.safetensors", model)
    return mine, other


def test_fuzzed_heads_files(llama_dir: Path, heads_files, tmp_path: Path):
    """Every defect in a heads file is one line (never "0% accepted"); the intact file drafts, another model's
    file is refused. CI runs each mutation kind once; FORETHOUGHT_FUZZ_CASES=N runs N more at random."""
    mine, other = heads_files
    cases = [
        # first: a cold child may compile the CPU kernels (minutes on a busy 2-core machine), not a hang
        Case("control: intact heads file", speculative_argv(llama_dir, mine), "ok", time_limit=900.0),
        Case("control: intact heads file, auto", speculative_argv(llama_dir, mine, "auto"), "ok"),
        Case("heads trained for another model", speculative_argv(llama_dir, other), "error"),
        Case("heads trained for another model, auto", speculative_argv(llama_dir, other, "auto"), "error"),
    ]
    rng = random.Random(SEED)
    extra = max(0, fuzz_cases(0))
    kinds = [*dict.fromkeys(HEADS_MUTATIONS), *(rng.choice(HEADS_MUTATIONS) for _ in range(extra))]
    for i, kind in enumerate(kinds):
        target = tmp_path / f"heads-{i}.safetensors"
        label, expect = mutate_heads(mine, target, rng, kind)
        cases.append(Case(label, speculative_argv(llama_dir, target, rng.choice(("heads", "auto"))), expect))
    report = _run_all("heads files", cases)
    assert not report.defects, "\n".join(report.defects)
    assert report.counts["loaded"] >= 2 and report.counts["error"] >= len(kinds)  # controls ran, errors happened


def test_speculative_flags_fail_before_the_model_loads(llama_dir: Path, heads_files, tmp_path: Path):
    report = _run_all("speculative flags", speculative_flag_cases(llama_dir, heads_files[0], tmp_path))
    assert not report.defects, "\n".join(report.defects)
    assert report.counts["loaded"] == 4  # the four controls


def test_error_after_streamed_text_starts_its_own_line(llama_dir: Path, capsys, monkeypatch):
    """A failure mid-generation: the `error:` line must not be glued to the streamed text."""
    import forethought.model.generate as gen
    from forethought.cli import main
    from forethought.errors import ForethoughtError

    def fails_midway(model, prompt_ids, n, params, on_token=None, **kwargs):
        on_token(prompt_ids[0])
        raise ForethoughtError("stopped halfway")

    monkeypatch.setattr(gen, "generate", fails_midway)
    assert main(["generate", "-m", str(llama_dir), "-n", "3", "Once upon a time"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and out.endswith("\n") and err == "error: stopped halfway\n"


@pytest.fixture(scope="module")
def report_corpus(tmp_path_factory) -> Path:
    from conftest import _CORPUS

    folder = tmp_path_factory.mktemp("corpus")
    words = " ".join(_CORPUS).split()
    rng = random.Random(0)
    for i in range(24):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(40)))
    return folder


def test_fuzzed_report_cache_and_inputs(llama_dir: Path, report_corpus: Path, tmp_path: Path, capsys):
    """A damaged cache entry is recomputed (the numbers shown are the true ones, never the damaged ones);
    garbage --compare / --results inputs and an --out onto a file are one line before any work."""
    from forethought.cli import main

    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = report_argv(llama_dir, report_corpus, cache, out)
    assert main(argv) == 0
    first = capsys.readouterr().out
    numbers = report_numbers(first)
    assert all(status == "ok" for status, *_ in numbers.values()), numbers
    original = numbers | {"_n_params": json.loads(first)["meta"]["model"]["description"]["n_params"]}

    def cached_and_same(stdout: str) -> str:
        now = report_numbers(stdout)
        wrong = [k for k, v in numbers.items() if now.get(k) != (v[0], True, v[2])]
        return f"not served from the cache unchanged: {wrong}" if wrong else ""

    def recomputed(stdout: str) -> str:
        return recomputed_check(original)(stdout)

    report = _run_all("", [Case("control: intact cache", argv, "ok", check=cached_and_same)], quiet=True)
    rng = random.Random(SEED)
    for _ in range(fuzz_cases(12)):  # one at a time: each case repairs the entry it damaged
        label = mutate_cache_entry(cache, rng)
        _run_all("", [Case(label, argv, "ok", check=recomputed)], report, quiet=True)
    cases = []
    other = out / "report.json"
    for i, garbage in enumerate(COMPARE_GARBAGE):
        path = tmp_path / f"compare-{i}.json"
        path.write_bytes(garbage)
        cases.append(Case(f"--compare garbage {garbage[:30]!r}", [*argv, "--compare", str(path)], "early-error"))
    cases.append(Case("--compare a cut report.json", [*argv, "--compare", str(_cut(other, tmp_path))], "early-error"))
    results = tmp_path / "results"
    for i, garbage in enumerate(RESULTS_GARBAGE):
        folder = results / str(i)
        folder.mkdir(parents=True)
        (folder / "second_model.json").write_text(garbage)
        extra = ["--results", str(folder), "--sections", "invariance,second_model"]
        cases.append(Case(f"--results garbage {garbage[:30]!r}", [*argv, *extra], "early-error"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases += [
        Case("--results a file", [*argv, "--results", str(a_file)], "early-error"),
        Case("--out onto a file", [*report_argv(llama_dir, report_corpus, cache, a_file)], "early-error"),
        Case("--out under a file", [*report_argv(llama_dir, report_corpus, cache, a_file / "r")], "early-error"),
        Case("--cache onto a file", [*report_argv(llama_dir, report_corpus, a_file, out)], "early-error"),
        Case("control: --compare its own report.json", [*argv, "--compare", str(other)], "ok"),
    ]
    report = _run_all("report", cases, report)
    assert not report.defects, "\n".join(report.defects)


def _cut(path: Path, folder: Path) -> Path:
    cut = folder / "cut-report.json"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


@pytest.fixture
def mounts(tmp_path: Path):
    """(a read-only filesystem, a nearly full one) as small tmpfs mounts, or None where mounting is not allowed."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    ok = os.geteuid() == 0 and shutil.which("mount") is not None
    ok = ok and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(ro)]).returncode == 0
    ok = ok and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(full)]).returncode == 0
    yield (ro, full) if ok else None
    for folder in (ro, full):
        subprocess.run(["umount", str(folder)], stderr=subprocess.DEVNULL)


def test_output_paths_fail_in_one_line_and_leave_no_half_file(
    llama_dir: Path, report_corpus: Path, tmp_path: Path, mounts
):
    """Each writing command onto a folder, under a file, a read-only and a full filesystem, and past a file-size
    limit (a full disk without root): one line naming the path and the reason; no half file left behind."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    m = ["-m", str(llama_dir)]
    corpus = ["--corpus", str(report_corpus)]

    def commands(where: Path) -> list[tuple[str, list[str], Path, object]]:
        save, store = where / "t.safetensors", where / "store"
        return [
            ("trace --save", ["trace", "Once upon a time", "--save", str(save), *m], save, absent(save)),
            ("extract --out", ["extract", "--out", str(store), *corpus, "--tokens", "600", "--window", "16", *m,
             "--json"],
             store, store_not_complete(store)),
            ("report --out", report_argv(llama_dir, report_corpus, tmp_path / "cache", where / "r"),
             where / "r", absent(where / "r" / "report.json")),
            ("equivalence --plot", ["equivalence", "hi", "-n", "3", "--plot", str(where / "p.png"), *m],
             where / "p.png", None),
            ("anatomy --plot-dir", ["anatomy", *corpus, "--docs", "4", "--length", "16", "--no-random-control",
             "--plot-dir", str(where / "plots"), *m], where / "plots", None),
            ("heads train --out", ["heads", "train", "--out", str(where / "h.safetensors"), *m],
             where / "h.safetensors", absent(where / "h.safetensors")),
        ]  # fmt: skip

    cases = []
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    for label, argv, _, _ in commands(a_file):
        cases.append(Case(f"{label} under a file (ENOTDIR)", argv, "early-error"))
    for label, argv, target, _ in commands(tmp_path):
        if target.suffix:  # a file output given a folder's name
            folder_argv = [str(folder) if a == str(target) else a for a in argv]
            cases.append(Case(f"{label} onto a folder (EISDIR)", folder_argv, "early-error"))
        else:  # a folder output given a file's name
            file_argv = [str(a_file) if a == str(target) else a for a in argv]
            cases.append(Case(f"{label} onto a file", file_argv, "early-error"))
    for label, argv, _, after in commands(tmp_path / "fsize"):
        (tmp_path / "fsize").mkdir(exist_ok=True)
        if label != "heads train --out":  # its write comes after minutes of training: unit-tested instead
            cases.append(
                Case(f"{label} past a file-size limit (EFBIG)", argv, "error", limit_file_size(2048), None, after)
            )
    if mounts is not None:
        ro, full = mounts
        for label, argv, _, _ in commands(ro):
            cases.append(Case(f"{label} on a read-only filesystem (EROFS)", argv, "early-error"))
        fill(full, 0)
        for label, argv, _, after in commands(full):
            if label != "heads train --out":
                cases.append(Case(f"{label} on a full filesystem (ENOSPC)", argv, "error", after=after))
    report = _run_all("output paths", cases)
    assert not report.defects, "\n".join(report.defects)
    errors = [line for line in report.lines if " error " in line]
    assert all(code in " ".join(errors) for code in ("ENOTDIR", "EFBIG")), errors
    if mounts is not None:
        assert all(code in " ".join(errors) for code in ("EROFS", "ENOSPC")), errors


def test_ray_addresses_fail_within_30_seconds(llama_dir: Path, report_corpus: Path, tmp_path: Path):
    pytest.importorskip("ray")
    silent = socket.socket()  # accepts connections and never answers: not a Ray head
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    threading.Thread(target=lambda: [silent.accept() for _ in range(8)], daemon=True).start()
    port = silent.getsockname()[1]
    base = ["extract", "--out", str(tmp_path / "s"), "--corpus", str(report_corpus), "-m", str(llama_dir)]
    specs = ["127.0.0.1:1", "ray://127.0.0.1:1", "127.0.0.1:99999", "local:100000", "local:0", "local:-1", "local",
             "nohost.invalid:6379", "garbage", f"127.0.0.1:{port}"]  # fmt: skip
    cases = [Case(f"--ray {spec}", [*base, "--ray", spec], "early-error", time_limit=30.0) for spec in specs]
    report = _run_all("--ray", cases)
    silent.close()
    assert not report.defects, "\n".join(report.defects)
