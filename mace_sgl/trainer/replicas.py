"""One adapter for every data-parallel replica: a step's result goes to all the others.

With `--dp-size N --mace-train` every scheduler has its own trainer on its own replica's
weights. The sidecar leases training to one replica at a time (sidecar/main.py), so a
step runs on one replica only; once its guard passed, that tenant's whole training state
(LoRA weights, AdamW moments and step counts, and the new version number) goes to every
other replica, which writes it into its own SGLang pool slot in place and serves the
same version; the stepping replica serves it once every peer took it (runtime.py
`_publish_delivered`; at once with --mace-sync-every-s), so all switch within about an
iteration of each other. The next step may then run on any replica: each holds the
same state.

Transport: a torch.distributed gloo group of the N schedulers, made here (not SGLang's
default group): rendezvous through a FileStore in an owner-only directory the launcher
made (no TCP store), and gloo's device bound to 127.0.0.1, so nothing listens beyond
loopback. Several servers (`--mace-sync-world-size` S > 1, `--mace-sync-rank`,
`--mace-sync-addr HOST:PORT`) form one group of S x N schedulers instead (global rank =
server rank x N + dp rank): a TCPStore that server 0's first scheduler serves on HOST:PORT
only (a socket bound there, handed to torch), and gloo on `--mace-sync-host` (default
127.0.0.1). Each server still leases to one replica of its own; across servers a step
also takes its tenant's lease in that store (trainer/lease.py). Gloo's point-to-point
work reports completion only through wait(), so each
replica has one receiving thread blocked in `recv_anysource` (a header, then the payload
from its sender) and one sending thread; the scheduler loop only drains their queues
(`received`, `delivered`) and never waits on the network. A sender reports its step's
Results to the sidecar only after every peer took the state (`delivered`), so a step the
sidecar counts as done is never missing on another replica; Work also names the versions
it must start from (messages.Work.versions) as a second guard.

A dead server (several servers only; on one server a dead replica takes the server down):
a gloo group cannot take a restarted member back, so the group is formed again, one
generation at a time. Each generation meets under its own prefix of the store
(`mace/sync/<g>/`); `mace/sync/gen` holds the current one and `mace/sync/member/<rank>`
the one each rank last joined. A member whose send or receive fails moves the counter on
from the generation that failed (compare-and-set, so several survivors move it once) and
waits in the next generation's rendezvous; members poll the counter, so one that saw no
error follows. A restarted server finds its rank's member key, waits until the counter
passes the generation it died in (or moves it itself after `rejoin_wait_s`), and joins.
(Measured with torch 2.14's gloo: a pending recv_anysource does not fail when a peer
dies, only a send to it does; so a survivor with nothing to send notices only when the
restarted server moves the counter, and its old receiving thread stays blocked in the
old group: one idle thread per regroup.) A TCPStore call holds its connection for as
long as it waits, and a rendezvous waits for its members (up to JOIN_WAIT_S): the
lease's calls from the scheduler thread go over a connection of their own
(client_store).
Sends that failed are kept and sent again in the new generation; the trainer announces
its tenants' states after each new generation (runtime._announce_versions), so the
restarted server installs what was published while it was down. A generation after the
first does not wait for a member that is gone: each member marks itself in under the
generation's prefix, and once all are in, or after JOIN_WAIT_S, the first to look seals
the list of those present (compare-and-set on `members`; every member reads the same
list) and the group forms among them, ranked by their order in it. So the survivors'
steps go on while a server is down (a step is done when every member took it), and one
that comes back after the seal finds itself missing, moves the counter on and is taken
into the next generation. (Before, a regroup waited for the dead server: its survivors
trained nothing until it was back.) A member that dies after marking itself in and
before gloo connects is given up after FORM_TIMEOUT_S: a regroup's gloo connections have
that timeout (the first generation's wait as long as the servers take to start; the
receiving thread passes its own long wait), and a formation that fails moves the
counter on, so the next attempt meets under a fresh prefix without the dead member (it
is not marked in there). The lowest member of each generation deletes the keys of the
generations before the previous one (`_prune`), so the store holds about three
generations' keys however often the group forms (the one forming, the current and the
previous); a member that seals a deleted generation late finds the counter two past it
and joins the current one instead.

The store lives in server 0 (its first scheduler). When server 0 dies, the other
servers' store calls fail; their group threads try a new connection every POLL_S plus
RECONNECT_TIMEOUT_S (`connect`, a client of --mace-sync-addr). The restarted server 0 serves a fresh store,
marked with a new epoch (EPOCH_KEY, a random id its first scheduler writes at once): a
member that connects and finds another epoch than the one it joined forms that store's
current generation whatever its own number (the fresh store starts from generation 0,
which waits for every server, as at start: a server that is down too holds the whole
group until it is back), and its trainer announces its versions there
(runtime._announce_versions), so the restarted server 0 installs what the group
published. The group thread's polls of the store and its moves of the counter have a
deadline (POLL_CALL_S, DeadlineStore): a server 0 whose host vanished without closing
its connections counts as dead after it, not when TCP gives up many minutes later. A
regroup (`_form_within`) runs on a thread of its own and is given up after the longest it
takes with a store that answers (the members' wait, gloo's connections, and a poll's
deadline for each of the store calls around them: `form_limit_s`), and the thread then
connects again as after a failed poll. A fresh store's first generation has no such
limit: it waits for every server, as at start, nor has a restarted member's regroup in
its constructor. (A server 0 process that hangs while its host still accepts connections
leaves one stuck thread per reconnection or regroup given up, until that process dies or
answers again; a vanished host's, until TCP gives up.) The survivors keep serving
meanwhile, but without the store they cannot form
a generation without server 0: a step they make is kept unsent (not counted done) until
the new generation forms, and goes then. Failures and waits name the group by `formed`
(how many this member formed), not by generation, whose numbers start again at 0.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mace_sgl.bound_store import bound_tcp_store
from mace_sgl.config import split_addr

logger = logging.getLogger("mace_sgl.trainer")

MAGIC = 0x4D414345  # "MACE"
HEADER = 4  # int64: magic, tenant key, version, payload elements
TAG_HEADER, TAG_PAYLOAD = 0, 1
STORE_FILE = "replicas.store"
# How long a server waits for the others of a multi-server group to come up.
RENDEZVOUS_TIMEOUT_S = 900.0
GEN_KEY = "mace/sync/gen"  # the group's current generation (several servers)
MEMBER_KEY = "mace/sync/member/{rank}"  # the generation a rank last joined
EPOCH_KEY = "mace/sync/epoch"  # which store this is: a new id each time server 0 starts
# A new connection to a restarted server 0's store waits at most this long.
RECONNECT_TIMEOUT_S = 5.0
# The longest a call on the first connection waits for a key once the group formed (a
# member whose store is served by another process; the rendezvous's is 900 s). It does
# not bound a reply that never comes (a server 0 whose host vanished without closing
# its connections): the group thread's polls have POLL_CALL_S for that.
STORE_CALL_TIMEOUT_S = 60.0
# The group thread's poll of the store (epoch, counter) waits at most this long for an
# answer, then counts as a dead store and connects again (several servers).
POLL_CALL_S = 10.0
POLL_S = 2.0  # how often a member reads the generation counter
REJOIN_WAIT_S = 30.0  # a restarted member waits this long for the survivors to move on
# How long a regroup waits for every member to join before the group goes on without the
# missing ones (several servers, generations after the first).
JOIN_WAIT_S = 10.0
# How long forming a regroup's gloo group may take once its members are sealed: gloo
# connects the members there and then; one that died after marking itself in never
# does, and the others give up on that generation after this and form the next one.
FORM_TIMEOUT_S = 60.0
# The receiving thread waits for the next header as long as its group lasts.
RECV_WAIT = datetime.timedelta(days=365)
# How long the first generation's gloo connections may take: every server's start, as
# long as SGLang's own rendezvous waits (no bound).
FIRST_FORM_TIMEOUT = datetime.timedelta(days=365)
MEMBERS_KEY = "members"  # under a generation's prefix: its members' global ranks, sealed


class NotAMember(Exception):
    """This rank came after its generation's members were sealed: it joins the next."""


