"""Means and 95% intervals over a few repeats (seeds of drift, repeats of colocate), and
how a benchmark without a server hands its result over (`emit`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}  # Student t, 97.5% quantile, by degrees of freedom


def mean_ci95(values: list[float]) -> tuple[float, list[float]]:
    """Mean and 95% confidence interval [low, high] of a few seeds' values."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, [m, m]
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return m, [m - half, m + half]


def aggregate(rows: list[dict[str, Any]], rows_key: str = "seeds") -> dict[str, Any]:
    """One baseline over repeats: the mean of every number (None where a repeat has none),
    `ci95` of each, and the repeats' own rows under `rows_key`."""
    out: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}
    for key, first in rows[0].items():
        if isinstance(first, bool) or not isinstance(first, int | float):
            continue
        values = [r.get(key) for r in rows]
        if any(not isinstance(v, int | float) for v in values):
            out[key] = None
            continue
        out[key], ci[key] = mean_ci95([float(v) for v in values])
    out["ci95"] = ci
    out[rows_key] = rows
    return out


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print `result` as JSON, and write it to out/results.json when `out` is given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
