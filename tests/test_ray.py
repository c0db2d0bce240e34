"""Extraction and probes on a local 2-worker Ray cluster give the single-process results, byte for byte.

One cluster (2 CPUs, loopback, no dashboard, a small object store) is shared by the whole module: Ray takes
seconds to start. Skipped without Ray, which is an optional extra (scripts/test.sh installs it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]" (scripts/test.sh does)')

from forethought.data.corpus import split_of  # noqa: E402
from forethought.data.store import ActivationStore, ExtractSettings, extract  # noqa: E402
from forethought.distributed.extract import ModelSource, extract_on_ray  # noqa: E402
from forethought.distributed.fanout import fan_out  # noqa: E402
from forethought.distributed.probes import map_cells  # noqa: E402
from forethought.errors import ForethoughtError  # noqa: E402
from forethought.experiments.probes import TEMPERATURE_TOKENS, run_probes  # noqa: E402
from forethought.model.random_init import random_model, tiny_config  # noqa: E402

# Ray workers cannot import this file by name: send its helpers (the crash hook) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SOURCE = ModelSource("tiny-llama-seed0", functools.partial(random_model, tiny_config(), 0))
SETTINGS = ExtractSettings(
    layers=(0, 1), tokens=1600, window=16, batch=4, test_fraction=0.2, shard_windows=8, separator_id=2
)
N_SHARDS = 13  # 100 windows of 16 tokens, 8 windows a shard


def synthetic_docs(n_docs: int = 80, seed: int = 1) -> list[tuple[int, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (i, torch.randint(3, 200, (int(torch.randint(10, 60, (1,), generator=g)),), generator=g).tolist())
        for i in range(n_docs)
    ]


DOCS = synthetic_docs()
IDS = [f"doc{i}" for i, _ in DOCS]
SPLITS = [0 if split_of(i, 0.2) == "train" else 1 for i in IDS]


def build(out: Path, on_ray=None, crash_hook=None, after_shard=None):
    """The store for SETTINGS at `out`: in this process, or with shards computed on Ray if `on_ray` is given."""
    model = SOURCE.factory()
    info = {"name": "tiny", "config": model.config.to_dict()}
    run = functools.partial(
        extract, model, iter(DOCS), SPLITS, IDS, out, SETTINGS, info, {"vocab_size": 256}, {"spec": "synthetic"}
    )
    run = functools.partial(run, progress=False, after_shard=after_shard)
    if on_ray is None:
        return run()
    return extract_on_ray(on_ray, SOURCE, run, lambda: iter(DOCS), SPLITS, out, crash_hook=crash_hook)


def shard_table(out: Path) -> list[tuple[str, str, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["name"], s["sha256"], s["tokens"]) for s in manifest["shards"]]


@pytest.fixture(scope="module")
def cluster():
    assert not ray.is_initialized()
    context = ray.init(
        num_cpus=2,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    assert context.address_info["gcs_address"].startswith("127.0.0.1:")  # loopback only
    yield context
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The single-process store: what every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "store"
    build(out)
    return out


def test_two_workers_write_the_single_process_store(cluster, reference: Path, tmp_path: Path) -> None:
    result = build(tmp_path / "ray", on_ray=ray)
    table = shard_table(tmp_path / "ray")
    assert len(table) == N_SHARDS
    assert table == shard_table(reference)  # names, sha256 and token counts, shard by shard
    for name, _, _ in table:
        assert (tmp_path / "ray" / name).read_bytes() == (reference / name).read_bytes()
    ActivationStore(tmp_path / "ray").verify()
    workers = result.ray["workers"]
    assert len(workers) == 2, workers  # both CPUs of the cluster took shards
    assert sum(w["tokens"] for w in workers.values()) == result.tokens == 1600
    assert all(w["tokens_per_second"] > 0 for w in workers.values())
    assert result.ray["projected_tokens_per_second"] > 0


def kill_once(marker: str, at_shard: int, index: int) -> None:
    """Runs inside a Ray task before it computes shard `index`: the first time it reaches `at_shard`, the
    worker process records its pid and SIGKILLs itself (a crash Ray must absorb by rerunning the task)."""
    if index != at_shard:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # the rerun
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_retried_and_the_store_is_unchanged(cluster, reference: Path, tmp_path: Path) -> None:
    marker = tmp_path / "killed.pid"
    result = build(tmp_path / "ray", on_ray=ray, crash_hook=functools.partial(kill_once, str(marker), 5))
    killed = int(marker.read_text())  # the kill happened, in a worker process (not this one)
    assert killed != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # and that process is gone
    assert shard_table(tmp_path / "ray") == shard_table(reference)  # nothing lost, nothing duplicated
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in reference.iterdir())
    assert sum(w["shards"] for w in result.ray["workers"].values()) == N_SHARDS  # each delivered once


DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import ray
import test_ray as t
from pathlib import Path
ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
t.build(Path({out!r}), on_ray=ray, after_shard=lambda i, p: time.sleep(0.25))
"""


