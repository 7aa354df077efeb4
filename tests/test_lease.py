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


def test_a_purged_tenant_created_again_steps_from_version_0_on_a_key_of_its_own(pair):
    """A purge (DELETE ...?purge=true, through the group's tenant log) deletes the
    tenant's checkpoints: created again it starts at v0, below the old key's floor. The
    purge moves tenants created after it to a new generation of keys; a tenant created
    before it (on a server that has not retired it yet) keeps the old one. A retire
    without purge keeps the key (created again, the tenant resumes its checkpoint)."""
    from mace_sgl.plugin import tenant_log

    a, b, clock = pair
    store = a.store
    for lease in (a, b):
        lease.created("t")
    assert a.try_acquire("t", 5)
    a.release("t", 6)
    a.retire("t", 6)  # retired without purge and created again: it resumed v6
    a.created("t")
    b.retire("t", 6)
    b.created("t")
    clock.now += RETRY_S
    assert not b.try_acquire("t", 0)  # a v0 (no checkpoint) stays below the floor
    tenant_log.append(store, tenant_log.TenantOp("retire", "t", purge=True, origin=0))
    clock.now += RETRY_S
    assert b.try_acquire("t", 6)  # b has not retired it yet: the old key, as before
    b.release("t", 7)
    for lease, served in ((a, 6), (b, 7)):  # the purge reaches both; t created again
        lease.retire("t", served)
        lease.created("t")
    clock.now += RETRY_S
    assert b.try_acquire("t", 0)  # v0 steps, on the new generation's key
    old = LeaseValue.parse(store.get(ClusterLease.key("t")))
    assert old.holder is None and old.version == 7  # the old key, untouched since
    assert LeaseValue.parse(store.get(ClusterLease.key("t", 1))).holder == 1
    b.release("t", 1)
    clock.now += RETRY_S
    assert not a.try_acquire("t", 0)  # the new key's floor holds as any other
    clock.now += RETRY_S
    assert a.try_acquire("t", 1)


