"""`mace-sgl serve --dp-size 2 --mace-train` on the tiny model: two replicas under
SGLang's data-parallel controller with LeMix placement, one adapter for both (identical
bytes after every published step), loopback only, a tenant created and retired at run
time on both, and a SIGKILL of the whole server in the middle of training: nothing
lost, both replicas resume at the same version."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from tiny_model import tiny_serve_args
from waits import mace_status, set_paused, wait_for_status, wait_for_value

from mace_sgl.launcher import Server
from sidecar import store

PAIRS = [
    {"prompt": f"Question {i}: say something", "chosen": "Certainly! Here.", "rejected": f"no {i}"}
    for i in range(6)
]


def start(model_dir: Path, state_dir: Path, log: Path) -> Server:
    """A dp-2 training server. Its pairs may train 1000 times, so training goes on for
    the whole module (the SIGKILL must land mid-training); on the random model the KL
    from the base then passes the guard's 1.0 after 200-300 versions (about a minute on
    a fast machine) and every later step is refused, which stalled the SIGKILL test's
    wait for a new version in a fresh clone: the KL bound is lifted here
    (tests/test_guard.py tests the guard). Tests compare replicas with training paused
    (`settled`), since under continuous training they rarely stand at one version."""
    return Server(
        tiny_serve_args(
            model_dir,
            "--dp-size",
            "2",
            "--mace-train",
            "--mace-state-dir",
            str(state_dir),
            "--mace-lr",
            "1e-3",
            "--mace-max-train-count",
            "1000",
            "--mace-guard-max-kl",
            "1e9",
        ),
        log,
    )


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dp-state")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, state_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start(tiny_model_dir, state_dir, tmp_path_factory.mktemp("logs") / "dp.log")
    yield srv
    srv.stop()


def in_flight(state_dir: Path) -> dict[int, str]:
    """The feedback rows a trainer session holds in flight (id: session), read from the
    store (a plain connection: no schema script beside the running server's writes)."""
    conn = sqlite3.connect(str(state_dir / "feedback.sqlite3"), timeout=30.0)
    try:
        query = "SELECT id, inflight_session FROM feedback WHERE inflight_session IS NOT NULL"
        return dict(conn.execute(query).fetchall())
    finally:
        conn.close()


def wait_for(server: Server, cond, timeout_s: float = 180.0) -> dict:
    return wait_for_status(server, cond, timeout_s)


def settled(server: Server, adapter: str = "live", timeout_s: float = 120.0) -> dict:
    """Pause training, then wait until every replica serves one version of `adapter`
    with the same bytes (a step in flight stops; the last published version reaches
    every replica); the status then. The caller resumes."""
    set_paused(server, True)

    def alike(s: dict) -> bool:
        reps = s["replicas"]
        versions = {r["adapters"].get(adapter) for r in reps}
        digests = {r["adapter_digests"].get(adapter) for r in reps}
        # nothing in flight: no version waiting for its peers, no send pending
        quiet = all(not r["sync"]["unpublished"] and r["sync"]["pending_sends"] == 0 for r in reps)
        return len(versions) == 1 and len(digests) == 1 and None not in digests and quiet

    return wait_for(server, alike, timeout_s)


def test_both_replicas_serve_on_loopback_only(server: Server):
    s = mace_status(server)
    assert [r["dp_rank"] for r in s["replicas"]] == [0, 1]
    assert [x["dp_rank"] for x in s["schedulers"]] == [0, 1]  # not in answering order
    # Each replica's threads on cores of its own, as many torch threads as cores.
    threads = [x["threads"] for x in s["schedulers"]]
    if len(os.sched_getaffinity(0)) >= 2 and s["device"] == "cpu":
        a, b = (set(t["cores"]) for t in threads)
        assert a and b and not a & b, threads
        assert all(t["torch_threads"] == len(t["cores"]) for t in threads), threads
    # No feedback yet, so no training work: placement counts no training time anywhere.
    assert [r["reserve_ms"] for r in s["replicas"]] == [0.0, 0.0]
    before = {x["dp_rank"]: x["total_prefill_uncached_tokens"] for x in loads(server)}
    body = {"text": "hello there, " * 6, "sampling_params": {"max_new_tokens": 8}}
    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda _: server.post("/generate", body).status_code, range(16)))
    assert codes == [200] * 16
    # Placement spreads concurrent requests: each replica ran prefills of its own.
    after = wait_for_value(
        lambda: {x["dp_rank"]: x["total_prefill_uncached_tokens"] for x in loads(server)},
        lambda a: all(a[r] > before[r] for r in (0, 1)),
        30,
        "prefill on both replicas",
        server.tail,
    )
    assert set(after) == {0, 1}
    listening = server.listening()
    assert any(addr.port == server.port for addr in listening)
    for addr in listening:  # SGLang's, gloo's and ours: none beyond loopback
        assert ipaddress.ip_address(addr.ip).is_loopback, addr


