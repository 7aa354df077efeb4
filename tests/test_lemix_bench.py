"""benchmarks.lemix's arithmetic, without servers."""

from __future__ import annotations

from benchmarks.lemix import prefill_share, skew_summary


def test_switch_skew_counts_only_versions_every_replica_served():
    switches = {
        1: {0: 10.000, 1: 10.004},  # 4 ms apart
        2: {0: 20.000, 1: 20.050},  # 50 ms
        3: {1: 30.000},  # replica 0 never seen serving v3 (superseded between polls)
        4: {0: 40.010, 1: 40.000},  # 10 ms, replica 1 first
    }
    got = skew_summary(switches, replicas=2)
    assert got["versions"] == 3
    assert abs(got["median"] - 10.0) < 1e-6 and abs(got["max"] - 50.0) < 1e-6
    assert skew_summary({}, 2) == {"versions": 0, "median": None, "max": None}


def test_prefill_share_is_each_replicas_part_of_the_tokens_prefilled_meanwhile():
    assert prefill_share([100, 50], [400, 150]) == [0.75, 0.25]
    assert prefill_share([], [1, 2]) is None  # /v1/loads unread at the start
    assert prefill_share([5, 5], [5, 5]) is None  # nothing prefilled