def test_a_tenant_retired_mid_step_gives_its_key_back_and_its_late_report_none():
    """runtime._sync_tenants and _report on a stand-in trainer: a tenant retired while
    its step runs (the step is dropped, never reported) gives its key back at once,
    instead of renewing it for ever; the step's late report (a version delivered to
    the peers after the retire) releases nothing of the tenant created again since."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from mace_sgl.policy.fairshare import FairShare
    from mace_sgl.trainer.runtime import MaceTrainer

    store, clock = HashStore(), Clock()
    lease, other = lease_of(store, 0, clock, t=3), lease_of(store, 1, clock, t=3)
    lease.renew()
    other.renew()
    assert lease.try_acquire("t", 3)  # a step of t runs here
    loaded = {"t"}  # the names SGLang holds an adapter of

    def tenant_at(version):
        return SimpleNamespace(
            name="t", version=version, held_back=[],
            publisher=SimpleNamespace(loaded=lambda: "t" in loaded),
        )  # fmt: skip

    retired = tenant_at(3)
    registry: dict = {"t": retired}

    def sync():
        registry.pop("t")
        return [], ["t"]

    fake = SimpleNamespace(
        synced_at=float("-inf"),
        tenants=SimpleNamespace(tenants=registry, sync=sync, active=retired),
        streams=SimpleNamespace(training_work=nullcontext),
        fair=FairShare(),
        board=SimpleNamespace(drop=lambda keep: [], step_job=None),
        lease=lease,
        link=SimpleNamespace(report=lambda *args: None, release=lambda ids: None,
                             required={"t": 3}),
        unpublished={},
        unreported=set(),
    )  # fmt: skip
    fake._live = lambda t: MaceTrainer._live(fake, t)
    fake._release_retired = lambda *a: MaceTrainer._release_retired(fake, *a)
    MaceTrainer._sync_tenants(fake)
    assert lease.status()["held"] == [] and fake.link.required == {}
    clock.now += RETRY_S
    assert other.try_acquire("t", 3)  # given back, not held until the TTL ran out
    other.release("t", 3)
    new = registry["t"] = tenant_at(3)  # created again (resumed v3)
    clock.now += RETRY_S
    assert lease.try_acquire("t", 3)  # a step of the new tenant
    reported = []
    fake.link.report = lambda *args: reported.append(args)
    pair = SimpleNamespace(sample_id=7)
    MaceTrainer._report(fake, retired, [pair], {7: 0.5}, 4)  # the old step's late report
    assert reported == [(7, 0.5, 4, "")]  # no version for the sidecar to take as t's
    assert lease.status()["held"] == ["t"]
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))).holder == 0
    # Retired again: SGLang unloaded it, the registry still has it (its sync runs every
    # SYNC_EVERY_S). The step's report names no version and releases nothing; the
    # retire that follows gives the key back.
    loaded.clear()
    MaceTrainer._report(fake, new, [pair], {7: 0.25}, 4)
    assert reported[-1] == (7, 0.25, 4, "") and lease.status()["held"] == ["t"]
    assert fake.synced_at == float("-inf")  # the registry looks at SGLang at the next poll
    MaceTrainer._sync_tenants(fake)
    assert lease.status()["held"] == []
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))).holder is None


def test_a_store_that_stops_answering_holds_the_scheduler_thread_at_most_call_s():
    """Server 0's host vanishes without closing connections (the store's connection
    answers nothing; TCP would give up after many minutes): a lease call, on the
    scheduler thread, gives up after its deadline and counts as a dead store; a thread
    connects again, and steps go on once the store is reachable."""
    import datetime
    import time

    from torch.distributed import TCPStore

    from tests.blackhole import BlackHole
    from tests.waits import wait_until

    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    proxy = BlackHole(master.port)
    try:
        client = TCPStore("127.0.0.1", proxy.port, is_master=False,
                          timeout=datetime.timedelta(seconds=120))  # fmt: skip
        direct = lambda: TCPStore("127.0.0.1", master.port, is_master=False,  # noqa: E731
                                  timeout=datetime.timedelta(seconds=5))  # fmt: skip
        clock = Clock()
        lease = ClusterLease(client, 0, 1, lambda: {"t": 1}, clock, connect=direct)
        clock.now += RENEW_S  # quiet after its start (it may connect again)
        assert lease.try_acquire("t", 1)
        lease.release("t", 2)
        lease._store.seconds = 1.0  # the deadline of the calls from here on
        proxy.silence()
        started = time.monotonic()
        assert not lease.try_acquire("t", 2)
        waited = time.monotonic() - started
        assert waited < 1.0 + 5.0, f"the scheduler thread waited {waited:.1f} s"
        assert lease.errors == 1
        wait_until(lambda: lease.renew() or lease.store is not client, 30,
                   "the lease adopted a new connection")  # fmt: skip
        clock.now += RENEW_S
        assert lease.try_acquire("t", 2)  # the floor the release wrote stands
    finally:
        proxy.close()


def created(lease: ClusterLease, name: str, kept=None) -> tuple[str, int]:
    """lease.created, and the (epoch, generation) the tenant steps under."""
    told = []
    lease.created(name, kept, lambda *got: told.append(got))
    assert len(told) == (kept is None)  # told only what it did not know
    return lease.epoch, lease.generations[name]


def test_a_tenant_resumed_after_a_restart_keeps_the_generation_it_was_created_under(pair):
    """A server restarted while a purge of its tenant went on elsewhere resumes its old
    tenant before it applies the purge: it steps (and announces) it under the
    generation kept at its creation, not the store's new one, where the tenant created
    again elsewhere steps from v0. A generation kept in another store (server 0 restarted
    since) is 0 there."""
    from mace_sgl.plugin import tenant_log

    a, b, clock = pair
    store = a.store
    kept = created(a, "t")
    assert kept == (a.epoch, 0) and created(b, "t") == kept
    tenant_log.append(store, tenant_log.TenantOp("retire", "t", purge=True, origin=1))
    b.retire("t", 0)
    assert created(b, "t") == (a.epoch, 1)  # created again after the purge
    restarted = lease_of(store, 0, clock, t=5)  # a, restarted: its old t resumed v5
    assert created(restarted, "t", kept) == kept
    restarted.renew()  # announces v5 on the old key
    clock.now += RETRY_S
    assert b.try_acquire("t", 0)
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))).version == 5
    other_store = lease_of(HashStore(), 0, clock)
    assert created(other_store, "t", ("an-earlier-store", 3)) == (other_store.epoch, 0)


def test_a_tenant_created_while_the_store_is_gone_fixes_its_generation_when_it_is_back():
    """A server that starts (or creates a tenant) while server 0's store does not
    answer: a resumed tenant steps under the generation kept in its directory, not the
    one a purge raised meanwhile (the tenant created again elsewhere steps under that);
    a new tenant reads the store's when it is back, and is told it for its directory."""
    import threading
    import time

    from mace_sgl.plugin import tenant_log

    store, clock, up = HashStore(), Clock(), threading.Event()
    first = lease_of(store, 0, clock)
    first.renew()  # the store's epoch; server 0 announced
    kept = created(first, "old")  # "old" was created under generation 0 ...
    for name in ("old", "new"):  # ... and both purged since
        tenant_log.append(store, tenant_log.TenantOp("retire", name, purge=True, origin=0))

    def connect():
        if not up.is_set():
            raise RuntimeError("connection refused")
        return store

    lease = ClusterLease(GoneStore(), 1, 2, lambda: {}, clock, connect=connect)
    told = []
    lease.created("old", kept, lambda *got: told.append(("old", got)))
    lease.created("new", None, lambda *got: told.append(("new", got)))
    assert lease.generations == {} and lease.errors == 1  # nothing read yet
    up.set()
    clock.now += RENEW_S
    deadline = time.monotonic() + 10
    while not lease.try_acquire("old", 0):
        assert time.monotonic() < deadline, "never stepped in the store once it was back"
        clock.now += RENEW_S
        time.sleep(0.01)
    assert lease.generations == {"old": 0}
    assert LeaseValue.parse(store.get(ClusterLease.key("old"))).holder == 1
    assert lease.try_acquire("new", 0)
    assert lease.generations["new"] == 1 and told == [("new", (first.epoch, 1))]
    assert LeaseValue.parse(store.get(ClusterLease.key("new", 1))).holder == 1


