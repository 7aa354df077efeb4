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
from mace_sgl.plugin.tenant_log import Base, Position, TenantLogFollower, TenantOp


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
    assert [tenant_log.append(client, op).index for op in ops] == [1, 2]
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


def follower_of(cfg: SimpleNamespace, rank: int, loop, book: dict[int, Position],
                seen: list[tuple[int, str, str]], keep: int = tenant_log.LOG_KEEP,
                ) -> TenantLogFollower:  # fmt: skip
    """Server `rank`'s follower, its position saved in `book[rank]` (its feedback store)
    and what it applies recorded in `seen` as (rank, op, name)."""

    async def apply(op: TenantOp) -> None:
        seen.append((rank, op.op, op.name))

    def save(p: Position) -> None:  # as the feedback store keeps it: a copy
        book[rank] = Position.from_settings(lambda k, d: p.settings().get(k, d))

    return TenantLogFollower(SimpleNamespace(**{**vars(cfg), "sync_rank": rank}), apply,
                             lambda: loop, lambda: book.get(rank, Position()), save,
                             keep=keep)  # fmt: skip


def applying(cfg: SimpleNamespace, rank: int, apply, loop, keep: int = tenant_log.LOG_KEEP,
             ) -> TenantLogFollower:  # fmt: skip
    """Server `rank`'s follower applying with `apply`, its position in memory only."""
    return TenantLogFollower(SimpleNamespace(**{**vars(cfg), "sync_rank": rank}), apply,
                             lambda: loop, Position, lambda p: None, keep=keep)  # fmt: skip


def test_an_entry_no_other_server_applied_outlives_a_restart_of_server_0(loop):
    """Server 1 creates a tenant; before server 0's follower reads it, server 0 restarts
    with a fresh store (a new log). Server 1 appends its entry again, and server 0,
    restarted from its saved position, creates the tenant. Once both applied it, the
    entry leaves server 1's outbox and a further restart appends nothing again."""
    store, cfg = master()
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    one = follower_of(cfg, 1, loop, book, seen)
    assert one.send(tenant_log.connect(cfg), TenantOp("create", "team-a", weight=2.0)) == 1
    assert [s.op.name for s in book[1].outbox] == ["team-a"]
    assert book[1].outbox[0].op.id and book[1].outbox[0].op.stamp > 0
    book[0] = Position(tenant_log.epoch(store), 0)  # server 0 had not read it yet
    one.poll(store, loop)
    assert [s.op.name for s in book[1].outbox] == ["team-a"]  # server 0 has not applied it
    # Server 0 restarts: a fresh store, its follower from the saved position.
    fresh, _ = master()
    zero = follower_of(cfg, 0, loop, book, seen)
    zero.poll(fresh, loop)
    assert seen == []  # nothing in the new log yet
    one.poll(fresh, loop)  # server 1 appends its entry again, as it was
    assert one.resent == 1 and book[1].outbox[0].epoch == tenant_log.epoch(fresh)
    entries, _ = tenant_log.read(fresh, 0)
    assert [(i, op.op, op.name, op.weight) for i, op in entries] == [(1, "create", "team-a", 2.0)]
    assert entries[0][1].id == book[1].outbox[0].op.id
    zero.poll(fresh, loop)
    assert seen == [(0, "create", "team-a")]
    one.poll(fresh, loop)  # both marks at 1: the entry leaves the outbox
    assert book[1].outbox == [] and one.status()["outbox"] == 0
    again, _ = master()
    for f in (one, zero):
        f.poll(again, loop)
    assert tenant_log.read(again, 0) == ([], None) and seen == [(0, "create", "team-a")]


