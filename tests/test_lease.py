"""The per-tenant lease across servers (trainer/lease.py), on torch's own in-memory store
with a hand-driven clock: one step at a time, never from an old version (not in a fresh
store either), and a dead holder's key taken over once it stops renewing."""

from __future__ import annotations

import pytest
from torch.distributed import HashStore

from mace_sgl.trainer.lease import RENEW_S, RETRY_S, TTL_S, ClusterLease, LeaseValue


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease_of(store, rank: int, clock, world: int = 2, **served: int) -> ClusterLease:
    """Global rank `rank` of `world`, serving `served` (tenant -> version)."""
    return ClusterLease(store, rank, world, lambda: dict(served), clock)


@pytest.fixture
def pair():
    store, clock = HashStore(), Clock()
    a, b = lease_of(store, 0, clock), lease_of(store, 1, clock)
    a.renew()
    b.renew()  # both announced (they serve nothing yet)
    return a, b, clock


def test_one_holder_at_a_time_and_never_from_an_older_version(pair):
    a, b, clock = pair
    assert a.try_acquire("live", 0)
    assert not b.try_acquire("live", 0)  # a steps
    a.release("live", 1)  # a's v1 reached every peer
    clock.now += RETRY_S
    assert not b.try_acquire("live", 0)  # b has not installed v1 yet
    clock.now += RETRY_S
    assert b.try_acquire("live", 1)
    assert b.status()["held"] == ["live"] and a.status()["held"] == []
    assert a.refusals == 0 and b.refusals == 2


def test_tenants_have_keys_of_their_own(pair):
    a, b, _ = pair
    assert a.try_acquire("live", 0) and b.try_acquire("team-a", 0)


def test_a_holder_stepping_again_before_delivery_frees_the_key_on_its_last_release(pair):
    a, b, clock = pair
    assert a.try_acquire("live", 0) and a.try_acquire("live", 1)  # second step, v1 in flight
    a.release("live", 1)
    clock.now += RETRY_S
    assert not b.try_acquire("live", 2)  # still held: a's second step runs
    a.release("live", 2)
    clock.now += RETRY_S
    assert not b.try_acquire("live", 1)  # the key names v2, the newest given back
    clock.now += RETRY_S
    assert b.try_acquire("live", 2)


def test_a_dead_holders_key_is_taken_after_its_ttl_and_a_live_one_renews(pair):
    a, b, clock = pair
    assert a.try_acquire("live", 3)
    clock.now += TTL_S - 1
    a.renew()  # alive: extends its hold
    clock.now += 2
    assert not b.try_acquire("live", 3)
    clock.now += TTL_S + 1  # a stopped renewing (its server died)
    assert b.try_acquire("live", 3)
    a.renew()  # a late renewal does not take the key back
    assert a.errors == 1
    assert LeaseValue.parse(b.store.get(ClusterLease.key("live"))).holder == 1


def test_lease_values_round_trip_and_bad_ones_are_refused():
    for v in (LeaseValue(None, 0.0, 7), LeaseValue(3, 1234.5, 2)):
        assert LeaseValue.parse(v.text()) == v
    with pytest.raises(ValueError, match="not a lease value"):
        LeaseValue.parse(b"taken")


class GoneStore:
    """A store whose server died: every call fails."""

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise RuntimeError("Connection reset by peer")

        return fail


