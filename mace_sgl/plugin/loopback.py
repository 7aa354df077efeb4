"""Keeps a single-process SGLang engine off the network: no listener beyond loopback."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any

# Set once this process swapped its torch.distributed rendezvous to a FileStore.
APPLIED: list[str] = []


def file_store_for_single_rank(*args: Any, **kwargs: Any) -> tuple[tuple, dict] | None:
    """BEFORE hook on sglang.srt.distributed.parallel_state.init_distributed_environment.

    Why: SGLang rendezvouses with `tcp://127.0.0.1:<nccl_port>`, and torch's TCPStore
    server then listens on every interface (`::`), whatever host the URL names: a port
    open to the network on a server the user bound to loopback.
    How: with world_size 1 there is nobody to meet, so the rendezvous moves to a
    `file://` store in a fresh owner-only (0700) directory, removed at exit. Multi-rank
    runs (tp/pp > 1) are left as SGLang made them: their ranks need the TCP store.
    """
    method = kwargs.get("distributed_init_method")
    if kwargs.get("world_size") != 1 or not str(method).startswith("tcp://"):
        return None
    store_dir = tempfile.mkdtemp(prefix="mace-sgl-dist-")
    atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
    kwargs["distributed_init_method"] = f"file://{store_dir}/store"
    APPLIED.append("file_store_rendezvous")
    return args, kwargs
