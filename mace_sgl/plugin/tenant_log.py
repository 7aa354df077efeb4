"""Run-time tenants across servers: one log of creations and retirements in the adapter
group's store, which every server's HTTP process follows.

With several servers (--mace-sync-world-size > 1) each has its own feedback store and its
own SGLang, so POST /mace/adapters on one of them must create the tenant on every server,
and DELETE retire it everywhere. The route does its own server's part and appends the
operation to a log in the group's TCPStore (trainer/replicas.py: served by server 0 on
--mace-sync-addr); a thread in every server's HTTP process (TenantLogFollower) reads the
log every POLL_S and applies the other servers' entries, in log order, through the same
local steps as the route. Its own entries it skips: the route applied them when it
appended, and applying them again later could undo a newer change made here (a retire
replayed onto a tenant created again since).

The log's keys:
    mace/tenants/epoch   set once by whoever uses the log first (a fresh store, i.e. a
                         restarted server 0, starts a new log with a new epoch)
    mace/tenants/n       entries counted so far (a writer takes index i = add(n, 1))
    mace/tenants/<i>     entry i as JSON (TenantOp), written by compare-and-set from ""
    mace/tenants/applied/<rank>  the last index that server's follower handled
A writer that dies between taking an index and writing it leaves a gap; a reader that
finds the same gap for GAP_S writes a `skip` entry there (compare-and-set, so a late
writer loses and reports the failure instead of being overwritten), and the log goes on.

Each server keeps (epoch, last index applied) in its own feedback store, so a restart
goes on where it stopped instead of replaying entries it applied (a replayed create and
retire would bring a retired tenant back for a moment, or retire one created again);
when the epoch changes (server 0 restarted), it starts the new log from its beginning.

The log lives in server 0's memory, so a restart of server 0 loses it; what no other
server had applied by then must not be lost with it (a server that was down, or server
0 itself, which had not yet applied the entry another server appended). So each server
also keeps, in its feedback store, the entries it appended (its outbox) until every
server has applied them: each follower writes how far it got (mace/tenants/applied/
<rank>), and an entry at or below every rank's mark leaves the outbox. Entries still in
the outbox when a new log starts are appended to it again, as they were (same id and
stamp, no second lease generation for a purge).

Entries appended again arrive out of their first order, beside the new log's own. So an
entry carries a stamp (the wall clock when first appended, above the newest stamp this
server knew for that tenant name), and a follower applies an entry only if its stamp is
newer than the last one it handled for that name (the stamps it keeps with its
position): a tenant's last change wins, in whatever order its entries come, and an entry
this server had already applied is not applied twice. Per name, that is also what makes
two servers that change one tenant at once end the same (the newer stamp wins on both),
as a server makes its own changes and applies the others' one at a time (`changing`).
A name whose stamp was dropped (beyond MAX_STAMPS names) takes any entry for it again.

An entry whose apply fails is tried again at the next poll: without end while this server
is starting (RetryLater), MAX_TRIES times for other errors, then skipped and counted (a
bad entry must not stop the log). Until a server applied a creation, versions of that
tenant that the others publish wait in its trainer (trainer/runtime.py, ORPHAN_AFTER_S),
and feedback for it is refused with 404 there like any unknown adapter's.

Entries are plain JSON; nothing is unpickled. While server 0 is down, routes that must
append answer 503 and the followers retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mace_sgl.trainer.lease import ClusterLease
from mace_sgl.trainer.replicas import client_store, store_text

logger = logging.getLogger(__name__)

LOG_EPOCH = "mace/tenants/epoch"
LOG_COUNT = "mace/tenants/n"
LOG_ENTRY = "mace/tenants/{i}"
LOG_APPLIED = "mace/tenants/applied/{rank}"
POLL_S = 2.0
GAP_S = 30.0  # a counted entry still unwritten after this long is given up as lost
MAX_TRIES = 3  # an entry that keeps failing here (not RetryLater) is skipped after these
APPLY_TIMEOUT_S = 300.0  # one entry's apply on the event loop, at most
STORE_TIMEOUT_S = 10.0  # a route's or the follower's store call, at most
OPS = ("create", "retire", "skip")
MAX_OUTBOX = 1000  # own entries kept for a server that is away; the oldest go beyond it
MAX_STAMPS = 10_000  # tenant names whose last stamp is kept; the oldest go beyond it


@dataclass(frozen=True)
class TenantOp:
    """One entry of the log: create or retire tenant `name` (`skip`: a lost entry)."""

    op: str
    name: str = ""
    weight: float = 1.0  # create: the tenant's share of steps
    purge: bool = False  # retire: delete its checkpoints too
    origin: int = -1  # the server (--mace-sync-rank) that appended it
    id: str = ""  # given when first appended; the same when appended again
    stamp: float = 0.0  # when first appended (0: not stamped, applied in log order)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"tenant log op {self.op!r}: one of {', '.join(OPS)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> TenantOp:
        data = json.loads(raw)
        return cls(
            op=str(data["op"]),
            name=str(data.get("name", "")),
            weight=float(data.get("weight", 1.0)),
            purge=bool(data.get("purge", False)),
            origin=int(data.get("origin", -1)),
            id=str(data.get("id", "")),
            stamp=float(data.get("stamp", 0.0)),
        )


SKIP = TenantOp("skip").to_json()


class LogError(Exception):
    """An entry could not be written (its index was given up as lost meanwhile)."""


def connect(cfg: Any) -> Any:
    """A client connection to the group's TCPStore (--mace-sync-addr), its calls waiting
    at most STORE_TIMEOUT_S."""
    return client_store(cfg, STORE_TIMEOUT_S)


def epoch(store: Any) -> str:
    """This log's epoch (set by the first to ask, in a fresh store)."""
    return store_text(store.compare_set(LOG_EPOCH, "", uuid.uuid4().hex))