class FormTimeout(TimeoutError):
    """A regroup took longer than it can with a store that answers (form_limit_s)."""


def group_store(cfg: Any, dp_rank: int) -> tuple[Any, int, int]:
    """The store the adapter group meets in, this scheduler's global rank, the world.

    One server: the launcher's FileStore of its N replicas. Several: the TCPStore on
    --mace-sync-addr, served by global rank 0 on a socket bound to that host only; every
    server checks that the others run the same --dp-size (the ranks would not add up)."""
    from torch.distributed import FileStore

    dp = cfg.replicas
    if cfg.sync_world_size <= 1:
        return FileStore(str(Path(cfg.replica_store) / STORE_FILE), dp), dp_rank, dp
    rank, world = cfg.sync_rank * dp + dp_rank, cfg.sync_world_size * dp
    host, port = split_addr(cfg.sync_addr)
    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    if rank == 0:
        store = bound_tcp_store(host, port, world, timeout, wait_for_workers=False)
        store.set(EPOCH_KEY, uuid.uuid4().hex)
    else:
        store = client_store(cfg)
    if dp_rank == 0:
        store.set(f"mace/dp/{cfg.sync_rank}", str(dp))
    first = int(store.get("mace/dp/0"))
    if first != dp:
        raise ValueError(
            f"--mace-sync-rank {cfg.sync_rank} runs --dp-size {dp}, server 0 runs {first}: "
            "every server of one adapter group needs the same --dp-size"
        )
    return store, rank, world