def test_a_tenant_ends_as_its_newest_change_says_whatever_order_its_entries_come_in(loop):
    """A retire appended again after a restart of server 0 is older than a create of
    the same name appended since: a server that missed both applies the create and not
    the retire that comes after it in the new log; an entry it applied in the old log,
    appended again, is not applied twice."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    one, two = follower_of(cfg, 1, loop, book, seen), follower_of(cfg, 2, loop, book, seen)
    one.send(store, TenantOp("create", "a"))
    one.send(store, TenantOp("retire", "b"))
    two.poll(store, loop)  # server 2 applies both; server 0 applies neither
    assert seen == [(2, "create", "a"), (2, "retire", "b")]
    fresh, _ = master()
    two.send(fresh, TenantOp("create", "b"))  # server 2, after server 0's restart
    one.poll(fresh, loop)  # server 1 appends its two entries again, after it
    ops = [(op.op, op.name) for _, op in tenant_log.read(fresh, 0)[0]]
    assert ops == [("create", "b"), ("create", "a"), ("retire", "b")]
    assert seen[2:] == [(1, "create", "b")]  # newer than its own retire of "b"
    zero = follower_of(cfg, 0, loop, book, seen)
    zero.poll(fresh, loop)
    assert seen[3:] == [(0, "create", "b"), (0, "create", "a")]  # the older retire: not
    two.poll(fresh, loop)
    assert seen[5:] == []  # "a" it had applied already; "b" it created since
    newest = book[2].stamps["b"]
    assert newest > book[1].outbox[-1].op.stamp  # the create is newer than the retire
    assert [book[r].stamps["b"] for r in (0, 1)] == [newest, newest]


def test_the_position_outbox_and_stamps_come_back_from_the_feedback_store_settings():
    op = TenantOp("retire", "x", purge=True, origin=1, id="abc", stamp=12.5, purged=3.0)
    p = Position("e", 3, [tenant_log.Sent("e", 2, op)], {"x": 12.5}, {"x": 12.5}, {"y": 2.0})
    assert Position.from_settings(lambda k, d: p.settings().get(k, d)) == p
    assert Position.from_settings(lambda k, d: d) == Position()
    assert TenantOp.from_json(op.to_json()) == op


class Watched(asyncio.Lock):
    """A lock that tells when somebody tries to take it."""

    def __init__(self) -> None:
        super().__init__()
        self.tried = threading.Event()

    async def acquire(self) -> bool:
        self.tried.set()
        return await super().acquire()


def poll_during_local_change(f: TenantLogFollower, store: TCPStore, loop, op: TenantOp) -> None:
    """f's server changes a tenant (inside `changing`, as the routes do, then sends
    `op`) while f's poll, which read the log before that change, waits for the lock;
    returns once both are done."""
    entered, release = threading.Event(), threading.Event()
    f.changing = Watched()

    async def local_change() -> None:  # the route: the lock, a change here, its entry
        async with f.changing:
            entered.set()
            await asyncio.to_thread(release.wait, 10)
            await asyncio.to_thread(f.send, store, op)

    change = asyncio.run_coroutine_threadsafe(local_change(), loop)
    assert entered.wait(10)
    f.changing.tried.clear()
    polled = threading.Thread(target=f.poll, args=(store, loop))
    polled.start()  # reads the log (no newer change yet), then waits for the lock
    assert f.changing.tried.wait(10)
    release.set()
    change.result(10)
    polled.join(10)
    assert not polled.is_alive()


def test_an_older_entry_waiting_while_this_server_changes_the_tenant_is_not_applied(loop):
    """Server 1 changes tenant `x` (inside `changing`, as the routes do) while its
    follower holds server 0's older retirement of `x`: the follower waits for the lock,
    then finds its own newer change and leaves `x` as it is."""
    store, cfg = master()
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    zero, one = follower_of(cfg, 0, loop, book, seen), follower_of(cfg, 1, loop, book, seen)
    zero.send(store, TenantOp("retire", "x"))
    poll_during_local_change(one, store, loop, TenantOp("create", "x"))
    assert seen == []  # the older retirement: not applied
    assert book[1].applied == 1  # handled all the same: the log goes on


def test_an_entry_in_the_log_is_not_reported_lost_when_its_outbox_save_fails(loop):
    """send raises nothing once the entry is in the log: the route must not undo a
    change that every other server applies."""
    store, cfg = master()
    saves: list[Position] = []

    def save(p: Position) -> None:
        if not saves:
            saves.append(p)
            raise OSError("database is locked")
        saves.append(p)

    async def apply(op: TenantOp) -> None:
        pass

    one = TenantLogFollower(cfg, apply, lambda: loop, Position, save)
    assert one.send(store, TenantOp("create", "y")) == 1
    assert "not saved" in one.last_error and [s.op.name for s in one.position.outbox] == ["y"]
    one.poll(store, loop)  # the next save writes the outbox
    assert [s.op.name for s in saves[-1].outbox] == ["y"]


def test_a_peers_create_with_a_weight_out_of_range_is_refused():
    """A peer from before the weight range may log a create with an infinite weight: this
    server refuses the entry (as a bad name) instead of storing it."""
    import asyncio

    from mace_sgl.config import MaceConfig
    from mace_sgl.plugin.routes import apply_tenant_op

    for weight in (float("inf"), 1e-320, 1e4):
        op = tenant_log.TenantOp("create", "team-a", weight=weight)
        with pytest.raises(ValueError, match="tenant weight"):
            asyncio.run(apply_tenant_op(MaceConfig(), op))


def entry_keys(store: TCPStore, n: int) -> list[int]:
    """The indexes of the log's entries still in the store, of 1..n."""
    return [i for i in range(1, n + 1) if store.check([tenant_log.LOG_ENTRY.format(i=i)])]


