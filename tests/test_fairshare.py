"""The weighted fair share of optimizer steps between tenants (policy/fairshare.py) and
the sidecar's turn-taking between tenants' feedback (sidecar/store.py pick_next)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mace_sgl.policy.fairshare import TENANT_WEIGHTS, FairShare
from sidecar import store


def run(fair: FairShare, backlog_of, steps: int) -> list[str]:
    picked = []
    for _ in range(steps):
        name = fair.pick(backlog_of())
        fair.charge(name)
        picked.append(name)
    return picked


def test_priority_orders_tenants_within_the_window():
    fair = FairShare(window=1.0)
    # b's pairs matter more: it goes first, and the window still makes it alternate.
    picked = run(fair, lambda: {"a": 1.0, "b": 5.0}, 6)
    assert picked[0] == "b"
    assert picked.count("a") == picked.count("b") == 3


def test_a_flooding_tenant_cannot_starve_a_waiting_one():
    fair = FairShare(window=1.0)
    # The flood always has the highest priority (older, higher loss) and always waits.
    picked = run(fair, lambda: {"flood": 100.0, "quiet": 0.0}, 40)
    assert picked.count("quiet") >= 19
    # With window 1 the flood never gets two steps in a row while quiet waits.
    longest = max(len(r) for r in "".join("f" if p == "flood" else "q" for p in picked).split("q"))
    assert longest <= 1


def test_weights_share_steps_in_proportion():
    fair = FairShare(window=1.0)
    fair.set_weight("big", 3.0)
    picked = run(fair, lambda: {"big": 0.0, "small": 0.0}, 400)
    assert picked.count("big") / picked.count("small") == pytest.approx(3.0, rel=0.05)


def test_idle_time_banks_no_credit():
    fair = FairShare(window=1.0)
    run(fair, lambda: {"busy": 0.0}, 50)  # "late" has nothing queued meanwhile
    picked = run(fair, lambda: {"busy": 0.0, "late": 1.0}, 10)
    # late starts level with busy: it alternates instead of taking ten steps in a row.
    assert picked.count("late") <= 6 and picked.count("busy") >= 4


def test_nothing_queued_picks_nobody_and_forget_drops_history():
    fair = FairShare()
    assert fair.pick({}) is None
    fair.charge("gone")
    fair.forget("gone")
    assert "gone" not in fair.status()
    with pytest.raises(ValueError):
        fair.set_weight("x", 0.0)


def pair(i: int, adapter: str) -> dict:
    return {"prompt": f"p{i}", "chosen": "c", "rejected": "r", "adapter": adapter, "weight": 1.0}


def test_sidecar_gives_every_tenant_turns_under_a_flood(tmp_path: Path):
    conn = store.connect(tmp_path / "f.sqlite3")
    for name in ("flood", "quiet"):
        store.add_tenant(conn, name)
    store.add_feedback(conn, [pair(i, "flood") for i in range(50)])
    quiet = store.add_feedback(conn, [pair(i, "quiet") for i in range(2)])
    rows = store.pick_next(conn, ["flood", "quiet"], 4, "s1")
    assert [r.adapter for r in rows].count("quiet") == 2
    assert {r.id for r in rows} >= set(quiet)


def test_sidecar_share_is_even_one_sample_at_a_time_with_idle_tenants(tmp_path: Path):
    # A trainer asks for one sample per Ready. Tenants with nothing to train (here the
    # first two in the list) must not hand their turn to their neighbour: in a run of
    # the tenants benchmark, a rotation over all tenants gave t0 11 steps to others' 4.
    conn = store.connect(tmp_path / "f.sqlite3")
    names = ["control", "live", "t0", "t1", "t2", "heavy"]
    for name in names:
        store.add_tenant(conn, name)
    for name in names[2:]:
        store.add_feedback(conn, [pair(i, name) for i in range(20)])
    share = FairShare()
    share.set_weight("heavy", 2.0)
    got: dict[str, int] = {}
    for k in range(25):
        (row,) = store.pick_next(conn, names, 1, f"s{k}", share=share)
        got[row.adapter] = got.get(row.adapter, 0) + 1
    assert got == {"t0": 5, "t1": 5, "t2": 5, "heavy": 10}


def test_tenants_are_created_retired_and_brought_back(tmp_path: Path):
    conn = store.connect(tmp_path / "f.sqlite3")
    assert store.add_tenant(conn, "a") is True
    assert store.add_tenant(conn, "a") is False  # exists
    assert store.retire_tenant(conn, "a") is True
    assert store.retire_tenant(conn, "a") is False
    assert not store.has_tenant(conn, "a") and store.tenants(conn) == []
    assert store.add_tenant(conn, "a", weight=2.0) is True
    (t,) = store.tenants(conn)
    assert (t.name, t.weight) == ("a", 2.0)


def test_weights_from_outside_the_range_are_clamped_into_it(tmp_path):
    """A weight the route refuses now (Infinity, a denormal) may still come from a store
    written before the range or from a peer: the fair share and the store's tenants clamp
    it, so virtual times stay finite and one tenant cannot take every step."""
    fair = FairShare()
    fair.set_weight("huge", float("inf"))
    fair.set_weight("tiny", 1e-320)
    assert fair.weights == {"huge": TENANT_WEIGHTS[1], "tiny": TENANT_WEIGHTS[0]}
    for _ in range(3):
        fair.charge(fair.pick({"huge": 1.0, "tiny": 1.0}))
    assert all(math.isfinite(v) for v in fair.vtime.values())
    conn = store.connect(tmp_path / "feedback.sqlite3")
    store.add_tenant(conn, "old", float("inf"))  # as the route took it before the range
    assert [t.weight for t in store.tenants(conn) if t.name == "old"] == [TENANT_WEIGHTS[1]]
    conn.close()
