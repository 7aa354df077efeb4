"""torch.distributed's TCPStore served on one host's address only.

torch's TCPStore server listens on every interface (`::`), whatever host it is given.
Both rank-0 stores of this project (SGLang's engine ranks meeting on a loopback host,
plugin/loopback.py; the adapter group across servers, trainer/replicas.py) bind the
socket themselves and hand it to the store instead.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any


def family(host: str) -> socket.AddressFamily:
    """The address family of a numeric host (an IPv6 one holds a colon)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bound_tcp_store(host: str, port: int, world_size: int, timeout: timedelta,
                    **options: Any) -> Any:  # fmt: skip
    """The TCPStore server of a group of `world_size`, listening on HOST:PORT only.
    `options` go to TCPStore as they are (wait_for_workers, use_libuv)."""
    from torch.distributed import TCPStore

    listener = socket.create_server((host, port), family=family(host), backlog=128)
    # detach(): the store owns the bound socket from here (Python must not close it).
    return TCPStore(host, port, world_size, True, timeout, master_listen_fd=listener.detach(),
                    **options)  # fmt: skip
