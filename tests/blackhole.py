"""A TCP proxy whose far end goes silent: a host that vanished without closing its
connections (power, network), for the store calls' deadlines."""

from __future__ import annotations


class BlackHole:
    """A TCP proxy on loopback to `port` that forwards both ways until `silence()`; from
    then on it reads and drops everything and closes nothing: a host that vanished."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.upstream, self.silent = port, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent.set()

    def close(self) -> None:
        for c in [self.listener, *self.conns]:
            c.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    return
                if not self.silent.is_set():
                    dst.sendall(data)
            except OSError:
                return
