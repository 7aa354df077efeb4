"""ZeroMQ PUSH/PULL channels over ipc:// sockets in an owner-only (0700) run directory.

The sidecar binds both sockets; the trainer connects. ZeroMQ reconnects on its own and a
connecting PUSH keeps queued messages while its peer restarts, so either side may restart.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq

TO_TRAINER = "to-trainer.sock"
TO_SIDECAR = "to-sidecar.sock"


def make_run_dir(path: Path) -> Path:
    """Create (or tighten) the socket directory: mode 0700, owned by us."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(f"{path} is not owned by this user")
    return path


def _addr(run_dir: Path, name: str) -> str:
    addr = f"ipc://{run_dir / name}"
    if len(addr) > 100:  # sun_path is ~107 bytes on Linux
        raise ValueError(f"socket path too long for ipc://: {addr}")
    return addr


def bind_sidecar(ctx: zmq.Context, run_dir: Path) -> tuple[zmq.Socket, zmq.Socket]:
    """(push to trainer, pull from trainer), bound, socket files chmod 0600."""
    make_run_dir(run_dir)
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    for sock, name in ((push, TO_TRAINER), (pull, TO_SIDECAR)):
        path = run_dir / name
        if path.exists():
            path.unlink()  # a stale socket file of a previous sidecar
        sock.bind(_addr(run_dir, name))
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return push, pull


def connect_trainer(ctx: zmq.Context, run_dir: Path) -> tuple[zmq.Socket, zmq.Socket]:
    """(push to sidecar, pull from sidecar), connected."""
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    push.connect(_addr(run_dir, TO_SIDECAR))
    pull.connect(_addr(run_dir, TO_TRAINER))
    return push, pull
