"""Durable feedback store (SQLite, WAL, synchronous commits).

Every process opens its own connection: the HTTP route writes accepted feedback, the
sidecar reads it and records training results. A commit returns only after the WAL is
synced, so a row acknowledged to a client survives kill -9 of any process.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mace_sgl.policy.fairshare import FairShare, tenant_weight

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    adapter TEXT NOT NULL,
    prompt TEXT NOT NULL,           -- the prompt string, or JSON chat messages
    prompt_is_chat INTEGER NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    weight REAL NOT NULL,
    train_count INTEGER NOT NULL DEFAULT 0,
    last_loss REAL,
    last_trained_at REAL,
    inflight_session TEXT           -- trainer session holding it, NULL when not in flight
);
CREATE INDEX IF NOT EXISTS feedback_pick ON feedback (adapter, train_count, last_loss);
-- The few rows in flight, found without a scan of every pair ever stored (held_elsewhere
-- runs on every Ready of a replica that asks, release_stale on every Hello).
CREATE INDEX IF NOT EXISTS feedback_inflight ON feedback (inflight_session)
    WHERE inflight_session IS NOT NULL;
-- Never-trained rows waiting, by adapter and arrival: newer_untrained on every Ready,
-- without a scan of an adapter's whole backlog.
CREATE INDEX IF NOT EXISTS feedback_waiting ON feedback (adapter, id)
    WHERE train_count = 0 AND inflight_session IS NULL;
-- Trained rows not in flight, by arrival: what trim_trained deletes beyond --retain.
CREATE INDEX IF NOT EXISTS feedback_trained ON feedback (id)
    WHERE train_count > 0 AND inflight_session IS NULL;
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,          -- the adapter name (a directory under STATE/adapters)
    created_at REAL NOT NULL,
    retired_at REAL,                -- NULL while the tenant exists
    weight REAL NOT NULL DEFAULT 1.0
);
"""


@dataclass(frozen=True)
class FeedbackRow:
    """One accepted preference pair, as stored."""

    id: int
    adapter: str
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    weight: float
    train_count: int
    last_loss: float | None


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the store with durable settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode every commit syncs the WAL, so an acknowledged row is on disk.
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


def version(conn: sqlite3.Connection) -> tuple[int, int]:
    """A value that differs after any change to the store, by any process: SQLite's
    data_version (moved by another connection's commit) with the rows `conn` itself
    changed (total_changes; its own commits leave data_version as it is)."""
    (other,) = conn.execute("PRAGMA data_version").fetchone()
    return int(other), conn.total_changes


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (the connection is in autocommit mode): BEGIN IMMEDIATE takes
    the write lock at once, so no other process's write comes between this one's read and
    its write; COMMIT on leaving the block, ROLLBACK (and the exception goes on) on any
    error in it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")  # a failed commit (disk full, I/O error) rolls back too
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back by itself already
            conn.execute("ROLLBACK")
        raise


class NotLive(Exception):
    """Feedback refused: its adapters are not live tenants (never created, or retired)."""

    def __init__(self, adapters: list[str]) -> None:
        super().__init__(f"no live adapter named {', '.join(map(repr, adapters))}")
        self.adapters = adapters


class BacklogFull(Exception):
    """Feedback refused: a tenant's never-trained pairs would exceed the bound."""

    def __init__(self, adapter: str, waiting: int, adding: int, limit: int) -> None:
        super().__init__(
            f"adapter {adapter!r} has {waiting} feedback pairs waiting to train; {adding} "
            f"more would pass the bound of {limit} (--mace-feedback-backlog); nothing was "
            "stored"
        )


# An adapter's oldest never-trained rows no trainer holds (index feedback_waiting).
_EVICT = (
    "DELETE FROM feedback WHERE id IN (SELECT id FROM feedback WHERE adapter = ?"
    " AND train_count = 0 AND inflight_session IS NULL ORDER BY id LIMIT ?)"
)


