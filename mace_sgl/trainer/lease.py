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
are synchronous but rare: two or three per step start (refusals back off RETRY_S, and
the trainer passes that tenant over meanwhile), and every RENEW_S a look at the store
plus one renewal per held key; an announcement makes two or three per tenant, and a
tenant's creation one (its generation, below).

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
that the other servers' holders, connecting as it did, write theirs first. Which store
it reached tells EPOCH_KEY, a new id in each: in the same store (a connection lost and
made again) the releases kept meanwhile are written; in a fresh one the announcement
writes the floors, and every tenant living here steps under generation 0 there.

The calls run on the scheduler thread, so each has a deadline (DeadlineStore, CALL_S): a
server 0 whose host vanished without closing its connections (power, network) answers
nothing, and TCP would notice only after many minutes. A call past its deadline counts as
a dead store: the thread connects again, and no call waits on the silent connection. (A
call that did reach the store late may have taken a key: a key held by this rank that
it does not know it holds counts as free to it.)

A tenant purged (DELETE /mace/adapters/NAME?purge=true) and created again starts from
version 0, below its old floor. Each purge raises the tenant's generation in the store
(`generation_key`; the server whose route appended the purge to the tenant log raises
it right after the entry), and each generation has a key of its own. A member reads the
generation when it creates the tenant (`created`; the trainer keeps it in the tenant's
adapter directory, so a restart resumes the tenant under the same one) and keeps it
until it retires it (`retire`, which also gives the key back at once: the step in
flight, if any, is dropped), so a server that has not applied the purge yet steps its
old tenant under the old key, and the tenant created again under the new one. A tenant
created while the store is gone fixes its generation at its first call that reaches
the store (a resumed one from its directory; a new one reads the store's then, so a
purge of its name in between would move it to the new key: a new tenant has no
checkpoint, so it steps from v0 either way).

The keys are bounded per name: a purge that raises the generation to g deletes the keys of
generations g - 2 and the SWEPT before it (`purged`). The key of g - 1 stays, for the
servers that have not applied the purge yet (their old tenant steps under it with its
floor). A server still stepping a tenant two purges back (down through both, or two purges
in a row: a DELETE retried, or two servers purging at once) finds its key gone, steps it
from a floor of 0 until it applies the purges, which delete that tenant anyway, and may
write its key anew meanwhile; the next purges delete that one too. What stays per name
ever used: its generation counter and about two keys (about 100 bytes each).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mace_sgl.trainer.replicas import DeadlineStore, store_text

logger = logging.getLogger("mace_sgl.trainer")

TTL_S = 60.0  # a holder that stops renewing loses the key after this long
RENEW_S = 10.0
RETRY_S = 0.5  # after a refusal, the next try for that tenant
CAS_TRIES = 8  # compare-and-set rounds before a change is given up as contended
CALL_S = 3.0  # one store call holds the scheduler thread at most this long
KEPT_GENERATIONS = 2  # a name's lease keys in the store: its newest generations'
SWEPT = 4  # generations before those whose keys a purge deletes again (written anew late)
EPOCH_KEY = "mace/lease/epoch"  # a new id in each store: a restarted server 0's is fresh


