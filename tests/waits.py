"""Bounded waits for tests: wait for exactly the condition a test asserts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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