def add_feedback(
    conn: sqlite3.Connection,
    items: Iterable[dict],
    backlog: int = 0,
    live_only: bool = False,
    evict: bool = False,
) -> list[int]:
    """Insert validated items in one transaction: all are stored, or none. With `backlog`
    > 0, none are (BacklogFull) when an adapter's never-trained pairs would exceed it;
    with `evict` (--mace-feedback-overflow evict), that adapter's oldest never-trained
    pairs that no trainer holds are deleted first to make room, counted in the
    `feedback_evicted` setting, and BacklogFull comes only when those are too few.
    With `live_only`, none are (NotLive) when an item's adapter is not a live tenant, as
    of this transaction: a retirement (and a purge's delete, which deletes the rows
    stored up to it) that committed after the caller looked cannot be followed by rows
    of the retired name."""
    now = time.time()
    items = list(items)
    ids: list[int] = []
    with _transaction(conn):
        if live_only:
            named = {item["adapter"] for item in items}
            gone = sorted(a for a in named if tenant_state(conn, a) != "live")
            if gone:
                raise NotLive(gone)
        if backlog > 0:
            for adapter, adding in Counter(item["adapter"] for item in items).items():
                (waiting,) = conn.execute(
                    "SELECT COUNT(*) FROM feedback WHERE adapter = ? AND train_count = 0",
                    (adapter,),
                ).fetchone()
                over = waiting + adding - backlog
                if over > 0 and evict:
                    gone = conn.execute(_EVICT, (adapter, over)).rowcount
                    if gone == over:
                        add_to_setting(conn, "feedback_evicted", gone)
                        continue
                if over > 0:  # (a partial eviction rolls back with the transaction)
                    raise BacklogFull(adapter, waiting, adding, backlog)
        for item in items:
            prompt = item["prompt"]
            is_chat = not isinstance(prompt, str)
            cur = conn.execute(
                "INSERT INTO feedback (created_at, adapter, prompt, prompt_is_chat, chosen,"
                " rejected, weight) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    item["adapter"],
                    json.dumps(prompt) if is_chat else prompt,
                    int(is_chat),
                    item["chosen"],
                    item["rejected"],
                    float(item["weight"]),
                ),
            )
            ids.append(int(cur.lastrowid))
    return ids


def _row(r: tuple) -> FeedbackRow:
    return FeedbackRow(
        id=r[0],
        adapter=r[1],
        prompt=json.loads(r[2]) if r[3] else r[2],
        chosen=r[4],
        rejected=r[5],
        weight=r[6],
        train_count=r[7],
        last_loss=r[8],
    )


_COLUMNS = "id, adapter, prompt, prompt_is_chat, chosen, rejected, weight, train_count, last_loss"


def get(conn: sqlite3.Connection, ids: Iterable[int]) -> list[FeedbackRow]:
    """Rows by id, in id order."""
    ids = list(ids)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT {_COLUMNS} FROM feedback WHERE id IN ({marks}) ORDER BY id", ids)
    return [_row(r) for r in rows]


# Never-trained rows first (by arrival: `{sign}id`, newest first with "-"), then the
# trained ones by last DPO loss times weight.
_PICK_ORDER = (
    " ORDER BY train_count > 0, CASE WHEN train_count = 0 THEN {sign}id END,"
    " COALESCE(last_loss, 0) * weight DESC, id LIMIT ?"
)
_ARRIVAL = {"newest": "-", "oldest": ""}  # pick_next's `order`: --mace-pick-order


def pick_next(
    conn: sqlite3.Connection,
    adapter: str | list[str],
    n: int,
    session: str,
    max_train_count: int = 3,
    share: FairShare | None = None,
    order: str = "newest",
) -> list[FeedbackRow]:
    """Choose up to n samples to train next and mark them in flight for `session`.

    Never-trained samples first, the newest first (`order` "oldest": in arrival order):
    after a shift of preference, the pairs that state the new one train before a
    backlog of pairs that state the old; then trained ones by last DPO loss times
    weight, highest first, so the pairs the adapter still gets most wrong train again.
    A sample trains at most `max_train_count` times: endless replay of a few pairs
    overfits them. With several adapters (a list), each one's order is kept and `share`
    (policy/fairshare.py, kept by the caller across calls, weights set) decides whose
    sample comes next, among the adapters that still have one: the least served first,
    the list's order breaking ties. So one tenant's flood of feedback cannot keep
    another's pairs from reaching the trainer, and an adapter with nothing to train
    gives its turn away instead of handing it to its neighbour in the list. Without
    `share`, the adapters take plain turns in the list's order.
    """
    if order not in _ARRIVAL:
        raise ValueError(f"pick order {order!r}: one of {', '.join(_ARRIVAL)}")
    adapters = [adapter] if isinstance(adapter, str) else list(adapter)
    share = share if share is not None else FairShare()
    rank = {a: -float(i) for i, a in enumerate(adapters)}  # earlier in the list first
    with _transaction(conn):
        left = {
            a: conn.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE adapter = ? AND inflight_session IS NULL"
                " AND train_count < ?" + _PICK_ORDER.format(sign=_ARRIVAL[order]),
                (a, max_train_count, n),
            ).fetchall()[::-1]  # pop() takes the first
            for a in adapters
        }
        rows = []
        while len(rows) < n:
            backlog = {a: rank[a] for a in adapters if left[a]}
            name = share.pick(backlog)
            if name is None:
                break
            share.charge(name)
            rows.append(left[name].pop())
        conn.executemany(
            "UPDATE feedback SET inflight_session = ? WHERE id = ?",
            [(session, r[0]) for r in rows],
        )
    return [_row(r) for r in rows]


