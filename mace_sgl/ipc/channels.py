"""ZeroMQ PUSH/PULL channels over ipc:// sockets in an owner-only (0700) run directory.

The sidecar binds the sockets; each trainer connects. Every trainer pushes into the one
TO_SIDECAR socket; the sidecar pushes to the trainer of data-parallel rank r through its
own socket (`to_trainer(r)`), so Work reaches exactly the replica it was picked for. ZeroMQ reconnects on its own and a
connecting PUSH keeps queued messages while its peer restarts, so either side may restart.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq

TO_TRAINER = "to-trainer.sock"
TO_SIDECAR = "to-sidecar.sock"


def to_trainer(dp_rank: int) -> str:
    """The socket file of the trainer of data-parallel rank `dp_rank` (rank 0: TO_TRAINER)."""
    return TO_TRAINER if dp_rank == 0 else f"to-trainer-{dp_rank}.sock"


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
    """(push to the trainer of rank 0, pull from every trainer), bound, chmod 0600."""
    pushes, pull = bind_sidecar_replicas(ctx, run_dir, 1)
    return pushes[0], pull


def bind_sidecar_replicas(
    ctx: zmq.Context, run_dir: Path, replicas: int
) -> tuple[list[zmq.Socket], zmq.Socket]:
    """([push to the trainer of rank r for each r], pull from every trainer), bound,
    socket files chmod 0600."""
    make_run_dir(run_dir)
    pushes = [ctx.socket(zmq.PUSH) for _ in range(replicas)]
    pull = ctx.socket(zmq.PULL)
    named = [(push, to_trainer(r)) for r, push in enumerate(pushes)] + [(pull, TO_SIDECAR)]
    for sock, name in named:
        path = run_dir / name
        if path.exists():
            path.unlink()  # a stale socket file of a previous sidecar
        sock.bind(_addr(run_dir, name))
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return pushes, pull


def connect_trainer(
    ctx: zmq.Context, run_dir: Path, dp_rank: int = 0
) -> tuple[zmq.Socket, zmq.Socket]:
    """(push to sidecar, pull from sidecar) of the trainer of `dp_rank`, connected."""
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    push.connect(_addr(run_dir, TO_SIDECAR))
    pull.connect(_addr(run_dir, to_trainer(dp_rank)))
    return push, pull
