"""A bounded load test on 127.0.0.1: concurrent clients, each with its own session, never see each other's data."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_server import LiveServer, tiny_viewer_lm  # noqa: E402

from forethought.server import Limits, create_app  # noqa: E402

CLIENTS = 8
REQUESTS = 25  # per client
TIMEOUT_S = 30  # per request
WORDS = ["fox", "river", "forest", "dog", "sun", "time", "little", "quick"]


def run_client(base_url: str, index: int) -> tuple[list[float], list[str]]:
    """One user: analyze a prompt of its own, then appends and cell clicks; every answer checked against it."""
    session = f"load-{index}"
    prompt = f"Client {index} saw a {WORDS[index % len(WORDS)]} and a {WORDS[(3 * index + 1) % len(WORDS)]}"
    latencies: list[float] = []
    problems: list[str] = []
    ids: list[int] = []
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as http:

        def call(method: str, path: str, **kw) -> dict | None:
            started = time.perf_counter()
            try:
                r = http.request(method, path, **kw)
            except httpx.HTTPError as e:
                problems.append(f"{path}: {type(e).__name__}: {e}")
                return None
            latencies.append(time.perf_counter() - started)
            if r.status_code != 200:
                problems.append(f"{path}: HTTP {r.status_code} {r.text[:200]}")
                return None
            data = r.json()
            if data.get("session") != session:
                problems.append(f"{path}: answered for session {data.get('session')!r}, not {session!r}")
            return data

        for step in range(REQUESTS):
            if step % 10 == 0:  # (re)start the session on this client's own prompt
                data = call("POST", "/api/analyze", json={"session": session, "prompt": prompt, "new_tokens": 2})
                if data is not None:
                    ids = [t["id"] for t in data["tokens"]]
                    text = "".join(t["text"] for t in data["tokens"][: data["n_prompt"]])
                    if text != prompt:
                        problems.append(f"analyze: grid is for {text!r}, not {prompt!r}")
            elif step % 2:
                data = call("POST", "/api/append", json={"session": session, "mode": "greedy"})
                if data is not None:
                    if data["start"] != len(ids):
                        problems.append(f"append: started at {data['start']}, this session holds {len(ids)}")
                    ids += [t["id"] for t in data["tokens"]]
                    if data["unchanged"]["max_abs_diff"] > 1e-4:
                        problems.append(f"append: earlier columns changed by {data['unchanged']['max_abs_diff']}")
            else:
                position = (step * 7 + index) % len(ids)
                params = {"session": session, "row": step % 3, "position": position}
                data = call("GET", "/api/cell", params=params)
                if data is not None and data["token"]["id"] != ids[position]:
                    problems.append(f"cell: position {position} is token {data['token']['id']}, not {ids[position]}")
    return latencies, problems


def test_concurrent_sessions_do_not_mix(capsys):
    app = create_app(tiny_viewer_lm(), Limits(max_tokens=128, max_sessions=2 * CLIENTS))
    with LiveServer(app) as base_url:
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda i: run_client(base_url, i), range(CLIENTS)))
        wall = time.perf_counter() - started
    latencies = sorted(x for lat, _ in results for x in lat)
    problems = [p for _, probs in results for p in probs]
    q = statistics.quantiles(latencies, n=20)
    with capsys.disabled():
        print(
            f"\nviewer load: {CLIENTS * REQUESTS} requests, concurrency {CLIENTS}, errors {len(problems)}, "
            f"p50 {1e3 * statistics.median(latencies):.1f} ms, p95 {1e3 * q[18]:.1f} ms, "
            f"{len(latencies) / wall:.0f} req/s, wall {wall:.1f} s"
        )
    assert problems == []
    assert len(latencies) == CLIENTS * REQUESTS
    assert wall < 90