# An adapter's never-trained rows waiting, newer than an id (index feedback_waiting).
_WAITING_NEWER = (
    "SELECT id FROM feedback WHERE adapter = ? AND train_count = 0"
    " AND inflight_session IS NULL AND id > ? ORDER BY id DESC LIMIT ?"
)


def newer_untrained(conn: sqlite3.Connection, held: Iterable[int]) -> dict[str, list[int]]:
    """Never-trained pairs waiting (in flight for nobody) that should train before pairs
    of their adapter among `held` (pick order newest: never-trained before replays, the
    newest first): per adapter, their ids newest first, at most as many as `held` has of
    it (no more can replace them). Newer than the oldest held never-trained pair; any,
    where `held` has a replay (a pair that trained before) of that adapter."""
    held = list(held)
    if not held:
        return {}
    marks = ",".join("?" * len(held))
    rows = conn.execute(
        "SELECT adapter, MIN(CASE WHEN train_count = 0 THEN id END), SUM(train_count > 0),"
        f" COUNT(*) FROM feedback WHERE id IN ({marks}) GROUP BY adapter",
        held,
    ).fetchall()
    newer = {}
    for adapter, first_new, replays, n in rows:
        after = 0 if replays else first_new
        ids = [r[0] for r in conn.execute(_WAITING_NEWER, (adapter, after, n))]
        if ids:
            newer[adapter] = ids
    return newer


# Rows one trim_trained call deletes at most (each call holds the write lock meanwhile).
TRIM_BATCH = 10_000
# Beyond the newest `keep` trained rows (index feedback_trained: no scan of the table).
_TRIM = (
    "DELETE FROM feedback WHERE id IN (SELECT id FROM feedback WHERE train_count > 0"
    " AND inflight_session IS NULL ORDER BY id DESC LIMIT ? OFFSET ?)"
)


def trim_trained(conn: sqlite3.Connection, keep: int) -> int:
    """Delete pairs that trained (train count above 0: a rolled-back step and an orphan's
    hand-back count too), in flight for nobody, beyond the newest `keep` of them, at most
    TRIM_BATCH a call; returns how many went, also added to the `feedback_trimmed`
    setting. Never-trained pairs are bounded by add_feedback's backlog instead."""
    with _transaction(conn):
        gone = conn.execute(_TRIM, (TRIM_BATCH, keep)).rowcount
        if gone:
            add_to_setting(conn, "feedback_trimmed", gone)
    return gone


def delete_adapter(conn: sqlite3.Connection, adapter: str, upto: int | None = None) -> int:
    """Delete the feedback rows of `adapter` (a purged tenant's: DELETE
    /mace/adapters/NAME?purge=true), those with ids up to `upto` (retire_marked: the
    retired tenant's, not those of one created again since), TRIM_BATCH rows a
    transaction so that no write waits long for the lock; returns how many went. Rows a
    trainer holds go too: their results then change nothing (record_result)."""
    limit = upto if upto is not None else -1
    gone = 0
    while True:
        with _transaction(conn):
            n = conn.execute(
                "DELETE FROM feedback WHERE id IN (SELECT id FROM feedback WHERE adapter = ?"
                " AND (? < 0 OR id <= ?) LIMIT ?)",
                (adapter, limit, limit, TRIM_BATCH),
            ).rowcount
        gone += n
        if n < TRIM_BATCH:
            return gone


