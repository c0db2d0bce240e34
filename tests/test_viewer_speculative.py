"""The viewer's speculative mode: the same tokens as plain greedy, with the drafted-and-accepted ones marked."""

from fastapi.testclient import TestClient
from test_server import tiny_viewer_lm

from forethought.server.app import create_app
from forethought.server.engine import Limits


def test_analyze_with_speculative_lookup_marks_accepted_drafts():
    lm = tiny_viewer_lm()
    app = create_app(lm, Limits(max_tokens=96, max_new_tokens=40, max_sessions=3, max_body_bytes=4096))
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"
    with TestClient(app, raise_server_exceptions=False) as client:
        plain = client.post("/api/analyze", json={"session": "p", "prompt": prompt, "new_tokens": 30}).json()
        body = {"session": "s", "prompt": prompt, "new_tokens": 30, "speculative": "lookup"}
        spec = client.post("/api/analyze", json=body).json()
        assert [t["id"] for t in spec["tokens"]] == [t["id"] for t in plain["tokens"]]
        assert spec["cache"] == plain["cache"] and spec["metrics"]["norm"] == plain["metrics"]["norm"]
        sp = spec["speculative"]
        assert len(sp["origins"]) == spec["generated"] and set(sp["origins"]) <= {"draft", "model"}
        assert sp["origins"].count("model") == sp["forwards"] + 1  # one per verifying forward, plus the first
        assert plain["speculative"] is None
        bad = client.post("/api/analyze", json=body | {"speculative": "medusa"})
        assert bad.status_code == 422
        # A tiny model ships no heads: a clear 4xx, not a 500.
        r = client.post("/api/analyze", json=body | {"speculative": "heads"})
        assert 400 <= r.status_code < 500 and "heads" in r.json()["error"]