def append(store: Any, op: TenantOp, lease: bool = True) -> Sent:
    """Add `op` at the end of the log; returns where: the log's epoch and the entry's
    index (from 1), read from the same store as the entry was written to. LogError if a reader
    gave the index up as lost before this wrote it. A purge then moves the tenant's
    training lease to a new generation (trainer/lease.py), for the tenant created again
    after it, which starts at version 0, below the old key's floor. (After the entry, so
    that a purge that never reached the log leaves the live tenant's key as it was.)
    `lease` False: not that (an entry appended again, to a fresh store)."""
    now = epoch(store)
    i = int(store.add(LOG_COUNT, 1))
    text = op.to_json()
    if store_text(store.compare_set(LOG_ENTRY.format(i=i), "", text)) != text:
        raise LogError(f"tenant log entry {i} was given up as lost before it was written")
    if lease and op.op == "retire" and op.purge:
        try:
            store.add(ClusterLease.generation_key(op.name), 1)
        except Exception:  # appended all the same: the retirement goes on everywhere
            logger.exception("tenant %s purged, but its lease generation was not raised: "
                             "created again, it trains once server 0 restarted", op.name)  # fmt: skip
    return Sent(now, i, op)


def read(store: Any, after: int) -> tuple[list[tuple[int, TenantOp]], int | None]:
    """The entries after index `after`, in order, and the index of the first one counted
    but not written yet (None: no gap), before which the list stops."""
    n = int(store.add(LOG_COUNT, 0))
    out = []
    for i in range(after + 1, n + 1):
        key = LOG_ENTRY.format(i=i)
        if not store.check([key]):
            return out, i
        out.append((i, TenantOp.from_json(store.get(key))))
    return out, None


def fill_gap(store: Any, i: int) -> None:
    """Give entry i up as lost: a `skip` there, unless its writer got there first."""
    store.compare_set(LOG_ENTRY.format(i=i), "", SKIP)


class RetryLater(Exception):
    """This server cannot apply the entry yet (SGLang is starting)."""


@dataclass
class Sent:
    """An entry this server appended, not known yet to be applied by every server."""

    epoch: str  # the log it is in now
    index: int
    op: TenantOp


