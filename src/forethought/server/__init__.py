"""The local web viewer: a token x layer grid of one loaded model, served to a browser.

`engine` does the work (one model, per-session KV caches, grid metrics, cell details); `app` is the
thin FastAPI layer over it; `static/` is the page (plain HTML/CSS/JS, no build step).
"""

from forethought.server.engine import Limits, ViewerEngine

__all__ = ["Limits", "ViewerEngine", "create_app"]


def create_app(*args, **kwargs):
    """FastAPI app over a LoadedModel-like object (imported lazily: fastapi is an optional dependency)."""
    from forethought.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)