def test_server_0_folds_old_entries_into_a_base_and_a_server_behind_it_catches_up(loop):
    """The log is bounded: server 0 keeps the newest `keep` entries and folds the older
    ones into the base, whether or not every server applied them. A server that was
    away, or lost its position, applies the base and then the rest, and ends with the
    tenants of a server that applied every entry."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    zero = follower_of(cfg, 0, loop, book, seen, keep=2)
    one, two = follower_of(cfg, 1, loop, book, seen), follower_of(cfg, 2, loop, book, seen)
    changes = [("create", "a"), ("create", "b"), ("retire", "a"), ("create", "c"),
               ("create", "d"), ("retire", "d"), ("create", "e")]  # fmt: skip
    for k, (op, name) in enumerate(changes):
        one.send(store, TenantOp(op, name))
        if k == 1:
            two.poll(store, loop)  # server 2 applies the first two, then is away
    zero.poll(store, loop)  # applies all seven, then keeps the newest two
    assert [(op, name) for r, op, name in seen if r == 0] == changes
    assert zero.trimmed == 5 and tenant_log.upto(store) == 5 and entry_keys(store, 7) == [6, 7]
    folded = {name: op.op for name, op in tenant_log.base(store).ops.items()}
    assert folded == {"a": "retire", "b": "create", "c": "create", "d": "create"}
    zero.poll(store, loop)  # fewer than 2 x keep entries past the base: nothing more
    assert zero.trimmed == 5 and entry_keys(store, 7) == [6, 7]
    # Server 2 was at entry 2: the base (what it applied already loses to its stamp),
    # then entries 6 and 7.
    two.poll(store, loop)
    assert two.from_base == 1 and book[2].applied == 7
    assert [(op, name) for r, op, name in seen if r == 2] == changes
    # Server 2 again, its position lost (a fresh feedback store): the base, then the
    # rest: the tenants b, c and e, as on server 0.
    del book[2]
    seen.clear()
    again = follower_of(cfg, 2, loop, book, seen)
    again.poll(store, loop)
    assert [(op, name) for _, op, name in seen] == [
        ("create", "b"), ("retire", "a"), ("create", "c"), ("create", "d"), ("retire", "d"),
        ("create", "e")]  # fmt: skip
    assert book[2].applied == 7 and again.status()["from_base"] == 1
    # Server 1 applied nothing of its own: its mark moves on all the same.
    one.poll(store, loop)
    assert book[1].applied == 7 and book[1].outbox == []


def test_the_base_never_passes_an_entry_not_written_yet_nor_takes_a_skip_later():
    store, _ = master()
    for name in "ab":
        tenant_log.append(store, TenantOp("create", name, origin=1))
    store.add(tenant_log.LOG_COUNT, 1)  # entry 3: its writer is slow
    for name in "cdef":
        tenant_log.append(store, TenantOp("create", name, origin=1))
    assert tenant_log.trim(store, keep=1) == 2  # it would fold up to 6, but 3 is unwritten
    assert tenant_log.upto(store) == 2 and entry_keys(store, 7) == [4, 5, 6, 7]
    tenant_log.fill_gap(store, 2)  # a reader that saw 2 missing: it was folded, not lost
    assert entry_keys(store, 7) == [4, 5, 6, 7]
    tenant_log.fill_gap(store, 3)  # a lost entry is given up as before
    assert tenant_log.trim(store, keep=1) == 3  # its skip stays, for a late writer
    assert entry_keys(store, 7) == [3, 7] and tenant_log.upto(store) == 6
    assert set(tenant_log.base(store).ops) == {"a", "b", "c", "d", "e"}


def test_the_base_folds_as_a_follower_applies_and_keeps_a_bounded_number_of_names():
    b = Base()
    changes = [("create", "a"), ("retire", "b"), ("create", "c"), ("retire", "d")]
    for i, (op, name) in enumerate(changes, 1):
        b.fold(i, TenantOp(op, name, origin=1, stamp=float(i)))
    b.fold(5, TenantOp("retire", "a", origin=2, stamp=0.5))  # older than a's create
    b.fold(6, TenantOp("skip"))
    assert b.upto == 6 and {n: op.op for n, op in b.ops.items()} == {
        "a": "create", "b": "retire", "c": "create", "d": "retire"}  # fmt: skip
    assert Base.from_json(b.to_json()) == b
    assert [op.name for op in b.in_order()] == ["a", "b", "c", "d"]
    assert b.bound(3) == 1 and set(b.ops) == {"a", "c", "d"}  # the oldest retirement
    assert b.bound(1) == 2 and set(b.ops) == {"c"}  # retirements, then the oldest
    # A purge replaced by entries whose servers did not know of it: carried on.
    b.fold(7, TenantOp("retire", "x", purge=True, origin=1, stamp=7.0))
    b.fold(8, TenantOp("create", "x", origin=2, stamp=8.0))
    b.fold(9, TenantOp("retire", "x", origin=2, stamp=9.0))
    assert (b.ops["x"].op, b.ops["x"].purge, b.ops["x"].purged) == ("retire", False, 7.0)
    assert b.ops["x"].missed_purge() == TenantOp("retire", "x", purge=True, origin=2, stamp=7.0)
    b.fold(10, TenantOp("retire", "x", purge=True, origin=1, stamp=10.0))  # a purge: its own
    assert b.ops["x"].missed_purge() is None and b.ops["x"].newest_purge() == 10.0
    b.fold(11, TenantOp("retire", "p", origin=1, stamp=11.0))
    assert b.bound(2) == 1 and set(b.ops) == {"c", "x"}  # plain retirements before purges
    assert b.bound(1) == 1 and set(b.ops) == {"c"}  # then purges, before creations


def test_a_create_after_a_purge_purges_first_on_a_server_that_missed_the_purge(loop):
    """A tenant purged and created again: a server that gets the creation before the
    purge (appended again out of order after a restart of server 0), or only the
    creation (the purge folded into the base), purges the old tenant's rows and
    checkpoints before it creates the new one; a server that applied the purge does
    not purge twice."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    applied: list[tuple[int, TenantOp]] = []

    def follower(rank: int, keep: int = tenant_log.LOG_KEEP) -> TenantLogFollower:
        async def apply(op: TenantOp) -> None:
            applied.append((rank, op))

        def save(p: Position) -> None:
            book[rank] = Position.from_settings(lambda k, d: p.settings().get(k, d))

        return TenantLogFollower(SimpleNamespace(**{**vars(cfg), "sync_rank": rank}), apply,
                                 lambda: loop, lambda: book.get(rank, Position()), save,
                                 keep=keep)  # fmt: skip

    def seen(rank: int) -> list[tuple[str, str, bool]]:
        return [(op.op, op.name, op.purge) for r, op in applied if r == rank]

    one = follower(1)
    one.send(store, TenantOp("create", "x"))
    one.send(store, TenantOp("retire", "x", purge=True))
    one.send(store, TenantOp("create", "x"))
    purge, create = (s.op for s in book[1].outbox[1:])
    assert create.purged == purge.stamp > 0 and book[1].outbox[0].op.purged == 0
    assert Position.from_settings(lambda k, d: book[1].settings().get(k, d)).purges == {
        "x": purge.stamp}  # fmt: skip
    one.send(store, TenantOp("create", "y"))
    # In log order: the purge once, then the creation.
    zero = follower(0, keep=1)
    zero.poll(store, loop)
    assert seen(0) == [("create", "x", False), ("retire", "x", True), ("create", "x", False),
                       ("create", "y", False)]  # fmt: skip
    # The creation before the purge (a new log, server 1's entries appended in another
    # order): the purge first, then the creation; the purge's own entry is older.
    fresh, _ = master()
    tenant_log.append(fresh, create, lease=False)
    tenant_log.append(fresh, purge, lease=False)
    follower(2).poll(fresh, loop)
    assert seen(2) == [("retire", "x", True), ("create", "x", False)]
    # Only the creation, in the base (server 0 folded the purge away): the same.
    assert zero.trimmed == 3 and tenant_log.base(store).ops["x"] == create
    applied.clear()
    del book[2]
    follower(2).poll(store, loop)
    assert seen(2) == [("retire", "x", True), ("create", "x", False), ("create", "y", False)]


