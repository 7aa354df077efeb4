"""The load generator's summary: failures, empty answers and SLO attainment kept apart."""

from __future__ import annotations

import http.server
import json
import threading
import time

from benchmarks.loadgen import RequestResult, poisson_load, summarize


def test_failed_and_empty_requests_are_counted_apart():
    fast = RequestResult(sent=0.0, ttft=0.1, gaps=[0.05, 0.05], e2e=0.2, tokens=3)
    slow = RequestResult(sent=0.0, ttft=3.0, gaps=[0.05], e2e=3.05, tokens=2)
    empty_in_time = RequestResult(sent=0.0, e2e=0.3)
    empty_late = RequestResult(sent=0.0, e2e=5.0)
    failed = RequestResult(sent=0.0, error="HTTPError: 503 Server Error")
    s = summarize([fast, slow, empty_in_time, empty_late, failed], 1000.0, 100.0, wall_s=10.0)
    assert s["requests"] == 5
    assert s["errors"] == 1 and s["error_samples"] == ["HTTPError: 503 Server Error"]
    assert s["empty"] == 2
    # met: `fast`, and the empty answer that finished inside the TTFT target
    assert s["slo_attainment"] == 2 / 5
    assert s["throughput_tok_s"] == 5 / 10.0
    assert s["ttft_p99_ms"] == 3000.0 and s["tbt_p99_ms"] == 50.0


class _Stream(http.server.BaseHTTPRequestHandler):
    """OpenAI-style SSE: two tokens at once, or (content "hang") only after 30 s."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["messages"][0]["content"] == "hang":
            time.sleep(30)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for token in ("a", "b"):
            chunk = {"choices": [{"delta": {"content": token}}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_a_bounded_drain_reports_requests_still_running_as_unfinished():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        body = lambda i: {"messages": [{"role": "user", "content": "hang" if i % 2 else "hi"}]}  # noqa: E731
        results = poisson_load(url, 40.0, 0.5, body, seed=3, drain_s=1.0)
        took = time.monotonic() - started
    finally:
        server.shutdown()
    done = [r for r in results if r.error is None]
    unfinished = [r for r in results if r.error and r.error.startswith("unfinished")]
    assert len(done) + len(unfinished) == len(results) >= 4
    assert all(r.tokens == 2 and r.text == "ab" for r in done)
    # every other request hangs for 30 s: those are the unfinished ones
    assert len(unfinished) == len(results) // 2
    assert took < 10.0  # the drain bound, not the 30-s hang, ended the wait


def test_the_load_lasts_its_duration_after_its_last_arrival():
    """poisson_load lasts duration_s even when its last request (or none) arrives early:
    the idle end of a Poisson window is part of the load (drift's windows and the
    training they hold depended on it)."""
    started = time.monotonic()
    results = poisson_load("http://127.0.0.1:1", 1e-6, 0.5, lambda i: {}, seed=1)
    assert results == [] and time.monotonic() - started >= 0.5
