"""One step at a time per tenant across servers: a lease in the adapter group's store.

Within one server the sidecar leases training to one replica at a time (sidecar/main.py).
Several servers (`--mace-sync-world-size` > 1) each have their own sidecar and feedback
store, so nothing there stops two servers from stepping the same tenant from the same
version at once, and one of the two new versions would be lost. This lease closes that:
before a step, a trainer takes its tenant's key in the torch.distributed store every
scheduler of every server already shares (trainer/replicas.py), and gives it back once
the step's version reached every peer (or the step rolled back).

The key's value is plain text, set only by compare-and-set:
    "free:V"            nobody steps; V is the newest version a holder gave back
    "held:R:T:V"        global rank R steps, until unix time T unless it renews; V as above

A trainer takes a free key only when it already serves version V or newer (a version
sent before the release may still be on its way to it), and a held key only once its
holder stopped renewing (a holder that died: after TTL_S). A holder that steps again
before its last version was delivered holds the key twice and frees it on the last
release. Store calls are synchronous but rare: one per step start (refusals back off
RETRY_S) and one renewal every RENEW_S.

When the store's server (server 0) dies, calls fail and no step starts; a thread
connects again (`connect`, tried every RETRY_S plus its connection timeout; the
scheduler thread never waits for a connection), so steps go on once server 0 is back
with a fresh store, where no key exists. A key held across that restart would be lost:
the thread writes each key this scheduler holds into the fresh store (compare-and-set
from absent) as soon as it connects, and after any new connection this scheduler takes
no new key for RENEW_S, so that the other servers' holders, connecting as it did, write
theirs first. What a fresh store cannot keep is each key's version floor: it starts
from 0, and until the group's announcements (runtime._announce_versions) bring every
server to the newest version, a server that resumed an older checkpoint could step
from it (README, Known gaps).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mace_sgl.trainer.replicas import store_text

logger = logging.getLogger("mace_sgl.trainer")

TTL_S = 60.0  # a holder that stops renewing loses the key after this long
RENEW_S = 10.0
RETRY_S = 0.5  # after a refusal, the next try for that tenant


@dataclass(frozen=True)
class LeaseValue:
    holder: int | None  # global rank, None when free
    expires: float  # unix time (0 when free)
    version: int  # the newest version a holder gave back

    @classmethod
    def parse(cls, raw: bytes | str) -> LeaseValue:
        text = store_text(raw)
        parts = text.split(":")
        if parts[0] == "free" and len(parts) == 2:
            return cls(None, 0.0, int(parts[1]))
        if parts[0] == "held" and len(parts) == 4:
            return cls(int(parts[1]), float(parts[2]), int(parts[3]))
        raise ValueError(f"not a lease value: {text!r}")

    def text(self) -> str:
        if self.holder is None:
            return f"free:{self.version}"
        return f"held:{self.holder}:{self.expires:.3f}:{self.version}"


class ClusterLease:
    """This scheduler's end of the per-tenant leases (`store`: a torch.distributed Store)."""

    def __init__(self, store: Any, rank: int, clock: Callable[[], float] = time.time,
                 connect: Callable[[], Any] | None = None) -> None:  # fmt: skip
        """`connect`: a new connection to the store, tried after a call failed."""
        self.store, self.rank, self.clock = store, rank, clock
        self.connect = connect
        self._connecting = threading.Lock()  # held while a thread connects again
        self.quiet_until = 0.0  # after a new connection: no new key before this time
        self.held: dict[str, tuple[str, int]] = {}  # name -> (value text, holds)
        self.gave_back: dict[str, int] = {}  # name -> newest version released meanwhile
        self.retry_at: dict[str, float] = {}
        self.renewed_at = 0.0
        self.refusals = 0
        self.errors = 0

    @staticmethod
    def key(name: str) -> str:
        return "mace/lease/" + hashlib.sha256(name.encode()).hexdigest()[:16]

    def try_acquire(self, name: str, version: int) -> bool:
        """Whether this scheduler may start a step of `name`, which it serves at `version`."""
        if name in self.held:
            value, holds = self.held[name]
            self.held[name] = (value, holds + 1)
            return True
        now = self.clock()
        if now < max(self.retry_at.get(name, 0.0), self.quiet_until):
            return False
        try:
            key = self.key(name)
            raw = self.store.compare_set(key, "", "free:0")  # the current value, made once
            current = LeaseValue.parse(raw)
            taken = current.holder is None or current.expires < now
            if taken and version >= current.version:
                mine = LeaseValue(self.rank, now + TTL_S, current.version).text()
                if store_text(self.store.compare_set(key, store_text(raw), mine)) == mine:
                    self.held[name] = (mine, 1)
                    return True
        except Exception as e:  # the store is gone (its server died): no steps
            self._reconnect()
            self._error(f"acquire {name}: {type(e).__name__}: {e}")
        self.refusals += 1
        self.retry_at[name] = now + RETRY_S
        return False

    def release(self, name: str, version: int) -> None:
        """A step of `name` ended (delivered at `version`, or rolled back)."""
        if name not in self.held:
            return
        value, holds = self.held[name]
        self.gave_back[name] = max(version, self.gave_back.get(name, -1))
        if holds > 1:
            self.held[name] = (value, holds - 1)
            return
        del self.held[name]
        free = LeaseValue(None, 0.0, self.gave_back.pop(name)).text()
        try:
            self.store.compare_set(self.key(name), value, free)
        except Exception as e:
            self._reconnect()
            self._error(f"release {name}: {type(e).__name__}: {e}")

    def renew(self) -> None:
        """Extend every held key (called from each poll; acts every RENEW_S)."""
        now = self.clock()
        if not self.held or now - self.renewed_at < RENEW_S:
            return
        self.renewed_at = now
        for name, (value, holds) in list(self.held.items()):
            old = LeaseValue.parse(value)
            new = LeaseValue(self.rank, now + TTL_S, old.version).text()
            try:
                if store_text(self.store.compare_set(self.key(name), value, new)) == new:
                    self.held[name] = (new, holds)
                else:
                    self._error(f"renew {name}: the key was taken after it expired")
            except Exception as e:
                self._reconnect()
                self._error(f"renew {name}: {type(e).__name__}: {e}")

    def status(self) -> dict[str, Any]:
        return {"held": sorted(self.held), "refusals": self.refusals, "errors": self.errors}

    def _reconnect(self) -> None:
        """After a failed call: a thread connects again, unless one is at it already."""
        if self.connect is None or not self._connecting.acquire(blocking=False):
            return

        def connect() -> None:
            try:
                while True:
                    try:
                        store = self.connect()
                        for name, (value, _) in list(self.held.items()):
                            store.compare_set(self.key(name), "", value)  # a fresh store
                        break
                    except Exception:  # the store's server is not back yet
                        time.sleep(RETRY_S)
                self.quiet_until = self.clock() + RENEW_S
                self.store = store
            finally:
                self._connecting.release()

        threading.Thread(target=connect, name="mace-lease-connect", daemon=True).start()

    def _error(self, msg: str) -> None:
        self.errors += 1
        logger.error("cluster lease: %s", msg)