@dataclass
class Position:
    """Where a server is in the log: the epoch and the last index it handled; its
    outbox; for each tenant name, the stamp of the newest entry it handled or appended.
    Kept in the server's feedback store (settings/from_settings)."""

    epoch: str = ""
    applied: int = 0
    outbox: list[Sent] = field(default_factory=list)
    stamps: dict[str, float] = field(default_factory=dict)

    def settings(self) -> dict[str, str]:
        """As the feedback store's settings (all written in one transaction)."""
        return {
            "tenant_log_epoch": self.epoch,
            "tenant_log_applied": str(self.applied),
            "tenant_log_outbox": json.dumps(
                [{"epoch": s.epoch, "index": s.index, "op": asdict(s.op)} for s in self.outbox]
            ),
            "tenant_log_stamps": json.dumps(self.stamps),
        }

    @classmethod
    def from_settings(cls, get: Callable[[str, str], str]) -> Position:
        """From `get(key, default)` over the feedback store's settings."""
        outbox = [
            Sent(str(s["epoch"]), int(s["index"]), TenantOp.from_json(json.dumps(s["op"])))
            for s in json.loads(get("tenant_log_outbox", "[]"))
        ]
        stamps = {str(k): float(v) for k, v in json.loads(get("tenant_log_stamps", "{}")).items()}
        return cls(get("tenant_log_epoch", ""), int(get("tenant_log_applied", "0")), outbox,
                   stamps)  # fmt: skip

    def handled(self, op: TenantOp) -> None:
        """Note `op`'s stamp as its name's newest (the oldest names beyond MAX_STAMPS go)."""
        if not op.stamp or op.stamp <= self.stamps.get(op.name, 0.0):
            return
        self.stamps.pop(op.name, None)
        self.stamps[op.name] = op.stamp
        if len(self.stamps) > MAX_STAMPS:
            del self.stamps[min(self.stamps, key=self.stamps.__getitem__)]

    def superseded(self, op: TenantOp) -> bool:
        """Handled here already, or older than what was: an entry appended again, or one
        that lost to a newer change of the same tenant."""
        return bool(op.stamp) and op.stamp <= self.stamps.get(op.name, 0.0)


