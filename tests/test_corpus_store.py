"""Corpora (files, folders, JSONL, the stdlib default, unreadable files) and the crash-safe activation store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forethought.data.corpus import is_validation, load_corpus, split_of
from forethought.data.store import ActivationStore, ExtractSettings, extract
from forethought.errors import ForethoughtError
from forethought.model.random_init import random_model, tiny_config

# ------------------------------------------------------------------------------------------------ corpora


def test_folder_corpus_skips_unreadable_and_orders_deterministically(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "sub" / "c.py").write_text("x = 1\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00not utf8 \xc3\x28")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(str(tmp_path))
    assert sorted(d.doc_id for d in corpus.documents) == ["a.txt", "sub/b.md", "sub/c.py"]
    assert corpus.skipped == 1
    again = load_corpus(str(tmp_path))
    assert [d.doc_id for d in again.documents] == [d.doc_id for d in corpus.documents]


def test_text_file_and_jsonl_corpora(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("hello world")
    assert [d.text for d in load_corpus(str(f)).documents] == ["hello world"]
    j = tmp_path / "docs.jsonl"
    j.write_text(json.dumps({"text": "first"}) + "\n" + "not json\n" + json.dumps({"id": "x", "text": "second"}) + "\n")
    corpus = load_corpus(str(j))
    assert sorted(d.text for d in corpus.documents) == ["first", "second"]
    assert "x" in {d.doc_id for d in corpus.documents}
    assert corpus.skipped == 1


def test_missing_or_empty_corpus_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ForethoughtError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForethoughtError, match="no text"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.txt").write_bytes(b"\xff\xff")
    with pytest.raises(ForethoughtError, match="1 unreadable"):
        load_corpus(str(tmp_path / "only_bad"))


def test_stdlib_default_and_split_by_document() -> None:
    corpus = load_corpus("stdlib")
    assert len(corpus.documents) > 500 and corpus.kind == "stdlib"
    ids = [d.doc_id for d in corpus.documents]
    assert "os.py" in ids
    test_share = sum(split_of(i) == "test" for i in ids) / len(ids)
    assert 0.05 < test_share < 0.15
    assert split_of("os.py") == split_of("os.py")  # a pure function of the ID
    assert 0.05 < sum(is_validation(i) for i in ids) / len(ids) < 0.15


def test_cli_rejects_missing_corpus_with_exit_2(tmp_path: Path) -> None:
    from forethought.cli import main

    assert main(["extract", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2


# ------------------------------------------------------------------------------------------------ store

WINDOW = 16


def synthetic_docs(n_docs: int = 80, seed: int = 1) -> list[tuple[int, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (i, torch.randint(3, 200, (int(torch.randint(10, 60, (1,), generator=g)),), generator=g).tolist())
        for i in range(n_docs)
    ]


def run_store(
    out: Path,
    after_shard=None,
    tokens: int = 1600,
    layers=(0, 1),
    dtype: str = "float32",
    source: str | None = None,
    progress=None,
):
    model = random_model(tiny_config(), seed=0)
    docs = synthetic_docs()
    ids = [f"doc{i}" for i, _ in docs]
    splits = [0 if split_of(i, 0.2) == "train" else 1 for i in ids]
    settings = ExtractSettings(
        layers=tuple(layers),
        tokens=tokens,
        window=WINDOW,
        batch=4,
        dtype=dtype,
        test_fraction=0.2,
        shard_windows=8,
        separator_id=2,
    )
    info = {"name": "tiny", "config": model.config.to_dict()} | ({"source": source} if source else {})
    return extract(
        model,
        iter(docs),
        splits,
        ids,
        out,
        settings,
        info,
        {"vocab_size": 256},
        {"spec": "synthetic"},
        progress=progress,
        after_shard=after_shard,
    )


def shard_table(out: Path) -> list[tuple[str, str, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["name"], s["sha256"], s["tokens"]) for s in manifest["shards"]]


def test_store_contents(tmp_path: Path) -> None:
    result = run_store(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    assert result.tokens == store.n_tokens == 1600  # 100 windows of 16
    assert result.shards == 13 and store.layers == [0, 1]
    assert sum(result.tokens_by_split.values()) == 1600 and result.tokens_by_split["test"] > 0
    store.verify()
    h = store.layer(1)
    assert h.shape == (1600, 64) and torch.isfinite(h).all()
    tokens = store.array("token_ids")
    # the stored activations are the model's: recompute one window
    from forethought.trace import run_with_trace

    model = random_model(tiny_config(), seed=0)
    logits, trace = run_with_trace(model, tokens[16:32].long()[None], "blocks.1.resid_post")
    torch.testing.assert_close(trace.tensors["blocks.1.resid_post"][0], h[16:32])
    assert torch.equal(store.array("greedy_ids")[16:32], logits[0].argmax(-1).int())
    lp = torch.log_softmax(logits[0], -1)[torch.arange(15), tokens[17:32].long()]
    torch.testing.assert_close(store.array("next_logprob")[16:31], lp)
    assert torch.isnan(store.array("next_logprob")[31])
    assert store.array("split").shape == (100,)


def test_extraction_reports_progress_in_tokens(tmp_path: Path) -> None:
    """Compute code reports (done, total) through the callback it is given, from 0 to the whole budget."""
    calls: list[tuple[int, int]] = []
    run_store(tmp_path / "s", progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 1600) and calls[-1] == (1600, 1600)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) == 1 + 13  # one call per shard


def test_crash_after_rename_then_resume_matches_clean_run(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    run_store(clean)

    def crash(index: int, path: Path) -> None:
        if index == 3:  # renamed into place, not yet in the manifest: the worst moment
            raise KeyboardInterrupt

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_store(crashed, after_shard=crash)
    with pytest.raises(ForethoughtError, match="did not finish"):
        ActivationStore(crashed)
    assert len(shard_table(crashed)) == 3
    (crashed / "shard-00004.safetensors.tmp").write_bytes(b"half a shard")  # a torn write from the crash
    resumed = run_store(crashed)
    assert resumed.shards_skipped == 3
    assert shard_table(crashed) == shard_table(clean)
    assert not list(crashed.glob("*.tmp"))
    assert sorted(p.name for p in crashed.glob("shard-*")) == sorted(p.name for p in clean.glob("shard-*"))
    ActivationStore(crashed).verify()


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    run_store(tmp_path / "s")
    again = run_store(tmp_path / "s")  # same settings: nothing to do
    assert again.shards_skipped == again.shards
    with pytest.raises(ForethoughtError, match="other settings"):
        run_store(tmp_path / "s", tokens=800)
    with pytest.raises(ForethoughtError, match="other settings"):
        run_store(tmp_path / "s", dtype="float16")


def test_store_without_a_model_source_still_resumes(tmp_path: Path) -> None:
    """Stores written before the manifest recorded where the model was loaded from (`model.source`), or from
    another path, must not be refused for it: it says nothing about what the store holds."""
    run_store(tmp_path / "s")
    again = run_store(tmp_path / "s", source="/somewhere/tiny")
    assert again.shards_skipped == again.shards
    moved = run_store(tmp_path / "s", source="/elsewhere/tiny")
    assert moved.shards_skipped == moved.shards


SUBPROCESS = """
import sys, time
sys.path.insert(0, {tests!r})
from test_corpus_store import run_store
from pathlib import Path
run_store(Path({out!r}), after_shard=lambda i, p: time.sleep(0.3))
"""


def test_sigkill_mid_run_then_resume_matches_clean_run(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    run_store(clean)
    out = tmp_path / "killed"
    code = SUBPROCESS.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ | {"PYTHONHASHSEED": "0"})
    deadline = time.time() + 60
    try:
        while not ((out / "manifest.json").exists() and shard_table(out)) and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(shard_table(out))
    assert 1 <= done_before < 13, "the kill must land mid-run"
    resumed = run_store(out)
    assert resumed.shards_skipped == done_before
    assert shard_table(out) == shard_table(clean)
    assert ActivationStore(out).n_tokens == ActivationStore(clean).n_tokens == 1600
