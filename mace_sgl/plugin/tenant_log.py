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
    mace/tenants/base    the entries up to some index, folded (Base): per tenant name,
                         the entry a follower applying them all in order would have
                         applied last
    mace/tenants/upto    that index (0 or absent: nothing folded)
A writer that dies between taking an index and writing it leaves a gap; a reader that
finds the same gap for GAP_S writes a `skip` entry there (compare-and-set, so a late
writer loses and reports the failure instead of being overwritten; the trimmer leaves
skips in place for that), and the log goes on.

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
A purge may lose to a newer change of the name (a creation, or a plain retirement), in a
log appended again out of order or folded into the base; the old tenant's rows and
checkpoints must go all the same. So every entry carries `purged`, the stamp of the
newest purge of its name its server knew of (each server keeps those stamps with its
position; the base carries a replaced entry's purge on to the entry that replaces it),
and a server that has not applied that purge applies it first, unless it made or
applied a creation of the name since (that creation came after the purge; in the log
the purge loses to it there too); a purge that an entry is or was made after reaches
the name even where the entry itself loses (the base carries a losing purge on to the
retirement it lost to). A missed purge that keeps failing is given up after
MAX_TRIES of its own, and the entry that carried it is applied on its own.

An entry whose apply fails is tried again at the next poll: without end while this server
is starting (RetryLater), MAX_TRIES times for other errors, then skipped and counted (a
bad entry must not stop the log). Until a server applied a creation, versions of that
tenant that the others publish wait in its trainer (trainer/runtime.py, ORPHAN_AFTER_S),
and feedback for it is refused with 404 there like any unknown adapter's.

The log is bounded: server 0's follower folds all but the newest `keep` (LOG_KEEP)
entries into the base and deletes them (`trim`), once 2 x keep entries are past the base,
whether or not every server applied them (a server that never came up must not hold the
log open). A follower whose position is below the base's index applies the base first
(its entries by stamp, each as a log entry: what it handled already loses to its stamp),
then the log after it: the same tenants as applying the other servers' entries one by
one, as a tenant's newest change wins (its own entries a server skips, as in the log). (The trimmer writes the base, then its index, then deletes the entries: a
reader finds every entry it has not folded in one or the other.) The base keeps at most
MAX_STAMPS names, dropping the retirements with the oldest stamps first.

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
LOG_BASE = "mace/tenants/base"
LOG_UPTO = "mace/tenants/upto"
LOG_KEEP = 256  # entries server 0 keeps in the store; older ones are folded into the base
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
    # the stamp of the newest purge of this name its origin knew of (0: none): a server
    # that has not applied that purge applies it first
    purged: float = 0.0

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
            purged=float(data.get("purged", 0.0)),
        )

    def missed_purge(self) -> TenantOp | None:
        """The purge this entry was made after (as its origin knew), as an entry of its
        own; None for none, and for a purge (it purges anyway)."""
        if self.op == "skip" or not self.purged or (self.op == "retire" and self.purge):
            return None
        return TenantOp("retire", self.name, purge=True, origin=self.origin, stamp=self.purged)

    def purge_part(self) -> TenantOp | None:
        """The newest purge this entry is or was made after, as an entry of its own
        (None: none): what must reach the name even where the entry itself loses."""
        stamp = self.newest_purge() if self.op != "skip" else 0.0
        if not stamp:
            return None
        return TenantOp("retire", self.name, purge=True, origin=self.origin, stamp=stamp)

    def newest_purge(self) -> float:
        """The stamp of the newest purge this entry is or was made after."""
        own = self.stamp if self.op == "retire" and self.purge else 0.0
        return max(own, self.purged)


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
            ClusterLease.purged(store, op.name)
        except Exception:  # appended all the same: the retirement goes on everywhere
            logger.exception("tenant %s purged, but its lease generation was not raised: "
                             "created again, it trains once server 0 restarted", op.name)  # fmt: skip
    return Sent(now, i, op)