def test_a_killed_driver_resumes_from_the_manifest(cluster, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    code = DRIVER.format(tests=str(Path(__file__).parent), address=cluster.address_info["gcs_address"], out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.json").exists() and len(shard_table(out)) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(shard_table(out))
    assert 2 <= done_before < N_SHARDS, "the kill must land mid-run"
    resumed = build(out, on_ray=ray)
    assert resumed.shards_skipped == done_before
    assert sum(w["shards"] for w in resumed.ray["workers"].values()) == N_SHARDS - done_before
    assert shard_table(out) == shard_table(reference)
    assert not list(out.glob("*.tmp"))


def test_cli_extract_and_probe_with_ray_match_without(cluster, llama_dir: Path, tmp_path: Path, capsys) -> None:
    from forethought.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing near old stone walls".split()
    for i in [*range(24), 63, 93, 104]:  # the last three are validation documents of the training split
        # distinct word sequences: the probes drop held-out documents that near-copy training ones
        text = " ".join(random.Random(i).choice(words) for _ in range(27))
        (corpus / f"d{i}.txt").write_text(f"document {i}: {text}")
    # --tokens beyond the corpus: every document is used, whatever the hash order
    common = ["extract", "--corpus", str(corpus), "--model", str(llama_dir), "--tokens", "100000", "--window", "32"]
    common += ["--batch", "4", "--shard-mb", "0.001", "--test-fraction", "0.3", "--json"]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray", "auto"]) == 0  # auto: this session's cluster
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(w["tokens"] for w in summary["ray"]["workers"].values()) == summary["tokens"] > 1000
    table = shard_table(tmp_path / "ray")
    assert len(table) >= 8 and table == shard_table(tmp_path / "single")

    probe = ["probe", "--model", str(llama_dir), "--offsets", "1-2", "--eval-tokens", "128", "--json"]
    assert main([*probe, "--store", str(tmp_path / "single")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert main([*probe, "--store", str(tmp_path / "ray"), "--ray", "auto"]) == 0
    fanned = json.loads(capsys.readouterr().out)
    assert sum(w["layers"] for w in fanned["ray"]["workers"].values()) == 2
    assert [(c["layer"], c["offset"]) for c in fanned["cells"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert set(fanned["headline"]) == {"1", "2"}
    assert comparable(fanned) == comparable(single)  # every number: cells, baselines, intervals, headline
    assert (tmp_path / "ray" / "probes" / "probe-layer01.safetensors").is_file()  # written by a worker


def comparable(result: dict) -> str:
    """A probe result's JSON without what may differ between two runs of the same probes: times, paths, Ray."""
    drop = ("seconds", "timings", "ray", "files", "store", "probes_dir")
    return json.dumps({k: v for k, v in result.items() if k not in drop}, sort_keys=True)


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory) -> ActivationStore:
    """A store with more validation positions than a layer's random draw takes (TEMPERATURE_TOKENS), so the draw
    is a real subset and a layer fitted alone matches a sequential run only if the draw depends on the layer."""
    out = tmp_path_factory.mktemp("probes") / "store"
    docs = synthetic_docs(n_docs=400, seed=2)
    ids = [f"doc{i}" for i, _ in docs]
    settings = dataclasses.replace(SETTINGS, tokens=12800, shard_windows=400)
    model = SOURCE.factory()
    info = {"name": "tiny", "config": model.config.to_dict()}
    splits = [0 if split_of(i, 0.2) == "train" else 1 for i in ids]
    extract(model, iter(docs), splits, ids, out, settings, info, {"vocab_size": 256}, {}, progress=False)
    return ActivationStore(out)


def test_probes_on_ray_equal_run_probes_in_process(cluster, probe_store: ActivationStore) -> None:
    store = probe_store
    options = {"eval_tokens": 300, "lens_eval_tokens": 200, "control_eval_tokens": 100, "save_dir": None}
    model = SOURCE.factory()
    cells = [(layer, k) for layer in (0, 1) for k in (1, 2, 3)]
    on_ray = map_cells(ray, store, model, SOURCE, cells, options)
    in_process = run_probes(store, model, [1, 2, 3], [0, 1], progress=False, **options)
    assert [(c.layer, c.offset) for c in on_ray.cells] == cells
    assert in_process.n_val > TEMPERATURE_TOKENS
    # every metric, lambda, temperature, interval and the layer chosen per offset, exactly (the second layer too:
    # its random draws depend on (seed, layer), not on the layers fitted before it in the same process)
    assert comparable(on_ray.to_dict()) == comparable(in_process.to_dict())
    for key, value in in_process.per_position.items():
        assert np.array_equal(on_ray.per_position[key], value), key
    assert sum(w["layers"] for w in on_ray.ray["workers"].values()) == 2


def weight_sum(seed: int) -> float:
    if seed < 0:
        raise ForethoughtError(f"seed {seed} is negative")
    return float(sum(p.double().sum() for p in random_model(tiny_config(), seed).parameters()))


def test_fan_out_over_seeds_keeps_their_order_and_user_errors(cluster) -> None:
    seeds = [3, 1, 2]
    assert fan_out(ray, weight_sum, seeds) == [weight_sum(s) for s in seeds]
    with pytest.raises(ForethoughtError, match="seed -1 is negative"):
        fan_out(ray, weight_sum, [0, -1])


def test_cli_plan_tasks_one_model_per_worker_matches_local(cluster, llama_dir: Path, qwen2_dir: Path, tmp_path):
    """`plan-tasks --ray`: each model's tasks on a worker, saved by the driver: the same runs and verdicts."""
    from forethought.cli import main
    from forethought.experiments.plan_tasks.types import TaskRun

    args = ["plan-tasks", "--model", f"{llama_dir},{qwen2_dir}", "--tasks", "article", "--prompts", "10", "--quick"]
    assert main([*args, "--out", str(tmp_path / "local"), "--json"]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "auto", "--json"]) == 0
    for model in (llama_dir.name, qwen2_dir.name):
        local = TaskRun.load(tmp_path / "local" / model / "article" / "run")
        remote = TaskRun.load(tmp_path / "ray" / model / "article" / "run")
        assert remote.completion_ids == local.completion_ids and remote.labels == local.labels
        np.testing.assert_allclose(remote.states, local.states, rtol=1e-5, atol=1e-5)
    maps = [json.loads((tmp_path / where / "plan_map.json").read_text()) for where in ("local", "ray")]
    assert [[r["verdict"] for r in o["results"]] for o in maps[0]["outcomes"]] == [
        [r["verdict"] for r in o["results"]] for o in maps[1]["outcomes"]
    ]
    assert [m["model"] for m in maps[1]["models"]] == [llama_dir.name, qwen2_dir.name]
