"""Start `mace-sgl serve` in a subprocess on a free loopback port, with a bounded wait.

Used by the end-to-end tests and the benchmarks; a user starts the server directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

MACE_SGL = str(Path(sys.executable).with_name("mace-sgl"))


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `mace-sgl serve` (or any command line given as `cmd`).

    stop() kills its whole process group, SGLang's scheduler and detokenizer included.
    """

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 300.0,
        cmd: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [*(cmd or [MACE_SGL, "serve"]), "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = log_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - self.started

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for the server's API key, if it has one."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        """The last n lines of the server's log."""
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=60, **kw)

    def post(self, path: str, json: Any, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, json=json, headers=self.headers, timeout=120, **kw)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 30 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
