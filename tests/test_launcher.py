"""The test launcher picks ports the kernel never hands out, and retries a taken one.

CI once lost a whole module of server tests: the port from bind(0) was handed to
another socket during the server's start, and uvicorn could not bind it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import requests

from mace_sgl import launcher

# A stand-in for `mace-sgl serve`: binds --port like uvicorn, logs uvicorn's bind error
# and keeps running (as SGLang's other processes do) when the port is taken.
FAKE_SERVE = r"""
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
try:
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
except OSError as e:
    print(f"ERROR:    [Errno {e.errno}] error while attempting to bind on address "
          f"('127.0.0.1', {port}): address already in use", flush=True)
    time.sleep(600)
srv.serve_forever()
"""


def test_free_port_is_below_the_ephemeral_range():
    low = launcher._ephemeral_low()
    for _ in range(20):
        port = launcher.free_port()
        assert 30000 <= port < low


def test_server_retries_on_a_port_taken_before_it_binds(tmp_path: Path, monkeypatch):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    real = launcher.free_port
    picks = iter([taken])
    monkeypatch.setattr(launcher, "free_port", lambda: next(picks, None) or real())
    srv = launcher.Server(
        [], tmp_path / "log", cmd=[sys.executable, "-c", FAKE_SERVE], timeout_s=30
    )
    try:
        assert srv.port != taken
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200
        assert f"port {taken} was taken" in (tmp_path / "log").read_text()
    finally:
        srv.stop()
        holder.close()


def test_server_gives_up_after_its_attempts(tmp_path: Path, monkeypatch):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    monkeypatch.setattr(launcher, "free_port", lambda: taken)
    try:
        with pytest.raises(launcher.PortTaken):
            launcher.Server(
                [],
                tmp_path / "log",
                cmd=[sys.executable, "-c", FAKE_SERVE],
                timeout_s=30,
                attempts=2,
            )
    finally:
        holder.close()


@pytest.mark.parametrize("cache_prompt", [False, True])
def test_scored_sums_the_completions_log_probs_from_where_it_asked(monkeypatch, cache_prompt):
    """Server.scored asks SGLang for input log-probs from the first token, or with
    cache_prompt from the prompt's last one (its KV may then come from the radix cache),
    and sums the completion's: the last len(completion) entries either way."""
    from mace_sgl import launcher

    prompt, completion = [1, 2, 3, 4], [5, 6, 7]
    logprob = {1: -9.0, 2: -8.0, 3: -7.0, 4: -6.0, 5: -0.5, 6: -0.25, 7: -0.125}
    sent: list[dict] = []

    class Reply:
        status_code = 200

        def __init__(self, body: dict) -> None:
            start = body["logprob_start_len"]
            ids = body["input_ids"][start:]
            # SGLang's first entry of a range has no log-prob
            self.entries = [[None, ids[0]]] + [[logprob[t], t] for t in ids[1:]]

        def json(self) -> dict:
            return {"meta_info": {"input_token_logprobs": self.entries}}

    server = launcher.Server.__new__(launcher.Server)
    monkeypatch.setattr(server, "post", lambda path, body: sent.append(body) or Reply(body),
                        raising=False)  # fmt: skip
    got, _ = server.scored(prompt, completion, "live", cache_prompt=cache_prompt)
    assert got == -0.875
    assert sent[0]["logprob_start_len"] == (3 if cache_prompt else 0)
    assert sent[0]["lora_path"] == "live"
    # A reply that does not cover the asked range (SGLang may override the start) is an
    # error, not a sum over the wrong tokens.
    short = Reply(sent[0])
    short.entries = short.entries[2:]
    monkeypatch.setattr(server, "post", lambda path, body: short, raising=False)
    with pytest.raises(RuntimeError, match="input log-probs"):
        server.scored(prompt, completion, "live", cache_prompt=cache_prompt)
