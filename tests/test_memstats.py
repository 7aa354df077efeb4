"""Process memory attribution (mace_sgl/memstats.py) and the rate-limited malloc_trim."""

from __future__ import annotations

import pytest

from mace_sgl import memstats


def test_snapshot_sets_rss_against_the_heap():
    snap = memstats.snapshot()
    assert snap["rss_mb"] > 0
    assert snap["python_blocks"] > 0 and snap["gc_objects"] > 0
    if memstats.heap() is None:
        pytest.skip("no glibc >= 2.33 here")
    assert snap["heap_in_use_mb"] > 0 and snap["heap_free_mb"] >= 0


def test_heap_in_use_follows_allocations():
    if memstats.heap() is None:
        pytest.skip("no glibc >= 2.33 here")
    before = memstats.heap()["heap_in_use_mb"]
    blob = bytearray(64 * 2**20)  # 64 MB from malloc (mmapped: hblkhd)
    during = memstats.heap()["heap_in_use_mb"]
    del blob
    after = memstats.heap()["heap_in_use_mb"]
    assert during - before > 60
    assert during - after > 60


def test_trimmer_is_rate_limited_and_off_at_zero():
    off = memstats.Trimmer(0.0)
    assert not off.maybe_trim(now=1e9)
    t = memstats.Trimmer(30.0)
    start = t.last
    assert not t.maybe_trim(now=start + 10)
    if memstats.heap() is None:
        pytest.skip("no glibc >= 2.33 here")
    assert t.maybe_trim(now=start + 31)
    assert not t.maybe_trim(now=start + 40)
    assert t.maybe_trim(now=start + 62)
    assert t.status()["trims"] == 2 and t.status()["freed_mb"] >= 0
