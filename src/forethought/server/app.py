"""The viewer's HTTP layer: JSON endpoints over `ViewerEngine`, and the static page.

Every answer is JSON; every failure is `{"error": "..."}` with a 4xx status for bad input and 500 for
a bug (never an HTML traceback). Bodies are capped before they are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from forethought.errors import ForethoughtError
from forethought.server.engine import Limits, ViewerEngine, ViewerError

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("forethought.server")


class JSON(Response):
    """Compact JSON, rendered once with no per-item encoder pass (a grid is tens of thousands of floats)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


def error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status)


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session: str = Field(max_length=64)
    prompt: str
    new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0, le=10)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    speculative: Literal["lookup", "heads", "auto"] | None = None


class AppendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session: str = Field(max_length=64)
    mode: Literal["greedy", "sample", "text"] = "greedy"
    text: str | None = None
    temperature: float | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes, declared or streamed, with a JSON 413."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if not 0 <= size <= self.limit:
                await error(413, f"request body over {self.limit} bytes")(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # An HTTPException passes through FastAPI's body parsing untouched and becomes a JSON 413.
                    raise _BodyTooLarge(413, f"request body over {self.limit} bytes")
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await error(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    pass


def _describe_validation(exc: RequestValidationError) -> tuple[int, str]:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return 400, f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg', ''))}"
        where = ".".join(str(part) for part in err.get("loc", ()) if part not in ("body", "query"))
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return 422, "; ".join(problems) or "invalid request"


def create_app(lm, limits: Limits | None = None, probes=None, probe_note: str = "") -> FastAPI:
    """The viewer for one loaded model (anything with .model, .tokenizer and .name, e.g. a LoadedModel)."""
    limits = limits or Limits()
    engine = ViewerEngine(lm, limits, probes)
    app = FastAPI(title="forethought viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return error(*_describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ForethoughtError)
    async def on_user_error(request: Request, exc: ForethoughtError):
        return error(exc.status if isinstance(exc, ViewerError) else 400, str(exc))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("viewer request failed: %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}): {exc}")

    # Endpoints are plain functions: FastAPI runs them on worker threads, and the engine's lock lets
    # one model forward run at a time.
    @app.get("/api/info")
    def info() -> JSON:
        return JSON(engine.info() | {"probe_note": probe_note})

    @app.post("/api/analyze")
    def analyze(body: AnalyzeRequest) -> JSON:
        return JSON(
            engine.analyze(
                body.session, body.prompt, body.new_tokens, body.temperature, body.top_k, body.seed, body.speculative
            )
        )

    @app.post("/api/append")
    def append(body: AppendRequest) -> JSON:
        return JSON(engine.append(body.session, body.mode, body.text, body.temperature, body.top_k, body.seed))

    @app.get("/api/cell")
    def cell(
        session: str = Query(max_length=64),
        row: int = Query(ge=0),
        position: int = Query(ge=0),
        k: int = Query(10, ge=1),
    ) -> JSON:
        return JSON(engine.cell(session, row, position, k))

    @app.get("/api/health")
    def health() -> JSON:
        return JSON({"ok": True, "sessions": len(engine.sessions), "evicted": engine.sessions.evicted})

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app
