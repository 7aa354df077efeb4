"""Keeps SGLang's engine ranks off the network: no listener beyond loopback."""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

from mace_sgl.bound_store import bound_tcp_store

PREFIX = "mace-sgl-dist-"
SCHEME = "mace-loopback"  # a tcp:// rendezvous whose store listens on its host only

# Set once this process swapped its torch.distributed rendezvous (what it swapped to).
APPLIED: list[str] = []


def rendezvous_on_loopback(*args: Any, **kwargs: Any) -> tuple[tuple, dict] | None:
    """BEFORE hook on sglang.srt.distributed.parallel_state.init_distributed_environment.

    Why: SGLang rendezvouses with `tcp://127.0.0.1:<nccl_port>` (the serving host), and
    torch's TCPStore server then listens on every interface (`::`), whatever host the
    URL names: a port open to the network on a server the user bound to loopback; and
    gloo's and NCCL's own connections listen on the interface the machine's hostname
    resolves to.
    How: with world_size 1 there is nobody to meet, so the rendezvous moves to a
    `file://` store in a fresh owner-only (0700) directory named after this process.
    SGLang stops its scheduler with SIGKILL, so exit handlers rarely run: each start
    also removes the directories of earlier schedulers that are gone. Several ranks
    (--tp-size/--pp-size > 1) meeting on a loopback host rendezvous through
    `mace-loopback://` (loopback_store: the same TCPStore, its server on a socket bound
    to that host only), and gloo and NCCL connect over the loopback interface
    (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, unless set already). A rendezvous on
    another host (--dist-init-addr, or --host beyond loopback: ranks on other machines)
    is left as SGLang made it, and so is one with --moe-a2a-backend nixl, whose global
    store SGLang derives from the tcp:// address.
    """
    method = str(kwargs.get("distributed_init_method"))
    if not method.startswith("tcp://"):
        return None
    if kwargs.get("world_size") == 1:
        kwargs["distributed_init_method"] = f"file://{private_store_dir()}/store"
        APPLIED.append("file_store_rendezvous")
        return args, kwargs
    host = urlparse(method).hostname or ""
    if not _is_loopback(host) or kwargs.get("moe_a2a_backend") == "nixl":
        return None
    import torch.distributed as dist

    try:
        dist.register_rendezvous_handler(SCHEME, loopback_store)
    except RuntimeError:  # by an earlier call in this process
        pass
    ifname = loopback_interface()
    if ifname:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    kwargs["distributed_init_method"] = SCHEME + method[len("tcp") :]
    APPLIED.append("loopback_store_rendezvous")
    return args, kwargs


def loopback_store(
    url: str, timeout: timedelta = timedelta(minutes=30), **_: Any
) -> Iterator[tuple[Any, int, int]]:
    """torch.distributed rendezvous handler of `mace-loopback://HOST:PORT?rank=R&
    world_size=N`: torch's tcp:// handler, except that rank 0 binds the store's socket
    to HOST itself and hands it to TCPStore (`master_listen_fd`), which otherwise
    listens on every interface."""
    from torch.distributed import TCPStore

    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    rank, world = int(query["rank"]), int(query["world_size"])
    # as torch's handler: the URL's use_libuv, else USE_LIBUV, else libuv
    libuv = query.get("use_libuv", os.environ.get("USE_LIBUV", "1")) == "1"
    host, port = parsed.hostname or "127.0.0.1", parsed.port
    if port is None:
        raise ValueError(f"{SCHEME}:// rendezvous: port number missing in {url!r}")
    if rank == 0:
        store = bound_tcp_store(host, port, world, timeout, use_libuv=libuv)
    else:
        store = TCPStore(host, port, world, False, timeout, use_libuv=libuv)
    yield store, rank, world
    raise RuntimeError(f"{SCHEME}:// cannot rendezvous again")  # as torch's tcp:// handler


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (`lo` on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return None


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
