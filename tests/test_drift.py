"""benchmarks.drift over several seeds: means and 95% intervals of every metric."""

from __future__ import annotations

import pytest

from benchmarks.stats import aggregate, mean_ci95


def test_mean_ci95_uses_student_t():
    m, (lo, hi) = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0
    assert hi - m == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert m - lo == pytest.approx(hi - m)
    assert mean_ci95([0.5]) == (0.5, [0.5, 0.5])


def test_aggregate_keeps_every_metric_a_number():
    rows = [
        {"win_rate": 0.5, "clpd": 1.0, "guard_refusals": 2, "timeline": [1], "ok": True},
        {"win_rate": 0.7, "clpd": None, "guard_refusals": 4, "timeline": [2], "ok": True},
    ]
    out = aggregate(rows)
    assert out["win_rate"] == pytest.approx(0.6)
    assert out["guard_refusals"] == 3.0
    assert out["clpd"] is None  # one seed had none: no mean pretends otherwise
    assert set(out["ci95"]) == {"win_rate", "guard_refusals"}
    lo, hi = out["ci95"]["win_rate"]
    assert lo < 0.6 < hi
    assert "timeline" not in out and "ok" not in out and out["seeds"] == rows
