"""Starts the training sidecar beside the server and restarts it, with backoff, if it fails."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from mace_sgl.config import MaceConfig

logger = logging.getLogger("mace_sgl")


@dataclass
class Backoff:
    """Restart delays: `first_s`, doubling up to `max_s`; back to `first_s` once a child
    stayed up `stable_s`, so a sidecar that crashes once a day restarts at once."""

    first_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0
    _next_s: float = field(default=0.0, init=False, repr=False)

    def delay(self, uptime_s: float) -> float:
        """Seconds to wait before the next start, after a child that ran `uptime_s`."""
        if uptime_s >= self.stable_s or self._next_s == 0.0:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay


def sidecar_command(cfg: MaceConfig, parent_pid: int) -> list[str]:
    """The sidecar's command line for this config, started by process `parent_pid`."""
    return [
        sys.executable,
        "-m",
        "sidecar.main",
        "--state-dir",
        str(cfg.state_path),
        "--adapter",
        cfg.adapter_name,
        "--max-train-count",
        str(cfg.max_train_count),
        "--pick-order",
        cfg.pick_order,
        "--retain",
        str(cfg.feedback_retain),
        "--parent-pid",
        str(parent_pid),
        "--replicas",
        str(cfg.replicas),
        *(["--train-ranks", cfg.train_ranks] if cfg.training_ranks else []),
    ]


class SidecarSupervisor:
    """Keeps one `python -m sidecar.main` running until stop().

    A sidecar that exits with 0 was told to stop (SIGTERM/SIGINT, e.g. to the server's
    process group) and is not restarted; any other exit is a failure and is.
    """

    def __init__(
        self,
        cfg: MaceConfig,
        backoff: Backoff | None = None,
        cmd: list[str] | None = None,
    ) -> None:
        self.cmd = cmd or sidecar_command(cfg, os.getpid())
        self.backoff = backoff or Backoff()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._started = threading.Event()
        # Held while starting a child and while stop() takes it: no start after stop.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mace-sidecar", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the watching thread; return once it started the first sidecar."""
        self._thread.start()
        self._started.wait(timeout_s)

    def _spawn(self) -> bool:
        with self._lock:
            if self._stopping.is_set():
                return False
            self.proc = subprocess.Popen(self.cmd)
        return True

    def _run(self) -> None:
        # Every child starts from this thread: the sidecar's PR_SET_PDEATHSIG fires when the
        # thread that forked it ends, and this one lives until stop().
        try:
            if not self._spawn():
                return
        finally:
            self._started.set()
        while True:
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            if code == 0:
                logger.info("sidecar stopped (exit 0); not restarting it")
                return
            delay = self.backoff.delay(time.monotonic() - started)
            logger.warning(
                "sidecar exited with %s; restart %d in %.1f s", code, self.restarts + 1, delay
            )
            if self._stopping.wait(delay) or not self._spawn():
                return
            self.restarts += 1

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching and terminate the sidecar (SIGKILL after timeout_s)."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
