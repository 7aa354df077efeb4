"""The load generator's summary: failures, empty answers and SLO attainment kept apart."""

from __future__ import annotations

from benchmarks.loadgen import RequestResult, summarize


def test_failed_and_empty_requests_are_counted_apart():
    fast = RequestResult(sent=0.0, ttft=0.1, gaps=[0.05, 0.05], e2e=0.2, tokens=3)
    slow = RequestResult(sent=0.0, ttft=3.0, gaps=[0.05], e2e=3.05, tokens=2)
    empty_in_time = RequestResult(sent=0.0, e2e=0.3)
    empty_late = RequestResult(sent=0.0, e2e=5.0)
    failed = RequestResult(sent=0.0, error="HTTPError: 503 Server Error")
    s = summarize([fast, slow, empty_in_time, empty_late, failed], 1000.0, 100.0, wall_s=10.0)
    assert s["requests"] == 5
    assert s["errors"] == 1 and s["error_samples"] == ["HTTPError: 503 Server Error"]
    assert s["empty"] == 2
    # met: `fast`, and the empty answer that finished inside the TTFT target
    assert s["slo_attainment"] == 2 / 5
    assert s["throughput_tok_s"] == 5 / 10.0
    assert s["ttft_p99_ms"] == 3000.0 and s["tbt_p99_ms"] == 50.0
