"""The sidecar and the trainer's end of the conversation over real ipc sockets: the
--mace-max-train-count bound, samples stranded by a sidecar restart, pause across a
restart, Work of a dead sidecar, and malformed messages on either side."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from waits import wait_until

from mace_sgl.config import MaceConfig
from mace_sgl.ipc import channels
from mace_sgl.ipc.messages import (
    Control,
    Hello,
    Ready,
    Result,
    Sample,
    Work,
    decode_to_sidecar,
    decode_to_trainer,
    encode,
)
from mace_sgl.supervisor import SidecarSupervisor
from sidecar import store

ROOT = Path(__file__).resolve().parent.parent


def pair(i: int) -> dict:
    return {"adapter": "live", "prompt": f"p{i}", "chosen": "c", "rejected": "r", "weight": 1.0}


def inflight(conn, sample_id: int) -> str | None:
    return conn.execute(
        "SELECT inflight_session FROM feedback WHERE id = ?", (sample_id,)
    ).fetchone()[0]


class SidecarProcess:
    """`python -m sidecar.main` on a state directory, its log in a file."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.log_path = state_dir / f"sidecar-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("w")
        cmd = [sys.executable, "-m", "sidecar.main", "--state-dir", str(state_dir), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(10)
        self.log.close()
        return code


class FakeTrainer:
    """The trainer's sockets, driven by hand (messages as MaceTrainer.poll sends them)."""

    def __init__(self, run_dir: Path, session: str = "s1", dp_rank: int = 0) -> None:
        self.ctx = zmq.Context()
        self.push, self.pull = channels.connect_trainer(self.ctx, run_dir, dp_rank)
        self.session = session
        self.dp_rank = dp_rank
        self.sidecar = ""

    def send(self, msg: Hello | Ready | Result) -> None:
        self.push.send(encode(msg))

    def ready(self, want: int = 0, held: list[int] | None = None) -> None:
        self.send(Ready(self.session, want, held or [], self.sidecar, self.dp_rank))

    def recv(self, timeout_s: float = 15.0) -> Work | Control:
        assert self.pull.poll(int(timeout_s * 1000)), "no message from the sidecar"
        return decode_to_trainer(self.pull.recv())

    def handshake(self, held: list[int] | None = None, timeout_s: float = 30.0) -> Control:
        """Ready now and then until a Control of this session names a sidecar."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.ready(0, held)
            if self.pull.poll(500):
                msg = decode_to_trainer(self.pull.recv())
                if isinstance(msg, Control) and msg.session == self.session and msg.sidecar:
                    self.sidecar = msg.sidecar
                    return msg
        raise AssertionError("no Control from the sidecar")

    def work(self, want: int, held: list[int] | None = None) -> Work:
        """Ask for `want` samples; the Work that answers (Controls skipped)."""
        self.ready(want, held)
        while True:
            msg = self.recv()
            if isinstance(msg, Work):
                assert msg.sidecar == self.sidecar
                return msg

    def close(self) -> None:
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()


@pytest.fixture
def conn(tmp_path: Path):
    c = store.connect(tmp_path / "feedback.sqlite3")
    yield c
    c.close()


@pytest.fixture
def trainer(tmp_path: Path):
    t = FakeTrainer(tmp_path / "run")
    yield t
    t.close()


def test_release_unheld_frees_only_what_the_session_does_not_hold(conn):
    ids = store.add_feedback(conn, [pair(i) for i in range(4)])
    assert [r.id for r in store.pick_next(conn, "live", 3, "s1", order="oldest")] == ids[:3]
    assert [r.id for r in store.pick_next(conn, "live", 1, "s2", order="oldest")] == ids[3:]
    assert store.release_unheld(conn, "s1", [ids[1], 999]) == 2
    assert [inflight(conn, i) for i in ids] == [None, "s1", None, "s2"]
    assert store.release(conn, "s1", [ids[1], ids[3]]) == {"live": 1}  # ids[3] is not s1's
    assert store.counts(conn).inflight == 1


def test_rows_in_flight_are_found_without_scanning_the_store(conn):
    """The queries that look for rows in flight (every asking Ready of a replica, every
    Hello) search an index of those few rows, not every pair ever stored."""
    store.add_feedback(conn, [pair(i) for i in range(3)])
    store.pick_next(conn, "live", 1, "s1")
    for sql, args in (
        (
            "SELECT COUNT(*) FROM feedback WHERE inflight_session IS NOT NULL"
            " AND inflight_session != ?",
            ("s2",),
        ),  # held_elsewhere
        ("SELECT id FROM feedback WHERE inflight_session = ?", ("s1",)),  # release_unheld
        (
            "UPDATE feedback SET inflight_session = NULL WHERE inflight_session IS NOT NULL"
            " AND inflight_session NOT IN (?)",
            ("s1",),
        ),  # release_stale
    ):
        plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert (
            "USING INDEX feedback_inflight" in plan
            or "USING COVERING INDEX feedback_inflight" in plan
        ), plan
    assert store.held_elsewhere(conn, "s2") == 1 and store.held_elsewhere(conn, "s1") == 0


def test_the_supervisor_passes_max_train_count(tmp_path: Path, conn, trainer: FakeTrainer):
    (a,) = store.add_feedback(conn, [pair(0)])
    sup = SidecarSupervisor(MaceConfig(state_dir=str(tmp_path), max_train_count=1))
    sup.start()
    try:
        trainer.send(Hello("s1", "live"))
        trainer.handshake()
        assert [s.id for s in trainer.work(1).samples] == [a]
        trainer.send(Result("s1", a, 0.5, 1))
        (b,) = store.add_feedback(conn, [pair(1)])
        # `a` trained once, its limit with 1; with the old fixed 3 it would come back too.
        assert [s.id for s in trainer.work(2).samples] == [b]
    finally:
        sup.stop()


def test_a_sample_says_how_often_it_trained(tmp_path: Path, conn, trainer: FakeTrainer):
    # the trainer's per-pair decay counts only pairs that never trained (Pair.new)
    (a,) = store.add_feedback(conn, [pair(0)])
    sup = SidecarSupervisor(MaceConfig(state_dir=str(tmp_path), max_train_count=3))
    sup.start()
    try:
        trainer.send(Hello("s1", "live"))
        trainer.handshake()
        assert [(s.id, s.trained) for s in trainer.work(1).samples] == [(a, 0)]
        trainer.send(Result("s1", a, 0.5, 1))
        assert [(s.id, s.trained) for s in trainer.work(1).samples] == [(a, 1)]
    finally:
        sup.stop()


def test_malformed_messages_are_dropped_and_the_sidecar_goes_on(
    tmp_path: Path, trainer: FakeTrainer
):
    sidecar = SidecarProcess(tmp_path)
    try:
        trainer.push.send(b"\xc1 not msgpack at all")  # msgspec.DecodeError
        trainer.push.send(encode(Work("s1", [])))  # msgpack, wrong type: ValidationError
        trainer.handshake()  # answered after both, in order
        assert sidecar.proc.poll() is None
    finally:
        assert sidecar.stop() == 0
    assert sidecar.log_path.read_text().count("dropped a malformed message") == 2


def test_rows_a_dead_sidecar_picked_are_requeued_and_work_in_transit_is_kept(
    tmp_path: Path, conn, trainer: FakeTrainer
):
    ids = store.add_feedback(conn, [pair(i) for i in range(6)])[::-1]  # the newest first
    first = SidecarProcess(tmp_path)
    try:
        trainer.send(Hello("s1", "live"))
        trainer.handshake()
        got = [s.id for s in trainer.work(3).samples]
        assert got == ids[:3]
    finally:
        first.kill()
    # Say ids[2]'s Work was lost with the sidecar: the trainer holds only ids[0:2].
    held = ids[:2]
    second = SidecarProcess(tmp_path)
    try:
        control = trainer.handshake(held)  # a Ready naming the dead sidecar, then Control
        assert control.sidecar and inflight(conn, ids[2]) == "s1"  # not yet: no Ready named it
        # The first Ready naming the new sidecar: ids[2] is requeued, the held stay.
        assert [s.id for s in trainer.work(1, held).samples] == [ids[2]]
        assert [inflight(conn, i) for i in ids[:3]] == ["s1"] * 3
        # Work in transit: ids[2] not yet read by the trainer, so not in held. A later
        # Ready must not free it (only the first Ready of a session reconciles).
        trainer.ready(0, held)
        assert [s.id for s in trainer.work(1, held).samples] == [ids[3]]
        assert inflight(conn, ids[2]) == "s1"
    finally:
        second.stop()


# -- the trainer's end: MaceTrainer.poll on a shell with only what poll() touches ---------


def trainer_shell(tmp_path: Path, lookahead: int = 2, **cfg):
    from mace_sgl.policy.cost import CostModel
    from mace_sgl.policy.fairshare import FairShare
    from mace_sgl.policy.policies import make_policy
    from mace_sgl.policy.profile import Profile
    from mace_sgl.trainer import jobs, learned_cost
    from mace_sgl.trainer.jobs import JobBoard
    from mace_sgl.trainer.link import SidecarLink
    from mace_sgl.trainer.runtime import MaceTrainer
    from mace_sgl.trainer.sliced import Pair

    t = object.__new__(MaceTrainer)
    t.cfg = MaceConfig(state_dir=str(tmp_path), train=True, lookahead=lookahead, **cfg)
    t.link = SidecarLink(tmp_path, "live")
    t.link.session = "s1"
    t.board = JobBoard()
    t.fair = FairShare()
    t.tenants = SimpleNamespace(tenants={"live": None})
    t.orphans_returned = 0
    t.handed_back = 0
    t.superseded = 0
    t.unreported = set()
    t.policy = make_policy("mace", Profile())
    t.step_wall_s = None  # no step finished yet
    t.seconds_by_work = dict.fromkeys(jobs.WORKS, 0.0)
    t.room = 0.0  # its replica's idle fraction (set by the scheduler hooks)
    t.replicas = None  # one replica: nothing to follow
    t._sync_tenants = lambda: None  # no SGLang here: the tenant set does not change
    t.cost_saver = learned_cost.CostSaver(
        tmp_path / learned_cost.FILE, {}, CostModel(), resumed=False
    )
    # No tokenizer here: the pair's ids do not matter to the conversation.
    t._pair = lambda s: Pair(s.id, [1], [2], [3], s.weight)
    t.push, t.pull = t.link.push, t.link.pull
    return t


@contextlib.contextmanager
def hand_driven(tmp_path: Path, lookahead: int = 2):
    """A trainer shell and the sidecar's sockets, driven by hand: (trainer, push, pull)."""
    ctx = zmq.Context()
    push, pull = channels.bind_sidecar(ctx, tmp_path / "run")
    t = trainer_shell(tmp_path, lookahead)
    try:
        yield t, push, pull
    finally:
        for sock in (t.push, t.pull, push, pull):
            sock.close(linger=0)
        ctx.term()


def last_ready(t, pull, until=lambda ready: True) -> Ready:
    """The first Ready `until` accepts, received after a poll that asks (asked_at
    reset), whatever came before it (the first poll's Hello, Readys of earlier polls),
    within 10 s. (It took the last Ready of what had arrived by the time the first
    message had: over ipc:// the Hello alone could be there, and no Ready.)"""
    t.link.asked_at = 0.0
    t.poll()
    deadline = time.monotonic() + 10.0
    while True:
        left_ms = max(0, int(1000 * (deadline - time.monotonic())))
        assert pull.poll(left_ms), "no such Ready within 10 s"
        msg = decode_to_sidecar(pull.recv())
        if isinstance(msg, Ready) and until(msg):
            return msg


def poll_until(t, cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        t.poll()
        time.sleep(0.05)


def test_resume_reaches_a_paused_trainer_after_a_sidecar_restart(tmp_path: Path, conn):
    t = trainer_shell(tmp_path)
    sidecar = SidecarProcess(tmp_path)
    try:
        store.set_setting(conn, "paused", "1")
        poll_until(t, lambda: t.paused, 30, "the trainer is paused")
        sidecar.kill()
        sidecar = SidecarProcess(tmp_path)
        store.set_setting(conn, "paused", "0")
        # The paused trainer still says Ready (want 0) now and then: the new sidecar
        # learns the session and forwards the resume.
        poll_until(t, lambda: not t.paused, 30, "the resume reached the trainer")
        (a,) = store.add_feedback(conn, [pair(0)])
        poll_until(t, lambda: [q.pair.sample_id for q in t.board.queue] == [a], 30, "work arrives")
    finally:
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


def test_the_trainer_holds_fewer_pairs_ahead_when_its_steps_are_slow(tmp_path: Path):
    """--mace-lookahead pairs ahead while steps are quick; at 45 s a step (drift's on 2
    cores) one step's: a pair the trainer takes waits about one step, not five, so the
    feedback of a new preference reaches training that much sooner. Before any step was
    measured, one step's pairs."""
    from mace_sgl.trainer.runtime import HOLD_AHEAD_S, pairs_ahead

    assert pairs_ahead(4, 1, None) == 1
    assert pairs_ahead(4, 1, 0.5) == 4
    assert pairs_ahead(4, 1, HOLD_AHEAD_S / 2) == 2
    assert pairs_ahead(4, 1, 45.0) == 1 and pairs_ahead(4, 1, 1e9) == 1
    assert pairs_ahead(4, 4, 45.0) == 4  # a whole step's pairs wait behind the running one
    assert pairs_ahead(8, 2, 10.0) == 6
    with hand_driven(tmp_path, lookahead=4) as (t, _, pull):
        wants = []
        for step_wall_s in (None, 1.0, 45.0):
            t.step_wall_s = step_wall_s
            wants.append(last_ready(t, pull).want)
        assert wants == [2, 5, 2]  # the pairs ahead, plus the step's one


def train_count(conn, sample_id: int) -> int:
    return conn.execute("SELECT train_count FROM feedback WHERE id = ?", (sample_id,)).fetchone()[0]


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_pairs_beyond_a_shrunk_hold_go_back_to_the_store_untrained(
    tmp_path: Path, conn, order: str
):
    """A trainer that took --mace-lookahead pairs while its steps were quick holds one
    step's once its steps are measured slow: the pairs beyond go back to the store
    untrained (in flight for nobody, train count unchanged), those a step would take
    last first, none whose reference pass is done. The sidecar hands them out again.
    A step's order: the policy's with --mace-pick-order oldest; newest, the newest
    never-trained pairs first, as the store hands them out."""
    ids = store.add_feedback(conn, [pair(i) for i in range(5)])
    t = trainer_shell(tmp_path, lookahead=4, pick_order=order)
    sidecar = SidecarProcess(tmp_path, "--pick-order", order)
    try:
        t.step_wall_s = 1.0  # quick steps: 4 pairs ahead plus the step's one
        poll_until(t, lambda: len(t.board.queue) == 5, 30, "five pairs held")
        queue = list(t.board.queue)
        for k, q in enumerate(queue):  # the last in the queue waited longest: the policy
            q.arrival -= k  # trains it first, and the first in the queue last
        # Oldest: the pair the policy trains last has its reference pass done, and stays.
        # Newest: the oldest has, and goes all the same (a newer one would go instead,
        # and the sidecar's Newer would swap them back).
        with_ref = queue[0] if order == "oldest" else queue[-1]
        t.board.refs[with_ref.pair.sample_id] = (-1.0, -2.0)
        t.step_wall_s = 45.0  # now one pair ahead plus the step's: three go back
        t.poll()
        kept = [q.pair.sample_id for q in t.board.queue]
        if order == "oldest":  # handed out 1..5; the policy: 5 (waited longest) first
            stay, back = [queue[0], queue[-1]], queue[1:4]
        else:  # handed out 5..1, and a step takes them in that order
            stay, back = queue[:2], queue[2:]
        assert kept == [q.pair.sample_id for q in stay]
        back = [q.pair.sample_id for q in back]
        wait_until(
            lambda: [inflight(conn, i) for i in back] == [None] * 3, 15, "the three given back"
        )
        assert [inflight(conn, i) for i in kept] == ["s1", "s1"]
        assert [train_count(conn, i) for i in ids] == [0] * 5
        assert t.handed_back == 3 and t.superseded == 0
        for _ in range(5):  # the sidecar names no newer pair: nothing else goes back
            t.link.asked_at = 0.0
            t.poll()
            time.sleep(0.1)
        assert [q.pair.sample_id for q in t.board.queue] == kept
        t.step_wall_s = 1.0
        poll_until(t, lambda: len(t.board.queue) == 5, 30, "the three handed out again")
        assert sorted(q.pair.sample_id for q in t.board.queue) == sorted(ids)
    finally:
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


def test_a_restarted_sidecar_keeps_the_pairs_of_steps_not_reported_yet(tmp_path: Path, conn):
    """Pairs of a finished step held back for a publish (--mace-publish-every > 1), or
    whose version is still reaching the peers, are not reported yet: the trainer lists
    them as held, so a restarted sidecar requeues only what it really lost (Work never
    delivered), not them: they would train twice."""
    kept, lost = store.add_feedback(conn, [pair(0), pair(1)])
    t = trainer_shell(tmp_path)
    sidecar = SidecarProcess(tmp_path)
    try:
        poll_until(t, lambda: len(t.board.queue) == 2, 30, "both pairs held")
        # `kept` trained in a step held back; `lost` was never delivered (dropped here).
        t.board.drop(lambda q: False)
        t.unreported = {kept}
        sidecar.kill()
        sidecar = SidecarProcess(tmp_path)
        # The new sidecar requeues `lost` and, as the trainer asks, hands it out again.
        queued = lambda: [q.pair.sample_id for q in t.board.queue]  # noqa: E731
        poll_until(t, lambda: lost in queued(), 30, "`lost` delivered again")
        assert queued() == [lost] and inflight(conn, kept) == "s1"
        # Its step reported (MaceTrainer._report): no longer the trainer's, and trained.
        tenant = SimpleNamespace(
            name="live", version=1, publisher=SimpleNamespace(loaded=lambda: True)
        )
        t.tenants, t.lease = SimpleNamespace(tenants={"live": tenant}), None
        t._report(tenant, [SimpleNamespace(sample_id=kept)], {kept: 0.5})
        assert t.unreported == set()
        wait_until(lambda: inflight(conn, kept) is None, 15, "the result recorded")
        assert train_count(conn, kept) == 1
    finally:
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


def test_results_and_releases_wait_while_the_sidecar_is_not_reading(tmp_path: Path, conn):
    """With the sidecar stopped (SIGSTOP) until the trainer's queue to it is full, a
    Result neither blocks the scheduler nor is dropped, nor is a Release: both wait in
    the link's outbox, no Ready goes out before them (it would list fewer samples than
    the sidecar has in flight for this session), and once the sidecar reads again the
    trained pair is recorded once and the given-back one is queued again, untrained."""
    import signal
    import threading

    trained, given_back = store.add_feedback(conn, [pair(0), pair(1)])
    t = trainer_shell(tmp_path)
    sidecar = SidecarProcess(tmp_path)
    try:
        poll_until(t, lambda: len(t.board.queue) == 2, 30, "both pairs held")
        t.board.drop(lambda q: False)  # one trained (reported below), one given back
        sidecar.proc.send_signal(signal.SIGSTOP)
        filler = encode(Ready("s1", 0, [trained, given_back], t.link.sidecar_id, 0, 0.0))
        sent, full_for = 0, 0
        while full_for < 3:  # the kernel's buffers and both ZeroMQ queues, full: no room
            try:  # comes back within 0.3 s (ZeroMQ's I/O thread may still be moving them)
                t.link.push.send(filler, zmq.NOBLOCK)
                sent, full_for = sent + 1, 0
            except zmq.Again:
                full_for += 1
                time.sleep(0.1)
        assert sent > 100
        reporter = threading.Thread(target=t.link.report, args=(trained, 0.5, 1, "live"))
        reporter.start()
        reporter.join(5)
        assert not reporter.is_alive(), "a Result blocked the scheduler"
        t.link.release([given_back])
        assert len(t.link.outbox) == 2
        t.link.asked_at = 0.0
        t.link.maybe_ready(1, True, [], 0.0)
        assert t.link.asked_at == 0.0  # no Ready: it would come before the two
        sidecar.proc.send_signal(signal.SIGCONT)
        wait_until(t.link.flush, 60, "the outbox sent")  # (no poll: it would ask again)
        wait_until(lambda: train_count(conn, trained) == 1, 30, "the result recorded")
        wait_until(lambda: inflight(conn, given_back) is None, 30, "the pair given back")
        assert inflight(conn, trained) is None and train_count(conn, given_back) == 0
    finally:
        sidecar.proc.send_signal(signal.SIGCONT)
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


def test_a_retired_tenants_pairs_go_back_to_the_store_untrained(tmp_path: Path, conn):
    """A tenant retired while the trainer holds its pairs (queued, in the running step,
    or in steps held back for a publish): they go back to the store untrained, for a
    tenant created again under the name, instead of staying in flight until a restart.
    Another tenant's pairs stay."""
    from mace_sgl.trainer.sliced import SliceSpec

    store.add_tenant(conn, "t")
    ids = store.add_feedback(conn, [{**pair(i), "adapter": "t"} for i in range(3)])
    (other,) = store.add_feedback(conn, [pair(9)])
    t = trainer_shell(tmp_path, lookahead=4)
    t.tenants = SimpleNamespace(tenants={"live": None, "t": None})
    t.step_wall_s = 1.0  # quick steps: it holds up to --mace-lookahead pairs
    sidecar = SidecarProcess(tmp_path)
    try:
        poll_until(t, lambda: len(t.board.queue) == 4, 30, "four pairs held")
        by_id = {q.pair.sample_id: q for q in t.board.queue}
        queued, stepping, held_back = ids
        t.board.drop(lambda q: q.pair.sample_id not in (stepping, held_back))

        def step():
            yield SliceSpec("fwd", 3)

        t.board.start_step(step(), [by_id[stepping]])
        gone = SimpleNamespace(held_back=[([by_id[held_back].pair], {held_back: 0.5})])
        t.unreported = {held_back}
        t._release_retired(["t"], {"t": gone})
        assert t.board.step_job is None and gone.held_back == [] and t.unreported == set()
        assert [q.pair.sample_id for q in t.board.queue] == [other]
        wait_until(lambda: [inflight(conn, i) for i in ids] == [None] * 3, 15, "released")
        assert [train_count(conn, i) for i in ids] == [0, 0, 0]
        assert inflight(conn, other) == "s1"
    finally:
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


def test_a_step_that_ends_sets_the_wall_time_per_step_unless_a_pause_came(tmp_path: Path):
    """MaceTrainer._run_unit measures a step from its start to its last slice; a step
    that a pause interrupted (drift pauses training for every evaluation) is not
    measured, nor one that failed."""
    import torch

    from mace_sgl.trainer.jobs import QueuedPair
    from mace_sgl.trainer.sliced import Pair, SliceSpec

    t = trainer_shell(tmp_path, lookahead=4)
    t.model = torch.nn.Linear(1, 1)
    t._observe_slice = lambda *a: None
    q = QueuedPair(Pair(1, [1], [2], [3], 1.0), time.monotonic(), None, "live")

    def step(fail: bool = False):
        yield SliceSpec("fwd", 3)
        if fail:
            raise RuntimeError("out of memory")

    def run_step(started_ago: float, paused: bool = False, fail: bool = False) -> None:
        job = t.board.start_step(step(fail), [q])
        t.step_started, t.step_paused = time.monotonic() - started_ago, paused
        t._report = lambda *a: None  # a failed step's pairs (nothing to report to)
        t.tenants = SimpleNamespace(tenants={"live": None}, get=lambda name: None)
        t._run_unit(job.key)
        assert t.board.step_job is None  # it ended

    run_step(40.0)
    assert 40.0 <= t.step_wall_s < 41.0
    run_step(10.0, paused=True)  # not measured
    run_step(10.0, fail=True)  # not measured
    assert 40.0 <= t.step_wall_s < 41.0
    run_step(20.0)
    assert 34.0 <= t.step_wall_s < 35.0  # 40 + 0.3 x (20 - 40)
    t.link.paused = True  # a pause while a step runs marks it
    t.board.start_step(step(), [q])
    t.step_started = time.monotonic() - 120.0
    t.link.asked_at = 0.0
    t.poll()
    assert t.step_paused
    assert t._ahead() == 1  # a step running for 2 minutes: no more pairs than one
    t.step_wall_s = None
    t.step_started = time.monotonic()
    assert t._ahead() == 1  # a young step with nothing measured: one step's pairs


def test_trainer_drops_malformed_messages_and_work_of_a_dead_sidecar(tmp_path: Path):
    with hand_driven(tmp_path) as (t, push, pull):
        push.send(b"\xc1 garbage")
        push.send(encode(Ready("s1", 1)))  # a sidecar-bound message: ValidationError
        push.send(encode(Control(False, "s1", "new")))
        push.send(encode(Work("s1", [Sample(1, "p", "c", "r", 1.0)], "old")))  # in transit
        push.send(encode(Work("s1", [Sample(2, "p", "c", "r", 1.0)], "new")))
        poll_until(t, lambda: len(t.board.queue) > 0, 30, "work of the new sidecar")
        assert [q.pair.sample_id for q in t.board.queue] == [2]
        # A Ready names the new sidecar and what the trainer holds (those of earlier
        # polls may still be on their way, one maybe sent between the Control and the
        # Work: waited for), and so does every later one.
        last_ready(t, pull, until=lambda r: r.sidecar == "new" and r.held == [2])
        for _ in range(2):
            ready = last_ready(t, pull)
            assert ready.sidecar == "new" and ready.held == [2]


def test_the_trainer_shares_steps_by_the_store_weights_the_sidecar_sends(tmp_path: Path, conn):
    """A tenant's weight reaches the trainer's fair share with the Work (it used to stay
    in the sidecar: the trainer treated every tenant as weight 1)."""
    t = trainer_shell(tmp_path, lookahead=4)
    t.tenants = SimpleNamespace(tenants={"live": None, "heavy": None})
    sidecar = SidecarProcess(tmp_path)
    try:
        store.add_tenant(conn, "live")
        store.add_tenant(conn, "heavy", weight=3.0)
        store.add_feedback(conn, [{**pair(0), "adapter": "heavy"}])
        poll_until(t, lambda: "heavy" in t.fair.weights, 30, "weights reach the trainer")
        assert t.fair.weights == {"live": 1.0, "heavy": 3.0}
        # Both tenants wait: the fair share hands heavy three steps to live's one.
        picks = []
        for _ in range(8):
            name = t.fair.pick({"live": 0.0, "heavy": 0.0})
            t.fair.charge(name)
            picks.append(name)
        assert picks.count("heavy") == 6 and picks.count("live") == 2
    finally:
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


@contextlib.contextmanager
def two_replicas(tmp_path: Path, *args: str):
    """A sidecar with --replicas 2 (and `args`), and the trainers of ranks 0 and 1
    (sessions r0, r1), each greeted and handed the sidecar's id."""
    sidecar = SidecarProcess(tmp_path, "--replicas", "2", *args)
    trainers = [FakeTrainer(tmp_path / "run", f"r{r}", dp_rank=r) for r in (0, 1)]
    try:
        for t in trainers:
            t.send(Hello(t.session, "live", t.dp_rank))
            t.handshake()
        yield trainers
    finally:
        for t in trainers:
            t.close()
        assert sidecar.stop() == 0


def test_replicas_train_one_at_a_time_from_the_newest_version(tmp_path: Path, conn):
    """--replicas 2: Work goes to one replica's trainer while another holds samples, and
    names the versions the steps reported; a rank's new session frees only its own."""
    ids = store.add_feedback(conn, [pair(i) for i in range(4)])[::-1]  # the newest first
    with two_replicas(tmp_path) as (t0, t1):
        first = t0.work(2)
        assert [s.id for s in first.samples] == ids[:2] and first.versions == {}
        t1.ready(2)  # refused: rank 0 holds samples in flight
        # A rank's new session replaces only that rank's: rank 0's samples stay its own.
        t1.session = "r1b"
        t1.send(Hello("r1b", "live", 1))
        t1.handshake()
        assert [inflight(conn, i) for i in ids[:2]] == ["r0", "r0"]
        for i in ids[:2]:
            t0.send(Result("r0", i, 0.5, 1, "live"))
        wait_until(
            lambda: [inflight(conn, i) for i in ids[:2]] == [None, None], 15, "results recorded"
        )
        # Rank 1's first Work comes after rank 0's step: it names the version to start from.
        # (Had the lease let the refused Ready through, that Work would name no version.)
        second = t1.work(2)
        assert [s.id for s in second.samples] == ids[2:] and second.versions == {"live": 1}
        assert [inflight(conn, i) for i in ids] == [None, None, "r1b", "r1b"]


def test_a_tenant_created_again_waits_for_no_version_of_the_retired_one(tmp_path: Path, conn):
    """Work names the versions steps reported of each tenant as it exists now: a tenant
    purged and created again starts at v0, and a step of it must not wait for the old
    tenant's v3 (it would wait for ever). A late untrained report (NaN loss, e.g. the old
    tenant's step dropped at its retirement) names no version. In process, no sockets."""
    from sidecar.main import Sidecar

    sc = Sidecar(tmp_path, "live")
    sent: list[Work] = []
    sc._send = lambda rank, msg: isinstance(msg, Work) and sent.append(msg) or True
    try:
        sc.handle(Hello("r0", "live", 0))
        store.add_tenant(conn, "t")
        ids = store.add_feedback(conn, [{**pair(i), "adapter": "t"} for i in range(3)])

        def work() -> Work:
            sc.handle(Ready("r0", 1, [], sc.id, 0, 0.0))
            return sent[-1]

        assert work().versions == {}
        sc.handle(Result("r0", ids[0], 0.5, 3, "t"))
        assert work().versions == {"t": 3}
        sc.handle(Result("r0", ids[1], 0.5, 4, "t"))
        assert store.retire_tenant(conn, "t")
        created = store.created_at(conn, "t")
        assert store.add_tenant(conn, "t")  # created again (purged: it starts at v0)
        assert store.created_at(conn, "t") != created
        sc.handle(Result("r0", ids[1], float("nan"), 3, "t"))  # the old step, untrained
        got = work()
        assert got.versions == {}
        sc.handle(Result("r0", got.samples[0].id, 0.5, 1, "t"))  # the new tenant's step
        store.add_feedback(conn, [{**pair(9), "adapter": "t"}])
        assert work().versions == {"t": 1}
    finally:
        sc.ctx.destroy(linger=0)
        sc.conn.close()


def test_only_the_training_ranks_get_work(tmp_path: Path, conn):
    """--train-ranks 1 (`--mace-train-ranks`): rank 0 only serves; its Ready gets no Work."""
    (a,) = store.add_feedback(conn, [pair(0)])
    with two_replicas(tmp_path, "--train-ranks", "1") as (t0, t1):
        t0.ready(1)
        # A new session of rank 0, on the same socket: the sidecar reads the Ready first,
        # and anything it sent rank 0 for it arrives before the Control of the new session.
        t0.send(Hello("r0b", "live", 0))
        t0.session = "r0b"
        got = [t0.recv()]
        while not (isinstance(got[-1], Control) and got[-1].session == "r0b"):
            got.append(t0.recv())
        assert not [m for m in got if isinstance(m, Work)]  # rank 0 got no Work
        assert [s.id for s in t1.work(1).samples] == [a]


def test_the_lease_goes_to_the_asking_replica_with_the_most_room(tmp_path: Path, conn):
    """Design (a) of the LeMix issue: of the replicas asking for samples, the one whose
    scheduler was idle the most lately (Ready.room) trains next. In process, messages
    handled in a fixed order, no sockets read."""
    from sidecar.main import Sidecar

    sc = Sidecar(tmp_path, "live", replicas=2)
    sent: list[tuple[int, Work | Control]] = []
    sc._send = lambda rank, msg: sent.append((rank, msg)) or True
    try:
        for r in (0, 1):
            sc.handle(Hello(f"r{r}", "live", r))

        def ask(rank: int, room: float) -> None:
            sc.handle(Ready(f"r{rank}", 2, [], sc.id, rank, room))

        def work() -> list[int]:
            return [rank for rank, msg in sent if isinstance(msg, Work)]

        ask(1, 0.9)  # nothing stored yet: no Work, but rank 1 is asking with room 0.9
        ids = store.add_feedback(conn, [pair(i) for i in range(4)])[::-1]  # the newest first
        ask(0, 0.1)
        assert work() == []  # rank 1 asked just now with more room
        ask(0, 0.88)  # within the margin of rank 1's room: first come, first served
        assert work() == [0]
        assert [inflight(conn, i) for i in ids[:2]] == ["r0", "r0"]
        for i in ids[:2]:
            sc.handle(Result("r0", i, 0.5, 1, "live"))
        ask(0, 0.1)
        assert work() == [0]  # rank 1's ask is still fresh and roomier
        sc.sessions[1].asked_at -= 10  # ... and now it is old: rank 1 stopped asking
        ask(0, 0.1)
        assert work() == [0, 0]
        assert [inflight(conn, i) for i in ids[2:]] == ["r0", "r0"]
    finally:
        sc.ctx.destroy(linger=0)
        sc.conn.close()


def test_newer_untrained_lists_waiting_pairs_newer_than_held_never_trained_ones(conn):
    """Per adapter: never-trained pairs in flight for nobody, newer than the oldest
    never-trained held one (any, where a replay is held), newest first, no more than
    the held pairs of that adapter; other adapters' do not count."""
    a1, a2, a3, a4, a5 = store.add_feedback(conn, [pair(i) for i in range(5)])
    (b1,) = store.add_feedback(conn, [{**pair(9), "adapter": "other"}])
    assert store.newer_untrained(conn, []) == {}
    assert store.newer_untrained(conn, [a5]) == {}  # nothing newer waits
    assert store.newer_untrained(conn, [a1]) == {"live": [a5]}  # one held: one newer
    assert store.newer_untrained(conn, [a2, a1]) == {"live": [a5, a4]}
    conn.execute("UPDATE feedback SET inflight_session = 's9' WHERE id = ?", (a5,))
    assert store.newer_untrained(conn, [a2, a1]) == {"live": [a4, a3]}  # a5: in flight
    conn.execute("UPDATE feedback SET train_count = 1 WHERE id = ?", (a1,))
    # a replay: any never-trained pair waiting goes first (a5 is in flight)
    assert store.newer_untrained(conn, [a1]) == {"live": [a4]}
    assert store.newer_untrained(conn, [a3, b1]) == {"live": [a4]}  # "other": nothing newer
    conn.execute("UPDATE feedback SET inflight_session = 's9' WHERE id = ?", (a4,))
    assert store.newer_untrained(conn, [a4, a1]) == {"live": [a3, a2]}  # a4: held
    # It runs on every Ready: a search of the waiting rows' index, no scan and no sort of
    # an adapter's whole backlog.
    plan = " ".join(
        row[-1]
        for row in conn.execute("EXPLAIN QUERY PLAN " + store._WAITING_NEWER, ("live", 1, 2))
    )
    assert "USING INDEX feedback_waiting" in plan and "TEMP B-TREE" not in plan, plan


def test_a_newer_older_than_work_since_gives_back_only_what_it_supersedes(tmp_path: Path):
    """A Newer answers an earlier Ready: pairs it names may have come in Work since (held
    now, so not waiting). Of the queued pairs and those still waiting, those a step
    takes first stay (never-trained before replays, the newest first), as many as were
    queued: a held replay goes back before any never-trained pair."""
    from mace_sgl.ipc.messages import Release
    from mace_sgl.trainer.jobs import QueuedPair
    from mace_sgl.trainer.sliced import Pair

    with hand_driven(tmp_path, lookahead=4) as (t, _, pull):
        for sid, new in ((1, True), (2, True), (4, True), (9, False)):
            t.board.queue.append(QueuedPair(Pair(sid, [1], [2], [3], new=new), 0.0, None, "live"))
        t.link.newer = {"live": [4, 3]}  # 4 came in Work meanwhile
        t._give_back_superseded()
        assert [q.pair.sample_id for q in t.board.queue] == [1, 2, 4]  # the replay 9 went
        assert t.superseded == 1
        sent = []  # the Hello first
        while not sent or not isinstance(sent[-1], Release):
            assert pull.poll(10_000), sent
            sent.append(decode_to_sidecar(pull.recv()))
        assert sent[-1] == Release(t.link.session, [9])
        t._give_back_superseded()  # taken once
        assert t.superseded == 1
        t.link.newer = {"live": [5, 3]}  # 3 and 5 wait: they replace 1 and 2
        t._give_back_superseded()
        assert [q.pair.sample_id for q in t.board.queue] == [4] and t.superseded == 3


def test_the_sidecar_says_once_which_newer_pairs_wait(tmp_path: Path, conn):
    """With pick order newest a Ready that holds never-trained pairs older than waiting
    ones is answered by a Newer naming them (after any Work it asked for: what that
    Work hands out is not named), not again while the same pairs wait; with pick order
    oldest, never. In process, no sockets read."""
    from mace_sgl.ipc.messages import Newer
    from sidecar.main import Sidecar

    for order in ("newest", "oldest"):
        d = tmp_path / order
        d.mkdir()
        c = store.connect(d / "feedback.sqlite3")
        sc = Sidecar(d, "live", pick_order=order)
        sent: list = []
        sc._send = lambda rank, msg, sent=sent: sent.append(msg) or True
        try:
            sc.handle(Hello("s1", "live", 0))
            ids = store.add_feedback(c, [pair(i) for i in range(2)])
            sc.handle(Ready("s1", 2, [], sc.id, 0))
            (work,) = sent
            assert sorted(s.id for s in work.samples) == ids
            new = store.add_feedback(c, [pair(i) for i in range(2, 5)])
            sc.handle(Ready("s1", 1, ids, sc.id, 0))  # asks for one more
            if order == "oldest":
                assert [s.id for s in sent[1].samples] == [new[0]]
                assert len(sent) == 2 and not [m for m in sent if isinstance(m, Newer)]
                continue
            assert [s.id for s in sent[1].samples] == [new[-1]]  # the newest
            assert sent[2] == Newer("s1", sc.id, {"live": [new[1], new[0]]})
            sc.handle(Ready("s1", 0, [*ids, new[-1]], sc.id, 0))
            assert len(sent) == 3  # the same pairs wait: said once
            store.release(c, "s1", ids)  # the trainer gave back both
            sc.handle(Ready("s1", 0, [new[-1]], sc.id, 0))
            assert len(sent) == 3  # nothing newer than what it holds waits now
        finally:
            sc.ctx.destroy(linger=0)
            sc.conn.close()
            c.close()


def test_the_newer_query_runs_only_when_held_pairs_or_the_store_changed(
    tmp_path: Path, monkeypatch
):
    """A trainer's Ready comes every 0.5 s even when nothing changes (a heartbeat): the
    sidecar asks the store for newer pairs again only once what the trainer holds or
    the store changed (another process's commit, or its own), and again after a Newer
    it could not send. In process, no sockets read."""
    from mace_sgl.ipc.messages import Newer
    from sidecar.main import Sidecar

    queries = []
    real = store.newer_untrained
    monkeypatch.setattr(
        store, "newer_untrained", lambda conn, held: queries.append(list(held)) or real(conn, held)
    )
    c = store.connect(tmp_path / "feedback.sqlite3")
    sc = Sidecar(tmp_path, "live", pick_order="newest")
    sent: list = []
    delivered = [True]
    sc._send = lambda rank, msg: (sent.append(msg) or True) if delivered[0] else False
    try:
        sc.handle(Hello("s1", "live", 0))
        ids = store.add_feedback(c, [pair(i) for i in range(2)])
        sc.handle(Ready("s1", 2, [], sc.id, 0))
        assert len(queries) == 1 and sorted(queries[0]) == ids  # after the Work it sent
        for _ in range(3):  # heartbeats: the same held pairs, the same store
            sc.handle(Ready("s1", 0, ids, sc.id, 0))
        assert len(queries) == 1
        new = store.add_feedback(c, [pair(2)])  # another connection's commit
        sc.handle(Ready("s1", 0, ids, sc.id, 0))
        assert len(queries) == 2 and sent[-1] == Newer("s1", sc.id, {"live": new})
        sc.handle(Ready("s1", 0, ids, sc.id, 0))
        assert len(queries) == 2 and len(sent) == 2  # Work, then one Newer
        sc.handle(Ready("s1", 0, ids[:1], sc.id, 0))  # it holds fewer now
        assert len(queries) == 3
        store.release(sc.conn, "s1", ids[1:])  # the sidecar's own write
        sc.handle(Ready("s1", 0, ids[:1], sc.id, 0))
        assert len(queries) == 4
        delivered[0] = False
        newest = store.add_feedback(c, [pair(3)])
        sc.handle(Ready("s1", 0, ids[:1], sc.id, 0))  # its Newer is not sent...
        delivered[0] = True
        sc.handle(Ready("s1", 0, ids[:1], sc.id, 0))  # ...so the next Ready asks again
        assert len(queries) == 6
        assert sent[-1] == Newer("s1", sc.id, {"live": newest})  # as many as it holds
    finally:
        sc.ctx.destroy(linger=0)
        sc.conn.close()
        c.close()


def test_held_pairs_go_back_for_newer_ones_posted_since(tmp_path: Path, conn):
    """Pick order newest: pairs the trainer took before newer ones were posted go back
    untrained (their reference pass too), replaced by the newer ones, and a step takes
    the newest first. Real sidecar process; the trainer's hold is full, so it does not
    ask: only the sidecar's Newer tells it."""
    old = store.add_feedback(conn, [pair(i) for i in range(3)])
    t = trainer_shell(tmp_path, lookahead=2)
    sidecar = SidecarProcess(tmp_path)
    try:
        t.step_wall_s = 1.0  # two pairs ahead plus the step's one
        poll_until(t, lambda: len(t.board.queue) == 3, 30, "three pairs held")
        t.board.refs[old[0]] = (-1.0, -2.0)  # the oldest one's reference pass ran
        new = store.add_feedback(conn, [pair(i) for i in range(3, 5)])
        want = {old[2], *new}
        poll_until(t, lambda: {q.pair.sample_id for q in t.board.queue} == want, 30, "swapped")
        assert t.superseded == 2 and t.handed_back == 0
        assert old[0] not in t.board.refs
        wait_until(
            lambda: [inflight(conn, i) for i in old[:2]] == [None, None], 15, "the two given back"
        )
        assert [train_count(conn, i) for i in (*old, *new)] == [0] * 5
        queue = t.board.queue
        assert [queue[i].pair.sample_id for i in t._ranked(lambda q: True)] == [
            new[1], new[0], old[2]
        ]  # fmt: skip
    finally:
        sidecar.stop()
        t.push.close(linger=0)
        t.pull.close(linger=0)


def test_a_full_backlog_refuses_the_whole_batch(conn):
    """store.add_feedback with a bound: a batch that would pass an adapter's
    never-trained pairs over it stores nothing; trained pairs do not count."""
    ids = store.add_feedback(conn, [pair(i) for i in range(3)], backlog=3)
    with pytest.raises(store.BacklogFull, match="'live' has 3 feedback pairs waiting"):
        store.add_feedback(conn, [{**pair(7), "adapter": "other"}, pair(8)], backlog=3)
    assert store.counts(conn).feedback == 3
    store.add_feedback(conn, [{**pair(7), "adapter": "other"}], backlog=3)
    conn.execute("UPDATE feedback SET train_count = 1 WHERE id = ?", (ids[0],))
    conn.execute("UPDATE feedback SET inflight_session = 's1' WHERE id = ?", (ids[1],))
    store.add_feedback(conn, [pair(9)], backlog=3)  # two never-trained left: room for one
    with pytest.raises(store.BacklogFull):  # in flight but never trained: it counts
        store.add_feedback(conn, [pair(10)], backlog=3)
    assert store.counts(conn, "live").feedback == 4
    store.add_feedback(conn, [pair(10)] * 5)  # no bound


def test_a_full_backlog_evicts_the_oldest_waiting_pairs_when_asked(conn):
    """--mace-feedback-overflow evict: a batch that would pass the bound deletes the
    adapter's oldest never-trained pairs no trainer holds to make room (counted in
    `feedback_evicted`); trained pairs, pairs in flight and other adapters' stay, and
    where those are all that fills the bound the batch is refused whole."""
    ids = store.add_feedback(conn, [pair(i) for i in range(4)], backlog=4)
    other = store.add_feedback(conn, [{**pair(5), "adapter": "other"}], backlog=4)
    conn.execute("UPDATE feedback SET train_count = 1 WHERE id = ?", (ids[0],))
    conn.execute("UPDATE feedback SET inflight_session = 's1' WHERE id = ?", (ids[1],))
    # 3 never-trained (ids 1-3, id 1 in flight): 2 more pass the bound of 4 by one
    new = store.add_feedback(conn, [pair(6), pair(7)], backlog=4, evict=True)
    left = {r[0] for r in conn.execute("SELECT id FROM feedback")}
    assert left == {ids[0], ids[1], ids[3], *other, *new}  # ids[2]: the oldest waiting
    assert store.get_setting(conn, "feedback_evicted", "0") == "1"
    conn.execute("UPDATE feedback SET inflight_session = 's1' WHERE adapter = 'live'")
    with pytest.raises(store.BacklogFull):  # nothing evictable: all held by a step
        store.add_feedback(conn, [pair(8)], backlog=4, evict=True)
    conn.execute("UPDATE feedback SET inflight_session = NULL WHERE id = ?", (new[1],))
    with pytest.raises(store.BacklogFull):  # one evictable, two needed: nothing changes
        store.add_feedback(conn, [pair(8), pair(9)], backlog=4, evict=True)
    assert {r[0] for r in conn.execute("SELECT id FROM feedback")} == left
    assert store.get_setting(conn, "feedback_evicted", "0") == "1"


def test_trained_pairs_are_trimmed_beyond_the_retained(tmp_path: Path, conn):
    """The sidecar deletes the oldest pairs that trained (train count above 0, not in
    flight) beyond --retain, by an index of those rows, counted in the `feedback_trimmed`
    setting; never-trained pairs and pairs in flight stay."""
    from sidecar.main import Sidecar

    ids = store.add_feedback(conn, [pair(i) for i in range(6)])
    trained = ids[:4]
    marks = ",".join("?" * 4)
    conn.execute(f"UPDATE feedback SET train_count = 1 WHERE id IN ({marks})", trained)
    conn.execute("UPDATE feedback SET train_count = 3 WHERE id = ?", (trained[1],))
    conn.execute("UPDATE feedback SET inflight_session = 's1' WHERE id = ?", (trained[0],))
    sc = Sidecar(tmp_path, "live", retain=1)
    try:
        sc.maybe_trim()
        left = [r[0] for r in conn.execute("SELECT id FROM feedback ORDER BY id")]
        # trained[0] is in flight, trained[3] the newest retained; ids[4:] never trained
        assert left == [trained[0], trained[3], *ids[4:]]
        assert store.get_setting(conn, "feedback_trimmed", "0") == "2"
        sc.maybe_trim()  # within TRIM_EVERY_S of the last: nothing runs
        conn.execute("UPDATE feedback SET inflight_session = NULL")
        sc.trimmed_at -= 61
        sc.maybe_trim()
        left = [r[0] for r in conn.execute("SELECT id FROM feedback ORDER BY id")]
        assert left == [trained[3], *ids[4:]]
        assert store.get_setting(conn, "feedback_trimmed", "0") == "3"
        plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + store._TRIM, (1, 1)))
        assert "feedback_trained" in plan and "SCAN feedback\n" not in plan + "\n", plan
    finally:
        sc.ctx.destroy(linger=0)
        sc.conn.close()


