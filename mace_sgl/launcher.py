"""Start `mace-sgl serve` in a subprocess on a free loopback port, with a bounded wait.

Used by the end-to-end tests and the benchmarks; a user starts the server directly.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

MACE_SGL = str(Path(sys.executable).with_name("mace-sgl"))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(low: int = 30000) -> int:
    """A TCP port free on loopback right now, below the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: until the server binds it (after its
    scheduler has loaded, many seconds later) any outgoing connection or gloo socket can
    be handed the same port. Ports from `low` up to the ephemeral range are never handed
    out by the kernel; SGLang picks its own internal ports from 22000-29999.
    """
    high = _ephemeral_low() - 1
    if high - low >= 64:
        for port in random.sample(range(low, high + 1), 64):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The server exited because its port was taken before it could bind it."""


class StartAborted(RuntimeError):
    """Server's start stopped by its `abort` event."""


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
        attempts: int = 3,
        abort: threading.Event | None = None,
    ) -> None:
        """Waits until /health answers, up to `timeout_s`; stops the server and raises
        when it exits, or at once when `abort` is set (a server started beside it failed:
        e.g. one of a sync group, which waits for its peers up to its timeout)."""
        self.abort = abort
        self.api_key = api_key
        self.log_path = log_path
        self.log = log_path.open("w")
        self.started = time.monotonic()
        for attempt in range(attempts):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            full = [*(cmd or [MACE_SGL, "serve"]), "--port", str(self.port), *args]
            if api_key:
                full += ["--api-key", api_key]
            self.proc = subprocess.Popen(
                full,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
            try:
                self._wait_ready(timeout_s)
                break
            except PortTaken:
                self._kill()
                if attempt == attempts - 1:
                    self.log.close()
                    raise
                self.log.write(f"\n[launcher] port {self.port} was taken; retrying on another\n")
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
        taken = f"address ('127.0.0.1', {self.port}): address already in use"
        while time.monotonic() < deadline:
            if self.abort is not None and self.abort.is_set():
                raise StartAborted("start aborted: a server started beside it failed")
            exited = self.proc.poll() is not None
            tail = self.tail()
            if taken in tail:
                # uvicorn logs the bind error but SGLang's other processes keep running.
                raise PortTaken(f"port {self.port} taken:\n{tail}")
            if exited:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
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

    def scored(
        self,
        prompt: list[int],
        completion: list[int],
        lora: str | None = None,
        *,
        cache_prompt: bool = False,
        **extra: Any,
    ) -> tuple[float, dict[str, Any]]:
        """The served log-prob of `completion` after `prompt` (token ids), under adapter
        `lora` (None: the base model), and SGLang's meta_info of the request. `extra`
        goes into the /generate body as it is.

        cache_prompt: ask for log-probs from the prompt's last token on, not from the
        first: SGLang then takes the prompt's KV from its radix cache where it has it and
        runs the LM head over the completion only (48 scorings of drift's margins: 2.2 s
        against 6.1 s on 2 CPU cores, 2026-12-07). The sum is the same up to the rounding
        of a cached prefix."""
        body: dict[str, Any] = {
            "input_ids": prompt + completion,
            "return_logprob": True,
            "logprob_start_len": max(0, len(prompt) - 1) if cache_prompt else 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            **extra,
        }
        if lora:
            body["lora_path"] = lora
        r = self.post("/generate", body)
        if r.status_code != 200:
            raise RuntimeError(f"/generate: {r.status_code} {r.text}")
        meta = r.json()["meta_info"]
        # one entry per token from logprob_start_len on (the first is None): the
        # completion's are the last ones
        lps = [x[0] for x in meta["input_token_logprobs"]]
        tail = lps[len(lps) - len(completion) :] if completion else []
        want = len(prompt) + len(completion) - body["logprob_start_len"]
        if len(lps) != want or None in tail:  # e.g. SGLang overrode the start
            raise RuntimeError(f"/generate gave {len(lps)} input log-probs from position "
                               f"{body['logprob_start_len']}, not {want}")  # fmt: skip
        return sum(tail), meta

    def listening(self) -> list[Any]:
        """The addresses (psutil's laddr) every process of the server listens on."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return [
            c.laddr
            for p in [root, *root.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 30 s."""
        self._kill()
        self.log.close()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
