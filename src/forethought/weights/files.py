"""Reading small user-supplied files, with errors that name the file instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

from forethought.errors import ForethoughtError


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or an integer of 4300+ digits
        raise ForethoughtError(f"{path}: not readable JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise ForethoughtError(f"{path}: not readable JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ForethoughtError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