def new_epoch() -> str:
    return uuid.uuid4().hex


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
        self.call_s = CALL_S
        self._calls: DeadlineStore | None = None  # self.store's calls, with a deadline
        self._connecting = threading.Lock()  # held while a thread connects again
        self._new_store: Any = None  # its connection, for the scheduler thread to adopt
        # after a start or a new connection: no new key before this time
        self.quiet_until = clock() + RENEW_S if connect is not None else 0.0
        self.announced = False  # this member's versions and ready key are in the store
        self.announced_at = 0.0
        self.announce_retry_at = 0.0  # after a contended announcement: not before this time
        self.ready = False  # every member's are
        self._told_missing = False
        self.held: dict[str, int] = {}  # name -> steps in flight under this key
        # Keys another member took while this scheduler's steps ran on (it stalled past
        # TTL_S): name -> those steps; their last release still raises the floor.
        self.lost: dict[str, int] = {}
        self.gave_back: dict[str, int] = {}  # name -> newest version released meanwhile
        # name -> the generation of keys this member's tenant of that name steps under:
        # read when it was created here (`created`), kept until it is retired (a purge
        # meanwhile moves only tenants created after it to the next generation)
        self.generations: dict[str, int] = {}
        # Tenants created while the store was gone, their generation not read yet: the
        # (epoch, generation) kept in their directory, or what to tell once it is read.
        self.kept: dict[str, tuple[str, int]] = {}
        self.tell: dict[str, Callable[[str, int], tuple[str, int] | None]] = {}
        self.epoch: str | None = None  # which store (EPOCH_KEY): a fresh one has another
        # (name, generation; None: unread) -> a floor released while the store was gone
        self.unwritten: dict[tuple[str, int | None], int] = {}
        self.retry_at: dict[str, float] = {}
        self.renewed_at = 0.0
        self.refusals = 0
        self.errors = 0

    @staticmethod
    def key(name: str, generation: int = 0) -> str:
        """The key of `name`'s lease in `generation` (raised by each purge)."""
        key = "mace/lease/" + hashlib.sha256(name.encode()).hexdigest()[:16]
        return key if generation == 0 else f"{key}/{generation}"

    @staticmethod
    def generation_key(name: str) -> str:
        """A counter: how many times `name` was purged (plugin/tenant_log.py raises it)."""
        return "mace/lease/generation/" + hashlib.sha256(name.encode()).hexdigest()[:16]

    @classmethod
    def purged(cls, store: Any, name: str) -> int:
        """Count a purge of `name` (the route that appended it to the tenant log, right
        after the entry): tenants created from now on step under the next generation's
        key. Deletes the keys of the generation before the previous one and of the SWEPT
        before it (the module's docstring says why those); returns the new generation."""
        generation = int(store.add(cls.generation_key(name), 1))
        last = generation - KEPT_GENERATIONS
        try:
            for old in range(max(0, last - SWEPT), last + 1):
                store.delete_key(cls.key(name, old))
        except Exception:  # the generation counts all the same; old keys stay
            logger.exception("cluster lease: %s purged, its old keys not deleted", name)
        return generation

    @property
    def _store(self) -> Any:
        """self.store, each call with a deadline (a new connection gets a new thread);
        without `connect` (nothing to fall back on), the store itself."""
        if self.connect is None:
            return self.store
        self._calls = DeadlineStore.over(self._calls, self.store, self.call_s)
        return self._calls

    def _read_epoch(self) -> str:
        """The store's epoch, written by the first member to ask (a fresh store has none)."""
        return store_text(self._store.compare_set(EPOCH_KEY, "", new_epoch()))

    def _in_this_store(self, kept: tuple[str, int]) -> int:
        """A kept (epoch, generation) in the store this member uses: one from an earlier
        store is 0, as every tenant older than that store (a fresh one counted no purge)."""
        return kept[1] if kept[0] == self.epoch else 0

    def _generation(self, name: str) -> int:
        """The generation this member's tenant `name` steps under: fixed at its creation
        (`created`), or at its first call if the store was gone then."""
        if name not in self.generations:
            if self.epoch is None:
                self.epoch = self._read_epoch()
            kept = self.kept.pop(name, None)
            if kept is not None:
                self.generations[name] = self._in_this_store(kept)
            else:
                generation = int(self._store.add(self.generation_key(name), 0))
                tell = self.tell.pop(name, None)
                if tell is not None:
                    # Another replica of this server may have read and kept its own
                    # (a purge between the two reads): every replica takes the kept one.
                    try:
                        got = tell(self.epoch, generation)
                    except Exception:  # not the store's failure: the store answered
                        logger.exception("cluster lease: keeping %s's generation", name)
                        got = None
                    if got is not None:
                        generation = self._in_this_store(got)
                self.generations[name] = generation
        return self.generations[name]

    def _key(self, name: str) -> str:
        return self.key(name, self._generation(name))

    def _store_gone(self) -> bool:
        """A call failed and no new connection is in use yet: no call waits on the old."""
        return self._connecting.locked() or self._new_store is not None

    def created(self, name: str, kept: tuple[str, int] | None = None,
                keep: Callable[[str, int], tuple[str, int] | None] | None = None,
                ) -> None:  # fmt: skip
        """Tenant `name` was created here (or resumed): fix the generation it steps
        under, so that a purge of it later (raised before every server retired it)
        cannot move it to the next generation's key. `kept`: the (epoch, generation)
        this tenant was created under, kept in its adapter directory (a tenant resumed
        after a restart: the store may have counted a purge of its name meanwhile, which
        another server's tenant created after it steps under); from another epoch (a
        store started since) it is 0, as every tenant older than that store. Without
        `kept` the generation is read from the store and `keep(epoch, generation)` is
        called with it, for the directory; it returns what the directory holds then (the
        first writer's: every replica of a server steps under that one). While the
        store is gone, both wait for the tenant's first call that reaches it.

        Neither this nor `retire` adopts a new connection (which announces every
        tenant's version): the trainer creates and retires several tenants in a row,
        and an announcement between two of them would read the store's generation for
        a resumed tenant not created here yet, instead of its kept one."""
        self.generations.pop(name, None)
        self.kept.pop(name, None)
        self.tell.pop(name, None)
        if kept is not None:
            self.kept[name] = kept
        elif keep is not None:
            self.tell[name] = keep
        if self._store_gone():
            return
        try:
            self._generation(name)
        except Exception as e:  # fixed at its first call instead
            self._store_failed(f"generation of {name}", e)

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
        if not self.announced and not self._store_gone():
            self._announce()
        if self._store_gone():  # no call waits on a dead store
            self.refusals += 1
            self.retry_at[name] = now + RETRY_S
            return False

        def take(current: LeaseValue) -> LeaseValue | None:
            # Held by this rank but not in `held`: a take whose answer came after its
            # deadline, or a step of this rank's process before it restarted; free.
            mine = current.holder == self.rank and name not in self.lost
            free = current.holder is None or current.expires < now or mine
            if free and version >= current.version:
                return LeaseValue(self.rank, now + TTL_S, current.version)
            return None

        try:
            if self._ready() and self._update(self._key(name), take) is not None:
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
        self._free(name, self.gave_back.pop(name), self.generations.get(name))

    def retire(self, name: str, version: int) -> None:
        """`name` was retired here (it may be created again, purged or not): its key is
        given back at `version` (what this member served) at once, and the steps still
        in flight under it end without a release (the trainer reports them untrained).
        Its next step, of a tenant created again, takes the key of that generation."""
        holding = self.held.pop(name, 0) + self.lost.pop(name, 0)
        floor = max(version, self.gave_back.pop(name, -1))
        self.retry_at.pop(name, None)
        if holding:
            self._free(name, floor, self.generations.get(name))
        self.generations.pop(name, None)
        self.kept.pop(name, None)
        self.tell.pop(name, None)

    def renew(self) -> None:
        """Every RENEW_S (called from each poll): look that the store still answers
        (an idle member, too, follows a restarted server 0 into its fresh store), write
        what was released while it was gone, and extend every held key; and announce
        this member's versions whenever they are not in the store."""
        self._adopt()
        if self._store_gone():
            return
        now = self.clock()
        if now - self.renewed_at >= RENEW_S:
            self.renewed_at = now
            try:
                if self.announced and not self._store.check([self.ready_key(self.rank)]):
                    self._new_store = self.store  # a store that forgot us: as a new one
                    self._adopt()
                    return
                if self.announced and not self.ready:
                    self._ready()
            except Exception as e:
                self._store_failed("look at the store", e)
                return
            if not self._write_unwritten():
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
        self, key: str, change: Callable[[LeaseValue], LeaseValue | None]
    ) -> LeaseValue | None:
        """Set `key` from its current value (made "free:0" where missing) to
        change(current) by compare-and-set, again while other members change it
        meanwhile; returns what was written, or None where `change` left it (raises
        Contended after CAS_TRIES rounds)."""
        raw = store_text(self._store.compare_set(key, "", "free:0"))
        for _ in range(CAS_TRIES):
            new = change(LeaseValue.parse(raw))
            if new is None:
                return None
            got = store_text(self._store.compare_set(key, raw, new.text()))
            if got == new.text():
                return new
            raw = got
        raise Contended(f"{key}: the key changed under {CAS_TRIES} tries")

    def _write_unwritten(self) -> bool:
        """Write the releases kept while the store was gone; whether it answered."""
        for (name, generation), floor in list(self.unwritten.items()):
            del self.unwritten[name, generation]
            if not self._free(name, floor, generation):
                return False
        return True

    def _free(self, name: str, floor: int, generation: int | None) -> bool:
        """Give `name`'s key of `generation` (None: read it) back at `floor` (where
        another member took it meanwhile, only raise its floor); kept for the next
        renewal while the store is gone. Returns whether the store answered."""

        def keep() -> None:
            was = self.unwritten.get((name, generation), -1)
            self.unwritten[name, generation] = max(floor, was)

        if self._store_gone():
            keep()
            return False

        def free(current: LeaseValue) -> LeaseValue | None:
            # Not taken again since: by a step of this tenant under this generation (a
            # release kept for an older generation frees that key all the same).
            again = name in self.held and self.generations.get(name) == generation
            if current.holder == self.rank and not again:
                return LeaseValue(None, 0.0, max(floor, current.version))
            if current.version < floor:
                return replace(current, version=floor)
            return None

        try:
            if generation is None:
                generation = self._generation(name)
            self._update(self.key(name, generation), free)
        except ValueError as e:  # not a lease's value: nothing to give back
            self._error(f"release {name}: {e}")
        except Contended as e:  # written at the next renewal
            keep()
            self._error(f"release {name}: {e}")
        except Exception as e:
            keep()
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
            if self._update(self._key(name), extend) is None:  # its steps run on, key gone
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
        if now < self.announce_retry_at:
            return
        try:
            if self.epoch is None:
                self.epoch = self._read_epoch()
            for name, version in self.versions().items():
                try:
                    self._update(self._key(name), raise_to(version))
                except ValueError as e:  # not a lease's value: that key serves nobody
                    self._error(f"announce {name}: {e}")
            self._store.set(self.ready_key(self.rank), "1")
            self.announced, self.announced_at = True, now
            self._told_missing = False
            self._ready()
        except Contended as e:  # the store answered: again after RETRY_S
            self.announce_retry_at = now + RETRY_S
            self._error(f"announce: {e}")
        except Exception as e:
            self._store_failed("announce", e)

    def _ready(self) -> bool:
        """Whether every member announced (one store call until they have); names the
        missing ones once when they are TTL_S late (a server that is down)."""
        if not self.ready and self.announced:
            keys = [self.ready_key(r) for r in range(self.world)]
            self.ready = bool(self._store.check(keys))
            if (
                not self.ready
                and not self._told_missing
                and self.clock() > self.announced_at + TTL_S
            ):
                self._told_missing = True
                missing = [r for r, k in enumerate(keys) if not self._store.check([k])]
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
        # The connect thread set the connection and is about to let go of the lock:
        # until it has, _store_gone() holds and the writes below would be kept again.
        if self._connecting.acquire(timeout=1.0):
            self._connecting.release()
        self.store = store
        now = self.clock()
        self.quiet_until = now + RENEW_S
        self.renewed_at = now
        self.announced = self.ready = False
        try:
            epoch = self._read_epoch()
        except Exception as e:
            self._store_failed("read the store's epoch", e)
            return
        if epoch != self.epoch:
            # A fresh store (server 0 restarted): no purge happened there to a tenant
            # that lives here, so each steps under generation 0; the floors released
            # meanwhile the announcement writes (it names what this member serves).
            known = self.epoch is not None
            self.epoch = epoch
            self.unwritten = {}
            self.generations = dict.fromkeys(self.generations, 0) if known else {}
        for name in list(self.held):
            if not self._extend(name, now, fresh=True):
                return
        if self._write_unwritten():
            self._announce()

    def _error(self, msg: str) -> None:
        self.errors += 1
        logger.error("cluster lease: %s", msg)
