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
connects again (`connect`, tried every RETRY_S plus its connection timeout), and while
it does no call goes to the dead store, so the scheduler thread waits for neither. Steps
go on once server 0 is back with a fresh store, where no key exists. A key held across
that restart would be lost: at its next call the scheduler thread writes each key it
holds into the new store with a new expiry (compare-and-set from absent), and after a
new connection (or a start with `connect`) it takes no new key for RENEW_S, so that the
other servers' holders, connecting as it did, write theirs first. What a fresh store cannot keep is each key's version floor: it starts
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
        """`connect`: a new connection to the store, made by a thread after a call
        failed. With it, no key is taken for RENEW_S after this start either (a restarted
        server 0: the others' holders write theirs into its fresh store first)."""
        self.store, self.rank, self.clock = store, rank, clock
        self.connect = connect
        self._connecting = threading.Lock()  # held while a thread connects again
        self._new_store: Any = None  # its connection, for the scheduler thread to adopt
        # after a start or a new connection: no new key before this time
        self.quiet_until = clock() + RENEW_S if connect is not None else 0.0
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
        self._adopt()
        if name in self.held:
            value, holds = self.held[name]
            self.held[name] = (value, holds + 1)
            return True
        now = self.clock()
        if now < max(self.retry_at.get(name, 0.0), self.quiet_until):
            return False
        if self._connecting.locked():  # the store is gone: no call waits on it
            self.refusals += 1
            self.retry_at[name] = now + RETRY_S
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
        except ValueError as e:  # a value that is not a lease's: the store answered
            self._error(f"acquire {name}: {e}")
        except Exception as e:  # the store is gone (its server died): no steps
            self._store_failed(f"acquire {name}", e)
        self.refusals += 1
        self.retry_at[name] = now + RETRY_S
        return False

    def release(self, name: str, version: int) -> None:
        """A step of `name` ended (delivered at `version`, or rolled back)."""
        self._adopt()
        if name not in self.held:
            return
        value, holds = self.held[name]
        self.gave_back[name] = max(version, self.gave_back.get(name, -1))
        if holds > 1:
            self.held[name] = (value, holds - 1)
            return
        del self.held[name]
        free = LeaseValue(None, 0.0, self.gave_back.pop(name)).text()
        if self._connecting.locked():  # not written into the next store: free there
            return
        try:
            self.store.compare_set(self.key(name), value, free)
        except Exception as e:
            self._store_failed(f"release {name}", e)

    def renew(self) -> None:
        """Extend every held key (called from each poll; acts every RENEW_S)."""
        self._adopt()
        now = self.clock()
        if not self.held or now - self.renewed_at < RENEW_S or self._connecting.locked():
            return
        self.renewed_at = now
        for name, (value, holds) in list(self.held.items()):
            try:
                self._extend(name, value, holds, now)
            except Exception as e:
                self._store_failed(f"renew {name}", e)

    def status(self) -> dict[str, Any]:
        return {"held": sorted(self.held), "refusals": self.refusals, "errors": self.errors}

    def _extend(self, name: str, value: str, holds: int, now: float, fresh: bool = False) -> None:
        """Hold `name`'s key until now + TTL_S (`fresh`: it may be missing, in a new
        store; then it is written anew)."""
        new = LeaseValue(self.rank, now + TTL_S, LeaseValue.parse(value).version).text()
        key = self.key(name)
        if fresh and store_text(self.store.compare_set(key, "", new)) == new:
            self.held[name] = (new, holds)
        elif store_text(self.store.compare_set(key, value, new)) == new:
            self.held[name] = (new, holds)
        else:
            self._error(f"renew {name}: the key was taken after it expired")

    def _store_failed(self, what: str, e: Exception) -> None:
        """A store call failed: a thread connects again, unless one is at it already;
        the scheduler thread adopts the connection at its next call (_adopt)."""
        self._error(f"{what}: {type(e).__name__}: {e}")
        if self.connect is None or not self._connecting.acquire(blocking=False):
            return

        def connect() -> None:
            try:
                while True:
                    try:
                        self._new_store = self.connect()
                        return
                    except Exception:  # the store's server is not back yet
                        time.sleep(RETRY_S)
            finally:
                self._connecting.release()

        threading.Thread(target=connect, name="mace-lease-connect", daemon=True).start()

    def _adopt(self) -> None:
        """On the scheduler thread: take a new connection up, write every key this
        scheduler holds into it with a new expiry (in a restarted server 0's fresh
        store they are missing), and take no new key for RENEW_S."""
        store, self._new_store = self._new_store, None
        if store is None:
            return
        self.store = store
        now = self.clock()
        self.quiet_until = now + RENEW_S
        self.renewed_at = now
        for name, (value, holds) in list(self.held.items()):
            try:
                self._extend(name, value, holds, now, fresh=True)
            except Exception as e:
                self._store_failed(f"rewrite {name}", e)
                return

    def _error(self, msg: str) -> None:
        self.errors += 1
        logger.error("cluster lease: %s", msg)
