"""The web viewer's API on a tiny random model: grid shapes, cell details, appends, sessions, bad input."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from forethought.model.random_init import random_model, tiny_config  # noqa: E402
from forethought.server import Limits, create_app  # noqa: E402
from forethought.trace import run_with_trace  # noqa: E402
from forethought.weights.tokenizer import Tokenizer  # noqa: E402

TEXT = [
    "Once upon a time, there was a little fox who lived in the forest near a river.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun.",
    "def add(a, b):\n    return a + b\n",
] * 3


def tiny_viewer_lm(context_length: int = 128, seed: int = 0) -> SimpleNamespace:
    """A LoadedModel-like object: a 2-layer random Llama and a byte-level BPE tokenizer trained here."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXT, trainer)
    config = tiny_config(vocab_size=backend.get_vocab_size(), context_length=context_length)
    # No EOS id: generation on random weights would otherwise stop at unpredictable lengths.
    return SimpleNamespace(
        model=random_model(config, seed=seed, std=0.2),
        tokenizer=Tokenizer(backend, bos_id=None, eos_id=None),
        name="tiny-random",
    )


class LiveServer:
    """uvicorn on a free loopback port (port 0: the OS picks), in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the viewer server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def lm():
    return tiny_viewer_lm()


@pytest.fixture()
def client(lm):
    app = create_app(lm, Limits(max_tokens=64, max_new_tokens=32, max_sessions=3, max_body_bytes=4096))
    # raise_server_exceptions=False: a 500 must come back as a JSON response, which is what we assert on.
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def analyze(client, session="s1", prompt="Once upon a time", **kw):
    r = client.post("/api/analyze", json={"session": session, "prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_info_lists_metrics_from_the_server(client, lm):
    info = client.get("/api/info").json()
    assert info["rows"] == ["embed", "L0", "L1"]
    assert [m["id"] for m in info["metrics"]] == ["norm", "lens", "change"]  # no probes loaded: no probe metric
    assert info["limits"]["max_tokens"] == 64
    assert info["kv_bytes_per_token"] == lm.model.new_cache(1).bytes_per_token


def test_analyze_grid_dimensions(client, lm):
    n_prompt = len(lm.tokenizer.encode("Once upon a time"))
    data = analyze(client, new_tokens=5, temperature=0.9, seed=3)
    n = n_prompt + 5
    assert data["n_prompt"] == n_prompt and data["generated"] == 5 and len(data["tokens"]) == n
    for name in ("norm", "lens", "change"):
        grid = data["metrics"][name]
        assert len(grid) == 3 and all(len(row) == n for row in grid), name
    assert all(v is None for v in (row[0] for row in data["metrics"]["change"]))  # nothing before position 0
    assert all(0 < p <= 1 for row in data["metrics"]["lens"] for p in row)
    assert len(data["lens_top1"]) == 3 and set(map(str, sum(data["lens_top1"], []))) <= set(data["vocab"])
    assert data["cache"]["tokens"] == n and data["cache"]["bytes"] == n * data["cache"]["bytes_per_token"]
    # The norm grid is the residual stream a plain forward produces.
    _, traced = run_with_trace(lm.model, [t["id"] for t in data["tokens"]], "resid_post")
    expected = traced["resid_post"][-1].norm(dim=-1)
    assert torch.allclose(torch.tensor(data["metrics"]["norm"][-1]), expected, rtol=1e-3)


def test_same_seed_same_generation(client):
    a = analyze(client, "a", new_tokens=6, temperature=1.0, seed=7)
    b = analyze(client, "b", new_tokens=6, temperature=1.0, seed=7)
    assert [t["id"] for t in a["tokens"]] == [t["id"] for t in b["tokens"]]


def test_cell_details(client, lm):
    data = analyze(client, new_tokens=2)
    pos = len(data["tokens"]) - 2
    cell = client.get("/api/cell", params={"session": "s1", "row": 2, "position": pos, "k": 5}).json()
    assert cell["name"] == "blocks.1.resid_post" and cell["token"] == data["tokens"][pos]
    assert len(cell["lens"]) == 5 and cell["lens"][0]["prob"] >= cell["lens"][-1]["prob"]
    assert cell["lens"][0]["id"] == data["lens_top1"][2][pos]
    assert cell["following"]["id"] == data["tokens"][pos + 1]["id"] and cell["following"]["rank"] >= 1
    att = cell["attention"]
    assert att["layer"] == 1 and att["keys"] == pos + 1 and att["n_heads"] == lm.model.config.n_heads
    assert len(att["heads"]) == 4 and all(len(h) == pos + 1 and abs(sum(h) - 1) < 1e-3 for h in att["heads"])
    assert cell["probes"] is None
    # The embedding row has no attention yet: a note instead.
    embed = client.get("/api/cell", params={"session": "s1", "row": 0, "position": 0}).json()
    assert embed["attention"] is None and "no attention" in embed["attention_note"]
    assert embed["values"]["change"] is None


def test_attention_matches_a_full_forward(client, lm):
    data = analyze(client, prompt="The quick brown fox jumps")
    ids = [t["id"] for t in data["tokens"]]
    pos = len(ids) - 1
    cell = client.get("/api/cell", params={"session": "s1", "row": 1, "position": pos}).json()
    _, traced = run_with_trace(lm.model, ids, ["blocks.0.attn_pattern"])
    expected = traced["blocks.0.attn_pattern"][:, pos]
    assert torch.allclose(torch.tensor(cell["attention"]["heads"]), expected, atol=1e-3)


def test_append_grows_cache_and_keeps_earlier_columns(client):
    data = analyze(client, new_tokens=3)
    n = len(data["tokens"])
    per_token = data["cache"]["bytes_per_token"]
    for mode, extra in (("greedy", {}), ("sample", {"temperature": 1.0, "seed": 1}), ("text", {"text": " fox"})):
        r = client.post("/api/append", json={"session": "s1", "mode": mode, **extra})
        assert r.status_code == 200, r.text
        step = r.json()
        added = len(step["tokens"])
        assert step["start"] == n and step["n_tokens"] == n + added
        assert step["cache"]["tokens"] == n + added and step["cache"]["bytes"] == (n + added) * per_token
        assert step["unchanged"]["columns"] == n and len(step["unchanged"]["per_column"]) == n
        # Earlier columns unchanged, and the cached column is the recomputed one: float32 rounding at most.
        scale = step["unchanged"]["max_abs_state"]
        assert step["unchanged"]["max_abs_diff"] <= 1e-5 * scale and step["cache_vs_recompute"] <= 1e-5 * scale
        assert all(len(row) == added for row in step["metrics"]["norm"])
        n += added
    assert [c["tokens"] for c in step["cache_history"]] == [n - 3, n - 2, n - 1, n]
    cell = client.get("/api/cell", params={"session": "s1", "row": 1, "position": n - 1}).json()
    assert cell["attention"]["keys"] == n


def test_greedy_append_is_the_lens_top1_of_the_last_layer(client):
    data = analyze(client)
    step = client.post("/api/append", json={"session": "s1", "mode": "greedy"}).json()
    assert step["tokens"][0]["id"] == data["lens_top1"][-1][-1]
    assert step["chosen_prob"] == 1.0


def test_sessions_are_isolated(client):
    a = analyze(client, "alpha", prompt="Once upon a time")
    b = analyze(client, "beta", prompt="The quick brown fox jumps over")
    client.post("/api/append", json={"session": "alpha", "mode": "greedy"})
    b_cell = client.get("/api/cell", params={"session": "beta", "row": 0, "position": 0}).json()
    assert b_cell["token"] == b["tokens"][0]
    a_cell = client.get("/api/cell", params={"session": "alpha", "row": 0, "position": 0}).json()
    assert a_cell["token"] == a["tokens"][0]
    # beta's cache did not grow when alpha appended
    step = client.post("/api/append", json={"session": "beta", "mode": "greedy"}).json()
    assert step["start"] == len(b["tokens"])


def test_least_recently_used_session_is_evicted(client):
    for name in ("one", "two", "three"):
        analyze(client, name)
    client.get("/api/cell", params={"session": "one", "row": 0, "position": 0})  # "one" is now recent
    analyze(client, "four")  # capacity 3: "two" goes
    r = client.post("/api/append", json={"session": "two", "mode": "greedy"})
    assert r.status_code == 404 and "unknown session" in r.json()["error"]
    assert client.post("/api/append", json={"session": "one", "mode": "greedy"}).status_code == 200
    assert client.get("/api/health").json()["sessions"] == 3


@pytest.mark.parametrize(
    "body, status",
    [
        ({"session": "s", "prompt": ""}, 400),
        ({"session": "s", "prompt": "   "}, 400),
        ({"session": "s", "prompt": "word " * 200}, 413),  # more tokens than the session limit
        ({"session": "s", "prompt": "hi", "new_tokens": 33}, 400),
        ({"session": "s", "prompt": "hi", "new_tokens": -1}, 422),
        ({"session": "s", "prompt": "hi", "temperature": -1}, 422),
        ({"session": "s", "prompt": "hi", "top_k": 10**6}, 400),
        ({"session": "bad id!", "prompt": "hi"}, 400),
        ({"session": "s" * 65, "prompt": "hi"}, 422),
        ({"prompt": "hi"}, 422),
        ({"session": "s", "prompt": 5}, 422),
        ({"session": "s", "prompt": "hi", "surprise": 1}, 422),
        ([1, 2, 3], 422),
    ],
)
def test_bad_analyze_requests_are_json_4xx(client, body, status):
    r = client.post("/api/analyze", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]


def test_bad_json_huge_body_and_unknown_things(client):
    headers = {"content-type": "application/json"}
    r = client.post("/api/analyze", content=b'{"session": "s", "prompt": ', headers=headers)
    assert r.status_code == 400 and r.json()["error"].startswith("invalid JSON")
    huge = json.dumps({"session": "s", "prompt": "x" * 10_000}).encode()
    r = client.post("/api/analyze", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/api/analyze", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]
    r = client.post("/api/append", json={"session": "nobody", "mode": "greedy"})
    assert r.status_code == 404 and "unknown session" in r.json()["error"]
    assert client.get("/api/cell", params={"session": "nobody", "row": 0, "position": 0}).status_code == 404
    assert client.get("/api/nothing").status_code == 404 and client.get("/api/nothing").json()["error"]
    assert client.delete("/api/analyze").status_code == 405


def test_bad_cell_and_append_requests(client):
    data = analyze(client)
    n = len(data["tokens"])
    for params, status in (
        ({"session": "s1", "row": 3, "position": 0}, 400),
        ({"session": "s1", "row": 0, "position": n}, 400),
        ({"session": "s1", "row": -1, "position": 0}, 422),
        ({"session": "s1", "row": "x", "position": 0}, 422),
        ({"session": "s1", "row": 0, "position": 0, "k": 1000}, 400),
        ({"session": "s1"}, 422),
    ):
        r = client.get("/api/cell", params=params)
        assert r.status_code == status and r.json()["error"], (params, r.text)
    for body, status in (
        ({"session": "s1", "mode": "text"}, 400),
        ({"session": "s1", "mode": "text", "text": "word " * 40}, 413),
        ({"session": "s1", "mode": "sample", "temperature": 0}, 400),
        ({"session": "s1", "mode": "shout"}, 422),
    ):
        r = client.post("/api/append", json=body)
        assert r.status_code == status and r.json()["error"], (body, r.text)
    # A failed append leaves the session as it was.
    step = client.post("/api/append", json={"session": "s1", "mode": "greedy"}).json()
    assert step["start"] == n


def test_session_token_limit(client):
    analyze(client, prompt="hello", new_tokens=0)
    n = len(client.post("/api/append", json={"session": "s1", "mode": "greedy"}).json()["tokens"])
    status = 200
    while status == 200:
        r = client.post("/api/append", json={"session": "s1", "mode": "greedy"})
        status = r.status_code
        n += 1
    assert status == 413 and "limit is 64" in r.json()["error"]


def test_internal_errors_become_json_500(lm, monkeypatch):
    app = create_app(lm)
    monkeypatch.setattr(app.state.engine, "info", lambda: 1 / 0)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/info")
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "forethought" in page.text and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_view_command_registered():
    from typer.testing import CliRunner

    from forethought.cli import _register_commands, app

    _register_commands()
    result = CliRunner().invoke(app, ["view", "--help"])
    assert result.exit_code == 0 and "--probes" in result.output and "--no-browser" in result.output


def write_probes(folder, lm, layers=(0, 1), offsets=(1, 2), n_columns=40):
    """Probe files in the format `forethought probe` saves (random weights: only the plumbing is tested)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d = lm.model.config.d_model
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        tensors = {"mean": torch.zeros(d), "std": torch.ones(d), "columns": torch.arange(n_columns, dtype=torch.int32)}
        for k in offsets:
            tensors[f"probe.{k}"] = torch.randn(d + 1, n_columns, generator=g)
            tensors[f"lens.{k}"] = torch.randn(d + 1, d, generator=g)
        cells = [{"offset": k, "probe_temperature": 0.5, "lens_temperature": 1.0} for k in offsets]
        meta = {"layer": layer, "model": "tiny-random", "cells": cells}
        save_file(
            tensors, str(folder / f"probe-layer{layer:02d}.safetensors"), metadata={"forethought": json.dumps(meta)}
        )
    return folder