def test_steps_go_on_in_the_fresh_store_of_a_restarted_server_0():
    """Server 0 died (its store with it) while this scheduler held a key, and took
    longer than the key's TTL to come back: the scheduler's calls fail, and while a
    thread connects again (failing while server 0 is down) none goes to the dead store;
    the scheduler adopts the new connection at its next call and writes the held key into
    the fresh store with a new expiry (so another server cannot take it mid-step), and
    takes no new key for RENEW_S."""
    import threading
    import time

    clock, fresh, up = Clock(), HashStore(), threading.Event()
    tries = []

    def connect():
        tries.append(time.monotonic())
        if not up.is_set():
            raise RuntimeError("connection refused")  # server 0 not back yet
        return fresh

    first = HashStore()
    lease_of(first, 0, clock).renew()  # server 0's scheduler announced
    lease = ClusterLease(first, 1, 2, lambda: {"live": 3}, clock, connect=connect)
    assert not lease.try_acquire("live", 3)  # started with `connect`: quiet for RENEW_S
    clock.now += RENEW_S
    assert lease.try_acquire("live", 3)  # a step of live is in flight
    lease.store = GoneStore()  # server 0 dies
    assert not lease.try_acquire("other", 3)
    assert lease.errors == 1
    deadline = time.monotonic() + 10
    while len(tries) < 2:  # tried again after the first refusal
        assert time.monotonic() < deadline, "no second connection attempt"
        time.sleep(0.01)
    clock.now += RETRY_S
    assert not lease.try_acquire("other", 3)
    assert lease.errors == 1  # refused without a call to the dead store
    clock.now += TTL_S  # server 0's restart takes longer than the key's TTL
    up.set()
    while lease.store is not fresh:  # the scheduler adopts it at a call
        assert time.monotonic() < deadline, "never connected to the fresh store"
        lease.renew()
        time.sleep(0.01)
    other_server = lease_of(fresh, 0, clock, live=3)  # restarted server 0
    other_server.renew()  # announced
    assert not other_server.try_acquire("live", 3)  # held, unexpired, in the fresh store
    held = LeaseValue.parse(fresh.get(ClusterLease.key("live")))
    assert held.holder == 1 and held.expires == clock.now + TTL_S
    clock.now += RETRY_S
    assert not lease.try_acquire("other", 3)  # new keys wait for the others' holders
    clock.now += RENEW_S
    assert lease.try_acquire("other", 3)
    lease.release("live", 4)
    clock.now += RETRY_S
    assert other_server.try_acquire("live", 4)


def test_no_key_is_taken_before_every_member_announced_and_never_below_the_newest():
    """A fresh store (the first start, or server 0 restarted) has no floors: a server
    that resumed an older checkpoint (v5) must not step before the one that serves v8
    announced it, nor after."""
    store, clock = HashStore(), Clock()
    old, new = lease_of(store, 0, clock, live=5), lease_of(store, 1, clock, live=8)
    assert not old.try_acquire("live", 5)  # rank 1 has not announced yet
    assert not old.ready
    new.renew()
    clock.now += RETRY_S
    assert not old.try_acquire("live", 5)  # the floor is v8 now
    assert old.ready and LeaseValue.parse(store.get(ClusterLease.key("live"))).version == 8
    assert new.try_acquire("live", 8)
    new.release("live", 9)
    clock.now += RETRY_S
    assert old.try_acquire("live", 9)  # once it installed v9


def test_a_release_after_the_key_was_taken_still_raises_its_floor(pair):
    a, b, clock = pair
    assert a.try_acquire("live", 2)
    clock.now += TTL_S + 1  # a stalled past its TTL; b takes the key over
    assert b.try_acquire("live", 2)
    a.renew()  # a's scheduler is back (the runtime renews before it reports the step)
    assert a.status()["held"] == [] and a.errors == 1
    a.release("live", 3)  # a's step delivered v3 after all
    assert LeaseValue.parse(b.store.get(ClusterLease.key("live"))).version == 3
    b.release("live", 2)
    clock.now += RETRY_S
    assert not b.try_acquire("live", 2)  # the floor stays at v3


def test_an_idle_member_follows_server_0_into_its_fresh_store_and_announces_there():
    """A member that holds no key and has nothing to train still notices that server 0
    died (it looks at the store every RENEW_S) and announces in the fresh store: else
    the others would wait for its ready key for ever."""
    import time

    clock, first, fresh = Clock(), HashStore(), HashStore()
    idle = ClusterLease(first, 1, 2, lambda: {"live": 4}, clock, connect=lambda: fresh)
    lease_of(first, 0, clock).renew()
    idle.renew()
    assert idle.announced
    idle.store = GoneStore()  # server 0 dies; restarted, it serves `fresh`
    server_0 = lease_of(fresh, 0, clock, live=2)  # resumed an older checkpoint
    server_0.renew()
    clock.now += RENEW_S
    deadline = time.monotonic() + 10
    while idle.store is not fresh or not idle.announced:
        assert time.monotonic() < deadline, "the idle member never reached the fresh store"
        idle.renew()
        time.sleep(0.01)
    clock.now += RETRY_S
    assert not server_0.try_acquire("live", 2)  # ready, but the floor is the idle one's v4
    assert server_0.ready
    clock.now += RETRY_S
    assert server_0.try_acquire("live", 4)
