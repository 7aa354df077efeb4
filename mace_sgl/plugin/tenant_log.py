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
A writer that dies between taking an index and writing it leaves a gap; a reader that
finds the same gap for GAP_S writes a `skip` entry there (compare-and-set, so a late
writer loses and reports the failure instead of being overwritten), and the log goes on.

Each server keeps (epoch, last index applied) in its own feedback store, so a restart
goes on where it stopped instead of replaying entries it applied (a replayed create and
retire would bring a retired tenant back for a moment, or retire one created again);
when the epoch changes (server 0 restarted), it starts the new log from its beginning.
A server that was down while another created a tenant gets it when it comes back, as
long as server 0 kept the log meanwhile.

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
from dataclasses import asdict, dataclass
from typing import Any

from mace_sgl.trainer.lease import ClusterLease
from mace_sgl.trainer.replicas import client_store, store_text

logger = logging.getLogger(__name__)

LOG_EPOCH = "mace/tenants/epoch"
LOG_COUNT = "mace/tenants/n"
LOG_ENTRY = "mace/tenants/{i}"
POLL_S = 2.0
GAP_S = 30.0  # a counted entry still unwritten after this long is given up as lost
MAX_TRIES = 3  # an entry that keeps failing here (not RetryLater) is skipped after these
APPLY_TIMEOUT_S = 300.0  # one entry's apply on the event loop, at most
STORE_TIMEOUT_S = 10.0  # a route's or the follower's store call, at most
OPS = ("create", "retire", "skip")


@dataclass(frozen=True)
class TenantOp:
    """One entry of the log: create or retire tenant `name` (`skip`: a lost entry)."""

    op: str
    name: str = ""
    weight: float = 1.0  # create: the tenant's share of steps
    purge: bool = False  # retire: delete its checkpoints too
    origin: int = -1  # the server (--mace-sync-rank) that appended it

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


def append(store: Any, op: TenantOp) -> int:
    """Add `op` at the end of the log; returns its index (from 1). LogError if a reader
    gave the index up as lost before this wrote it. A purge then moves the tenant's
    training lease to a new generation (trainer/lease.py), for the tenant created again
    after it, which starts at version 0, below the old key's floor. (After the entry, so
    that a purge that never reached the log leaves the live tenant's key as it was.)"""
    epoch(store)
    i = int(store.add(LOG_COUNT, 1))
    text = op.to_json()
    if store_text(store.compare_set(LOG_ENTRY.format(i=i), "", text)) != text:
        raise LogError(f"tenant log entry {i} was given up as lost before it was written")
    if op.op == "retire" and op.purge:
        try:
            store.add(ClusterLease.generation_key(op.name), 1)
        except Exception:  # appended all the same: the retirement goes on everywhere
            logger.exception("tenant %s purged, but its lease generation was not raised: "
                             "created again, it trains once server 0 restarted", op.name)  # fmt: skip
    return i


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
class Position:
    """Where a server is in the log: the epoch and the last index it handled."""

    epoch: str = ""
    applied: int = 0


class TenantLogFollower:
    """Applies the other servers' log entries to this server: a daemon thread that hands
    each to `apply` on the HTTP process's event loop (`loop()` returns it, None until
    SGLang's tokenizer manager has one), and records its position with `save` after each
    (`load` gives the saved one at start)."""

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
            "last_error": self.last_error,
        }

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
        """One read of the log, applying what is new (the thread calls it every poll_s)."""
        if self.position is None:
            self.position = self.load()
        now = epoch(store)
        if now != self.position.epoch:  # a new log (server 0 restarted): from its start
            self.position = Position(now, 0)
            self.save(self.position)
        entries, gap = read(store, self.position.applied)
        for i, op in entries:
            if not self._handle(loop, op):
                return  # this entry again at the next poll
            self.position = Position(now, i)
            self.save(self.position)
        if gap is not None:
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
            asyncio.run_coroutine_threadsafe(self.apply(op), loop).result(APPLY_TIMEOUT_S)
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

    def _error(self, msg: str) -> None:
        if msg != self.last_error:  # every poll for as long as it lasts: log it once
            logger.error("mace: %s", msg)
        self.errors += 1
        self.last_error = msg