def client_store(cfg: Any, timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> Any:
    """Another connection to the group's TCPStore (several servers), its calls waiting
    at most `timeout_s`. A TCPStore call holds its connection's lock for as long as it
    waits, and the rendezvous of a new group generation waits for its members
    (JOIN_WAIT_S, then gloo's connections): the scheduler thread's own calls (the
    lease's) go over a connection of their own, so serving never waits; so do the HTTP
    process's (plugin/tenant_log.py)."""
    from torch.distributed import TCPStore

    host, port = split_addr(cfg.sync_addr)
    timeout = datetime.timedelta(seconds=timeout_s)
    return TCPStore(host, port, cfg.sync_world_size * cfg.replicas, False, timeout)


def reconnector(cfg: Any, dp_rank: int) -> Callable[[], Any] | None:
    """For ReplicaSync's `connect`: a new client of the group's store, for after server 0
    restarted (several servers; None on one server and for global rank 0, whose process
    serves the store and restarts with it)."""
    if cfg.sync_world_size <= 1 or cfg.sync_rank * cfg.replicas + dp_rank == 0:
        return None
    return lambda: client_store(cfg, RECONNECT_TIMEOUT_S)


def store_text(raw: bytes | str) -> str:
    """A store value as text (get and compare_set answer bytes)."""
    return raw.decode() if isinstance(raw, bytes) else raw


class Outcome:
    """One call's result or exception, handed from the thread that runs it (`run`) to the
    one that waits for it (`done`, then `value`): DeadlineStore's calls, _form_within."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self._box: list[tuple[bool, Any]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._box.append((True, fn(*args)))
        except Exception as e:
            self._box.append((False, e))
        self.done.set()

    def value(self) -> Any:
        """The call's return value, or its exception raised here (after `done`)."""
        ok, value = self._box[0]
        if not ok:
            raise value
        return value


class DeadlineStore:
    """`store`'s calls, each run on a thread of this object's own and given up (TimeoutError)
    after `seconds`; after one has been given up, every later call fails at once (that
    thread still waits on the silent connection, and ends with that call). For the
    calls of the lease (trainer/lease.py) and the group thread's polls, over a TCPStore
    whose server may vanish without closing the connection."""

    def __init__(self, store: Any, seconds: float) -> None:
        self.store, self.seconds = store, seconds
        self.stuck = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        """Let the thread end (this object is not called again)."""
        self._calls.put(None)

    @classmethod
    def over(cls, current: DeadlineStore | None, store: Any, seconds: float) -> DeadlineStore:
        """`current` while it wraps `store`; else (a new connection) a new one over it,
        `current` closed."""
        if current is not None and current.store is store:
            return current
        if current is not None:
            current.close()
        return cls(store, seconds)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.store, name)

        def call(*args: Any) -> Any:
            if self.stuck:
                raise TimeoutError(f"an earlier store call got no answer within {self.seconds:g} s")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mace-store-call",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            result = Outcome()
            self._calls.put((method, args, result))
            if not result.done.wait(self.seconds):
                self.stuck = True
                raise TimeoutError(f"store {name}: no answer within {self.seconds:g} s")
            return result.value()

        return call

    def _run(self) -> None:
        while not self.stuck:
            job = self._calls.get()
            if job is None:
                return
            method, args, result = job
            result.run(method, *args)


def _generation(key: str) -> float:
    """The generation whose prefix holds `key` (mace/sync/<g>/...); inf for any other."""
    parts = key.split("/", 3)
    if len(parts) > 3 and parts[:2] == ["mace", "sync"] and parts[2].isdigit():
        return int(parts[2])
    return float("inf")