def record_result(conn: sqlite3.Connection, sample_id: int, loss: float, session: str) -> bool:
    """Record one trained sample; False (nothing changed) if `session` no longer holds it."""
    cur = conn.execute(
        "UPDATE feedback SET train_count = train_count + 1, last_loss = ?, last_trained_at = ?,"
        " inflight_session = NULL WHERE id = ? AND inflight_session = ?",
        (loss, time.time(), sample_id, session),
    )
    return cur.rowcount == 1


def release_stale(conn: sqlite3.Connection, live: str | Iterable[str] | None) -> int:
    """Return in-flight samples of every trainer session not in `live` (one live session,
    or those of all replicas; dead sessions) to the queue."""
    keep = [live] if isinstance(live, str) else [s for s in (live or ()) if s]
    marks = ",".join("?" * len(keep))
    cur = conn.execute(
        "UPDATE feedback SET inflight_session = NULL WHERE inflight_session IS NOT NULL"
        + (f" AND inflight_session NOT IN ({marks})" if keep else ""),
        keep,
    )
    return cur.rowcount


def held_elsewhere(conn: sqlite3.Connection, session: str) -> int:
    """How many samples trainer sessions other than `session` hold in flight."""
    return conn.execute(
        "SELECT COUNT(*) FROM feedback WHERE inflight_session IS NOT NULL"
        " AND inflight_session != ?",
        (session,),
    ).fetchone()[0]


def release_unheld(conn: sqlite3.Connection, session: str, held: Iterable[int]) -> int:
    """Return to the queue the samples in flight for `session` that it does not hold."""
    keep = set(held)
    with _transaction(conn):
        rows = conn.execute(
            "SELECT id FROM feedback WHERE inflight_session = ?", (session,)
        ).fetchall()
        free = [(r[0], session) for r in rows if r[0] not in keep]
        conn.executemany(
            "UPDATE feedback SET inflight_session = NULL WHERE id = ? AND inflight_session = ?",
            free,
        )
    return len(free)


