"""How numbers read, everywhere they are shown (the CLI, the report, the plots): sizes in decimal units, shares as
percentages, intervals as `estimate [low, high]`, tokens shortened for a cell. One place, so the same number
never reads two ways."""

from __future__ import annotations

import json
import math

MISSING = "–"  # a value that was not measured


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def size(n: float | None) -> str:
    """Bytes in decimal units, three significant digits: 1.23 MB (a KV cache of 1.2e6 bytes is 1.2 MB)."""
    if _missing(n):
        return MISSING
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def percent(x: float | None, digits: int = 1, unit: str = "%", sign: bool = False) -> str:
    """A share in [0, 1] as a percentage: 0.123 -> 12.3% (unit "" where a column header already says %;
    `sign` for a difference, in points: +1.2)."""
    if _missing(x):
        return MISSING
    return f"{100 * x:{'+' if sign else ''}.{digits}f}{unit}"


def interval(iv, digits: int = 1, scale: float = 100.0, sign: bool = False, unit: str = "") -> str:
    """An estimate with its 95% interval, `12.3 [11.0, 13.5]`; `iv` has .estimate, .low, .high. The default
    scale reads a share in percent (unit "%" to print the sign on each number, `sign` for a difference in
    points: +1.2 [-0.3, +2.6]); scale=1 for nats or ratios."""
    if iv is None:
        return MISSING
    f = f"{'+' if sign else ''}.{digits}f"
    return f"{scale * iv.estimate:{f}}{unit} [{scale * iv.low:{f}}{unit}, {scale * iv.high:{f}}{unit}]"


def bounds(pair: list[float] | None) -> str:
    """Just the interval of a [low, high] pair, three significant digits: [0.12, 0.34]."""
    return "" if not pair else f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def plus_minus(iv: dict, scale: float = 1.0, digits: int = 3) -> str:
    """A mean over seeds with its 95% half-width, `0.512 ± 0.031`, from {"mean": m, "ci95": h} (the
    architectures lab's form); the mean alone when the half-width is unknown (one seed)."""
    mean, half = iv["mean"] * scale, iv["ci95"] * scale
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def number(value) -> str:
    """A number as a person reads it: integers with thousands separators, floats to four significant digits
    (three, in exponent form, when very small or large); anything else as JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return json.dumps(value, default=str)


def short_token(token: str, width: int = 7) -> str:
    """A token for a narrow cell: whitespace made visible, cut to `width` with an ellipsis."""
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    if token.strip() == "":
        token = "␣" * len(token) if token else "∅"
    return token if len(token) <= width else token[: width - 1] + "…"
