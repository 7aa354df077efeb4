"""Bounded waits for tests: wait for exactly the condition a test asserts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll `cond` every 50 ms; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def wait_for_value(
    get: Callable[[], T],
    cond: Callable[[T], object],
    timeout_s: float,
    what: str,
    context: Callable[[], str] = lambda: "",
) -> T:
    """Poll `get` every 0.5 s until `cond` holds for its value, and return that value;
    TimeoutError naming `what`, the last value and `context()` (a server log's tail)
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = get()
        if cond(got):
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s; last {got}\n{context()}")
        time.sleep(0.5)


def mace_status(server: Any) -> dict:
    """GET /mace/status of a running `mace_sgl.launcher.Server`."""
    return server.get("/mace/status").json()


def wait_for_status(
    server: Any, cond: Callable[[dict], object], timeout_s: float, what: str = "status"
) -> dict:
    """/mace/status, polled until `cond` holds for it (wait_for_value, with the server
    log's tail on a timeout)."""
    return wait_for_value(lambda: mace_status(server), cond, timeout_s, what, server.tail)


def set_paused(server: Any, paused: bool, timeout_s: float = 30.0) -> None:
    """POST /mace/train/pause or resume, then wait until the trainer reports that state
    (with several replicas, every replica's trainer)."""
    r = server.post("/mace/train/pause" if paused else "/mace/train/resume", {})
    assert r.status_code == 200, r.text

    def reached(s: dict) -> bool:
        trainers = [s["training"], *s.get("replicas", [])]
        return all(t["paused"] == paused for t in trainers)

    wait_for_status(server, reached, timeout_s, "pause")