def release(conn: sqlite3.Connection, session: str, ids: Iterable[int]) -> dict[str, int]:
    """Return these samples, in flight for `session`, to the queue (Work never sent, or
    given back untrained); how many went back, per adapter."""
    ids = list(ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    where = f" WHERE inflight_session = ? AND id IN ({marks})"
    with _transaction(conn):
        back = dict(
            conn.execute(
                "SELECT adapter, COUNT(*) FROM feedback" + where + " GROUP BY adapter",
                [session, *ids],
            ).fetchall()
        )
        conn.execute("UPDATE feedback SET inflight_session = NULL" + where, [session, *ids])
    return back


@dataclass(frozen=True)
class Counts:
    """Row counts for /mace/status."""

    feedback: int
    untrained: int
    inflight: int


def counts(conn: sqlite3.Connection, adapter: str | None = None) -> Counts:
    """Durable rows, rows never trained once, rows in flight (optionally for one adapter).
    From the indexes alone (_COUNTS): /mace/status asks on every call."""
    if adapter is None:
        total, untrained = conn.execute(_COUNTS).fetchone()
        (inflight,) = conn.execute(_INFLIGHT).fetchone()
    else:
        total, untrained = conn.execute(_COUNTS + " WHERE adapter = ?", (adapter,)).fetchone()
        (inflight,) = conn.execute(_INFLIGHT + " AND adapter = ?", (adapter,)).fetchone()
    return Counts(feedback=total, untrained=untrained or 0, inflight=inflight)


# Counts that read an index, not the table: the rows carry the prompt and both answers,
# so a scan of the table at --mace-feedback-retain's 100000 rows read about 100 MB and
# took 130-160 ms on a 2-core Xeon for each /mace/status (2026-12-07). feedback_pick
# (adapter, train_count, ...) covers the first; the partial index of rows in flight the
# second, whose few rows are then read.
_COUNTS = "SELECT COUNT(*), SUM(train_count = 0) FROM feedback INDEXED BY feedback_pick"
_INFLIGHT = (
    "SELECT COUNT(*) FROM feedback INDEXED BY feedback_inflight WHERE inflight_session IS NOT NULL"
)
_COUNTS_BY_ADAPTER = (
    "SELECT adapter, COUNT(*), SUM(train_count = 0) FROM feedback INDEXED BY feedback_pick"
    " GROUP BY adapter"
)
_INFLIGHT_BY_ADAPTER = (
    "SELECT adapter, COUNT(*) FROM feedback INDEXED BY feedback_inflight"
    " WHERE inflight_session IS NOT NULL GROUP BY adapter"
)


def tenant_state(conn: sqlite3.Connection, name: str) -> str | None:
    """Tenant `name`'s state: "live" while it exists, "retired" once retired, None if
    the store never had it."""
    row = conn.execute("SELECT retired_at IS NULL FROM tenants WHERE name = ?", (name,))
    found = row.fetchone()
    return None if found is None else ("live" if found[0] else "retired")


def counts_by_adapter(conn: sqlite3.Connection) -> dict[str, Counts]:
    """counts() of every adapter that has feedback rows."""
    rows = conn.execute(_COUNTS_BY_ADAPTER)
    inflight = dict(conn.execute(_INFLIGHT_BY_ADAPTER))
    return {
        a: Counts(feedback=n, untrained=u or 0, inflight=inflight.get(a, 0)) for a, n, u in rows
    }


def set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Durably set a control setting (e.g. `paused`)."""
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def get_setting(conn: sqlite3.Connection, key: str, default: str) -> str:
    """A control setting, or the default when it was never set."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def add_to_setting(conn: sqlite3.Connection, key: str, n: int) -> None:
    """Add `n` to a counting setting (rows deleted so far: `feedback_trimmed`,
    `feedback_evicted`), in the caller's transaction."""
    set_setting(conn, key, str(int(get_setting(conn, key, "0")) + n))


# -- tenants: the adapters that exist (each one trained on its own feedback) -------------


@dataclass(frozen=True)
class Tenant:
    """One existing adapter."""

    name: str
    created_at: float
    weight: float


def add_tenant(conn: sqlite3.Connection, name: str, weight: float = 1.0) -> bool:
    """Create tenant `name` (or bring a retired one back); True if it did not exist."""
    with _transaction(conn):
        row = conn.execute("SELECT retired_at FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] is None:
            return False
        conn.execute(
            "INSERT INTO tenants (name, created_at, retired_at, weight) VALUES (?, ?, NULL, ?)"
            " ON CONFLICT(name) DO UPDATE SET retired_at = NULL, weight = excluded.weight,"
            " created_at = excluded.created_at",
            (name, time.time(), float(weight)),
        )
    return True


def retire_tenant(conn: sqlite3.Connection, name: str) -> bool:
    """Retire tenant `name` (its feedback rows stay); False if it does not exist."""
    cur = conn.execute(
        "UPDATE tenants SET retired_at = ? WHERE name = ? AND retired_at IS NULL",
        (time.time(), name),
    )
    return cur.rowcount == 1


def retire_marked(conn: sqlite3.Connection, name: str) -> tuple[bool, int]:
    """retire_tenant, and in the same transaction the newest feedback id of `name` (0:
    none): the rows up to it are the retired tenant's (what its purge deletes), any
    after it come from a tenant created again under the name since."""
    with _transaction(conn):
        retired = retire_tenant(conn, name)
        (upto,) = conn.execute(
            "SELECT COALESCE(MAX(id), 0) FROM feedback WHERE adapter = ?", (name,)
        ).fetchone()
    return retired, int(upto)


def tenants(conn: sqlite3.Connection) -> list[Tenant]:
    """The existing tenants, oldest first (weights clamped into the range the route takes
    now: a store written before it may hold Infinity)."""
    rows = conn.execute(
        "SELECT name, created_at, weight FROM tenants WHERE retired_at IS NULL"
        " ORDER BY created_at, name"
    )
    return [Tenant(name, created, tenant_weight(weight)) for name, created, weight in rows]


def created_at(conn: sqlite3.Connection, name: str) -> float | None:
    """When tenant `name` was created (or brought back): which incarnation of the name
    exists now (None: none, it is retired or was never created)."""
    row = conn.execute(
        "SELECT created_at FROM tenants WHERE name = ? AND retired_at IS NULL", (name,)
    ).fetchone()
    return row[0] if row is not None else None


def has_tenant(conn: sqlite3.Connection, name: str) -> bool:
    """True if tenant `name` exists (not retired)."""
    return tenant_state(conn, name) == "live"
