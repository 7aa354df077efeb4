"""Shutdown of a training server: SIGTERM to its process group stops every process, even
with requests streaming, and the sidecar does not outlive a launcher killed with -9."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from tiny_model import tiny_serve_args

from mace_sgl.launcher import Server

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")


def start(tiny_model_dir: Path, tmp_path: Path) -> Server:
    args = tiny_serve_args(tiny_model_dir, "--mace-train", "--mace-state-dir", str(tmp_path))
    return Server(args, tmp_path / "server.log", timeout_s=600)


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds nothing but its exit status)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still alive after at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def tree(server: Server) -> list[psutil.Process]:
    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


def stragglers(server: Server, state_dir: Path) -> list[psutil.Process]:
    """Live processes of the server's group, or naming its state directory: also those
    started after the signal (a sidecar restarted during shutdown) and orphans."""
    found = []
    for p in psutil.process_iter():
        try:
            if (
                os.getpgid(p.pid) == server.proc.pid or str(state_dir) in " ".join(p.cmdline())
            ) and alive(p):
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


def sidecar_of(server: Server) -> psutil.Process:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in tree(server):
            try:
                if "sidecar.main" in " ".join(p.cmdline()) and alive(p):
                    return p
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no sidecar under the server\n{server.tail()}")


def kill_left(server: Server, procs: list[psutil.Process], state_dir: Path) -> None:
    for p in [*procs, *stragglers(server, state_dir)]:
        try:
            p.kill()
        except psutil.Error:
            pass
    server.stop()


def stream_forever(server: Server, first_chunk: threading.Event) -> None:
    """One streaming request that would run far longer than the test (until cut off)."""
    body = {
        "text": "Once upon a time",
        "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True, "temperature": 0.7},
        "stream": True,
    }
    try:
        with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    json.loads(line[5:])
                    first_chunk.set()
    except (requests.RequestException, ValueError):
        pass  # the server went away mid-stream: expected


def test_sigterm_to_group_stops_every_process_with_streams_in_flight(
    tiny_model_dir: Path, tmp_path: Path
):
    server = start(tiny_model_dir, tmp_path)
    procs: list[psutil.Process] = []
    try:
        sidecar = sidecar_of(server)
        started = [threading.Event() for _ in range(3)]
        threads = [
            threading.Thread(target=stream_forever, args=(server, e), daemon=True) for e in started
        ]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(60), f"a stream produced nothing\n{server.tail()}"
        procs = tree(server)
        assert sidecar.pid in {p.pid for p in procs}
        assert len(procs) >= 4  # launcher/HTTP, scheduler, detokenizer, sidecar
        assert all(t.is_alive() for t in threads), "the streams ended before the signal"

        os.killpg(server.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        left = wait_gone(procs, 15)
        assert not left, f"alive 15 s after SIGTERM: {left}\n{server.tail()}"
        left = wait_gone(stragglers(server, tmp_path), max(deadline - time.monotonic(), 0.5))
        assert not left, f"started during shutdown and left running: {left}\n{server.tail()}"
    finally:
        kill_left(server, procs, tmp_path)


def test_sidecar_exits_when_the_launcher_is_killed(tiny_model_dir: Path, tmp_path: Path):
    server = start(tiny_model_dir, tmp_path)
    procs: list[psutil.Process] = []
    try:
        sidecar = sidecar_of(server)
        procs = tree(server)
        os.kill(server.proc.pid, signal.SIGKILL)  # the launcher alone, not its group
        server.proc.wait(10)
        assert not wait_gone([sidecar], 5), f"sidecar outlived its parent\n{server.tail()}"
    finally:
        kill_left(server, procs, tmp_path)
