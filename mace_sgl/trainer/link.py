"""The trainer's end of the sidecar conversation (messages in ipc/messages.py).

Samples arrive as Work, pause and the sidecar's id as Control, news of newer pairs
waiting in the store as Newer (pick order newest); the trainer says Ready
(how many samples it wants, which it holds), sends a Result per trained sample and a
Release for samples it gives back untrained. The link never blocks the scheduler: with
the sidecar not reading (stopped, or its queue full), a Ready is dropped (the next one
says the same, newer), while Results and Releases wait in the link's outbox, in order,
and go out before the next Ready. Dropped, they would be lost for good: the Ready after
them no longer lists those samples as held, and a sidecar that reconciles (a restarted
one) would queue a trained sample again, or leave a given-back one in flight. The outbox
holds at most one message per sample the trainer held: no Work comes while it waits.
What ZeroMQ already took (its queue, the kernel's socket buffer) is lost when the
sidecar dies with it unread; then a trained sample can train once more.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from pathlib import Path

import msgspec
import zmq

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
    decode_to_trainer,
    encode,
)

logger = logging.getLogger("mace_sgl.trainer")


class SidecarLink:
    """ZeroMQ sockets to the sidecar, the session id and the pause state it sent."""

    def __init__(self, state_path: Path, adapter_name: str, dp_rank: int = 0) -> None:
        self.session = uuid.uuid4().hex
        self.dp_rank = dp_rank
        ctx = zmq.Context.instance()
        self.push, self.pull = channels.connect_trainer(ctx, state_path / "run", dp_rank)
        self.paused = False
        self.asked_at = 0.0
        self.weights: dict[str, float] = {}  # tenant weights of the latest Work
        # The newest version of each tenant any replica reported (Work.versions, as of
        # the latest Work: of the tenants that exist now): a step of that tenant waits
        # until this replica's copy is at least that version.
        self.required: dict[str, int] = {}
        # Never-trained pairs waiting in the store newer than ones we hold, per tenant
        # (the latest Newer, until the trainer took it: take_newer).
        self.newer: dict[str, list[int]] = {}
        # The sidecar process whose Work we take (messages.py), set by its Control.
        self.sidecar_id = ""
        # Results and Releases not sent yet (the sidecar not reading), oldest first.
        self.outbox: deque[bytes] = deque()
        self.push.send(encode(Hello(self.session, adapter_name, dp_rank)))

    def receive(self) -> list[Sample]:
        """Every waiting message taken: the samples of Work from the current sidecar
        (Control updates `paused` and the sidecar's id)."""
        samples: list[Sample] = []
        sidecar = self.sidecar_id
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode_to_trainer(data)
            except msgspec.DecodeError as e:  # garbage, or a ValidationError (a subclass)
                logger.error("dropped a malformed sidecar message (%d bytes): %s", len(data), e)
                continue
            if isinstance(msg, Work) and msg.session == self.session and msg.sidecar == sidecar:
                self.asked_at = 0.0
                samples.extend(msg.samples)
                self.weights = dict(msg.weights)  # every tenant's, as the store has them
                # The sidecar's whole map: a tenant retired and created again (from v0)
                # is in it no more with the old one's version.
                self.required = dict(msg.versions)
            elif isinstance(msg, Newer) and msg.session == self.session and msg.sidecar == sidecar:
                self.newer = dict(msg.ids)
            elif isinstance(msg, Control) and msg.session in ("", self.session):
                self.paused = msg.paused
                sidecar = self.sidecar_id = msg.sidecar
                self.asked_at = 0.0  # name it in a Ready at once: it sends no Work before
        return samples

    def take_newer(self) -> dict[str, list[int]]:
        """The latest Newer's ids by tenant, once (empty when none came since)."""
        newer, self.newer = self.newer, {}
        return newer

    def maybe_ready(self, want: int, asking: bool, held: list[int], room: float = 0.0) -> None:
        """Ask for `want` samples (every 0.5 s while `asking`), and say Ready every 2 s even
        when not (paused, full), so a restarted sidecar learns of this session, sends it
        the pause state and requeues what it will never get. Not before the outbox is
        out: a Ready that lists fewer samples than the sidecar has in flight for us must
        come after the Results and Releases that account for the difference."""
        if not self.flush():
            return
        now = time.monotonic()
        if (asking and now - self.asked_at > 0.5) or now - self.asked_at > 2.0:
            ready = Ready(self.session, want if asking else 0, held, self.sidecar_id,
                          self.dp_rank, room)  # fmt: skip
            try:
                # Never block the scheduler: with the sidecar down for long the queue fills.
                self.push.send(encode(ready), zmq.NOBLOCK)
            except zmq.Again:
                pass
            self.asked_at = now

    def release(self, sample_ids: list[int]) -> None:
        """Give these held samples back untrained (queued again, train count unchanged)."""
        self._post(encode(Release(self.session, sample_ids)))

    def report(self, sample_id: int, loss: float, version: int, adapter: str = "") -> None:
        """One sample took part in a finished step of `adapter` (loss NaN: rolled back)."""
        self._post(encode(Result(self.session, sample_id, loss, version, adapter)))

    def _post(self, data: bytes) -> None:
        self.outbox.append(data)
        if not self.flush() and len(self.outbox) == 1:
            logger.warning("sidecar not reading: results and releases wait in the outbox")

    def flush(self) -> bool:
        """Send what the outbox holds, in order, without blocking; True once it is empty."""
        while self.outbox:
            try:
                self.push.send(self.outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                return False
            self.outbox.popleft()
        return True