def tenant_key(name: str) -> int:
    """A tenant's name as a 62-bit integer (the header carries no strings)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 2


def packable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether pack_state can pack this optimizer (it has state for every parameter: a
    tenant resumed without optimizer state has none until its next step)."""
    sd = optimizer.state_dict()
    return all(sd["state"].get(i) is not None for i in _param_ids(sd))


def pack_state(weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One fp32 host tensor: every LoRA tensor (in `weights` order), then per parameter of
    the optimizer its step count, first and second moments. Same model and flags on every
    replica: the same order and sizes."""
    parts = [t.detach().reshape(-1).float().cpu() for t in weights.values()]
    sd = optimizer.state_dict()
    for i in _param_ids(sd):
        st = sd["state"].get(i)
        if st is None:
            raise ValueError("optimizer has no state for a parameter: pack after a step")
        parts.append(torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu())
        parts.append(st["exp_avg"].detach().reshape(-1).float().cpu())
        parts.append(st["exp_avg_sq"].detach().reshape(-1).float().cpu())
    return torch.cat(parts)


def unpack_state(
    payload: torch.Tensor, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> None:
    """Write a pack_state() payload into `weights` (in place) and the optimizer's state."""
    if payload.numel() != state_numel(weights, optimizer):
        raise ValueError(
            f"replica state of {payload.numel()} elements, expected "
            f"{state_numel(weights, optimizer)}: replicas with different flags?"
        )
    at = 0
    with torch.no_grad():
        for t in weights.values():
            n = t.numel()
            t.copy_(payload[at : at + n].view_as(t))
            at += n
    sd = optimizer.state_dict()
    params = [t for t in weights.values()]
    state = {}
    for i in _param_ids(sd):
        like = params[i]
        n = like.numel()
        step = payload[at].clone()
        avg = payload[at + 1 : at + 1 + n].view_as(like).clone()
        sq = payload[at + 1 + n : at + 1 + 2 * n].view_as(like).clone()
        state[i] = {"step": step, "exp_avg": avg, "exp_avg_sq": sq}
        at += 1 + 2 * n
    sd["state"] = state
    optimizer.load_state_dict(sd)


def state_numel(weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Elements of a pack_state() payload for these weights and this optimizer."""
    n = sum(t.numel() for t in weights.values())
    return 3 * n + len(_param_ids(optimizer.state_dict()))


def _param_ids(sd: dict[str, Any]) -> list[int]:
    return [i for group in sd["param_groups"] for i in group["params"]]


@dataclass(frozen=True)
class Update:
    """A tenant's state as another replica published it."""

    key: int  # tenant_key(name)
    version: int
    payload: torch.Tensor
    src: int  # the global rank it came from (the dp rank on one server)


@dataclass
class SyncStats:
    sent: int = 0
    received: int = 0
    applied: int = 0
    send_failures: int = 0
    regroups: int = 0  # generations formed after the first
    pruned_keys: int = 0  # keys of old generations deleted from the store (by this rank)
    store_restarts: int = 0  # fresh stores joined (server 0 restarted)
    last_send_ms: float | None = None
    errors: list[str] = field(default_factory=list)


class ReplicaSync:
    """This replica's end of the group: a sending and a receiving thread, and with
    `rejoin` (several servers) a thread that forms the group again after a failure."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world: int,
        timeout_s: float = 600.0,
        every_s: float = 0.0,
        host: str = "127.0.0.1",
        rejoin: bool = False,
        rejoin_wait_s: float = REJOIN_WAIT_S,
        join_wait_s: float = JOIN_WAIT_S,
        form_timeout_s: float = FORM_TIMEOUT_S,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        """`store`, `rank`, `world`: group_store()'s. every_s > 0 (--mace-sync-every-s):
        send at most that often, the newest state of each tenant only (versions queued
        meanwhile are superseded by it). `host`: the address gloo listens on. `rejoin`:
        form the group again when a member dies and comes back, without the members
        that are not back within `join_wait_s` (module docstring); a regroup whose
        sealed members do not all connect within `form_timeout_s` is given up for the
        next generation. `connect` (with `rejoin`; reconnector()): a new connection to
        the store once its server (server 0) is gone, to follow it when it restarts."""
        self.rank, self.world = rank, world
        self.every_s = every_s
        self.join_wait_s = join_wait_s
        self.form_timeout_s = form_timeout_s
        self.host = host
        self.stats = SyncStats()
        self.store = store
        self.rejoin = rejoin
        self._connect = connect if rejoin else None
        self.poll_call_s = POLL_CALL_S
        self._polls: DeadlineStore | None = None  # the group thread's, over self.store
        self.epoch = self._epoch()  # the store this member joined in ("": unmarked)
        self.send_timeout = datetime.timedelta(seconds=timeout_s)
        self._inbox: queue.Queue[Update] = queue.Queue()
        # Sends not taken by the sending thread yet: each tenant's newest state only (a
        # send that waits for a regroup must not hold one state per step meanwhile), and
        # every send's `done`, delivered by the newest.
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}
        self._pending_done: list[Callable[[], None]] = []
        self._pending_cv = threading.Condition()
        self._done: queue.Queue[Callable[[], None]] = queue.Queue()
        self._moved = threading.Condition()  # generation and pg change together under it
        self._failed = threading.Event()
        generation = self._first_generation(rejoin_wait_s) if rejoin else 0
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
        while True:
            try:
                self.pg, self.members = self._form(generation)
                self._joined(generation, self.store)
                break
            except NotAMember:  # (no deadline here: nothing to reconnect to yet)
                generation = self._move_on(generation, self.store)
            except Exception as e:
                # a regroup's member died while it formed (FORM_TIMEOUT_S): as
                # _group_loop does, the next generation forms without it
                if not rejoin or generation == 0 or time.monotonic() > deadline:
                    raise
                self._error(f"join: generation {generation}: {type(e).__name__}: {e}")
                generation = self._move_on(generation, self.store)
        self.generation = generation
        if self._connect is not None:  # later connections wait RECONNECT_TIMEOUT_S
            self.store.set_timeout(datetime.timedelta(seconds=STORE_CALL_TIMEOUT_S))
        self._start_receiving()
        threading.Thread(target=self._send_loop, name="mace-replicas-send", daemon=True).start()
        if rejoin:
            threading.Thread(target=self._group_loop, name="mace-replicas-group",
                             daemon=True).start()  # fmt: skip
        logger.info("replica sync up: rank %d of %d (gloo on %s), generation %d",
                    rank, world, host, self.generation)  # fmt: skip

    # -- the scheduler's side (never blocks) --------------------------------------------

    def send(
        self, name: str, version: int, payload: torch.Tensor, done: Callable[[], None]
    ) -> None:
        """Queue `name`'s state at `version` for every peer (replacing an older one still
        waiting); `done` is returned by delivered() once all of them took it."""
        key = tenant_key(name)
        with self._pending_cv:
            waiting = self._pending.get(key)
            if waiting is None or version > waiting[0]:
                self._pending[key] = (version, payload)
            self._pending_done.append(done)
            self._pending_cv.notify()

    def received(self) -> list[Update]:
        """Updates from other replicas, oldest first."""
        return _drain(self._inbox)

    def delivered(self) -> list[Callable[[], None]]:
        """The `done` callbacks of sends every peer took."""
        return _drain(self._done)

    @property
    def formed(self) -> int:
        """Groups this member formed after its first (0 here, at its start): unlike the
        generation, which starts from 0 again in a restarted server 0's fresh store, it
        only grows, so a failure or a wait names the one group it means."""
        return self.stats.regroups

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "rank": self.rank,
            "world": self.world,
            "generation": self.generation,
            "formed": self.formed,
            "members": list(self.members),
            "regroups": s.regroups,
            "store_restarts": s.store_restarts,
            "pruned_keys": s.pruned_keys,
            "sent": s.sent,
            "received": s.received,
            "applied": s.applied,
            "send_failures": s.send_failures,
            "last_send_ms": s.last_send_ms,
            "pending_sends": len(self._pending_done),
            "errors": s.errors[-3:],
        }

    # -- generations -----------------------------------------------------------------------

    def _form(self, generation: int) -> tuple[Any, tuple[int, ...]]:
        """The gloo group of `generation` and its members' global ranks (blocks until
        every member joined it); NotAMember when it was sealed without this rank."""
        from torch.distributed import PrefixStore, ProcessGroupGloo

        store = self.store  # one connection throughout (the group thread may move on)
        prefix = PrefixStore(f"mace/sync/{generation}/", store)
        members = self._members(prefix, generation, store)
        if self.rank not in members:
            raise NotAMember(generation)
        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname=self.host)]
        # The timeout of gloo's connections among the members. The first generation
        # waits for every server to come up (as SGLang's own rendezvous does); a
        # regroup's members are up already (they marked themselves in), so one that does
        # not connect soon died while the group formed. Sends and receives pass their
        # own waits (send_timeout, RECV_WAIT).
        first = generation == 0 or not self.rejoin
        opts._timeout = (
            FIRST_FORM_TIMEOUT if first else datetime.timedelta(seconds=self.form_timeout_s)
        )
        return ProcessGroupGloo(prefix, members.index(self.rank), len(members), opts), members

    def _joined(self, generation: int, store: Any) -> None:
        """Record `generation` as the one this rank last joined (several servers), once
        its group formed; not in `_form`, whose thread, given up, may finish much later
        (a store that answers again) and would write an older generation over it."""
        if self.rejoin:
            store.set(MEMBER_KEY.format(rank=self.rank), str(generation))

    def form_limit_s(self) -> float:
        """The longest a regroup takes with a store that answers: the members' wait
        (`join_wait_s`), gloo's connections (`form_timeout_s`) and a poll's deadline for
        each of the store calls around them."""
        return self.join_wait_s + self.form_timeout_s + 2 * self.poll_call_s

    def _form_within(self, generation: int) -> tuple[Any, tuple[int, ...]]:
        """`_form` for the group thread: on a thread of its own, given up (FormTimeout)
        after form_limit_s() (a server 0 whose host vanished answers none of its store
        calls: the thread left waiting ends when TCP gives up). Without `connect`
        (nothing to fall back on), or for the first generation (a fresh store's waits
        for every server), `_form` itself."""
        if self._connect is None or generation == 0:
            return self._form(generation)
        result = Outcome()
        threading.Thread(target=result.run, args=(self._form, generation),
                         name="mace-replicas-form", daemon=True).start()  # fmt: skip
        limit = self.form_limit_s()
        if not result.done.wait(limit):
            raise FormTimeout(f"generation {generation} did not form within {limit:g} s")
        return result.value()

    def _members(self, prefix: Any, generation: int, store: Any) -> tuple[int, ...]:
        """Who is in `generation`: everyone in the first one (or on one server); after a
        regroup, the ranks that joined within `join_wait_s` (all of them: at once), as
        the first to see the wait end sealed it (compare-and-set: one list for all).
        NotAMember once the counter is two past `generation`, whose keys `_prune` may
        have deleted then (a list sealed over them would be this rank's alone): checked
        before marking in, and again after the seal, as `_prune` deletes only once the
        counter got there (a seal before the deletes saw the generation's own list)."""
        if not self.rejoin or generation == 0:
            return tuple(range(self.world))
        if self._counter(store) >= generation + 2:
            raise NotAMember(generation)
        prefix.set(f"in/{self.rank}", "1")
        keys = [f"in/{r}" for r in range(self.world)]
        deadline = time.monotonic() + self.join_wait_s
        while (
            not prefix.check(keys)
            and not prefix.check([MEMBERS_KEY])  # sealed already (this rank came late)
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        present = ",".join(str(r) for r in range(self.world) if prefix.check([keys[r]]))
        sealed = store_text(prefix.compare_set(MEMBERS_KEY, "", present))
        members = tuple(int(r) for r in sealed.split(","))
        if self._counter(store) >= generation + 2:
            raise NotAMember(generation)
        if len(members) < self.world:
            gone = sorted(set(range(self.world)) - set(members))
            self._error(f"generation {generation} goes on without rank(s) {gone}")
        return members

    def _prune(self, generation: int) -> None:
        """Delete the keys of the generations before `generation` - 1 (their gloo
        addresses, marks and member lists), which every member has left: without it
        server 0's store keeps every regroup's keys for as long as it runs. Run by the
        lowest member of each generation formed after the first; the previous
        generation's are kept for a member that forms it just as the others move on.
        A member that seals one of them late finds itself out of it (`_members`: the
        counter is past it by two). A failure is logged and left for the next regroup
        (the keys stay meanwhile)."""
        below = generation - 1
        if below <= 0:
            return
        try:
            polls = self._poll_store()
            old = [k for k in map(store_text, polls.list_keys()) if _generation(k) < below]
            for key in old:
                self.stats.pruned_keys += bool(polls.delete_key(key))
        except Exception as e:
            self._error(f"prune below generation {below}: {type(e).__name__}: {e}")

    def _move_on(self, generation: int, store: Any = None) -> int:
        """Move the counter past `generation` (once, whoever does it) and return it
        (`store`: the connection to use; default the group thread's, with a deadline)."""
        store = self._poll_store() if store is None else store
        store.compare_set(GEN_KEY, str(generation), str(generation + 1))
        return self._counter(store)

    def _counter(self, store: Any = None) -> int:
        """The current generation (`store`: the connection to use; default self.store);
        the add creates the counter at 0 on first use."""
        return int((self.store if store is None else store).add(GEN_KEY, 0))

    def _epoch(self, store: Any = None) -> str:
        """The store's epoch ("" on one server: its FileStore has none). Waits for it: a
        restarted server 0 writes it as soon as its store listens (group_store)."""
        if not self.rejoin:
            return ""
        return store_text((self.store if store is None else store).get(EPOCH_KEY))

    def _poll_store(self) -> Any:
        """self.store, each call with a deadline (POLL_CALL_S), for the group thread's
        polls: a server 0 whose host vanished answers nothing, and without it the thread
        would notice only when TCP gives up (many minutes), and follow a restarted
        server 0 no sooner. Without `connect` (nothing to fall back on), the store."""
        if self._connect is None:
            return self.store
        self._polls = DeadlineStore.over(self._polls, self.store, self.poll_call_s)
        return self._polls

    def _reconnect(self) -> bool:
        """After a store call failed: a new connection (raises while server 0 is down;
        False without `connect`)."""
        if self._connect is None:
            return False
        self.store = self._connect()
        return True

    def _first_generation(self, wait_s: float) -> int:
        """The generation to join at start: the current one, unless this rank was a
        member before (a restart): then the first one after the generation it left."""
        member = MEMBER_KEY.format(rank=self.rank)
        if not self.store.check([member]):
            return self._counter()
        left = int(self.store.get(member))
        deadline = time.monotonic() + wait_s
        while self._counter() <= left and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._counter() <= left:  # nobody noticed this rank was gone: move on for them
            self.store.compare_set(GEN_KEY, str(left), str(left + 1))
        generation = self._counter()
        logger.info("replica sync: rank %d rejoins at generation %d (left %d)",
                    self.rank, generation, left)  # fmt: skip
        return generation

    def _fail(self, formed: int, what: str, e: Exception) -> None:
        """A send or receive in the group this member formed `formed`-th failed."""
        self._error(f"{what} (group {formed}): {type(e).__name__}: {e}")
        with self._moved:
            if formed == self.formed:
                self._failed.set()

    def _after(self, formed: int) -> None:
        """Block until this member formed a group after its `formed`-th."""
        with self._moved:
            self._moved.wait_for(lambda: self.formed > formed)

    def _store_failed(self, e: Exception, last_error: str) -> str:
        """The store did not answer: connect again (server 0 restarted?), log once."""
        msg = f"store: {type(e).__name__}: {e}"
        if msg != last_error:  # every POLL_S for as long as it lasts: log it once
            self._error(msg)
        try:
            connected = self._reconnect()
        except Exception:
            connected = False
        if not connected:  # not back yet (or nothing to connect to): not a busy loop
            time.sleep(POLL_S)
        return msg

    def _give_up(self, generation: int) -> None:
        """Move the counter past `generation`, unless the store is gone (the next poll
        finds out and connects again)."""
        try:
            self._move_on(generation)
        except Exception:
            pass

    def _group_loop(self) -> None:
        """Form the next generation when this member's group failed or the counter moved."""
        last_error = ""
        abandoned = ("", -1)  # (epoch, generation) of a regroup given up (FormTimeout)
        while True:
            failed = self._failed.wait(POLL_S)
            try:
                polls = self._poll_store()
                epoch, current = self._epoch(polls), self._counter(polls)
            except Exception as e:  # the store is gone (server 0 died, or its host)
                last_error = self._store_failed(e, last_error)
                continue
            fresh = epoch != self.epoch  # server 0 restarted: a new store, new numbers
            try:
                # Past a generation that failed, or whose forming was given up (in this
                # very store: its prefix holds this member's marks and gloo keys of then)
                past = failed and current == self.generation and not fresh
                if past or (epoch, current) == abandoned:
                    current = self._move_on(current)
                if current <= self.generation and not fresh:
                    continue
                logger.warning("replica sync: rank %d forms generation %d", self.rank, current)
                pg, members = self._form_within(current)
                self._joined(current, self._poll_store())
            except NotAMember:  # sealed without this rank: the next one takes it in
                self._give_up(current)
                continue
            except FormTimeout as e:  # the store answers nothing: as a failed poll
                abandoned = (epoch, current)
                last_error = self._store_failed(e, last_error)
                continue
            except Exception as e:  # a member died again (or the store did)
                msg = f"regroup: {type(e).__name__}: {e}"
                if msg != last_error:  # every POLL_S for as long as it lasts: log it once
                    self._error(msg)
                last_error = msg
                # Not this generation's prefix again (a dead member's keys are there);
                # but a fresh store's first generation is never given up: the restarted
                # server 0 waits in it (its constructor) and would not follow.
                if not fresh:
                    self._give_up(current)
                continue
            last_error = ""
            with self._moved:
                self.epoch = epoch
                self.pg, self.members, self.generation = pg, members, current
                self._failed.clear()
                self.stats.regroups += 1  # self.formed
                if fresh:
                    self.stats.store_restarts += 1
                self._moved.notify_all()
            if fresh:
                logger.warning("replica sync: rank %d joined a restarted store (server 0)",
                               self.rank)  # fmt: skip
            self._start_receiving()
            if members[0] == self.rank:
                self._prune(current)

    # -- threads ---------------------------------------------------------------------------

    def _start_receiving(self) -> None:
        args = (self.formed, self.pg, self.members)
        threading.Thread(target=self._receive_loop, args=args, name="mace-replicas-recv",
                         daemon=True).start()  # fmt: skip

    def _send_loop(self) -> None:
        last = float("-inf")
        while True:
            with self._pending_cv:
                self._pending_cv.wait_for(lambda: bool(self._pending_done))
            wait = last + self.every_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self._pending_cv:
                newest, self._pending = self._pending, {}
                dones, self._pending_done = self._pending_done, []
            start = time.perf_counter()
            if not self._send_all(newest):
                continue  # one server: it is going down with its replica
            last = time.monotonic()
            self.stats.last_send_ms = (time.perf_counter() - start) * 1000
            for done in dones:  # superseded versions are delivered by the newest
                self._done.put(done)

    def _send_all(self, newest: dict[int, tuple[int, torch.Tensor]]) -> bool:
        """Send each tenant's newest state to every peer. With `rejoin`, a failed send
        waits for the next generation and the whole batch goes again (a peer that had it
        already keeps the version it has); without, it gives up (returns False)."""
        while True:
            with self._moved:
                formed, pg, members = self.formed, self.pg, self.members
            try:
                for key, (version, payload) in newest.items():
                    header = torch.tensor([MAGIC, key, version, payload.numel()], dtype=torch.int64)
                    for peer in range(len(members)):
                        if members[peer] == self.rank:
                            continue
                        pg.send([header], peer, TAG_HEADER).wait(self.send_timeout)
                        pg.send([payload], peer, TAG_PAYLOAD).wait(self.send_timeout)
                    self.stats.sent += 1
                return True
            except Exception as e:  # a peer is gone
                self.stats.send_failures += 1
                self._fail(formed, "send", e)
                if not self.rejoin:
                    return False
                self._after(formed)

    def _receive_loop(self, formed: int, pg: Any, members: tuple[int, ...]) -> None:
        """Receive in the group this member formed `formed`-th; ends when it fails."""
        while True:
            header = torch.zeros(HEADER, dtype=torch.int64)
            try:
                work = pg.recv_anysource([header], TAG_HEADER)
                work.wait(RECV_WAIT)
                src = work.source_rank()
                magic, key, version, numel = (int(v) for v in header.tolist())
                if magic != MAGIC or numel <= 0:
                    self._error(f"bad header from rank {src}: {header.tolist()}")
                    continue
                payload = torch.empty(numel, dtype=torch.float32)
                pg.recv([payload], src, TAG_PAYLOAD).wait(self.send_timeout)
            except Exception as e:  # a member died (or this server is shutting down)
                self._fail(formed, "receive", e)
                return
            self.stats.received += 1
            self._inbox.put(Update(key, version, payload, members[src]))

    def _error(self, msg: str) -> None:
        logger.error("replica sync: %s", msg)
        self.stats.errors = [*self.stats.errors[-9:], msg]


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