def loads(server: Server) -> list[dict]:
    return server.get("/v1/loads").json()["loads"]


def test_replicas_serve_identical_adapters_after_steps(server: Server):
    assert server.post("/mace/feedback", PAIRS).status_code == 200
    wait_for(
        server,
        lambda s: s["queue_depth"] == 0 and min(r["adapter_version"] for r in s["replicas"]) >= 3,
    )  # every pair trained once, three versions published
    try:
        s = settled(server)
    finally:
        set_paused(server, False)
    reps = s["replicas"]  # settled's pause waited until both trainers report it
    # Same version, same bytes: max abs difference 0 (sha256 of the served LoRA tensors).
    assert reps[0]["adapter_digest"] is not None
    assert reps[0]["adapter_digest"] == reps[1]["adapter_digest"]
    assert reps[0]["adapters"] == reps[1]["adapters"] == {"live": reps[0]["adapter_version"]}
    # Both switched to it (publish on one, install on the other) close together: an idle
    # replica installs at its next idle poll (SGLang's idle sleeper wakes every 1 s).
    switched = [r["switched_at"] for r in reps]
    assert all(t > 0 for t in switched) and abs(switched[0] - switched[1]) < 5.0, switched
    # Steps ran on the replicas, and every version one published reached the other.
    assert sum(r["train_steps"] for r in reps) >= 3
    for r in reps:
        assert r["sync"]["errors"] == [] and r["sync"]["send_failures"] == 0
        assert r["sync"]["unpublished"] == {}  # the stepping replica serves it too
    # Each version was published by one replica and installed by the other.
    assert sum(r["sync"]["applied"] for r in reps) >= 1
    assert all(r["sync"]["applied"] <= r["adapter_version"] for r in reps)


def test_sigkill_mid_training_loses_nothing_and_replicas_resume_together(
    server: Server, tiny_model_dir: Path, state_dir: Path, tmp_path: Path
):
    more = [{**p, "prompt": p["prompt"] + " again"} for p in PAIRS] * 3
    assert server.post("/mace/feedback", more).status_code == 200
    count = mace_status(server)["feedback_count"]
    start_version = mace_status(server)["replicas"][0]["adapter_version"]
    # Training is under way: a new version was published after this feedback arrived.
    wait_for(server, lambda s: s["replicas"][0]["adapter_version"] > start_version, 120)
    # The kill lands while a trainer holds pairs for its steps (rows in flight in the
    # store): the server is frozen (SIGSTOP) until the store shows such rows, so nothing
    # changes between that read and the SIGKILL.
    deadline = time.monotonic() + 60
    while True:
        os.killpg(server.proc.pid, signal.SIGSTOP)
        held = in_flight(state_dir)  # WAL: readable while the writers are stopped
        if held or time.monotonic() > deadline:
            break
        os.killpg(server.proc.pid, signal.SIGCONT)
        time.sleep(0.5)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    assert held, "no trainer held a pair within 60 s"
    newest = max(
        json.loads(m.read_text())["version"]
        for m in (state_dir / "adapters" / "live").glob("v*/mace.json")
    )
    # Restart paused (the setting POST /mace/train/pause writes), to read the versions
    # the replicas resumed at before any new step.
    conn = store.connect(state_dir / "feedback.sqlite3")
    store.set_setting(conn, "paused", "1")
    conn.close()
    again = start(tiny_model_dir, state_dir, tmp_path / "dp-restart.log")
    try:
        s = mace_status(again)
        assert s["feedback_count"] == count  # nothing accepted was lost
        # The pairs the dead trainers held go back to the queue (the sidecar releases
        # the sessions that are gone when the new trainers say hello), not lost in flight.
        wait_for_value(
            lambda: {i: d for i, d in in_flight(state_dir).items() if i in held and d == held[i]},
            lambda stale: not stale,
            60,
            "the dead sessions' pairs released",
        )
        versions = [r["adapter_version"] for r in s["replicas"]]
        assert versions == [newest, newest]  # both resume from the newest checkpoint
        digests = {r["adapter_digest"] for r in s["replicas"]}
        assert len(digests) == 1 and None not in digests  # the same bytes, resumed
        # Training goes on from there, on one adapter for both.
        assert again.post("/mace/train/resume", {}).status_code == 200
        wait_for(again, lambda s: min(r["adapter_version"] for r in s["replicas"]) > newest)
        s = settled(again)
        assert s["replicas"][0]["adapter_digest"] == s["replicas"][1]["adapter_digest"]
    finally:
        again.stop()