def test_a_transaction_whose_commit_fails_is_rolled_back(tmp_path: Path):
    """A COMMIT that fails (disk full, an I/O error on the WAL's sync) must not leave the
    connection inside its write transaction, holding the lock every other writer
    waits for: it is rolled back and the error goes on."""

    class FailingCommit:
        def __init__(self, real):
            self.real = real

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return self.real.execute(sql, *args)

        @property
        def in_transaction(self):
            return self.real.in_transaction

    real = store.connect(tmp_path / "f.sqlite3")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store.add_feedback(FailingCommit(real), [pair(0)])
    assert not real.in_transaction
    assert store.add_feedback(real, [pair(1)]) == [1]  # the insert above was undone
    real.close()


def test_status_counts_read_indexes_not_the_tables_rows(conn):
    """counts() and counts_by_adapter() (every /mace/status, every feedback POST's queue
    depth) read the covering index and the partial index of rows in flight: the rows
    carry the texts, so a scan of them at the retain bound read ~100 MB per call."""
    ids = store.add_feedback(conn, [pair(i) for i in range(4)])
    store.add_feedback(conn, [{**pair(9), "adapter": "other"}])
    conn.execute("UPDATE feedback SET train_count = 1 WHERE id = ?", (ids[0],))
    conn.execute("UPDATE feedback SET inflight_session = 's' WHERE id IN (?, ?)", ids[1:3])
    assert store.counts(conn) == store.Counts(feedback=5, untrained=4, inflight=2)
    assert store.counts(conn, "live") == store.Counts(feedback=4, untrained=3, inflight=2)
    assert store.counts(conn, "none") == store.Counts(feedback=0, untrained=0, inflight=0)
    assert store.counts_by_adapter(conn) == {
        "live": store.Counts(feedback=4, untrained=3, inflight=2),
        "other": store.Counts(feedback=1, untrained=1, inflight=0),
    }
    for query, args in (
        (store._COUNTS, ()),
        (store._COUNTS + " WHERE adapter = ?", ("live",)),
        (store._COUNTS_BY_ADAPTER, ()),
        (store._INFLIGHT, ()),
        (store._INFLIGHT + " AND adapter = ?", ("live",)),
        (store._INFLIGHT_BY_ADAPTER, ()),
    ):
        plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + query, args)]
        assert all("COVERING INDEX feedback_pick" in p or "feedback_inflight" in p
                   or "TEMP B-TREE" in p for p in plan), (query, plan)  # fmt: skip