def test_a_base_entry_that_keeps_failing_is_given_up_and_the_catch_up_goes_on(loop):
    """Each poll applies the base again from its start: what it applied is skipped, and
    the entry that fails counts its own tries (those before it do not reset them)."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    one = follower_of(cfg, 1, loop, book, seen)
    for name in ("a", "bad", "c", "d"):
        one.send(store, TenantOp("create", name))
    assert tenant_log.trim(store, keep=1) == 3  # a, bad, c in the base; d in the log
    tries: list[str] = []

    async def apply(op: TenantOp) -> None:
        tries.append(op.name)
        if op.name == "bad":
            raise RuntimeError("SGLang could not load it")

    two = applying(cfg, 2, apply, loop)
    for _ in range(tenant_log.MAX_TRIES):
        two.poll(store, loop)
    assert tries == ["a"] + ["bad"] * tenant_log.MAX_TRIES + ["c", "d"]
    assert two.skipped == 1 and two.position.applied == 4


def test_a_purge_folded_under_a_later_plain_retirement_still_reaches_a_server_behind(loop):
    """Server 1 purges x; server 0, before it read the purge, creates x and retires it
    (no purge): the base keeps the retirement only, and carries the purge on it; a
    server that held the old x purges it, as it would have from the log."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    one, zero = follower_of(cfg, 1, loop, book, seen), follower_of(cfg, 0, loop, book, seen)
    one.send(store, TenantOp("retire", "x", purge=True))
    zero.send(store, TenantOp("create", "x"))
    zero.send(store, TenantOp("retire", "x"))
    one.send(store, TenantOp("create", "y"))
    purge = book[1].outbox[0].op
    assert [s.op.purged for s in book[0].outbox] == [0.0, 0.0]  # server 0 knew of none
    assert tenant_log.trim(store, keep=1) == 3
    folded = tenant_log.base(store).ops["x"]
    assert (folded.op, folded.purge, folded.purged) == ("retire", False, purge.stamp)
    applied: list[tuple[str, str, bool]] = []

    async def apply(op: TenantOp) -> None:
        applied.append((op.op, op.name, op.purge))

    two = applying(cfg, 2, apply, loop)
    two.poll(store, loop)
    assert applied == [("retire", "x", True), ("retire", "x", False), ("create", "y", False)]
    assert two.position.purges == {"x": purge.stamp}