def test_run_time_tenants_reach_every_replica_and_train_in_sync(
    tiny_model_dir: Path, tmp_path: Path
):
    """POST /mace/adapters with --dp-size 2: the plugin loads the adapter on every
    replica (SGLang's own route refuses data-parallel replicas), both train it as one
    adapter, and DELETE retires it on both. A server of its own, started after the
    module's is gone (the SIGKILL test above ends it; two servers at once on 2 cores
    starved the second's start): on the module's the live adapter trains all along, and
    the SIGKILL test needs it not to have drifted past the guard's KL bound (about 200
    versions on the random model)."""
    server = start(tiny_model_dir, tmp_path / "state", tmp_path / "tenants.log")
    try:
        _run_time_tenant_on_both(server)
    finally:
        server.stop()


def _run_time_tenant_on_both(server: Server) -> None:
    r = server.post("/mace/adapters", {"name": "team-a"})
    assert r.status_code == 201, r.text
    wait_for(server, lambda s: all(x["adapters"].get("team-a") == 0 for x in s["replicas"]), 60)
    for rank in (0, 1):  # each replica serves it (the header pins the request to one)
        r = requests.post(
            server.url + "/generate",
            json={"text": "hi", "lora_path": "team-a", "sampling_params": {"max_new_tokens": 2}},
            headers={**server.headers, "X-Data-Parallel-Rank": str(rank)},
            timeout=120,
        )
        assert r.status_code == 200, r.text
    body = [{**p, "adapter": "team-a"} for p in PAIRS[:4]]
    assert server.post("/mace/feedback", body).status_code == 200

    wait_for(server, lambda s: min(x["adapters"].get("team-a", 0) for x in s["replicas"]) >= 2)
    try:
        s = settled(server, "team-a")  # one version >= 2, the same bytes on both
    finally:
        set_paused(server, False)
    for x in s["replicas"]:
        assert x["sync"]["errors"] == [] and x["sync"]["send_failures"] == 0
    r = requests.delete(server.url + "/mace/adapters/team-a", headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    wait_for(server, lambda s: all("team-a" not in x["adapters"] for x in s["replicas"]), 60)
    assert "team-a" not in mace_status(server)["tenants"]["names"]
    # SGLang's own adapter routes refuse data-parallel replicas, and say what to use
    # (the message, not a bad path's 400, is what tells the refusal apart)
    for route, body in (
        ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}),
        ("/unload_lora_adapter", {"lora_name": "live"}),
    ):
        r = server.post(route, body)
        assert r.status_code == 400 and "POST /mace/adapters" in r.json()["error"], r.text
    assert "live" in mace_status(server)["tenants"]["names"]  # nothing was unloaded