def read(
    store: Any, after: int, last: int | None = None
) -> tuple[list[tuple[int, TenantOp]], int | None]:
    """The entries after index `after` (up to `last`, if given), in order, and the index
    of the first one counted but not written yet (None: no gap), before which the list
    stops. (An entry folded into the base reads as not written: see `upto`.)"""
    n = int(store.add(LOG_COUNT, 0))
    out = []
    for i in range(after + 1, min(n, last if last is not None else n) + 1):
        raw = _get(store, LOG_ENTRY.format(i=i))
        if raw is None:
            return out, i
        out.append((i, TenantOp.from_json(raw)))
    return out, None


ABSENT = "\x00absent"  # no entry's JSON


def _get(store: Any, key: str) -> bytes | None:
    """The key's value, None where there is none, in one call that neither writes nor
    waits: compare-and-set from a value no key holds (TCPStore then answers the value,
    or for a missing key the expected value, and sets nothing). A check, then a get,
    would wait out the store's timeout for a key the trimmer deleted in between."""
    raw = store.compare_set(key, ABSENT, ABSENT)
    return None if store_text(raw) == ABSENT else raw


def fill_gap(store: Any, i: int) -> None:
    """Give entry i up as lost: a `skip` there, unless its writer got there first or it
    was folded into the base meanwhile."""
    if i > upto(store):
        store.compare_set(LOG_ENTRY.format(i=i), "", SKIP)


@dataclass
class Base:
    """Entries 1..upto folded: per tenant name, the one entry that a follower applying
    them all in log order would have applied last (skips fold to nothing)."""

    upto: int = 0
    ops: dict[str, TenantOp] = field(default_factory=dict)

    def fold(self, i: int, op: TenantOp) -> None:
        """Entry i (the one after upto) into the base."""
        if op.op != "skip":
            last = self.ops.get(op.name)
            # as a follower: an entry is applied unless its stamp is not newer
            if last is None or not op.stamp or op.stamp > last.stamp:
                if last is not None and not (op.op == "retire" and op.purge):
                    # the purge it replaces (or was made after) must not be lost with it
                    op = replace(op, purged=max(op.purged, last.newest_purge()))
                self.ops.pop(op.name, None)
                self.ops[op.name] = op
            elif last.op != "create" and op.newest_purge() > last.purged:
                # it loses, but its purge reaches a server that has not applied it (a
                # follower of the log applies a losing entry's purge where no creation
                # came since; after a creation it would not)
                self.ops[op.name] = replace(last, purged=op.newest_purge())
        self.upto = i

    def bound(self, names: int) -> int:
        """Drop names beyond `names`, the retirements with the oldest stamps first (plain
        ones before purges), then the oldest creations; returns how many went."""
        over = len(self.ops) - names
        if over <= 0:
            return 0
        order = sorted(
            self.ops.values(),
            key=lambda op: (op.op != "retire", bool(op.newest_purge()), op.stamp),
        )
        for op in order[:over]:
            del self.ops[op.name]
        return over

    def in_order(self) -> list[TenantOp]:
        """Its entries by stamp (unstamped ones first, in log order)."""
        return sorted(self.ops.values(), key=lambda op: op.stamp)

    def to_json(self) -> str:
        return json.dumps({"upto": self.upto, "ops": [asdict(op) for op in self.ops.values()]})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Base:
        data = json.loads(raw)
        ops = [TenantOp.from_json(json.dumps(op)) for op in data["ops"]]
        return cls(int(data["upto"]), {op.name: op for op in ops})


def upto(store: Any) -> int:
    """The index of the last entry folded into the base (0: none)."""
    raw = _get(store, LOG_UPTO)
    return int(store_text(raw)) if raw is not None else 0


def base(store: Any) -> Base:
    """The folded entries (empty where nothing was folded)."""
    raw = _get(store, LOG_BASE)
    return Base.from_json(raw) if raw is not None else Base()