def test_a_release_kept_for_an_old_generation_frees_its_key_while_the_new_one_is_held(
    pair, monkeypatch
):
    """A release that could not be written (contended) is written at the next renewal.
    If a purge and the tenant's creation came meanwhile, and the new tenant holds its
    own generation's key, the old key is freed all the same (not held until TTL_S, which
    would stop a server that still steps the old tenant)."""
    from mace_sgl.plugin import tenant_log
    from mace_sgl.trainer import lease as lease_module

    a, _, clock = pair
    store = a.store
    created(a, "t")
    assert a.try_acquire("t", 0)
    monkeypatch.setattr(lease_module, "CAS_TRIES", 0)  # every compare-and-set contended
    a.release("t", 1)
    monkeypatch.undo()
    assert a.unwritten == {("t", 0): 1}
    tenant_log.append(store, tenant_log.TenantOp("retire", "t", purge=True, origin=0))
    a.retire("t", 1)
    assert created(a, "t") == (a.epoch, 1)
    clock.now += RETRY_S
    assert a.try_acquire("t", 0)  # the new tenant's step, on its own key
    clock.now += RENEW_S
    a.renew()
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))) == LeaseValue(None, 0.0, 1)
    assert LeaseValue.parse(store.get(ClusterLease.key("t", 1))).holder == 0


