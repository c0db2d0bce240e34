"""How compute code says how far it has come, without drawing anything: it takes a `Progress` callback and calls
it with (done, total) in its own units (tokens, layers, positions); the command line draws the bar
(`forethought.commands.common.progress_bar`). None or False: nobody is watching."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]


def tell(progress: Progress | bool | None, done: int, total: int) -> None:
    """Call `progress(done, total)` when there is one (False, from callers that used to pass a flag, is none)."""
    if callable(progress):
        progress(done, total)
