"""Hostile use of the architectures lab through the CLI (tests/fuzz_lab.py): every case a clean one-line error or
a clean run, and every killed, damaged or disk-starved run either refused in one line or resumed to the weights of
an uninterrupted run.

CI runs a few seeded cases per group; FORETHOUGHT_FUZZ_CASES=N runs N per group (FORETHOUGHT_FUZZ_SEED picks
another sample). `python tests/fuzz_lab.py --cases 40` prints the whole table.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import fuzz_lab
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks and reads /proc")

SEED = int(os.environ.get("FORETHOUGHT_FUZZ_SEED", "25"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_lab")


@pytest.fixture(scope="module")
def reference(work: Path) -> tuple[str, str]:
    _, hashes = fuzz_lab.reference(work)
    return hashes


def _check(table: fuzz_lab.Table, surface: str, least_errors: int = 1) -> None:
    print(table.markdown())
    assert not table.defects, "\n".join(table.defects)
    assert table.rows[surface]["error"] >= least_errors  # the cases did reach something that must refuse


def test_train_flags_and_paths(work: Path):
    table = fuzz_lab.Table()
    fuzz_lab.group_flags(table, work, fuzz_lab.fuzz_cases(6), random.Random(SEED))
    _check(table, "arch train flags and paths")


def test_damaged_checkpoints_are_refused_or_resume_exactly(work: Path, reference: tuple[str, str]):
    table = fuzz_lab.Table()
    fuzz_lab.group_checkpoints(table, work, fuzz_lab.fuzz_cases(4), random.Random(SEED), reference)
    print(table.markdown())
    assert not table.defects, "\n".join(table.defects)


def test_sigkill_anywhere_resumes_to_the_same_weights(work: Path, reference: tuple[str, str]):
    """The control that must fail is built in: the events are counted on a real run, and a kill that landed
    nowhere (no SIGKILL seen) counts as a case of its own, not as a pass."""
    table = fuzz_lab.Table()
    rows = fuzz_lab.kill_test(table, work, max(2, fuzz_lab.fuzz_cases(3)), random.Random(SEED))
    print("\n".join(rows))
    assert not table.defects, "\n".join(table.defects)
    assert table.rows["SIGKILL during arch train, resume"]["ok"] == len(rows) >= 2


def test_compare_refuses_impossible_results(work: Path):
    table = fuzz_lab.Table()
    fuzz_lab.group_compare(table, work, fuzz_lab.fuzz_cases(4), random.Random(SEED))
    _check(table, "arch compare")


def test_mutated_lab_folders(work: Path):
    table = fuzz_lab.Table()
    fuzz_lab.group_folders(table, work, fuzz_lab.fuzz_cases(8), random.Random(SEED))
    _check(table, "exported lab model folders")


def test_full_disk_is_one_line_and_loses_nothing(work: Path, reference: tuple[str, str]):
    table = fuzz_lab.Table()
    fuzz_lab.group_disk(table, work, fuzz_lab.fuzz_cases(2), random.Random(SEED), reference)
    _check(table, "full disk / read-only filesystem")
