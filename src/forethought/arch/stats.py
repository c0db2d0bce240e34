"""Intervals over seeds, shared by the comparison's table and its sweeps."""

from __future__ import annotations

import math
import statistics

# Student-t 97.5% quantiles for a 95% interval of a mean over n seeds (df = n - 1).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval half-width over seeds (NaN width for a single seed)."""
    mean = statistics.fmean(values)
    n = len(values)
    half = _T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "n": n, "values": values}
