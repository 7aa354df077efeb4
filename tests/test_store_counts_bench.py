"""benchmarks.store_counts on a small store: both ways count the same, and the figures
it reports are there (the timing itself is the benchmark's, not a test's)."""

from __future__ import annotations


def test_the_benchmark_compares_the_same_counts_both_ways():
    from benchmarks.store_counts import run

    got = run(rows=300, text_chars=10, repeats=2)
    assert got["rows"] == 300
    for name in ("counts", "counts_by_adapter"):
        for way in ("indexes", "rows_scan"):
            t = got[name][way]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"]
        assert got[name]["speedup"] > 0