class TenantLogFollower:
    """Applies the other servers' log entries to this server: a daemon thread that hands
    each to `apply` on the HTTP process's event loop (`loop()` returns it, None until
    SGLang's tokenizer manager has one), and records its position with `save` after each
    (`load` gives the saved one at start). This server's own entries go through `send`,
    which stamps them and keeps them in the outbox."""

    def __init__(
        self,
        cfg: Any,
        apply: Callable[[TenantOp], Awaitable[None]],
        loop: Callable[[], asyncio.AbstractEventLoop | None],
        load: Callable[[], Position],
        save: Callable[[Position], None],
        poll_s: float = POLL_S,
        gap_s: float = GAP_S,
    ) -> None:
        self.cfg, self.apply, self.loop = cfg, apply, loop
        self.load, self.save = load, save
        self.poll_s, self.gap_s = poll_s, gap_s
        self.rank = cfg.sync_rank
        self.position: Position | None = None
        self.errors = 0
        self.skipped = 0  # entries given up after MAX_TRIES
        self.last_error = ""
        self.resent = 0  # own entries appended again to a new log
        self.dropped = 0  # own entries dropped from a full outbox
        self._lock = threading.Lock()  # the position: this thread and the routes' appends
        # Held on the event loop by a local tenant change and its `send`, and by this
        # thread's applies: one tenant change at a time on this server, each checked
        # against the newest stamp when it runs.
        self.changing = asyncio.Lock()
        self._tries = 0  # failures of the entry after the position
        self._gap: tuple[int, float] | None = None  # (index, first seen)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mace-tenant-log", daemon=True)

    def start(self) -> TenantLogFollower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        p = self.position
        return {
            "epoch": p.epoch if p else None,
            "applied": p.applied if p else None,
            "errors": self.errors,
            "skipped": self.skipped,
            "outbox": len(p.outbox) if p else None,
            "resent": self.resent,
            "dropped": self.dropped,
            "last_error": self.last_error,
        }

    def _book(self) -> Position:
        """The position (loaded at first use); call with the lock held."""
        if self.position is None:
            self.position = self.load()
        return self.position

    def send(self, store: Any, op: TenantOp) -> int:
        """Append this server's `op` to the log (`append`), stamped newer than any
        change of its tenant this server knew of, and keep it in the outbox until every
        server applied it. Returns its index. Call it, with the local change it logs,
        inside `changing`. Once the entry is in the log this raises nothing: a failed
        save of the outbox is reported, and the next save writes it."""
        with self._lock:
            book = self._book()
            before = book.stamps.get(op.name)
            stamp = max(time.time(), (before or 0.0) + 1e-6)
            op = replace(op, origin=self.rank, id=uuid.uuid4().hex, stamp=stamp)
            book.handled(op)  # from now on an older entry for this name loses here
        try:
            sent = append(store, op)
        except BaseException:
            with self._lock:
                if book.stamps.get(op.name) == stamp:  # nothing newer came meanwhile
                    if before is None:
                        del book.stamps[op.name]
                    else:
                        book.stamps[op.name] = before
            raise
        with self._lock:
            book.outbox.append(sent)
            if len(book.outbox) > MAX_OUTBOX:
                lost = book.outbox.pop(0)
                self.dropped += 1
                self._error(f"tenant log outbox full: {lost.op.op} {lost.op.name!r} dropped, "
                            "a server away since then misses it if server 0 restarts")  # fmt: skip
            self._save(book)
        return sent.index

    def _save(self, book: Position) -> None:
        """save(book), a failure reported instead of raised (the next save writes it)."""
        try:
            self.save(book)
        except Exception as e:
            self._error(f"tenant log position not saved: {type(e).__name__}: {e}")

    async def _apply_newest(self, op: TenantOp) -> None:
        """`apply(op)` inside `changing`, unless this server changed the tenant since
        (its own newer entry, sent while the follower waited for the lock)."""
        async with self.changing:
            with self._lock:
                if self._book().superseded(op):
                    return
            await self.apply(op)

    def _run(self) -> None:
        store = None
        while not self._stop.wait(self.poll_s):
            loop = self.loop()
            if loop is None:
                continue
            try:
                store = store or connect(self.cfg)
                self.poll(store, loop)
            except Exception as e:  # server 0 (the store) is down or not up yet
                store = None
                self._error(f"tenant log unreadable: {type(e).__name__}: {e}")

    def poll(self, store: Any, loop: asyncio.AbstractEventLoop) -> None:
        """One read of the log, applying what is new (the thread calls it every poll_s);
        before it, this server's own entries that a new log lacks are appended to it;
        after it, this server's mark, and its entries every server applied leave the
        outbox."""
        with self._lock:
            book = self._book()
            now = epoch(store)
            if now != book.epoch:  # a new log (server 0 restarted): from its start
                book.epoch, book.applied = now, 0
                self._tries, self._gap = 0, None
                self.save(book)
            self._resend(store, book, now)
            start = book.applied
        entries, gap = read(store, start)
        stalled = False
        for i, op in entries:
            with self._lock:
                superseded = book.superseded(op)
            if superseded:
                self._tries = 0
            elif not self._handle(loop, op):
                stalled = True  # this entry again at the next poll
                break
            with self._lock:
                book.applied = i
                book.handled(op)
                self.save(book)
        store.set(LOG_APPLIED.format(rank=self.rank), str(book.applied))
        with self._lock:
            self._acked(store, book, now)
        if gap is not None and not stalled:
            first = self._gap[1] if self._gap and self._gap[0] == gap else time.monotonic()
            self._gap = (gap, first)
            if time.monotonic() - first >= self.gap_s:
                fill_gap(store, gap)
                self._error(f"tenant log entry {gap} unwritten for {self.gap_s:g} s: skipped")

    def _handle(self, loop: asyncio.AbstractEventLoop, op: TenantOp) -> bool:
        """True when the entry is done with (applied, not ours to apply, or given up)."""
        if op.op == "skip" or op.origin == self.rank:
            return True
        try:
            asyncio.run_coroutine_threadsafe(self._apply_newest(op), loop).result(APPLY_TIMEOUT_S)
        except RetryLater as e:
            self._error(f"tenant {op.op} {op.name!r} waits: {e}")
            return False
        except Exception as e:
            self._tries += 1
            if self._tries < MAX_TRIES:
                self._error(f"tenant {op.op} {op.name!r} failed, tried again: {e!r}")
                return False
            self.skipped += 1
            self._error(f"tenant {op.op} {op.name!r} skipped after {MAX_TRIES} tries: {e!r}")
        self._tries = 0
        return True

    def _resend(self, store: Any, book: Position, now: str) -> None:
        """Append again, in stamp order, the outbox's entries of earlier logs (lock held)."""
        resent = self.resent
        try:
            for sent in sorted(book.outbox, key=lambda s: s.op.stamp):
                if sent.epoch == now:
                    continue
                try:
                    fresh = append(store, sent.op, lease=False)
                except LogError:
                    continue  # its index was given up meanwhile: again at the next poll
                sent.epoch, sent.index = fresh.epoch, fresh.index
                self.resent += 1
        finally:
            if self.resent > resent:
                self.save(book)

    def _acked(self, store: Any, book: Position, now: str) -> None:
        """Drop the outbox's entries that every server applied (lock held)."""
        if not book.outbox:
            return
        marks = []
        for rank in range(self.cfg.sync_world_size):
            key = LOG_APPLIED.format(rank=rank)
            marks.append(int(store_text(store.get(key))) if store.check([key]) else 0)
        keep = [s for s in book.outbox if s.epoch != now or s.index > min(marks)]
        if len(keep) < len(book.outbox):
            book.outbox = keep
            self.save(book)

    def _error(self, msg: str) -> None:
        if msg != self.last_error:  # every poll for as long as it lasts: log it once
            logger.error("mace: %s", msg)
        self.errors += 1
        self.last_error = msg