def trim(store: Any, keep: int = LOG_KEEP) -> int:
    """Fold the entries before the newest `keep` into the base and delete them (but
    skips), once 2 x keep entries are past it (never past an entry not written yet);
    returns how many were deleted. Server 0's follower calls it: one trimmer per log."""
    n, folded = int(store.add(LOG_COUNT, 0)), upto(store)
    if n - folded < 2 * keep:
        return 0
    entries, _ = read(store, folded, last=n - keep)
    if not entries:
        return 0
    b = base(store)
    for i, op in entries:
        b.fold(i, op)
    dropped = b.bound(MAX_STAMPS)
    if dropped:
        logger.warning("mace: tenant log base holds %d names at most: %d dropped (a server "
                       "that missed them does not learn them)", MAX_STAMPS, dropped)  # fmt: skip
    store.set(LOG_BASE, b.to_json())  # first the base, then its index, then the deletes
    store.set(LOG_UPTO, str(b.upto))
    deleted = 0
    for i, op in entries:
        if op.op != "skip":  # a skip stays: its late writer must find it (rare: a writer lost)
            store.delete_key(LOG_ENTRY.format(i=i))
            deleted += 1
    return deleted


class RetryLater(Exception):
    """This server cannot apply the entry yet (SGLang is starting)."""


class MissedPurgeFailed(Exception):
    """The purge an entry was made after failed here; it counts tries of its own."""


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
    purges: dict[str, float] = field(default_factory=dict)  # the newest purge's stamp
    creates: dict[str, float] = field(default_factory=dict)  # the newest creation's stamp

    def settings(self) -> dict[str, str]:
        """As the feedback store's settings (all written in one transaction)."""
        return {
            "tenant_log_epoch": self.epoch,
            "tenant_log_applied": str(self.applied),
            "tenant_log_outbox": json.dumps(
                [{"epoch": s.epoch, "index": s.index, "op": asdict(s.op)} for s in self.outbox]
            ),
            "tenant_log_stamps": json.dumps(self.stamps),
            "tenant_log_purges": json.dumps(self.purges),
            "tenant_log_creates": json.dumps(self.creates),
        }

    @classmethod
    def from_settings(cls, get: Callable[[str, str], str]) -> Position:
        """From `get(key, default)` over the feedback store's settings."""
        outbox = [
            Sent(str(s["epoch"]), int(s["index"]), TenantOp.from_json(json.dumps(s["op"])))
            for s in json.loads(get("tenant_log_outbox", "[]"))
        ]
        stamps, purges, creates = (
            {str(k): float(v) for k, v in json.loads(get(f"tenant_log_{key}", "{}")).items()}
            for key in ("stamps", "purges", "creates")
        )
        return cls(get("tenant_log_epoch", ""), int(get("tenant_log_applied", "0")), outbox,
                   stamps, purges, creates)  # fmt: skip

    def handled(self, op: TenantOp) -> None:
        """Note `op`'s stamp as its name's newest, a purge's as its newest purge and a
        creation's as its newest creation (the oldest names beyond MAX_STAMPS go)."""
        if op.op == "retire" and op.purge:
            _newest(self.purges, op)
        if op.op == "create":
            _newest(self.creates, op)
        _newest(self.stamps, op)

    def owes(self, missed: TenantOp | None) -> bool:
        """Whether `missed` (an entry's missed_purge) is still to be applied here: not
        if this server applied it (or a newer purge), nor if it made or applied a
        creation of the name since, which the purge came before (as in the log, where
        that creation's stamp makes the purge lose)."""
        if missed is None:
            return False
        since = max(self.purges.get(missed.name, 0.0), self.creates.get(missed.name, 0.0))
        return since < missed.stamp

    def settled(self, op: TenantOp) -> bool:
        """Nothing of `op` left to apply here: superseded, and no purge in it owed."""
        return self.superseded(op) and not self.owes(op.purge_part())

    def superseded(self, op: TenantOp) -> bool:
        """Handled here already, or older than what was: an entry appended again, or one
        that lost to a newer change of the same tenant."""
        return bool(op.stamp) and op.stamp <= self.stamps.get(op.name, 0.0)


def _entry_key(op: TenantOp) -> tuple:
    """What tells one entry's tries from another's."""
    return (op.id, op.op, op.name, op.purge, op.stamp)