def test_a_purge_that_never_reached_the_log_is_not_remembered_as_one(loop):
    """A purge whose append failed (the route answered 503) must not tell the other
    servers, through a later entry's `purged`, to purge what the user kept."""
    store, cfg = master()
    book: dict[int, Position] = {}
    one = follower_of(cfg, 1, loop, book, [])
    one.send(store, TenantOp("retire", "x", purge=True))
    first = book[1].outbox[0].op.stamp

    class Down:
        def __getattr__(self, name: str):
            raise ConnectionError("server 0 is down")

    with pytest.raises(ConnectionError):
        one.send(Down(), TenantOp("retire", "x", purge=True))
    assert one.position.purges == {"x": first} and one.position.stamps == {"x": first}
    one.send(store, TenantOp("create", "x"))
    assert book[1].outbox[-1].op.purged == first


def test_a_late_writer_whose_index_was_given_up_and_folded_is_refused():
    store, _ = master()

    class Late(Racing):
        """Its index is given up, folded and deleted before it writes."""

        def add(self, key: str, value: int) -> int:
            i = self.store.add(key, value)
            if key == tenant_log.LOG_COUNT and value == 1:
                tenant_log.fill_gap(self.store, i)
                tenant_log.append(self.store, TenantOp("create", "other", origin=0))
                assert tenant_log.trim(self.store, keep=1) == 0  # the skip, folded, stays
            return i

    with pytest.raises(tenant_log.LogError, match="given up"):
        tenant_log.append(Late(store), TenantOp("create", "late"))
    assert entry_keys(store, 2) == [1, 2] and tenant_log.upto(store) == 1
    assert tenant_log.read(store, 0)[0][0] == (1, TenantOp("skip"))