def test_a_purged_adapters_rows_are_deleted_in_batches(conn, monkeypatch):
    """delete_adapter (DELETE /mace/adapters/NAME?purge=true) deletes every row of that
    adapter, trained or not, in flight or not, TRIM_BATCH a transaction; other
    adapters' rows stay."""
    monkeypatch.setattr(store, "TRIM_BATCH", 2)
    gone = store.add_feedback(conn, [{**pair(i), "adapter": "gone"} for i in range(5)])
    kept = store.add_feedback(conn, [pair(i) for i in range(3)])
    conn.execute("UPDATE feedback SET train_count = 2 WHERE id = ?", (gone[0],))
    conn.execute("UPDATE feedback SET inflight_session = 's1' WHERE id = ?", (gone[1],))
    transactions = []
    real = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda c: transactions.append(1) or real(c))
    assert store.delete_adapter(conn, "gone") == 5
    assert len(transactions) == 3  # 2 + 2 + 1 rows
    assert [r[0] for r in conn.execute("SELECT id FROM feedback ORDER BY id")] == kept
    assert store.delete_adapter(conn, "gone") == 0


def test_feedback_for_a_tenant_retired_meanwhile_is_not_stored(conn):
    """POST /mace/feedback looks the adapters up, then stores (live_only): a retirement
    committed in between (a DELETE, maybe with a purge whose delete has run) refuses the
    whole body in the storing transaction, so no row of the retired name comes after
    the purge."""
    assert store.add_tenant(conn, "t") and store.add_tenant(conn, "u")
    assert len(store.add_feedback(conn, [{**pair(0), "adapter": "t"}], live_only=True)) == 1
    retired, upto = store.retire_marked(conn, "t")
    assert retired and store.delete_adapter(conn, "t", upto) == 1
    with pytest.raises(store.NotLive) as refused:
        store.add_feedback(
            conn, [{**pair(1), "adapter": "u"}, {**pair(2), "adapter": "t"}], live_only=True
        )
    assert refused.value.adapters == ["t"]
    with pytest.raises(store.NotLive):
        store.add_feedback(conn, [{**pair(3), "adapter": "never"}], live_only=True)
    assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone() == (0,)  # all or none
    assert not conn.in_transaction