def test_future_probes_metric_and_panel(lm, tmp_path):
    from forethought.server.probes import load_probes

    probes, note = load_probes(write_probes(tmp_path / "probes", lm, layers=(1,)), lm.model)
    assert probes is not None and note == ""
    with TestClient(create_app(lm, probes=probes)) as c:
        info = c.get("/api/info").json()
        assert info["metrics"][-1]["id"] == "probe" and info["probes"]["offsets"] == [1, 2]
        data = analyze(c, new_tokens=1)
        grid = data["metrics"]["probe"]
        assert all(v is None for v in grid[0] + grid[1])  # no probe for the embedding and layer 0
        assert all(0 < v <= 1 for v in grid[2])
        cell = c.get("/api/cell", params={"session": "s1", "row": 2, "position": 1, "k": 3}).json()
        assert [p["k"] for p in cell["probes"]] == [1, 2]
        assert all(len(p["top"]) == 3 and len(p["lens"]) == 3 and p["top"][0]["id"] < 40 for p in cell["probes"])
        assert c.get("/api/cell", params={"session": "s1", "row": 1, "position": 1}).json()["probes"] is None
        step = c.post("/api/append", json={"session": "s1", "mode": "greedy"}).json()
        assert len(step["metrics"]["probe"][2]) == 1


def test_unreadable_probes_are_left_out(lm, tmp_path):
    from forethought.server.probes import load_probes

    assert load_probes(tmp_path / "missing", lm.model)[0] is None
    (tmp_path / "empty").mkdir()
    probes, note = load_probes(tmp_path / "empty", lm.model)
    assert probes is None and "no probe-layer" in note
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "probe-layer00.safetensors").write_bytes(b"not a safetensors file")
    probes, note = load_probes(tmp_path / "bad", lm.model)
    assert probes is None and "not readable" in note
    with TestClient(create_app(lm, probe_note=note)) as c:
        info = c.get("/api/info").json()
        assert "probe" not in [m["id"] for m in info["metrics"]] and "not readable" in info["probe_note"]
