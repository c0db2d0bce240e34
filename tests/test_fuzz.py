"""Fuzzed model files through the CLI: every case is a clean one-line error or a load with finite logits.

CI runs a few dozen seeded cases; FORETHOUGHT_FUZZ_CASES=N runs N per corpus (FORETHOUGHT_FUZZ_SEED picks
another sequence). Each case runs in a forked child with a time limit and its peak memory measured; the budget
is twice the peak of loading the intact file (a Q4 GGUF dequantizes to ~5x its size, so the intact load, not
the file size, is the yardstick).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
from fuzzing import Report, fuzz_cases, generate_argv, mutate_gguf, mutate_hf, parse_gguf, run_case

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
