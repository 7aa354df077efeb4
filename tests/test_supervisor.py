"""The sidecar supervisor: restarts with backoff, stop() leaves nothing running, and a
sidecar does not outlive the process that started it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from waits import wait_until

from mace_sgl.config import MaceConfig
from mace_sgl.supervisor import Backoff, SidecarSupervisor

ROOT = Path(__file__).resolve().parent.parent


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (re-parented orphans may stay zombies here)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if alive(p)]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run():
    b = Backoff(first_s=1.0, max_s=30.0, stable_s=60.0)
    assert [b.delay(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.delay(61.0) == 1.0  # it stayed up a while: start over
    assert b.delay(0.5) == 2.0


def test_failures_restart_with_growing_delays_and_are_counted(tmp_path: Path):
    starts = tmp_path / "starts"
    script = (
        f"import sys, time; open({str(starts)!r}, 'a').write(f'{{time.time()}}\\n'); sys.exit(3)"
    )
    sup = SidecarSupervisor(
        MaceConfig(state_dir=str(tmp_path)),
        Backoff(first_s=0.2, max_s=0.8, stable_s=60.0),
        cmd=[sys.executable, "-c", script],
    )
    sup.start()
    try:
        wait_until(lambda: len(lines(starts)) >= 5, 30, "five starts")
    finally:
        sup.stop()
    times = [float(t) for t in lines(starts)]
    # Every start is counted (a last one stop() killed before it wrote, too).
    assert 4 <= len(times) - 1 <= sup.restarts
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Each start waits its delay after the previous child exited (which is after it wrote).
    for gap, delay in zip(gaps[:4], [0.2, 0.4, 0.8, 0.8], strict=True):
        assert gap >= delay, (gaps, delay)


def test_a_clean_exit_is_not_restarted(tmp_path: Path):
    sup = SidecarSupervisor(
        MaceConfig(state_dir=str(tmp_path)),
        Backoff(first_s=0.05),
        cmd=[sys.executable, "-c", "pass"],
    )
    sup.start()
    sup._thread.join(10)  # the watcher ends by itself: the child was told to stop
    assert not sup._thread.is_alive()
    assert sup.restarts == 0 and sup.proc.returncode == 0


def test_stop_during_the_restart_delay_starts_no_orphan(tmp_path: Path):
    marker = tmp_path / "ran-once"
    # Fails the first time; any later start would live for a minute.
    script = (
        f"import pathlib, sys, time; m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.touch(); sys.exit(1)\ntime.sleep(60)"
    )
    sup = SidecarSupervisor(
        MaceConfig(state_dir=str(tmp_path)),
        Backoff(first_s=2.0),
        cmd=[sys.executable, "-c", script],
    )
    sup.start()
    first = sup.proc
    try:
        wait_until(lambda: first.poll() is not None, 30, "the first child failed")
        sup.stop()  # the watcher is now in its 2 s restart delay
        sup._thread.join(10)
        assert not sup._thread.is_alive(), "the watcher outlived stop()"
        assert sup.proc is first and live_children() == []
    finally:
        for p in live_children():
            p.kill()


def test_passes_max_train_count_and_pick_order_to_the_sidecar(tmp_path: Path):
    cfg = MaceConfig(
        state_dir=str(tmp_path), max_train_count=7, pick_order="oldest", feedback_retain=12
    )
    sup = SidecarSupervisor(cfg)
    i = sup.cmd.index("--max-train-count")
    assert sup.cmd[i + 1] == "7"
    assert sup.cmd[sup.cmd.index("--pick-order") + 1] == "oldest"
    assert sup.cmd[sup.cmd.index("--retain") + 1] == "12"
    for bad in ({"feedback_retain": -2}, {"feedback_backlog": -1}):
        with pytest.raises(ValueError, match="feedback_backlog must be >= 0"):
            MaceConfig(**bad)
    with pytest.raises(ValueError, match="--mace-pick-order 'lifo': one of newest, oldest"):
        MaceConfig(pick_order="lifo")
    # The sidecar itself accepts the command line (it serves, and stops on SIGTERM).
    sup.start()
    try:
        wait_until(lambda: (tmp_path / "run" / "to-sidecar.sock").exists(), 30, "sockets")
        assert sup.proc.poll() is None
    finally:
        sup.stop()
    assert sup.proc.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process tree")
def test_the_sidecar_exits_when_its_parent_is_killed(tmp_path: Path):
    # A stand-in for `mace-sgl serve`: it runs a supervisor and sleeps.
    launcher = (
        "import sys, time\n"
        "from mace_sgl.config import MaceConfig\n"
        "from mace_sgl.supervisor import SidecarSupervisor\n"
        f"sup = SidecarSupervisor(MaceConfig(state_dir={str(tmp_path)!r}))\n"
        "sup.start()\n"
        "print(sup.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    sidecar = None
    try:
        sidecar = psutil.Process(int(parent.stdout.readline()))
        wait_until(lambda: (tmp_path / "run" / "to-sidecar.sock").exists(), 30, "sockets")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not alive(sidecar), 5, "the sidecar exits with its parent")
    finally:
        parent.kill()
        parent.wait()
        if sidecar is not None and alive(sidecar):
            sidecar.kill()