def test_a_key_this_rank_holds_without_knowing_it_is_free_to_it(pair):
    """A take whose answer came after its deadline (or a step of this rank's process
    before it restarted) left the key held by this rank: it takes it again at once,
    instead of blocking the tenant everywhere for TTL_S."""
    a, b, clock = pair
    a.store.set(ClusterLease.key("u"), LeaseValue(0, clock.now + TTL_S, 0).text())
    assert not b.try_acquire("u", 0)
    assert a.try_acquire("u", 0)


def test_releases_kept_while_the_store_was_gone_are_written_when_the_same_store_is_back():
    """A connection lost and made again to the same store (the same epoch): the release
    made meanwhile is written there (else the key stayed held until its TTL)."""
    import time

    store, clock = HashStore(), Clock()
    lease = ClusterLease(store, 0, 1, lambda: {}, clock, connect=lambda: store)
    clock.now += RENEW_S
    assert lease.try_acquire("t", 0)
    lease.store = GoneStore()
    lease.release("t", 1)  # kept: the store is gone
    deadline = time.monotonic() + 10
    while lease.store is not store:
        assert time.monotonic() < deadline, "never connected again"
        lease.renew()
        time.sleep(0.01)
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))) == LeaseValue(None, 0.0, 1)


class LateRelease:
    """The connect thread's lock, let go of `late_s` after it is released: the scheduler
    thread may adopt the new connection in between (a window of microseconds otherwise)."""

    def __init__(self, late_s: float) -> None:
        import threading

        self.lock, self.late_s = threading.Lock(), late_s

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.lock.acquire(blocking, timeout)

    def release(self) -> None:
        import time

        time.sleep(self.late_s)
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()


def test_a_release_kept_while_the_store_was_gone_is_written_at_once_when_adopted():
    """The scheduler thread adopts the new connection before the connect thread let go
    of its lock: the release kept meanwhile is written then all the same, not kept
    again until the next renewal (RENEW_S later; the key stayed held meanwhile)."""
    import time

    store, clock = HashStore(), Clock()
    lease = ClusterLease(store, 0, 1, lambda: {}, clock, connect=lambda: store)
    lease._connecting = LateRelease(0.3)
    clock.now += RENEW_S
    assert lease.try_acquire("t", 0)
    lease.store = GoneStore()
    lease.release("t", 1)  # kept: the store is gone; a thread connects again
    deadline = time.monotonic() + 10
    while lease._new_store is None:  # connected; its lock is let go of 0.3 s later
        assert time.monotonic() < deadline, "never connected again"
        time.sleep(0.01)
    lease.renew()  # adopts it, and writes the release
    assert lease.store is store
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))) == LeaseValue(None, 0.0, 1)


def test_tenants_created_in_a_row_while_the_store_comes_back_keep_their_generations():
    """The trainer creates its tenants one after another (at start, or a sync that
    retires and creates several): the first meets a dead connection, a new one is made
    at once, and the rest are created before the lease adopts it. The announcement that
    follows raises each tenant's floor on the key of the generation it steps under (a
    resumed tenant's kept one), never on a newer generation's key, where the tenant
    created again after a purge on another server steps from v0."""
    import time

    from mace_sgl.plugin import tenant_log

    store, clock = HashStore(), Clock()
    first = lease_of(store, 0, clock)
    first.renew()
    kept = created(first, "c")  # c, created under generation 0, resumes v5 below ...
    tenant_log.append(store, tenant_log.TenantOp("retire", "c", purge=True, origin=0))
    lease = ClusterLease(GoneStore(), 1, 2, lambda: {"a": 1, "b": 1, "c": 5}, clock,
                         connect=lambda: store)  # fmt: skip
    lease.created("a")  # fails: a new connection is made at once
    deadline = time.monotonic() + 10
    while lease._new_store is None:
        assert time.monotonic() < deadline, "never connected again"
        time.sleep(0.01)
    lease.created("b")
    lease.retire("x", 0)  # a sync retires and creates in one go
    lease.created("c", kept)
    lease.renew()  # adopts the connection and announces
    assert lease.announced and lease.generations == {"a": 0, "b": 0, "c": 0}
    assert not store.check([ClusterLease.key("c", 1)])  # the new c's key: untouched
    assert store.check([ClusterLease.key("c")])  # (a missing key's get would wait)
    assert LeaseValue.parse(store.get(ClusterLease.key("c"))).version == 5


