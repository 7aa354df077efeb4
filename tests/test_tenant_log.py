"""The tenant log several servers share (plugin/tenant_log.py), on a real TCPStore on
loopback: entries in order, a half-written one waits, the follower applies each once, in
order, keeps one whose server is still starting and skips a bad one."""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from torch.distributed import TCPStore

from mace_sgl.launcher import free_port
from mace_sgl.plugin import tenant_log
from mace_sgl.plugin.tenant_log import TenantLogFollower, TenantOp


@pytest.fixture()
def group():
    port = free_port()
    master = TCPStore("127.0.0.1", port, 2, True, datetime.timedelta(seconds=10),
                      wait_for_workers=False)  # fmt: skip
    cfg = SimpleNamespace(sync_addr=f"127.0.0.1:{port}", sync_world_size=2, replicas=1)
    yield master, cfg
    del master


def test_entries_come_back_in_order_and_a_half_written_one_waits(group):
    master, cfg = group
    client = tenant_log.connect(cfg)
    ops = [TenantOp("create", "team-a", weight=2.0, origin=0), TenantOp("retire", "team-a")]
    assert [tenant_log.append(client, op) for op in ops] == [1, 2]
    assert tenant_log.read(master, 0) == [(1, ops[0]), (2, ops[1])]
    assert tenant_log.read(master, 1) == [(2, ops[1])]
    # Counted by a writer that has not set it yet: the reader stops before it.
    assert int(master.add(tenant_log.LOG_COUNT, 1)) == 3
    assert tenant_log.read(master, 2) == []
    master.set(tenant_log.LOG_ENTRY.format(i=3), json.dumps(asdict(TenantOp("create", "b"))))
    assert tenant_log.read(master, 2) == [(3, TenantOp("create", "b"))]
    with pytest.raises(ValueError, match="one of create, retire"):
        TenantOp("rename", "x")
    assert TenantOp.from_json(json.dumps(asdict(ops[0]))) == ops[0]


def test_the_follower_applies_each_entry_once_in_order(group):
    master, cfg = group
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    seen: list[tuple[str, str]] = []
    starting = {"late": 2}  # this server answers "starting" twice for it

    async def apply(op: TenantOp) -> None:
        if starting.get(op.name):
            starting[op.name] -= 1
            raise tenant_log.RetryLater("server is starting")
        if op.name == "bad":
            raise ValueError("no such thing")
        seen.append((op.op, op.name))

    ready = threading.Event()  # no event loop yet: nothing is read
    follower = TenantLogFollower(cfg, apply, lambda: loop if ready.is_set() else None, 0.05)
    follower.start()
    for op in (TenantOp("create", "a"), TenantOp("create", "late"), TenantOp("create", "bad"),
               TenantOp("retire", "a")):  # fmt: skip
        tenant_log.append(master, op)
    time.sleep(0.3)
    assert follower.applied == 0 and seen == []
    ready.set()
    deadline = time.monotonic() + 30
    while follower.applied < 4:
        assert time.monotonic() < deadline, follower.status()
        time.sleep(0.05)
    assert seen == [("create", "a"), ("create", "late"), ("retire", "a")]
    assert follower.errors == 3  # two waits for "late", one skip of "bad"
    tenant_log.append(master, TenantOp("create", "c"))
    while follower.applied < 5:
        assert time.monotonic() < deadline, follower.status()
        time.sleep(0.05)
    assert seen[-1] == ("create", "c") and len(seen) == 4
    follower.stop()
    loop.call_soon_threadsafe(loop.stop)
