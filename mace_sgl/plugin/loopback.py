"""Keeps a single-process SGLang engine off the network: no listener beyond loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

PREFIX = "mace-sgl-dist-"

# Set once this process swapped its torch.distributed rendezvous to a FileStore.
APPLIED: list[str] = []


def file_store_for_single_rank(*args: Any, **kwargs: Any) -> tuple[tuple, dict] | None:
    """BEFORE hook on sglang.srt.distributed.parallel_state.init_distributed_environment.

    Why: SGLang rendezvouses with `tcp://127.0.0.1:<nccl_port>`, and torch's TCPStore
    server then listens on every interface (`::`), whatever host the URL names: a port
    open to the network on a server the user bound to loopback.
    How: with world_size 1 there is nobody to meet, so the rendezvous moves to a
    `file://` store in a fresh owner-only (0700) directory named after this process.
    SGLang stops its scheduler with SIGKILL, so exit handlers rarely run: each start
    also removes the directories of earlier schedulers that are gone. Multi-rank runs
    (tp/pp > 1) are left as SGLang made them: their ranks need the TCP store.
    """
    method = kwargs.get("distributed_init_method")
    if kwargs.get("world_size") != 1 or not str(method).startswith("tcp://"):
        return None
    kwargs["distributed_init_method"] = f"file://{private_store_dir()}/store"
    APPLIED.append("file_store_rendezvous")
    return args, kwargs


def private_store_dir() -> str:
    """A fresh owner-only (0700) directory for a torch.distributed FileStore, named after
    this process and removed at its exit; directories of processes that are gone (killed
    before their exit handlers ran) are removed first."""
    remove_stale_stores(Path(tempfile.gettempdir()))
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def remove_stale_stores(tmp: Path) -> list[Path]:
    """Removes this user's store directories whose process no longer exists; returns them.

    A directory whose pid was reused by another process is kept (a leak of one small
    file, never a removal under a live scheduler)."""
    removed = []
    for d in tmp.glob(f"{PREFIX}*-*"):
        pid = d.name[len(PREFIX) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or d.stat().st_uid != os.getuid() or _alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
