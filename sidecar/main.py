"""The training sidecar process: owns sample selection and the trainer conversation.

    python -m sidecar.main --state-dir DIR --adapter live

It binds the two ipc:// sockets in DIR/run, answers the trainer's Ready with Work picked
from the store, records each Result, returns in-flight samples of a dead trainer session to
the queue, and forwards pause/resume (a `paused` setting in the store) as Control.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import msgspec
import zmq

from mace_sgl.ipc import channels
from mace_sgl.ipc.messages import (
    Control,
    Hello,
    Ready,
    Result,
    Sample,
    Work,
    decode_to_sidecar,
    encode,
)
from sidecar import store

logger = logging.getLogger("mace_sgl.sidecar")


class Sidecar:
    """One sidecar: a store connection and the two sockets."""

    def __init__(self, state_dir: Path, adapter: str, max_train_count: int = 3) -> None:
        self.max_train_count = max_train_count
        self.conn = store.connect(state_dir / "feedback.sqlite3")
        self.adapter = adapter
        self.ctx = zmq.Context()
        self.push, self.pull = channels.bind_sidecar(self.ctx, state_dir / "run")
        self.session: str | None = None
        self.paused: bool | None = None
        self.running = True

    def handle(self, msg: Hello | Ready | Result) -> None:
        """React to one trainer message."""
        if isinstance(msg, Hello):
            self.session = msg.session
            freed = store.release_stale(self.conn, msg.session)
            if freed:
                logger.warning("requeued %d samples in flight in a dead trainer session", freed)
            self.paused = None  # tell the new session the current pause state
        elif isinstance(msg, Ready):
            self.session = msg.session
            rows = store.pick_next(
                self.conn, self.adapter, msg.want, msg.session, self.max_train_count
            )
            if rows:
                samples = [
                    Sample(r.id, r.prompt, r.chosen, r.rejected, r.weight, r.last_loss)
                    for r in rows
                ]
                self.push.send(encode(Work(msg.session, samples)))
        elif isinstance(msg, Result):
            if not store.record_result(self.conn, msg.sample_id, msg.loss, msg.session):
                logger.warning("result for sample %d from a stale session", msg.sample_id)

    def sync_pause(self) -> None:
        """Forward a change of the `paused` setting to the trainer."""
        paused = store.get_setting(self.conn, "paused", "0") == "1"
        if paused != self.paused and self.session is not None:
            self.push.send(encode(Control(paused=paused)))
            self.paused = paused

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while self.running:
            if poller.poll(200):
                data = self.pull.recv()
                try:
                    self.handle(decode_to_sidecar(data))
                except msgspec.ValidationError as e:
                    logger.error("dropped a malformed message: %s", e)
            self.sync_pause()

    def stop(self, *_: object) -> None:
        """Signal handler: leave the loop."""
        self.running = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the sidecar process."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.main")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--adapter", default="live")
    parser.add_argument("--max-train-count", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s sidecar] %(message)s")
    sidecar = Sidecar(args.state_dir, args.adapter, args.max_train_count)
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)
    logger.info("sidecar ready (store %s)", args.state_dir / "feedback.sqlite3")
    sidecar.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
