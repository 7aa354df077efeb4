"""Means and 95% intervals over a few repeats (seeds of drift, repeats of colocate), and
how a benchmark without a server hands its result over (`emit`)."""

from __future__ import annotations

import json
import math
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


def number(value: Any) -> bool:
    """Whether `value` is a finite number (not a bool: flags are not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(rows: list[dict[str, Any]], rows_key: str = "seeds") -> dict[str, Any]:
    """One baseline over repeats: for every key a repeat gives a number, the mean over the
    repeats that have one and its `ci95`, so that every metric stays a number; `partial`
    says, for the keys some repeats lack (a phase with no scored prompt has no CLPD),
    how many repeats the mean is over. The repeats' own rows go under `rows_key`."""
    out: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}
    partial: dict[str, int] = {}
    for key in dict.fromkeys(k for r in rows for k in r):  # every repeat's, in order
        values = [float(r[key]) for r in rows if number(r.get(key))]
        if not values:
            continue
        out[key], ci[key] = mean_ci95(values)
        if len(values) < len(rows):
            partial[key] = len(values)
    out["ci95"] = ci
    out["partial"] = partial
    out[rows_key] = rows
    return out


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print `result` as JSON, and write it to out/results.json when `out` is given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