def test_a_purge_deletes_the_retired_tenants_rows_not_those_of_one_created_again(conn):
    """retire_marked notes the newest row of the tenant it retires: a tenant created
    again under the name before the purge's delete ran keeps the rows it got since."""
    assert store.add_tenant(conn, "t")
    old = store.add_feedback(conn, [{**pair(i), "adapter": "t"} for i in range(3)])
    assert store.retire_marked(conn, "t") == (True, old[-1])
    assert store.retire_marked(conn, "t") == (False, old[-1])  # retired already
    assert store.tenant_state(conn, "t") == "retired" and not store.has_tenant(conn, "t")
    assert store.add_tenant(conn, "t")  # created again meanwhile...
    assert store.tenant_state(conn, "t") == "live"
    new = store.add_feedback(conn, [{**pair(9), "adapter": "t"}])
    assert store.delete_adapter(conn, "t", upto=old[-1]) == 3  # ...keeps its own row
    assert [r[0] for r in conn.execute("SELECT id FROM feedback")] == new
    assert store.retire_marked(conn, "never") == (False, 0)
    assert store.tenant_state(conn, "never") is None


def test_pairs_given_back_are_not_charged_to_their_tenants_fair_share(tmp_path: Path, conn):
    """A pair handed out is charged to its tenant's fair share; given back untrained
    (Release, or Work that could not be sent), the charge is taken back, so a tenant
    whose pairs often go back for newer ones is not served less than its weight."""
    from mace_sgl.ipc.messages import Release
    from sidecar.main import Sidecar

    sc = Sidecar(tmp_path, "live")
    sent: list = []
    sc._send = lambda rank, msg: sent.append(msg) or True
    try:
        sc.handle(Hello("s1", "live", 0))
        ids = store.add_feedback(conn, [pair(i) for i in range(2)])
        sc.handle(Ready("s1", 2, [], sc.id, 0))
        assert sc.share.vtime["live"] == 2.0
        sc.handle(Release("s1", ids[:1]))
        assert sc.share.vtime["live"] == 1.0 and inflight(conn, ids[0]) is None
        sc._send = lambda rank, msg: False  # no trainer to take this Work
        sc.handle(Ready("s1", 1, ids[1:], sc.id, 0))
        assert sc.share.vtime["live"] == 1.0 and inflight(conn, ids[0]) is None
    finally:
        sc.ctx.destroy(linger=0)
        sc.conn.close()