def test_a_purge_is_not_owed_where_a_creation_since_came_first(loop):
    """Server 2 created x again itself before server 1's purge of x reached it (the
    purge loses to that newer creation there, as in the log); a later entry that
    carries the purge does not make server 2 purge its newer tenant."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    one, two = follower_of(cfg, 1, loop, book, seen), follower_of(cfg, 2, loop, book, seen)
    one.send(store, TenantOp("retire", "x", purge=True))
    two.send(store, TenantOp("create", "x"))  # before it read the purge
    one.poll(store, loop)  # server 1 applies server 2's newer creation
    one.send(store, TenantOp("retire", "x"))  # and retires x, knowing of its purge
    assert book[1].outbox[-1].op.purged == book[1].outbox[0].op.stamp
    two.poll(store, loop)
    assert [(op, name) for r, op, name in seen if r == 2] == [("retire", "x")]
    assert book[2].purges == {}


def test_a_missed_purge_that_keeps_failing_is_given_up_and_its_entry_applied_alone(loop):
    store, cfg = master()
    book: dict[int, Position] = {}
    one = follower_of(cfg, 1, loop, book, [])
    one.send(store, TenantOp("retire", "x", purge=True))
    one.send(store, TenantOp("create", "x"))
    purge, create = (s.op for s in book[1].outbox)
    fresh, _ = master()  # the creation comes first (appended again out of order)
    tenant_log.append(fresh, create, lease=False)
    tenant_log.append(fresh, purge, lease=False)
    calls: list[tuple[str, bool]] = []

    async def apply(op: TenantOp) -> None:
        calls.append((op.op, op.purge))
        if op.purge:
            raise OSError("checkpoints could not be removed")

    zero = applying(cfg, 0, apply, loop)
    for _ in range(tenant_log.MAX_TRIES + 1):
        zero.poll(fresh, loop)
    # the purge, tried MAX_TRIES times and given up; then the creation alone; the
    # purge's own entry loses to it
    assert calls == [("retire", True)] * tenant_log.MAX_TRIES + [("create", False)]
    assert zero.skipped == 1 and zero.position.applied == 2


def test_a_purge_that_loses_to_a_plain_retirement_made_without_it_still_purges(loop):
    """Server 2 retired x (no purge) before server 1's purge of x reached it; a server
    that gets the retirement first still purges x when the older purge comes, from the
    log or from the base (which carries the losing purge on the retirement)."""
    store, cfg = master()
    cfg.sync_world_size = 3
    book: dict[int, Position] = {}
    one, two = follower_of(cfg, 1, loop, book, []), follower_of(cfg, 2, loop, book, [])
    one.send(store, TenantOp("retire", "x", purge=True))
    two.send(store, TenantOp("retire", "x"))
    purge, retire = book[1].outbox[0].op, book[2].outbox[0].op
    assert retire.purged == 0.0 and retire.stamp > purge.stamp
    fresh, _ = master()  # appended again after a restart of server 0: retirement first
    tenant_log.append(fresh, retire, lease=False)
    tenant_log.append(fresh, purge, lease=False)
    tenant_log.append(fresh, TenantOp("create", "y", origin=1, stamp=retire.stamp + 1))
    applied: list[tuple[str, str, bool]] = []

    async def apply(op: TenantOp) -> None:
        applied.append((op.op, op.name, op.purge))

    def zero() -> TenantLogFollower:
        return applying(cfg, 0, apply, loop, keep=1)

    first = zero()
    first.poll(fresh, loop)  # applies all three, then folds the first two
    assert applied == [("retire", "x", False), ("retire", "x", True), ("create", "y", False)]
    assert first.position.purges == {"x": purge.stamp}
    folded = tenant_log.base(fresh).ops["x"]
    assert (folded.op, folded.purge, folded.purged) == ("retire", False, purge.stamp)
    applied.clear()
    zero().poll(fresh, loop)  # position lost: from the base
    assert applied == [("retire", "x", True), ("retire", "x", False), ("create", "y", False)]


def test_a_creation_given_up_here_does_not_count_as_one_made_since_a_purge(loop):
    store, cfg = master()
    tenant_log.append(store, TenantOp("create", "x", origin=0, stamp=5.0, purged=2.0))
    tries: list[TenantOp] = []

    async def apply(op: TenantOp) -> None:
        tries.append(op)
        if op.op == "create":
            raise RuntimeError("SGLang could not load it")

    f = TenantLogFollower(cfg, apply, lambda: loop, Position, lambda p: None)
    for _ in range(tenant_log.MAX_TRIES):
        f.poll(store, loop)
    assert [(op.op, op.purge) for op in tries] == [("retire", True), ("create", False)] * 1 + [
        ("create", False)] * (tenant_log.MAX_TRIES - 1)  # fmt: skip
    assert f.skipped == 1 and f.position.applied == 1
    assert f.position.creates == {} and f.position.purges == {"x": 2.0}
    assert f.position.stamps == {"x": 5.0}  # handled: an older entry for x loses


def test_a_purge_superseded_while_it_waited_for_the_lock_still_purges(loop):
    """Server 1 retires x (no purge) while its follower holds server 0's older purge
    of x, waiting for the tenant lock: the purge loses to the newer retirement, but
    its purge part is still applied (x's old rows and checkpoints go)."""
    store, cfg = master()
    book: dict[int, Position] = {}
    seen: list[tuple[int, str, str]] = []
    zero, one = follower_of(cfg, 0, loop, book, seen), follower_of(cfg, 1, loop, book, seen)
    zero.send(store, TenantOp("retire", "x", purge=True))
    poll_during_local_change(one, store, loop, TenantOp("retire", "x"))
    assert seen == [(1, "retire", "x")]  # the purge part only
    assert book[1].purges == {"x": book[0].outbox[0].op.stamp}
