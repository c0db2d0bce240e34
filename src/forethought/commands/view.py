"""`forethought view`: the local web viewer (token x layer grid in the browser)."""

from __future__ import annotations

import socket
import threading
import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from forethought.commands.common import DEFAULT_MODEL, DeviceOpt, DtypeOpt, ModelOpt, app, err_console, load
from forethought.errors import ForethoughtError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ForethoughtError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None


@app.command()
def view(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default: local use only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    probes: Annotated[
        Path | None, typer.Option("--probes", help="Folder of future-token probes (from forethought probe).")
    ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser tab.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per session (prompt + new).")] = 512,
    max_sessions: Annotated[int, typer.Option("--max-sessions", help="Sessions kept (least recent dropped).")] = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Browse the token x layer grid of a model in the browser: logit lens, attention, KV cache, appends."""
    try:
        import uvicorn

        from forethought.server import Limits, create_app
        from forethought.server.probes import load_probes
    except ImportError as e:
        raise ForethoughtError(f"the viewer needs its extra ({e.name} is missing): pip install -e '.[view]'") from None
    if not 1 <= port <= 65535:
        raise ForethoughtError(f"--port must be in 1..65535, got {port}")
    if max_tokens < 2 or max_sessions < 1:
        raise ForethoughtError("--max-tokens must be >= 2 and --max-sessions >= 1")
    _check_port(host, port)
    lm = load(model, device, dtype)
    probe_set, note = (None, "")
    if probes is not None:
        probe_set, note = load_probes(probes, lm.model)
        if probe_set is None:
            err_console.print(f"[yellow]future probes left out: {note}[/yellow]", soft_wrap=True)
    limits = Limits(max_tokens=max_tokens, max_sessions=max_sessions)
    web = create_app(lm, limits, probes=probe_set, probe_note=note)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/"
    if host not in LOOPBACK:
        err_console.print(f"[yellow]listening on {host}: anyone who can reach this address can run the model[/yellow]")
    err_console.print(f"forethought viewer for {lm.name} at {url}  (Ctrl-C to stop)", markup=False)
    if not no_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(web, host=host, port=port, log_level="warning", access_log=False)
