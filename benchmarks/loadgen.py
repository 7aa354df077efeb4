"""Open-loop load generator: Poisson arrivals of streaming OpenAI chat requests.

Speaks only the OpenAI-compatible HTTP API, so it measures stock `sglang.launch_server`
and `mace-sgl serve` alike. Each request runs in its own thread, started at its arrival
time whether or not earlier ones finished (open loop); every streamed chunk is
timestamped, giving TTFT, the gaps between tokens (TBT) and end-to-end latency.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests


@dataclass
class RequestResult:
    """One streamed request as the client saw it (seconds)."""

    sent: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    e2e: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)


def stream_chat(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> RequestResult:
    """POST /v1/chat/completions with stream=True; timestamps every content chunk."""
    result = RequestResult(sent=time.monotonic())
    last = None
    try:
        with requests.post(
            url + "/v1/chat/completions",
            json={**body, "stream": True},
            headers=headers or {},
            stream=True,
            timeout=600,
        ) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                choices = chunk.get("choices") or []
                content = (choices[0].get("delta") or {}).get("content") if choices else None
                if not content:
                    continue
                result.text += content
                now = time.monotonic()
                if last is None:
                    result.ttft = now - result.sent
                else:
                    result.gaps.append(now - last)
                last = now
                result.tokens += 1
        result.e2e = (last or time.monotonic()) - result.sent
    except Exception as e:  # a failed request is a result, not a crash of the benchmark
        result.error = f"{type(e).__name__}: {e}"
    return result


def poisson_load(
    url: str,
    rate: float,
    duration_s: float,
    make_body: Callable[[int], dict[str, Any]],
    seed: int = 0,
    headers: dict[str, str] | None = None,
    on_result: Callable[[int, dict[str, Any], RequestResult], None] | None = None,
    drain_s: float | None = None,
) -> list[RequestResult]:
    """Requests at exponential inter-arrival times (mean 1/rate) for duration_s, then waits
    for every request sent to finish. `on_result(i, body, result)` runs as each one ends.

    The load lasts duration_s whenever its last request arrives: the time after the last
    arrival (the whole window, when nothing arrives) is part of it, as it is of a Poisson
    process, and a server idle then has it to itself. Until 2026-12-07 the call returned
    once the last arrival's request finished, so at drift's 0.15 requests/s a 16.7-second
    window lasted 5-14 s and the idle time that training takes was lost.

    With `drain_s`, waits at most that long after the load's end: a request still
    running then is a result with error "unfinished ..." (an overloaded server's backlog
    bounds the run instead of stretching it; its tokens so far are not counted)."""
    rng = random.Random(seed)
    results: list[RequestResult] = []
    lock = threading.Lock()
    finished: set[int] = set()
    threads: list[tuple[threading.Thread, float]] = []

    def one(i: int) -> None:
        body = make_body(i)
        r = stream_chat(url, body, headers)
        with lock:
            results.append(r)
            finished.add(i)
        if on_result is not None:
            on_result(i, body, r)

    start = time.monotonic()
    t, i = rng.expovariate(rate), 0
    while t < duration_s:
        delay = start + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i,), daemon=True)
        th.start()
        threads.append((th, time.monotonic()))
        i += 1
        t += rng.expovariate(rate)
    time.sleep(max(0.0, start + duration_s - time.monotonic()))  # the load's idle end
    deadline = None if drain_s is None else time.monotonic() + drain_s
    for th, _ in threads:
        th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    with lock:
        unfinished = [
            RequestResult(sent=sent, error=f"unfinished {drain_s:.0f} s after the load ended")
            for i, (_, sent) in enumerate(threads)
            if i not in finished
        ]
        return results + unfinished


def closed_loop(
    url: str,
    concurrency: int,
    duration_s: float,
    make_body: Callable[[int], dict[str, Any]],
    headers: dict[str, str] | None = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending its next request when the last one ends, for
    duration_s; returns the results and the wall time until the last one finished."""
    results: list[RequestResult] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    start = time.monotonic()

    def client() -> None:
        while time.monotonic() - start < duration_s:
            with lock:
                i = next(counter)
            r = stream_chat(url, make_body(i), headers)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, time.monotonic() - start


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile in milliseconds, None for no values."""
    if not values:
        return None
    from mace_sgl.policy.slo import percentile

    return 1000.0 * percentile(values, q)


def tail_targets(
    results: list[RequestResult], headroom: float = 1.0, per_token: str = "tpot"
) -> tuple[float, float]:
    """SLO targets (ms) that a run just meets: its p99 TTFT and p99 time per token, times
    `headroom`. per_token "tpot": requests' mean time per output token (what
    `summarize` counts for attainment); "gap": single gaps between tokens (the server
    controller's default TBT, prefill stalls included). Failed requests set nothing."""
    ok = [r for r in results if r.error is None and r.ttft is not None]
    ttft = percentile_ms([r.ttft for r in ok], 99)
    if per_token == "gap":
        tbt = percentile_ms([g for r in ok for g in r.gaps], 99)
    else:
        tbt = percentile_ms([r.tpot for r in ok if r.tpot is not None], 99)
    if ttft is None or tbt is None:
        raise RuntimeError("no request completed: no SLO targets to derive")
    return ttft * headroom, tbt * headroom


def summarize(
    results: list[RequestResult], ttft_ms: float, tbt_ms: float, wall_s: float
) -> dict[str, Any]:
    """Latency tails, SLO attainment (TTFT and mean TPOT within target) and throughput.

    `errors` counts requests the client saw fail (HTTP error, broken stream, timeout),
    with up to five messages in `error_samples`; `empty` counts requests that finished
    with no content (an adapter can learn to stop at once), which have no TTFT or TBT
    and count toward SLO attainment when they finished within the TTFT target."""
    ok = [r for r in results if r.error is None and r.ttft is not None]
    failed = [r for r in results if r.error is not None]
    empty = [r for r in results if r.error is None and r.ttft is None]
    gaps = [g for r in ok for g in r.gaps]
    met = [
        r for r in ok if r.ttft * 1000 <= ttft_ms and (r.tpot is None or r.tpot * 1000 <= tbt_ms)
    ] + [r for r in empty if r.e2e is not None and r.e2e * 1000 <= ttft_ms]
    return {
        "requests": len(results),
        "errors": len(failed),
        "error_samples": [r.error for r in failed[:5]],
        "empty": len(empty),
        "ttft_p50_ms": percentile_ms([r.ttft for r in ok], 50),
        "ttft_p99_ms": percentile_ms([r.ttft for r in ok], 99),
        "tbt_p50_ms": percentile_ms(gaps, 50),
        "tbt_p99_ms": percentile_ms(gaps, 99),
        "tpot_p50_ms": percentile_ms([r.tpot for r in ok if r.tpot is not None], 50),
        "tpot_p99_ms": percentile_ms([r.tpot for r in ok if r.tpot is not None], 99),
        "e2e_p50_ms": percentile_ms([r.e2e for r in ok if r.e2e is not None], 50),
        "e2e_p99_ms": percentile_ms([r.e2e for r in ok if r.e2e is not None], 99),
        "slo_attainment": len(met) / len(results) if results else None,
        "throughput_tok_s": sum(r.tokens for r in ok) / wall_s if wall_s else None,
    }
