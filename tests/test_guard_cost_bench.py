"""benchmarks.guard_cost on the tiny model: both ways check the same candidate, and the
figures it reports are there (the timing itself is the benchmark's, not a test's)."""

from __future__ import annotations

from pathlib import Path


def test_the_benchmark_checks_the_candidate_both_ways(tiny_model_dir: Path):
    from benchmarks.guard_cost import run

    got = run(str(tiny_model_dir), steps=3, repeats=2, dtype="float32", lr=1e-2)
    assert got["steps"] == 3 and got["repeats"] == 2 and got["lr"] == 1e-2
    for way in ("unmerged", "merged"):
        for what in ("check_s", "largest_slice_s"):
            t = got[way][what]
            assert 0 < t["min"] <= t["median"] <= t["max"]
    assert got["merged"]["merged_decode"] and not got["unmerged"]["merged_decode"]
    assert got["speedup"] > 0 and got["merge_s"] > 0
    # the adapter moved the model, so agreeing is a real comparison; float32: the merged
    # weights round like the unmerged sum, so the answers agree
    assert got["kl_per_token"]["merged"] > 1e-4
    assert got["answers"] > 0 and got["answers_that_differ"] == 0
    assert got["kl_max_abs_diff"] < 1e-4
