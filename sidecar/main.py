"""The training sidecar process: owns sample selection and the trainer conversation.

    python -m sidecar.main --state-dir DIR --adapter live [--max-train-count N]
                           [--parent-pid PID] [--replicas N] [--retain N]

It binds the two ipc:// sockets in DIR/run, answers the trainer's Ready with Work picked
from the store (every existing tenant by its fair share; --adapter names the default one, which
always exists), records each Result, queues again what a Release gives back untrained,
returns in-flight samples of a dead trainer session
(or of Work a dead sidecar never delivered) to the queue, forwards pause/resume (a
`paused` setting in the store) as Control, and every minute deletes the oldest pairs that
trained beyond --retain. It exits with its parent (--parent-pid).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from mace_sgl.config import PICK_ORDERS
from mace_sgl.ipc import channels
from mace_sgl.ipc.messages import (
    Control,
    Hello,
    Newer,
    Ready,
    Release,
    Result,
    Sample,
    Work,
    decode_to_sidecar,
    encode,
)
from mace_sgl.policy.fairshare import FairShare
from sidecar import store

logger = logging.getLogger("mace_sgl.sidecar")

# A trainer that has not yet taken our id says so in every Ready; answer it this often.
ANNOUNCE_EVERY_S = 1.0
# Leasing by room: an ask older than this is not a competitor (trainers ask every 0.5 s),
# and a replica needs this much more idle fraction to win over the one asking now.
ASK_FRESH_S = 1.5
ROOM_MARGIN = 0.05
# How often the oldest trained pairs are deleted beyond --retain.
TRIM_EVERY_S = 60.0


@dataclass
class Session:
    """The trainer session of one data-parallel rank, as this sidecar knows it."""

    id: str
    paused: bool | None = None  # the pause state it last got from us (None: tell it)
    announced_at: float = float("-inf")  # when it last got a Control
    # Whether its in-flight rows were checked against what it holds (release_unheld).
    reconciled: bool = False
    room: float = 0.0  # its replica's idle fraction, from its last asking Ready
    asked_at: float = float("-inf")  # when it last asked for samples
    newer_sent: dict[str, list[int]] = field(default_factory=dict)  # its last Newer's ids
    # What the last settled newer_untrained answer went by (held, store state): while it
    # is the same, so is the answer, and no query runs (a heartbeat Ready every 0.5 s).
    newer_key: tuple | None = None


class Sidecar:
    """One sidecar process: a store connection, the sockets and its own id.

    With several data-parallel replicas (--replicas N) each scheduler's trainer is one
    session, and the sidecar leases training to one of them at a time: Work goes to a
    session only while no other session holds samples in flight, so no pair trains on two
    replicas and every step starts from the adapter the previous one published (Work
    names the versions it must start from; trainer/replicas.py brings them over)."""

    def __init__(
        self,
        state_dir: Path,
        adapter: str,
        max_train_count: int = 3,
        parent_pid: int | None = None,
        replicas: int = 1,
        train_ranks: list[int] | None = None,
        pick_order: str = "newest",
        retain: int = -1,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.max_train_count = max_train_count
        self.retain = retain  # pairs kept once they trained (-1: all)
        self.trimmed_at = float("-inf")
        self.pick_order = pick_order  # --mace-pick-order: which untrained pairs go first
        self.parent_pid = parent_pid
        self.conn = store.connect(state_dir / "feedback.sqlite3")
        self.adapter = adapter  # the default tenant, which always exists
        self.share = FairShare()  # whose sample goes next, across Readies
        store.add_tenant(self.conn, adapter)
        self.ctx = zmq.Context()
        self.replicas = replicas
        # The ranks whose trainers may take Work (None: all); the others only serve.
        self.train_ranks = set(train_ranks) if train_ranks else None
        self.pushes, self.pull = channels.bind_sidecar_replicas(
            self.ctx, state_dir / "run", replicas
        )
        self.sessions: dict[int, Session] = {}  # dp rank -> its trainer's session
        # The newest version of each tenant any trained Result reported (Work.versions),
        # with the creation time of the tenant it belongs to (store.created_at): a tenant
        # retired and created again (purged: from v0) must not wait for the old one's.
        self.versions: dict[str, tuple[float, int]] = {}
        self.running = True

    def handle(self, msg: Hello | Ready | Result | Release) -> None:
        """React to one trainer message."""
        if isinstance(msg, Hello):
            if not 0 <= msg.dp_rank < self.replicas:
                logger.error("Hello from dp rank %d of %d: ignored", msg.dp_rank, self.replicas)
                return
            self.sessions[msg.dp_rank] = Session(msg.session)
            # A rank's new session replaces its dead one: what no live session holds goes
            # back to the queue (the pause state and our id go out in sync_pause).
            freed = store.release_stale(self.conn, [s.id for s in self.sessions.values()])
            if freed:
                logger.warning("requeued %d samples in flight in a dead trainer session", freed)
        elif isinstance(msg, Ready):
            self._ready(msg)
        elif isinstance(msg, Result):
            if not store.record_result(self.conn, msg.sample_id, msg.loss, msg.session):
                logger.warning("result for sample %d from a stale session", msg.sample_id)
            if msg.adapter and not math.isnan(msg.loss):  # NaN: not trained, no version
                self._reported(msg.adapter, msg.version)
        elif isinstance(msg, Release):  # given back untrained: queued again, uncounted
            self._give_back(msg.session, msg.sample_ids)

    def _give_back(self, session: str, ids: list[int]) -> None:
        """Queue these samples again untrained, and take back their tenants' fair-share
        charges: handed out again, they are charged again (a tenant whose pairs are often
        given back for newer ones would otherwise get fewer than its weight)."""
        for adapter, n in store.release(self.conn, session, ids).items():
            if adapter in self.share.weights:
                self.share.charge(adapter, -n)

    def _reported(self, name: str, version: int) -> None:
        """A step of tenant `name` reached `version` (its tenant as it exists now)."""
        created = store.created_at(self.conn, name)
        if created is None:  # retired meanwhile: nothing for a tenant created again
            return
        was = self.versions.get(name)
        if was is None or was[0] != created or version > was[1]:
            self.versions[name] = (created, version)

    def _ready(self, msg: Ready) -> None:
        if not 0 <= msg.dp_rank < self.replicas:
            return
        session = self.sessions.get(msg.dp_rank)
        if session is None or session.id != msg.session:
            # e.g. this sidecar restarted and missed the Hello
            session = self.sessions[msg.dp_rank] = Session(msg.session)
        if msg.sidecar != self.id:
            # The trainer would drop our Work: first a Control must tell it who we are.
            if time.monotonic() - session.announced_at > ANNOUNCE_EVERY_S:
                session.paused = None
            return
        if not session.reconciled:
            # The trainer named us only after it took our Control, and from then on it drops
            # Work of earlier sidecars; we sent none before this Ready. So what it does not
            # hold now it will never train: Work a dead sidecar picked but never delivered.
            session.reconciled = True
            freed = store.release_unheld(self.conn, msg.session, msg.held)
            if freed:
                logger.warning("requeued %d samples picked but never delivered", freed)
        sent = self._work(msg, session) if msg.want > 0 else []
        if self.pick_order == "newest":
            self._tell_newer(msg, session, [*msg.held, *sent])

    def _tell_newer(self, msg: Ready, session: Session, held: list[int]) -> None:
        """Newer: the never-trained pairs waiting in the store that should train before
        pairs the trainer holds (`held`: its Ready's and the Work just sent; newer than
        its never-trained ones, or any where it holds a replay), unless it was told
        exactly these already. No query while neither `held` nor the store changed since
        the last answer that was settled (told, or nothing to tell): store.version."""
        key = (tuple(sorted(held)), store.version(self.conn))
        if key == session.newer_key:
            return
        newer = store.newer_untrained(self.conn, held)
        if newer and newer != session.newer_sent:
            if not self._send(msg.dp_rank, Newer(msg.session, self.id, newer)):
                return  # asked again at the next Ready
            session.newer_sent = newer
        elif not newer:
            session.newer_sent = {}
        session.newer_key = key

    def _work(self, msg: Ready, session: Session) -> list[int]:
        """Pick and send the samples an asking Ready wants; the ids sent."""
        if self.train_ranks is not None and msg.dp_rank not in self.train_ranks:
            return []  # a serving-only replica (--mace-train-ranks)
        session.room, session.asked_at = msg.room, time.monotonic()
        if self.replicas > 1:
            if store.held_elsewhere(self.conn, msg.session):
                return []  # another replica is training: one step at a time
            if self._roomier_elsewhere(session):
                return []  # it goes to the replica with the most idle capacity
        # Every tenant with feedback to train gets its fair share of the samples sent
        # (store.pick_next), the default one included, by weight, whether the trainer
        # asks for one sample at a time or many.
        tenants = store.tenants(self.conn) or [store.Tenant(self.adapter, 0.0, 1.0)]
        for t in tenants:
            self.share.set_weight(t.name, t.weight)
        for gone in set(self.share.weights) - {t.name for t in tenants}:
            self.share.forget(gone)
        adapters = [t.name for t in tenants]
        rows = store.pick_next(
            self.conn,
            adapters,
            msg.want,
            msg.session,
            self.max_train_count,
            self.share,
            self.pick_order,
        )
        if rows:
            samples = [
                Sample(
                    r.id,
                    r.prompt,
                    r.chosen,
                    r.rejected,
                    r.weight,
                    r.last_loss,
                    r.adapter,
                    trained=r.train_count,
                )  # fmt: skip
                for r in rows
            ]
            weights = {t.name: t.weight for t in tenants}
            # Only the versions of the tenants as they exist now (a retired one's go).
            created = {t.name: t.created_at for t in tenants}
            self.versions = {n: cv for n, cv in self.versions.items() if created.get(n) == cv[0]}
            versions = {n: v for n, (_, v) in self.versions.items()}
            work = Work(msg.session, samples, self.id, weights, versions)
            if not self._send(msg.dp_rank, work):
                self._give_back(msg.session, [r.id for r in rows])
                return []
        return [r.id for r in rows]

    def _roomier_elsewhere(self, session: Session) -> bool:
        """Whether another replica asked lately (its trainer asks every 0.5 s while it
        wants samples) with clearly more room: that one gets the lease on its next Ready."""
        now = time.monotonic()
        return any(
            other is not session
            and now - other.asked_at < ASK_FRESH_S
            and other.room > session.room + ROOM_MARGIN
            for other in self.sessions.values()
        )

    def _send(self, dp_rank: int, msg: Work | Control | Newer) -> bool:
        # Never block: with no trainer connected a bound PUSH would wait forever, deaf to
        # SIGTERM; the caller undoes what an unsent message promised.
        try:
            self.pushes[dp_rank].send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            # A Control is retried on the next loop turn: only lost Work is worth a warning.
            log = logger.warning if isinstance(msg, Work) else logger.debug
            log("no trainer connected to send %s to; dropped", type(msg).__name__)
            return False
        return True

    def sync_pause(self) -> None:
        """Forward a change of the `paused` setting (and our id) to every trainer."""
        if not self.sessions:
            return
        paused = store.get_setting(self.conn, "paused", "0") == "1"
        for rank, session in self.sessions.items():
            if paused != session.paused and self._send(rank, Control(paused, session.id, self.id)):
                session.paused = paused
                session.announced_at = time.monotonic()

    def parent_alive(self) -> bool:
        """False once the process that started us is gone (we were re-parented)."""
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or the parent's death."""
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while self.running:
            if not self.parent_alive():
                logger.warning("parent %d is gone; exiting", self.parent_pid)
                break
            if poller.poll(200):
                data = self.pull.recv()
                try:
                    msg = decode_to_sidecar(data)
                except msgspec.DecodeError as e:  # garbage bytes, or a ValidationError
                    logger.error("dropped a malformed message (%d bytes): %s", len(data), e)
                else:
                    self.handle(msg)
            self.sync_pause()
            self.maybe_trim()

    def maybe_trim(self) -> None:
        """Every TRIM_EVERY_S: delete the oldest pairs that trained beyond --retain
        (store.trim_trained; a batch at a time, the next at the next loop turn)."""
        now = time.monotonic()
        if self.retain < 0 or now - self.trimmed_at < TRIM_EVERY_S:
            return
        gone = store.trim_trained(self.conn, self.retain)
        self.trimmed_at = now if gone < store.TRIM_BATCH else now - TRIM_EVERY_S
        if gone:
            logger.info("deleted %d trained pairs beyond --retain %d", gone, self.retain)

    def stop(self, *_: object) -> None:
        """Signal handler: leave the loop."""
        self.running = False

    def close(self) -> None:
        """Release sockets and the store; messages not yet sent are dropped."""
        for push in self.pushes:
            push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
        self.conn.close()


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the thread that started it ends (its parent's
    death, as the supervisor starts us from a thread that lives until stop())."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the sidecar process."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.main")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--adapter", default="live")
    parser.add_argument("--max-train-count", type=int, default=3)
    parser.add_argument("--pick-order", choices=PICK_ORDERS, default="newest")
    parser.add_argument(
        "--retain",
        type=int,
        default=-1,
        help="pairs kept once they trained; the oldest beyond go (-1: keep all)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="data-parallel replicas, one trainer each"
    )
    parser.add_argument(
        "--train-ranks", default="", help="comma-separated ranks that may train (default all)"
    )
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is gone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s sidecar] %(message)s")
    sidecar = Sidecar(
        args.state_dir,
        args.adapter,
        args.max_train_count,
        args.parent_pid,
        args.replicas,
        [int(r) for r in args.train_ranks.split(",") if r.strip()] or None,
        args.pick_order,
        args.retain,
    )
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)
    if args.parent_pid is not None:
        die_with_parent()  # then the first loop turn sees a parent that died before this
    logger.info(
        "sidecar ready (store %s, max train count %d)",
        args.state_dir / "feedback.sqlite3",
        args.max_train_count,
    )
    try:
        sidecar.run()
    finally:
        sidecar.close()
    logger.info("sidecar stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
