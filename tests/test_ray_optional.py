"""Ray is optional: without --ray nothing imports it, and a missing Ray or a bad --ray is a one-line error."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from forethought.distributed.cluster import RaySpec, parse_ray_spec
from forethought.errors import ForethoughtError

RUN = """
import sys
from forethought.cli import main
codes = [main(argv) for argv in {argvs!r}]
print("exit codes:", codes, "ray imported:", "ray" in sys.modules)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing near old stone walls".split()
    for i in range(40):  # distinct word sequences: the probes drop held-out documents that near-copy training ones
        text = " ".join(random.Random(i).choice(words) for _ in range(40))
        (folder / f"d{i}.txt").write_text(f"text {i}: {text}")
    return folder


def test_extract_and_probe_without_ray_never_import_it(llama_dir: Path, corpus: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    extract = ["extract", "--corpus", str(corpus), "--model", str(llama_dir), "--out", str(store), "--json"]
    extract += ["--tokens", "1024", "--window", "16", "--test-fraction", "0.3"]
    probe = ["probe", "--store", str(store), "--model", str(llama_dir), "--offsets", "1-2", "--eval-tokens", "32"]
    probe += ["--json"]
    code = RUN.format(argvs=[extract, probe])  # one interpreter for both: it is the import that matters
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "exit codes: [0, 0] ray imported: False" in done.stdout, done.stderr[-2000:]


def test_missing_ray_is_a_one_line_error(llama_dir: Path, corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from forethought.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    argv = ["extract", "--corpus", str(corpus), "--model", str(llama_dir), "--out", str(tmp_path / "s")]
    assert main([*argv, "--tokens", "64", "--window", "16", "--ray", "local:2"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == 'error: Ray is not installed: pip install "forethought[ray]"'
    )


def test_ray_spec_parsing() -> None:
    assert parse_ray_spec("local:2") == RaySpec(local_workers=2)
    assert parse_ray_spec("auto") == RaySpec(address="auto")
    assert parse_ray_spec("10.0.0.5:6379") == RaySpec(address="10.0.0.5:6379")
    assert parse_ray_spec("ray://head:10001") == RaySpec(address="ray://head:10001")
    for bad in ("local:0", "local", "local:x", "nowhere", "10.0.0.5"):
        with pytest.raises(ForethoughtError, match="--ray"):
            parse_ray_spec(bad)
