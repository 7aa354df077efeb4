"""Starts the training sidecar beside the server and restarts it if it dies."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

from mace_sgl.config import MaceConfig

logger = logging.getLogger("mace_sgl")


class SidecarSupervisor:
    """Keeps one `python -m sidecar.main` running until stop()."""

    def __init__(self, cfg: MaceConfig, restart_delay_s: float = 1.0) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "sidecar.main",
            "--state-dir",
            str(cfg.state_path),
            "--adapter",
            cfg.adapter_name,
        ]
        self.restart_delay_s = restart_delay_s
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mace-sidecar", daemon=True)

    def start(self) -> None:
        """Start the sidecar and the thread that watches it."""
        self.proc = subprocess.Popen(self.cmd)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            logger.warning("sidecar exited with %s; restarting", code)
            time.sleep(self.restart_delay_s)
            self.restarts += 1
            self.proc = subprocess.Popen(self.cmd)

    def stop(self) -> None:
        """Stop watching and terminate the sidecar."""
        self._stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
