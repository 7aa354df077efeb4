"""One step at a time per tenant across servers: a lease in the adapter group's store.

Within one server the sidecar leases training to one replica at a time (sidecar/main.py).
Several servers (`--mace-sync-world-size` > 1) each have their own sidecar and feedback
store, so nothing there stops two servers from stepping the same tenant from the same
version at once, and one of the two new versions would be lost. This lease closes that:
before a step, a trainer takes its tenant's key in the torch.distributed store every
scheduler of every server already shares (trainer/replicas.py), and gives it back once
the step's version reached every peer (or the step rolled back).

The key's value is plain text, changed only by compare-and-set:
    "free:V"            nobody steps; V is the version floor
    "held:R:T:V"        global rank R steps, until unix time T unless it renews; V as above

The floor V is the newest version any member gave back or announced. A trainer takes a
free key only when it already serves version V or newer (a version sent before the
release may still be on its way to it), and a held key only once its holder stopped
renewing (a holder that died: after TTL_S). A holder that steps again before its last
version was delivered holds the key twice and frees it on the last release. Store calls
are synchronous but rare: one or two per step start (refusals back off RETRY_S, and the
trainer passes that tenant over meanwhile), and every RENEW_S a look at the store plus
one renewal per held key; an announcement makes one or two per tenant.

Every member announces the versions it serves (`versions`) at its first call and after
each new connection: it raises each key's floor to them, then writes its ready key. No
key is taken until every member of the group (`world`) is ready, so in a store where
the keys start from nothing (the first start, or a restarted server 0's fresh store) a
server that resumed an older checkpoint cannot step from it: the floor names the
newest version a member serves, and the group's announcements (runtime
`_announce_versions`) bring it there first. The price: steps wait for every member,
as the group's first generation does (trainer/replicas.py).

When the store's server (server 0) dies, calls fail and no step starts; a thread
connects again (`connect`, tried every RETRY_S plus its connection timeout), and while
it does no call goes to the dead store, so the scheduler thread waits for neither. Steps
go on once server 0 is back with a fresh store. A key held across that restart would be
lost: at its next call the scheduler thread writes each key it holds into the new store
with a new expiry, announces its versions again, and takes no new key for RENEW_S, so
that the other servers' holders, connecting as it did, write theirs first.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mace_sgl.trainer.replicas import store_text

logger = logging.getLogger("mace_sgl.trainer")

TTL_S = 60.0  # a holder that stops renewing loses the key after this long
RENEW_S = 10.0
RETRY_S = 0.5  # after a refusal, the next try for that tenant
CAS_TRIES = 8  # compare-and-set rounds before a change is given up as contended


class Contended(Exception):
    """A key changed under every one of CAS_TRIES compare-and-set rounds."""


@dataclass(frozen=True)
class LeaseValue:
    holder: int | None  # global rank, None when free
    expires: float  # unix time (0 when free)
    version: int  # the floor: the newest version given back or announced

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
    """This scheduler's end of the per-tenant leases (`store`: a torch.distributed Store
    shared by the `world` members of the group, this one global rank `rank`; `versions`:
    the version this scheduler serves, by tenant)."""

    def __init__(self, store: Any, rank: int, world: int,
                 versions: Callable[[], dict[str, int]],
                 clock: Callable[[], float] = time.time,
                 connect: Callable[[], Any] | None = None) -> None:  # fmt: skip
        """`connect`: a new connection to the store, made by a thread after a call
        failed. With it, no key is taken for RENEW_S after this start either (a restarted
        server 0: the others' holders write theirs into its fresh store first)."""
        self.store, self.rank, self.world, self.clock = store, rank, world, clock
        self.versions, self.connect = versions, connect
        self._connecting = threading.Lock()  # held while a thread connects again
        self._new_store: Any = None  # its connection, for the scheduler thread to adopt
        # after a start or a new connection: no new key before this time
        self.quiet_until = clock() + RENEW_S if connect is not None else 0.0
        self.announced = False  # this member's versions and ready key are in the store
        self.announced_at = 0.0
        self.announce_at = 0.0  # after a contended announcement: not before this time
        self.ready = False  # every member's are
        self._told_missing = False
        self.held: dict[str, int] = {}  # name -> steps in flight under this key
        # Keys another member took while this scheduler's steps ran on (it stalled past
        # TTL_S): name -> those steps; their last release still raises the floor.
        self.lost: dict[str, int] = {}
        self.gave_back: dict[str, int] = {}  # name -> newest version released meanwhile
        self.unwritten: dict[str, int] = {}  # name -> a floor released while the store was gone
        self.retry_at: dict[str, float] = {}
        self.renewed_at = 0.0
        self.refusals = 0
        self.errors = 0

    @staticmethod
    def key(name: str) -> str:
        return "mace/lease/" + hashlib.sha256(name.encode()).hexdigest()[:16]

    @staticmethod
    def ready_key(rank: int) -> str:
        return f"mace/lease/ready/{rank}"

    def try_acquire(self, name: str, version: int) -> bool:
        """Whether this scheduler may start a step of `name`, which it serves at `version`."""
        self._adopt()
        if name in self.held:
            self.held[name] += 1
            return True
        now = self.clock()
        if now < max(self.retry_at.get(name, 0.0), self.quiet_until):
            return False
        if not self.announced and not self._connecting.locked():
            self._announce()
        if self._connecting.locked():  # the store is gone: no call waits on it
            self.refusals += 1
            self.retry_at[name] = now + RETRY_S
            return False

        def take(current: LeaseValue) -> LeaseValue | None:
            free = current.holder is None or current.expires < now
            if free and version >= current.version:
                return LeaseValue(self.rank, now + TTL_S, current.version)
            return None

        try:
            if self._ready() and self._update(name, take) is not None:
                self.held[name] = 1
                return True
        except (ValueError, Contended) as e:  # the store answered
            self._error(f"acquire {name}: {e}")
        except Exception as e:  # the store is gone (its server died): no steps
            self._store_failed(f"acquire {name}", e)
        self.refusals += 1
        self.retry_at[name] = now + RETRY_S
        return False

    def refused_lately(self, name: str) -> bool:
        """Whether `name` was refused within RETRY_S: the trainer passes it over
        meanwhile, so that a tenant another server steps holds up no other tenant."""
        return self.clock() < self.retry_at.get(name, 0.0)

    def release(self, name: str, version: int) -> None:
        """A step of `name` ended (delivered at `version`, or rolled back)."""
        self._adopt()
        steps = self.lost if name in self.lost else self.held
        if name not in steps:
            return
        self.gave_back[name] = max(version, self.gave_back.get(name, -1))
        steps[name] -= 1
        if steps[name] > 0:
            return
        del steps[name]
        if name in self.held or name in self.lost:  # a step under the other entry runs
            return
        self._free(name, self.gave_back.pop(name))

    def renew(self) -> None:
        """Every RENEW_S (called from each poll): look that the store still answers
        (an idle member, too, follows a restarted server 0 into its fresh store), write
        what was released while it was gone, and extend every held key; and announce
        this member's versions whenever they are not in the store."""
        self._adopt()
        if self._connecting.locked():
            return
        now = self.clock()
        if now - self.renewed_at >= RENEW_S:
            self.renewed_at = now
            try:
                if self.announced and not self.store.check([self.ready_key(self.rank)]):
                    self._new_store = self.store  # a store that forgot us: as a new one
                    self._adopt()
                    return
                if self.announced and not self.ready:
                    self._ready()
            except Exception as e:
                self._store_failed("look at the store", e)
                return
            for name, floor in list(self.unwritten.items()):
                del self.unwritten[name]
                if not self._free(name, floor):
                    return
            for name in list(self.held):
                if not self._extend(name, now):
                    return
        if not self.announced:
            self._announce()

    def status(self) -> dict[str, Any]:
        return {"held": sorted(self.held), "refusals": self.refusals, "errors": self.errors,
                "ready": self.ready}  # fmt: skip

    def _update(
        self, name: str, change: Callable[[LeaseValue], LeaseValue | None]
    ) -> LeaseValue | None:
        """Set `name`'s key from its current value (made "free:0" where missing) to
        change(current) by compare-and-set, again while other members change it
        meanwhile; returns what was written, or None where `change` left it (raises
        Contended after CAS_TRIES rounds)."""
        key = self.key(name)
        raw = store_text(self.store.compare_set(key, "", "free:0"))
        for _ in range(CAS_TRIES):
            new = change(LeaseValue.parse(raw))
            if new is None:
                return None
            got = store_text(self.store.compare_set(key, raw, new.text()))
            if got == new.text():
                return new
            raw = got
        raise Contended(f"{name}: the key changed under {CAS_TRIES} tries")

    def _free(self, name: str, floor: int) -> bool:
        """Give `name`'s key back at `floor` (where another member took it meanwhile,
        only raise its floor); kept for the next renewal while the store is gone.
        Returns whether the store answered."""
        if self._connecting.locked():
            self.unwritten[name] = max(floor, self.unwritten.get(name, -1))
            return False

        def free(current: LeaseValue) -> LeaseValue | None:
            if current.holder == self.rank and name not in self.held:  # not taken again
                return LeaseValue(None, 0.0, max(floor, current.version))
            if current.version < floor:
                return replace(current, version=floor)
            return None

        try:
            self._update(name, free)
        except ValueError as e:  # not a lease's value: nothing to give back
            self._error(f"release {name}: {e}")
        except Contended as e:  # written at the next renewal
            self.unwritten[name] = max(floor, self.unwritten.get(name, -1))
            self._error(f"release {name}: {e}")
        except Exception as e:
            self.unwritten[name] = max(floor, self.unwritten.get(name, -1))
            self._store_failed(f"release {name}", e)
            return False
        return True

    def _extend(self, name: str, now: float, fresh: bool = False) -> bool:
        """Hold `name`'s key until now + TTL_S (`fresh`: in a new store, where it is
        missing, it is written anew). Returns whether the store answered."""

        def extend(current: LeaseValue) -> LeaseValue | None:
            if current.holder == self.rank or (fresh and current.holder is None):
                return LeaseValue(self.rank, now + TTL_S, current.version)
            return None  # taken by another member after it expired

        try:
            if self._update(name, extend) is None:  # its steps run on, the key is gone
                self.lost[name] = self.lost.get(name, 0) + self.held.pop(name)
                self._error(f"renew {name}: the key was taken after it expired")
        except (ValueError, Contended) as e:  # kept: tried again at the next renewal
            self._error(f"renew {name}: {e}")
        except Exception as e:
            self._store_failed(f"renew {name}", e)
            return False
        return True

    def _announce(self) -> None:
        """Raise each tenant's floor to the version this member serves, then write its
        ready key; look whether every member's is there (no key is taken before)."""

        def raise_to(version: int) -> Callable[[LeaseValue], LeaseValue | None]:
            return lambda current: (
                replace(current, version=version) if current.version < version else None
            )

        now = self.clock()
        if now < self.announce_at:
            return
        try:
            for name, version in self.versions().items():
                try:
                    self._update(name, raise_to(version))
                except ValueError as e:  # not a lease's value: that key serves nobody
                    self._error(f"announce {name}: {e}")
            self.store.set(self.ready_key(self.rank), "1")
            self.announced, self.announced_at = True, now
            self._told_missing = False
            self._ready()
        except Contended as e:  # the store answered: again after RETRY_S
            self.announce_at = now + RETRY_S
            self._error(f"announce: {e}")
        except Exception as e:
            self._store_failed("announce", e)

    def _ready(self) -> bool:
        """Whether every member announced (one store call until they have); names the
        missing ones once when they are TTL_S late (a server that is down)."""
        if not self.ready and self.announced:
            keys = [self.ready_key(r) for r in range(self.world)]
            self.ready = bool(self.store.check(keys))
            if (
                not self.ready
                and not self._told_missing
                and self.clock() > self.announced_at + TTL_S
            ):
                self._told_missing = True
                missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
                logger.warning("cluster lease: no step before rank(s) %s announce", missing)
        return self.ready

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
        store they are missing) and what it released meanwhile, announce this member's
        versions there, and take no new key for RENEW_S."""
        store, self._new_store = self._new_store, None
        if store is None:
            return
        self.store = store
        now = self.clock()
        self.quiet_until = now + RENEW_S
        self.renewed_at = now
        self.announced = self.ready = False
        for name in list(self.held):
            if not self._extend(name, now, fresh=True):
                return
        for name, floor in list(self.unwritten.items()):
            del self.unwritten[name]
            if not self._free(name, floor):
                return
        self._announce()

    def _error(self, msg: str) -> None:
        self.errors += 1
        logger.error("cluster lease: %s", msg)