def test_a_step_takes_the_newest_never_trained_pair_of_the_tenant_whose_turn_it_is():
    """--mace-pick-order newest in the trainer: the fair share picks the tenant, and its
    step takes that tenant's newest never-trained pair, before an older one and before a
    replay with a high loss (the store's order). Stand-in trainer, no step run."""
    from mace_sgl.policy.fairshare import FairShare
    from mace_sgl.policy.policies import make_policy
    from mace_sgl.policy.profile import Profile
    from mace_sgl.trainer.jobs import QueuedPair
    from mace_sgl.trainer.runtime import MaceTrainer
    from mace_sgl.trainer.sliced import Pair

    def queued(sid: int, tenant: str, loss: float | None = None) -> QueuedPair:
        return QueuedPair(Pair(sid, [1], [2], [3], new=loss is None), float(sid), loss, tenant)

    queue = [queued(1, "live"), queued(3, "live", loss=2.0), queued(4, "other"), queued(5, "live")]
    started: list[list[int]] = []

    def take(picked):
        pairs = [queue[i] for i in picked]
        for i in sorted(picked, reverse=True):
            del queue[i]
        return pairs, {}

    tenant = SimpleNamespace(version=0)
    fake = SimpleNamespace(
        board=SimpleNamespace(
            queue=queue,
            take=take,
            start_step=lambda gen, pairs: started.append([q.pair.sample_id for q in pairs]),
        ),
        tenants=SimpleNamespace(tenants={"live": tenant, "other": tenant}),
        link=SimpleNamespace(required={}),
        unpublished={},
        policy=make_policy("mace", Profile()),
        fair=FairShare(),
        lease=None,
        cfg=MaceConfig(pick_order="newest"),
        _step=lambda tenant, pairs, refs: None,
    )
    fake._ranked = lambda keep: MaceTrainer._ranked(fake, keep)
    for _ in range(4):
        MaceTrainer._start_step(fake)
    # live (its newest pair 5 first in line), then other's turn, then live's older pair,
    # then the replay
    assert started == [[5], [4], [1], [3]]
