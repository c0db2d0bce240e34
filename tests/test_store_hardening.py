"""A damaged activation store is one clean error naming the file; SIGKILLs in a row still resume to identical shards."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
from test_corpus_store import run_store, shard_table

from forethought.data.store import ActivationStore
from forethought.errors import ForethoughtError


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "clean"
    run_store(out)
    return out


def _copy(store: Path, target: Path) -> Path:
    target.mkdir()
    for p in store.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target


def _edit_manifest(store: Path, edit) -> None:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    result = edit(manifest)
    path.write_text(json.dumps(manifest if result is None else result))


MANIFEST_EDITS = {
    "a list": lambda m: [m],
    "empty": lambda m: {},
    "no shards": lambda m: m.pop("shards") and None,
    "window a string": lambda m: m["settings"].update(window="16") or None,
    "layers a dict": lambda m: m["settings"].update(layers={"0": 1}) or None,
    "n_tokens 1e12": lambda m: m.update(n_tokens=10**12) or None,
    "shard tokens 1e12": lambda m: m["shards"][0].update(tokens=10**12, windows=10**12 // 16) or None,
    "shard named ../x": lambda m: m["shards"][0].update(name="../shard-00000.safetensors") or None,
    "shard listed twice": lambda m: m["shards"].append(m["shards"][0]) or None,
    "sha256 a number": lambda m: m["shards"][0].update(sha256=7) or None,
    "bytes negative": lambda m: m["shards"][0].update(bytes=-1) or None,
    "d_model huge": lambda m: m.update(d_model=2**40) or None,
    "dtype unknown": lambda m: m["settings"].update(dtype="int4") or None,
    "model a string": lambda m: m.update(model="smollm2-135m") or None,
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_bad_manifest_is_one_error_naming_it(clean_store: Path, tmp_path: Path, edit: str) -> None:
    store = _copy(clean_store, tmp_path / "s")
    _edit_manifest(store, MANIFEST_EDITS[edit])
    with pytest.raises(ForethoughtError, match="manifest.json"):
        ActivationStore(store)
    with pytest.raises(ForethoughtError, match="manifest.json"):  # and a resume refuses it the same way
        run_store(store)


@pytest.mark.parametrize(
    "raw", [b"\xff\xfe{}", b"[" * 100_000, b'{"n": ' + b"9" * 5000 + b"}"], ids=["non-utf8", "nested", "huge-int"]
)
def test_unreadable_manifest_bytes(clean_store: Path, tmp_path: Path, raw: bytes) -> None:
    store = _copy(clean_store, tmp_path / "s")
    (store / "manifest.json").write_bytes(raw)
    with pytest.raises(ForethoughtError, match="manifest.json"):
        ActivationStore(store)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


SHARD_DAMAGE = {
    "one byte flipped, same size": lambda p: _flip(p, p.stat().st_size - 3),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "header length 2^60": lambda p: p.write_bytes(struct.pack("<Q", 2**60) + p.read_bytes()[8:]),
}


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGE))
def test_damaged_shard_is_caught_on_read_and_on_resume(clean_store: Path, tmp_path: Path, damage: str) -> None:
    store = _copy(clean_store, tmp_path / "s")
    shard = store / "shard-00002.safetensors"
    SHARD_DAMAGE[damage](shard)
    with pytest.raises(ForethoughtError, match="shard-00002"):
        ActivationStore(store).layer(1)
    with pytest.raises(ForethoughtError, match="shard-00002"):
        run_store(store)  # a resume checks every recorded shard before building on it


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded(out: Path) -> int:
    try:
        return len(shard_table(out))
    except (OSError, ValueError):  # not written yet
        return 0


@pytest.mark.skipif(sys.platform != "linux", reason="forks")
def test_twenty_sigkills_in_a_row_then_resume_is_hash_identical(tmp_path: Path) -> None:
    tokens = 2560  # 20 shards of 8 windows of 16 tokens
    clean = tmp_path / "clean"
    started = time.perf_counter()
    run_store(clean, tokens=tokens)
    per_shard = (time.perf_counter() - started) / len(shard_table(clean))
    assert len(shard_table(clean)) == 20
    # Kill i waits until shard i is recorded, then a random fraction of one shard's time more: the 20 kills land at
    # random instants spread over the whole extraction (writes, fsyncs, renames, manifest updates), whatever the
    # machine's speed.
    out, rng, progress = tmp_path / "killed", random.Random(20), []
    for i in range(20):
        pid = os.fork()
        if pid == 0:
            try:
                run_store(out, tokens=tokens)
            finally:
                os._exit(0)
        deadline = time.perf_counter() + 120
        while _recorded(out) < i and time.perf_counter() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, per_shard))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        manifest = out / "manifest.json"
        done = manifest.exists() and json.loads(manifest.read_text()).get("complete")
        progress.append(-1 if done else _recorded(out))
    print(f"shards recorded after each of the 20 kills (-1: already complete): {progress}")
    assert sum(p >= 0 for p in progress) >= 15, "most kills must land before the store is complete"
    run_store(out, tokens=tokens)
    assert shard_table(out) == shard_table(clean)
    shards = sorted(p.name for p in out.glob("shard-*"))
    assert shards == sorted(p.name for p in clean.glob("shard-*"))
    assert [_sha(out / n) for n in shards] == [_sha(clean / n) for n in shards]
    assert not list(out.glob("*.tmp"))
    ActivationStore(out).verify()


def test_a_config_field_added_after_the_store_was_written_is_not_a_difference():
    from forethought.data.store import _differences

    stored = {"model": {"config": {"d_model": 64}}, "settings": {"window": 8}}
    later = {"model": {"config": {"d_model": 64, "rope_local_theta": 10000.0}}, "settings": {"window": 8}}
    assert _differences(stored, later) == []
    assert _differences(stored, {"model": {"config": {"d_model": 32}}, "settings": {"window": 8}}) != []
    assert _differences(stored, {"model": {"config": {"d_model": 64}}, "settings": {"window": 8, "x": 1}}) != []
