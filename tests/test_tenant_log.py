"""The tenant log several servers share (plugin/tenant_log.py), on real TCPStores on
loopback: entries in order, a lost entry given up and its late writer refused, and a
follower that applies the other servers' entries once each, in order, goes on from its
saved position after a restart, starts a new log from its beginning, keeps an entry while
its server is starting and gives up one that keeps failing."""

from __future__ import annotations

import asyncio
import datetime
import threading
from types import SimpleNamespace

import pytest
from torch.distributed import TCPStore

from mace_sgl.launcher import free_port
from mace_sgl.plugin import tenant_log
from mace_sgl.plugin.tenant_log import Position, TenantLogFollower, TenantOp


def master() -> tuple[TCPStore, SimpleNamespace]:
    port = free_port()
    s = TCPStore("127.0.0.1", port, 2, True, datetime.timedelta(seconds=10),
                 wait_for_workers=False)  # fmt: skip
    return s, SimpleNamespace(sync_addr=f"127.0.0.1:{port}", sync_world_size=2, replicas=1,
                              sync_rank=1)  # fmt: skip


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)


class Racing:
    """A store whose index, once taken, is given up as lost before the writer writes."""

    def __init__(self, store: TCPStore) -> None:
        self.store = store

    def add(self, key: str, value: int) -> int:
        i = self.store.add(key, value)
        if key == tenant_log.LOG_COUNT and value == 1:
            tenant_log.fill_gap(self.store, i)
        return i

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def test_entries_come_back_in_order_and_a_lost_one_is_given_up():
    store, cfg = master()
    client = tenant_log.connect(cfg)
    ops = [TenantOp("create", "team-a", weight=2.0, origin=0), TenantOp("retire", "team-a")]
    assert [tenant_log.append(client, op) for op in ops] == [1, 2]
    assert tenant_log.read(store, 0) == ([(1, ops[0]), (2, ops[1])], None)
    assert tenant_log.read(store, 1) == ([(2, ops[1])], None)
    # Counted by a writer that has not written it yet: the reader stops before it...
    assert int(store.add(tenant_log.LOG_COUNT, 1)) == 3
    assert tenant_log.read(store, 2) == ([], 3)
    # ...and once it is given up, a skip stands there and the log goes on.
    tenant_log.fill_gap(store, 3)
    assert tenant_log.read(store, 2) == ([(3, TenantOp("skip"))], None)
    # A writer whose index was given up meanwhile is told, not overwritten.
    with pytest.raises(tenant_log.LogError, match="given up"):
        tenant_log.append(Racing(client), TenantOp("create", "late"))
    assert tenant_log.read(store, 3) == ([(4, TenantOp("skip"))], None)
    with pytest.raises(ValueError, match="one of create, retire, skip"):
        TenantOp("rename", "x")
    assert TenantOp.from_json(ops[0].to_json()) == ops[0]
    assert tenant_log.epoch(store) == tenant_log.epoch(client) != ""


def test_the_follower_applies_the_others_entries_once_in_order(loop):
    store, cfg = master()  # this server is sync rank 1
    seen: list[tuple[str, str]] = []
    starting = {"late": 2}  # this server answers "starting" twice for it
    saved: list[Position] = []

    async def apply(op: TenantOp) -> None:
        if starting.get(op.name):
            starting[op.name] -= 1
            raise tenant_log.RetryLater("server is starting")
        if op.name == "bad":
            raise RuntimeError("SGLang could not load it")
        seen.append((op.op, op.name))

    def follower(position: Position) -> TenantLogFollower:
        return TenantLogFollower(cfg, apply, lambda: loop, lambda: position, saved.append)

    ops = [TenantOp("create", "a", origin=0), TenantOp("create", "mine", origin=1),
           TenantOp("create", "late", origin=0), TenantOp("create", "bad", origin=0),
           TenantOp("retire", "a", origin=0)]  # fmt: skip
    for op in ops:
        tenant_log.append(store, op)
    f = follower(Position())
    for _ in range(2):  # "late" waits twice
        f.poll(store, loop)
        assert f.position.applied == 2 and seen == [("create", "a")]
    for tries in range(tenant_log.MAX_TRIES):  # "bad" fails, then is given up
        f.poll(store, loop)
        assert f.position.applied == (3 if tries < tenant_log.MAX_TRIES - 1 else 5)
    # Its own entry ("mine": the route applied it) is not applied again; the others are,
    # once each, in order; its position is saved after each.
    assert seen == [("create", "a"), ("create", "late"), ("retire", "a")]
    assert (f.skipped, f.errors) == (1, 2 + tenant_log.MAX_TRIES)
    assert saved[-1] == Position(tenant_log.epoch(store), 5)
    # Restarted at its saved position: nothing is applied twice, what is new is.
    tenant_log.append(store, TenantOp("create", "c", origin=0))
    again = follower(saved[-1])
    again.poll(store, loop)
    assert seen[3:] == [("create", "c")] and again.position.applied == 6
    # A new log (server 0 restarted, a fresh store: another epoch) is read from its start.
    fresh, _ = master()
    tenant_log.append(fresh, TenantOp("create", "d", origin=0))
    again.poll(fresh, loop)
    assert seen[4:] == [("create", "d")]
    assert again.position == Position(tenant_log.epoch(fresh), 1)


def test_a_gap_is_given_up_after_gap_s_and_the_log_goes_on(loop):
    store, cfg = master()
    seen: list[str] = []

    async def apply(op: TenantOp) -> None:
        seen.append(op.name)

    f = TenantLogFollower(cfg, apply, lambda: loop, Position, lambda p: None, gap_s=0.0)
    store.add(tenant_log.LOG_COUNT, 1)  # a writer died between add and write
    tenant_log.append(store, TenantOp("create", "after", origin=0))
    f.poll(store, loop)  # stops at the gap and gives it up (gap_s 0)
    assert seen == [] and f.position.applied == 0
    f.poll(store, loop)
    assert seen == ["after"] and f.position.applied == 2
