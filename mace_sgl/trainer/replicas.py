"""One adapter for every data-parallel replica: a step's result goes to all the others.

With `--dp-size N --mace-train` every scheduler has its own trainer on its own replica's
weights. The sidecar leases training to one replica at a time (sidecar/main.py), so a
step runs on one replica only; once it is published, that tenant's whole training state
(LoRA weights, AdamW moments and step counts, and the new version number) goes to every
other replica, which writes it into its own SGLang pool slot in place and serves the
same version. The next step may then run on any replica: each holds the same state.

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
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mace_sgl.config import split_addr

logger = logging.getLogger("mace_sgl.trainer")

MAGIC = 0x4D414345  # "MACE"
HEADER = 4  # int64: magic, tenant key, version, payload elements
TAG_HEADER, TAG_PAYLOAD = 0, 1
STORE_FILE = "replicas.store"
# How long a server waits for the others of a multi-server group to come up.
RENDEZVOUS_TIMEOUT_S = 900.0


def group_store(cfg: Any, dp_rank: int) -> tuple[Any, int, int]:
    """The store the adapter group meets in, this scheduler's global rank, the world.

    One server: the launcher's FileStore of its N replicas. Several: the TCPStore on
    --mace-sync-addr, served by global rank 0 on a socket bound to that host only; every
    server checks that the others run the same --dp-size (the ranks would not add up)."""
    from torch.distributed import FileStore, TCPStore

    dp = cfg.replicas
    if cfg.sync_world_size <= 1:
        return FileStore(str(Path(cfg.replica_store) / STORE_FILE), dp), dp_rank, dp
    rank, world = cfg.sync_rank * dp + dp_rank, cfg.sync_world_size * dp
    host, port = split_addr(cfg.sync_addr)
    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    if rank == 0:
        listener = socket.create_server((host, port), family=_family(host), backlog=128)
        # detach(): the store owns the bound socket from here (Python must not close it).
        store = TCPStore(host, port, world, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())  # fmt: skip
    else:
        store = TCPStore(host, port, world, False, timeout)
    if dp_rank == 0:
        store.set(f"mace/dp/{cfg.sync_rank}", str(dp))
    first = int(store.get("mace/dp/0"))
    if first != dp:
        raise ValueError(
            f"--mace-sync-rank {cfg.sync_rank} runs --dp-size {dp}, server 0 runs {first}: "
            "every server of one adapter group needs the same --dp-size"
        )
    return store, rank, world


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tenant_key(name: str) -> int:
    """A tenant's name as a 62-bit integer (the header carries no strings)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 2


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
    last_send_ms: float | None = None
    errors: list[str] = field(default_factory=list)


class ReplicaSync:
    """This replica's end of the group: a sending and a receiving thread."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world: int,
        timeout_s: float = 600.0,
        every_s: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        """`store`, `rank`, `world`: group_store()'s. every_s > 0 (--mace-sync-every-s):
        send at most that often, the newest state of each tenant only (versions queued
        meanwhile are superseded by it). `host`: the address gloo listens on."""
        from torch.distributed import ProcessGroupGloo

        self.rank, self.world = rank, world
        self.every_s = every_s
        self.peers = [r for r in range(world) if r != rank]
        self.stats = SyncStats()
        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        # Waits are for a peer that is alive (a dead replica takes the server down):
        # the receiving thread waits for the next header as long as the server runs.
        opts._timeout = datetime.timedelta(days=365)
        self.pg = ProcessGroupGloo(store, rank, world, opts)
        self.send_timeout = datetime.timedelta(seconds=timeout_s)
        self._inbox: queue.Queue[Update] = queue.Queue()
        self._outbox: queue.Queue[tuple[int, int, torch.Tensor, Callable[[], None]]] = queue.Queue()
        self._done: queue.Queue[Callable[[], None]] = queue.Queue()
        for target, name in ((self._receive_loop, "recv"), (self._send_loop, "send")):
            threading.Thread(target=target, name=f"mace-replicas-{name}", daemon=True).start()
        logger.info("replica sync up: rank %d of %d (gloo on %s)", rank, world, host)

    # -- the scheduler's side (never blocks) --------------------------------------------

    def send(
        self, name: str, version: int, payload: torch.Tensor, done: Callable[[], None]
    ) -> None:
        """Queue `name`'s state at `version` for every peer; `done` is returned by
        delivered() once all of them took it."""
        self._outbox.put((tenant_key(name), version, payload, done))

    def received(self) -> list[Update]:
        """Updates from other replicas, oldest first."""
        return _drain(self._inbox)

    def delivered(self) -> list[Callable[[], None]]:
        """The `done` callbacks of sends every peer took."""
        return _drain(self._done)

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "rank": self.rank,
            "world": self.world,
            "sent": s.sent,
            "received": s.received,
            "applied": s.applied,
            "send_failures": s.send_failures,
            "last_send_ms": s.last_send_ms,
            "pending_sends": self._outbox.qsize(),
            "errors": s.errors[-3:],
        }

    # -- threads ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        import time

        last = float("-inf")
        while True:
            batch = [self._outbox.get()]
            wait = last + self.every_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            batch += _drain(self._outbox)
            newest: dict[int, tuple[int, torch.Tensor]] = {}
            for key, version, payload, _ in batch:
                if key not in newest or version > newest[key][0]:
                    newest[key] = (version, payload)
            start = time.perf_counter()
            try:
                for key, (version, payload) in newest.items():
                    header = torch.tensor([MAGIC, key, version, payload.numel()], dtype=torch.int64)
                    for peer in self.peers:
                        self.pg.send([header], peer, TAG_HEADER).wait(self.send_timeout)
                        self.pg.send([payload], peer, TAG_PAYLOAD).wait(self.send_timeout)
                    self.stats.sent += 1
            except Exception as e:  # the peer is gone: the server is going down with it
                self.stats.send_failures += 1
                self._error(f"send: {type(e).__name__}: {e}")
                continue
            last = time.monotonic()
            self.stats.last_send_ms = (time.perf_counter() - start) * 1000
            for _, _, _, done in batch:  # superseded versions are delivered by the newest
                self._done.put(done)

    def _receive_loop(self) -> None:
        while True:
            header = torch.zeros(HEADER, dtype=torch.int64)
            try:
                work = self.pg.recv_anysource([header], TAG_HEADER)
                work.wait()
                src = work.source_rank()
                magic, key, version, numel = (int(v) for v in header.tolist())
                if magic != MAGIC or numel <= 0:
                    self._error(f"bad header from rank {src}: {header.tolist()}")
                    continue
                payload = torch.empty(numel, dtype=torch.float32)
                self.pg.recv([payload], src, TAG_PAYLOAD).wait()
            except Exception as e:  # the group is gone (server shutting down)
                self._error(f"receive: {type(e).__name__}: {e}")
                return
            self.stats.received += 1
            self._inbox.put(Update(key, version, payload, src))

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