def _newest(stamps: dict[str, float], op: TenantOp) -> None:
    """stamps[op.name] = op.stamp if newer, keeping MAX_STAMPS names (the oldest go)."""
    if not op.stamp or op.stamp <= stamps.get(op.name, 0.0):
        return
    stamps.pop(op.name, None)
    stamps[op.name] = op.stamp
    if len(stamps) > MAX_STAMPS:
        del stamps[min(stamps, key=stamps.__getitem__)]


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
        keep: int = LOG_KEEP,
    ) -> None:
        self.cfg, self.apply, self.loop = cfg, apply, loop
        self.load, self.save = load, save
        self.poll_s, self.gap_s, self.keep = poll_s, gap_s, keep
        self.rank = cfg.sync_rank
        self.position: Position | None = None
        self.errors = 0
        self.skipped = 0  # entries given up after MAX_TRIES
        self.last_error = ""
        self.resent = 0  # own entries appended again to a new log
        self.dropped = 0  # own entries dropped from a full outbox
        self.trimmed = 0  # entries folded into the base and deleted (server 0)
        self.from_base = 0  # times this server was behind the base and applied it
        self._lock = threading.Lock()  # the position: this thread and the routes' appends
        # Held on the event loop by a local tenant change and its `send`, and by this
        # thread's applies: one tenant change at a time on this server, each checked
        # against the newest stamp when it runs.
        self.changing = asyncio.Lock()
        self._tries = 0  # failures of the entry `_failing` (the one that failed last)
        self._failing: tuple | None = None
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
            "trimmed": self.trimmed,
            "from_base": self.from_base,
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
            purged, created = book.purges.get(op.name), book.creates.get(op.name)
            stamp = max(time.time(), (before or 0.0) + 1e-6)
            op = replace(op, origin=self.rank, id=uuid.uuid4().hex, stamp=stamp,
                         purged=purged or 0.0)  # fmt: skip
            book.handled(op)  # from now on an older entry for this name loses here
        try:
            sent = append(store, op)
        except BaseException:  # not in the log: as if never sent
            with self._lock:
                for stamps, was in ((book.stamps, before), (book.purges, purged),
                            (book.creates, created)):  # fmt: skip
                    if stamps.get(op.name) == stamp:  # nothing newer came meanwhile
                        if was is None:
                            del stamps[op.name]
                        else:
                            stamps[op.name] = was
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

    async def _apply_newest(self, op: TenantOp, missed: TenantOp | None = None,
                            purge_only: bool = False) -> None:  # fmt: skip
        """Inside `changing`: the `missed` purge, if still owed, then `apply(op)` unless
        `purge_only` or this server changed the tenant since (its own newer entry, sent
        while the follower waited for the lock); each noted as handled once applied,
        before the lock is given back. A failed missed purge raises MissedPurgeFailed."""
        async with self.changing:
            with self._lock:
                book = self._book()
                skip = purge_only or book.superseded(op)
                if skip and not purge_only:  # superseded meanwhile: its own purge too
                    missed = op.purge_part()
                owed = book.owes(missed)
            if owed:
                try:
                    await self.apply(missed)
                except RetryLater:
                    raise
                except Exception as e:
                    raise MissedPurgeFailed(e) from e
                with self._lock:
                    book.handled(missed)
            if skip:
                return
            await self.apply(op)
            with self._lock:
                book.handled(op)

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
        outbox; then server 0 trims the log. A server behind the base applies it first."""
        with self._lock:
            book = self._book()
            now = epoch(store)
            if now != book.epoch:  # a new log (server 0 restarted): from its start
                book.epoch, book.applied = now, 0
                self._tries, self._failing, self._gap = 0, None, None
                self.save(book)
            self._resend(store, book, now)
            start = book.applied
        stalled = start < upto(store) and not self._catch_up(store, loop, book)
        entries, gap = read(store, book.applied) if not stalled else ([], None)
        for i, op in entries:
            if not self._take(loop, book, op):
                stalled = True  # this entry again at the next poll
                break
            with self._lock:
                book.applied = i
                self.save(book)
        store.set(LOG_APPLIED.format(rank=self.rank), str(book.applied))
        with self._lock:
            self._acked(store, book, now)
        if self.rank == 0:
            self.trimmed += trim(store, self.keep)
        if gap is not None and not stalled:
            first = self._gap[1] if self._gap and self._gap[0] == gap else time.monotonic()
            self._gap = (gap, first)
            if time.monotonic() - first >= self.gap_s:
                fill_gap(store, gap)
                self._error(f"tenant log entry {gap} unwritten for {self.gap_s:g} s: skipped")

    def _take(self, loop: asyncio.AbstractEventLoop, book: Position, op: TenantOp) -> bool:
        """One entry, unless superseded here; True when done with (its stamp noted). A
        purge this server still owes (Position.owes) that the entry was made after (the
        purge comes later, older, or was folded away) is applied first, and one that
        the entry is or was made after is applied even where the entry itself loses."""
        with self._lock:
            if book.settled(op):
                return True
            superseded = book.superseded(op)
            missed = op.purge_part() if superseded else op.missed_purge()
            if not book.owes(missed):
                missed = None
        if not self._handle(loop, op, missed, purge_only=superseded):
            return False
        with self._lock:  # handled: what was applied is noted by _apply_newest
            _newest(book.stamps, op)
        return True

    def _catch_up(self, store: Any, loop: asyncio.AbstractEventLoop, book: Position) -> bool:
        """This server is behind the base (it was away while server 0 trimmed, or lost
        its position): apply the base's entries, then go on after it. False when one
        has to wait (the whole base again at the next poll; what was applied is
        superseded by then)."""
        b = base(store)
        for op in b.in_order():
            with self._lock:
                settled = book.settled(op)
            if settled:
                continue
            if not self._take(loop, book, op):
                return False
            with self._lock:  # what it applied, noted: not again after a restart
                self._save(book)
        with self._lock:
            book.applied = b.upto
            self.from_base += 1
            self.save(book)
        return True

    def _handle(self, loop: asyncio.AbstractEventLoop, op: TenantOp,
                missed: TenantOp | None = None, purge_only: bool = False) -> bool:  # fmt: skip
        """True when the entry is done with (applied, not ours to apply, or given up);
        `missed`: a purge to apply before it (noted once applied; with `purge_only`, the
        entry itself is not applied). Failures count per entry, whatever was applied
        between its tries."""
        if op.op == "skip" or op.origin == self.rank:
            return True
        try:
            applied = self._apply_newest(op, missed, purge_only)
            asyncio.run_coroutine_threadsafe(applied, loop).result(APPLY_TIMEOUT_S)
        except RetryLater as e:
            self._error(f"tenant {op.op} {op.name!r} waits: {e}")
            return False
        except MissedPurgeFailed as e:
            assert missed is not None
            if self._handle_failure(missed, e.__cause__ or e):
                with self._lock:  # given up: the entry is tried on its own next time
                    self._book().handled(missed)
            return False
        except Exception as e:
            return self._handle_failure(op, e)
        if self._failing == _entry_key(op):
            self._failing, self._tries = None, 0
        return True

    def _handle_failure(self, op: TenantOp, e: BaseException) -> bool:
        """Count a failed apply of `op` (tries per entry, whatever was applied between
        them); True once it is given up (skipped, counted), after MAX_TRIES."""
        entry = _entry_key(op)
        if self._failing != entry:
            self._failing, self._tries = entry, 0
        self._tries += 1
        if self._tries < MAX_TRIES:
            self._error(f"tenant {op.op} {op.name!r} failed, tried again: {e!r}")
            return False
        self.skipped += 1
        self._error(f"tenant {op.op} {op.name!r} skipped after {MAX_TRIES} tries: {e!r}")
        self._failing, self._tries = None, 0
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
            raw = _get(store, key)
            marks.append(int(store_text(raw)) if raw is not None else 0)
        keep = [s for s in book.outbox if s.epoch != now or s.index > min(marks)]
        if len(keep) < len(book.outbox):
            book.outbox = keep
            self.save(book)

    def _error(self, msg: str) -> None:
        if msg != self.last_error:  # every poll for as long as it lasts: log it once
            logger.error("mace: %s", msg)
        self.errors += 1
        self.last_error = msg