def test_replicas_of_one_server_step_under_the_generation_its_directory_kept(pair, tmp_path):
    """Two replicas of one server read a new tenant's generation on their own, and a
    purge may come between the reads: the directory keeps the first writer's, and
    every replica steps under that one; one kept in an earlier store counts as 0 (as a
    resumed tenant's does), and without the directory the store's read stands."""
    from functools import partial

    from mace_sgl.trainer.checkpoints import keep_lease_generation, read_lease_generation

    a, b, _ = pair
    assert keep_lease_generation(tmp_path, a.epoch, 3) == (a.epoch, 3)  # the sibling's
    a.created("t", None, partial(keep_lease_generation, tmp_path))
    assert a.generations["t"] == 3 and read_lease_generation(tmp_path) == (a.epoch, 3)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    keep_lease_generation(earlier, "an-earlier-store", 2)
    a.store.add(ClusterLease.generation_key("u"), 1)  # u was purged once here
    b.created("u", None, partial(keep_lease_generation, earlier))
    assert b.generations["u"] == 0
    b.created("v", None, partial(keep_lease_generation, tmp_path / "purged"))
    assert b.generations["v"] == 0 and not (tmp_path / "purged").exists()
    a.store.add(ClusterLease.generation_key("w"), 2)
    b.created("w", None, partial(keep_lease_generation, tmp_path / "purged"))
    assert b.generations["w"] == 2  # nothing kept: the store's read stands


def test_a_purge_deletes_the_key_two_generations_back_and_keeps_the_previous(pair):
    """Each purge of a name moves it to a new generation of keys; without a bound the
    old keys stay in server 0's store for good. A purge to generation g deletes the key
    of g - 2; g - 1 keeps its floor for a server that has not applied the purge yet,
    and a stale tenant two purges behind steps from a floor of 0 (its key made anew)."""
    from mace_sgl.plugin import tenant_log

    a, b, clock = pair
    store = a.store
    purge = tenant_log.TenantOp("retire", "t", purge=True, origin=0)
    a.created("t")  # generation 0: steps to v3 under the plain key
    assert a.try_acquire("t", 2)
    a.release("t", 3)
    b.created("t")  # a server that will miss every purge below
    tenant_log.append(store, purge)
    assert store.check([ClusterLease.key("t")])  # one purge: generation 0 still kept
    a.retire("t", 3)
    a.created("t")  # generation 1
    clock.now += RETRY_S
    assert a.try_acquire("t", 0)
    a.release("t", 1)
    tenant_log.append(store, purge)  # generation 2: the key of 0 goes
    assert not store.check([ClusterLease.key("t")])
    assert LeaseValue.parse(store.get(ClusterLease.key("t", 1))).version == 1
    a.retire("t", 1)
    a.created("t")
    clock.now += RETRY_S
    assert a.try_acquire("t", 0)  # generation 2's key
    a.release("t", 1)
    tenant_log.append(store, purge)  # generation 3: the key of 1 goes
    assert not store.check([ClusterLease.key("t", 1)])
    assert LeaseValue.parse(store.get(ClusterLease.key("t", 2))).version == 1
    assert int(store.add(ClusterLease.generation_key("t"), 0)) == 3
    clock.now += RETRY_S
    assert b.try_acquire("t", 0)  # b, down through three purges: floor 0, key made anew
    assert LeaseValue.parse(store.get(ClusterLease.key("t"))).holder == 1
    tenant_log.append(store, purge)  # generation 4: the key b wrote anew goes again
    assert not store.check([ClusterLease.key("t")])
