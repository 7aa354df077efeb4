"""Run-time tenants across servers: one log of creations and retirements in the adapter
group's store, which every server's HTTP process replays.

With several servers (--mace-sync-world-size > 1) each has its own feedback store and its
own SGLang, so POST /mace/adapters on one of them must create the tenant on every server,
and DELETE retire it everywhere. The route does its own server's part, then appends the
operation to a log in the group's TCPStore (trainer/replicas.py: served by server 0 on
--mace-sync-addr): `mace/tenants/n` counts the entries, `mace/tenants/<i>` holds the i-th
as JSON. A thread in every server's HTTP process (TenantLogFollower) reads the log from
where it left off every POLL_S and applies each entry through the same local steps as the
route, in log order; applying is idempotent (a tenant that exists is not created again,
one already retired is not retired again), so a server also replays its own entries. A
server that starts later, or restarts, replays the whole log: a tenant created at run
time is there after a restart too. Until a server applied a creation, versions of that
tenant that other servers publish wait in its trainer (trainer/runtime.py, for up to
ORPHAN_AFTER_S), and its own feedback for that tenant is refused with 404 like any
unknown adapter's.

Entries are plain JSON (TenantOp); nothing is unpickled. The store lives in server 0: while
it is down, routes that must append answer 503 and the followers retry.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

LOG_COUNT = "mace/tenants/n"
LOG_ENTRY = "mace/tenants/{i}"
POLL_S = 2.0
STORE_TIMEOUT_S = 10.0  # a route's or the follower's store call, at most
OPS = ("create", "retire")


@dataclass(frozen=True)
class TenantOp:
    """One entry of the log: create or retire tenant `name`."""

    op: str
    name: str
    weight: float = 1.0  # create: the tenant's share of steps
    purge: bool = False  # retire: delete its checkpoints too
    origin: int = -1  # the server (--mace-sync-rank) that appended it

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"tenant log op {self.op!r}: one of {', '.join(OPS)}")

    @classmethod
    def from_json(cls, raw: bytes | str) -> TenantOp:
        data = json.loads(raw)
        return cls(
            op=str(data["op"]),
            name=str(data["name"]),
            weight=float(data.get("weight", 1.0)),
            purge=bool(data.get("purge", False)),
            origin=int(data.get("origin", -1)),
        )


def connect(cfg: Any, timeout_s: float = STORE_TIMEOUT_S) -> Any:
    """A client connection to the group's TCPStore (--mace-sync-addr)."""
    from torch.distributed import TCPStore

    from mace_sgl.config import split_addr

    host, port = split_addr(cfg.sync_addr)
    timeout = datetime.timedelta(seconds=timeout_s)
    return TCPStore(host, port, cfg.sync_world_size * max(cfg.replicas, 1), False, timeout)


def append(store: Any, op: TenantOp) -> int:
    """Add `op` at the end of the log; returns its index (from 1)."""
    i = int(store.add(LOG_COUNT, 1))
    store.set(LOG_ENTRY.format(i=i), json.dumps(asdict(op)))
    return i


def read(store: Any, after: int) -> list[tuple[int, TenantOp]]:
    """The entries after index `after`, in order; stops before one that was counted but
    not written yet (its writer is between add and set: the next read has it)."""
    n = int(store.add(LOG_COUNT, 0))
    out = []
    for i in range(after + 1, n + 1):
        key = LOG_ENTRY.format(i=i)
        if not store.check([key]):
            break
        out.append((i, TenantOp.from_json(store.get(key))))
    return out


class TenantLogFollower:
    """Applies the log to this server: a daemon thread that hands each new entry to
    `apply` on the HTTP process's event loop (`loop()` returns it, None until SGLang's
    tokenizer manager has one) and goes on only when it returned. `apply` raising
    RetryLater keeps the entry for the next poll (this server is still starting); any
    other error is logged and the entry skipped (a bad entry must not stop the log)."""

    def __init__(
        self,
        cfg: Any,
        apply: Callable[[TenantOp], Awaitable[None]],
        loop: Callable[[], asyncio.AbstractEventLoop | None],
        poll_s: float = POLL_S,
    ) -> None:
        self.cfg, self.apply, self.loop, self.poll_s = cfg, apply, loop, poll_s
        self.applied = 0  # the index of the last entry handled
        self.errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mace-tenant-log", daemon=True)

    def start(self) -> TenantLogFollower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        return {"applied": self.applied, "errors": self.errors, "last_error": self.last_error}

    def _run(self) -> None:
        store = None
        while not self._stop.wait(self.poll_s):
            loop = self.loop()
            if loop is None:
                continue
            try:
                store = store or connect(self.cfg)
                entries = read(store, self.applied)
            except Exception as e:  # server 0 (the store) is down or not up yet
                store = None
                self._error(f"tenant log unreadable: {type(e).__name__}: {e}")
                continue
            for i, op in entries:
                if not self._apply(loop, op):
                    break  # RetryLater: this entry again next time
                self.applied = i

    def _apply(self, loop: asyncio.AbstractEventLoop, op: TenantOp) -> bool:
        """True when the entry is done with (applied, or skipped after an error)."""
        try:
            asyncio.run_coroutine_threadsafe(self.apply(op), loop).result()
            return True
        except RetryLater as e:
            self._error(f"tenant {op.op} {op.name!r} waits: {e}")
            return False
        except Exception as e:
            self._error(f"tenant {op.op} {op.name!r} skipped: {type(e).__name__}: {e}")
            return True

    def _error(self, msg: str) -> None:
        if msg != self.last_error:  # every poll for as long as it lasts: log it once
            logger.error("mace: %s", msg)
        self.errors += 1
        self.last_error = msg


class RetryLater(Exception):
    """This server cannot apply the entry yet (SGLang is starting)."""
