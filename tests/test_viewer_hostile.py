"""Hostile viewer requests: every body gets a JSON answer with a 2xx or 4xx status, never a 500."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_server import tiny_viewer_lm  # noqa: E402

from forethought.server import Limits, create_app  # noqa: E402
from forethought.server.engine import check_session_id  # noqa: E402

ODD_VALUES = [
    None, True, 0, -1, 1, 2**63, 10**40, 1e-45, 5e-324, 1e308, -0.0, 0.5, "", "a", "\ud800", "x\udcff",
    "\x00", "abc\n", "é" * 70, [], [1], {}, {"a": 1}, "1e-45", "NaN",
]  # fmt: skip
FIELDS = {
    "/api/analyze": ["session", "prompt", "new_tokens", "temperature", "top_k", "seed"],
    "/api/append": ["session", "mode", "text", "temperature", "top_k", "seed"],
}


@pytest.fixture(scope="module")
def client():
    app = create_app(tiny_viewer_lm(), Limits(max_tokens=96, max_sessions=4))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/api/analyze", json={"session": "s1", "prompt": "Once upon a time"}).status_code == 200
        yield c


def _post(client, path: str, body) -> int:
    # Serialized by hand: lone surrogates must reach the server as JSON escapes ("\ud800"), as a browser sends them.
    data = json.dumps(body, allow_nan=True).encode()
    response = client.post(path, content=data, headers={"content-type": "application/json"})
    assert response.headers["content-type"].startswith("application/json"), response.text
    assert "error" in response.json() or response.status_code == 200
    return response.status_code


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/analyze", {"session": "s2", "prompt": "caf\ud800"}),
        ("/api/analyze", {"session": "s2", "prompt": "hi", "new_tokens": 3, "temperature": 1e-45, "seed": 1}),
        ("/api/append", {"session": "s1", "mode": "text", "text": "x\udcff"}),
        ("/api/append", {"session": "s1", "mode": "sample", "temperature": 1e-45, "seed": 2}),
    ],
)
def test_the_two_500s_of_the_issue_are_gone(client, path: str, body: dict) -> None:
    assert _post(client, path, body) in (200, 400, 422)


def test_session_id_must_match_whole() -> None:
    from forethought.errors import ForethoughtError

    assert check_session_id("abc_-09") == "abc_-09"
    for bad in ("abc\n", "abc\r\n", "", "a" * 65, "a b", "ab/c"):
        with pytest.raises(ForethoughtError):
            check_session_id(bad)


def test_random_hostile_bodies_never_500(client) -> None:
    rng = random.Random(5)
    statuses = {}
    for _ in range(150):
        path = rng.choice(sorted(FIELDS))
        if rng.random() < 0.1:
            body = rng.choice([[], "x", 1, None, {"session": {"$ne": 1}}])
        else:
            body = {"session": "s1", "prompt": "hi", "mode": rng.choice(["greedy", "sample", "text"])}
            if path == "/api/append":
                body.pop("prompt")
            for field in rng.sample(FIELDS[path], rng.randint(1, 3)):
                body[field] = rng.choice(ODD_VALUES)
        status = _post(client, path, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, body
    for query in ("session=s1&row=0&position=99999999999999999999", "session=s1%0A&row=0&position=0", "row=-1"):
        assert client.get(f"/api/cell?{query}").status_code in (400, 404, 422)
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0
