"""Two `mace-sgl serve --mace-train` servers of the tiny model behind SGLang's router
(`python -m sglang_router.launch_router`), one adapter group over loopback
(--mace-sync-addr): the router answers, feedback given to either server trains the
adapter both serve, no two steps start from one version (the lease across servers), and
each server's /get_load, which the router polls, counts its training work."""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import requests
from tiny_model import tiny_serve_args
from waits import mace_status, wait_for_status, wait_for_value

from mace_sgl.launcher import MACE_SGL, Server, free_port

pytest.importorskip("sglang_router", reason="the optional router extra (sglang-router)")

PAIRS = [
    {"prompt": f"Question {i}: say something", "chosen": "Certainly! Here.", "rejected": f"no {i}"}
    for i in range(4)
]


def start_rank(model_dir: Path, root: Path, addr: str, rank: int, tag: str) -> Server:
    """One training server of the adapter group meeting at `addr`, state in root/state-RANK."""
    args = tiny_serve_args(
        model_dir, "--mace-train", "--mace-state-dir", str(root / f"state-{rank}"),
        "--mace-lr", "1e-3",  # each pair trains at most 3 times: training ends
        "--mace-sync-addr", addr, "--mace-sync-world-size", "2",
        "--mace-sync-rank", str(rank),
    )  # fmt: skip
    server = Server(args, root / f"server-{rank}-{tag}.log", timeout_s=400)
    server.state_dir = root / f"state-{rank}"  # type: ignore[attr-defined]
    server.addr = addr  # type: ignore[attr-defined]
    return server


def start_group(model_dir: Path, root: Path, tag: str) -> list[Server]:
    """Two training servers of one adapter group, state in root/state-RANK."""
    addr = f"127.0.0.1:{free_port()}"
    # Each server's schedulers wait in the group's rendezvous for the other's: start both.
    with ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(start_rank, model_dir, root, addr, rank, tag) for rank in (0, 1)]
    started = [f.result() for f in futures if f.exception() is None]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for s in started:
            s.stop()
        raise errors[0]
    return started


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, root: Path):
    started = start_group(tiny_model_dir, root, "first")
    yield started
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def router(servers: list[Server], tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("router") / "router.log"
    urls = [s.url for s in servers]
    # `mace-sgl router`: sglang_router.launch_router on loopback (its host and metrics).
    args = ["--policy", "power_of_two", "--prometheus-port", str(free_port()),
            "--worker-urls", *urls]  # fmt: skip
    r = Server(args, log, cmd=[MACE_SGL, "router"], timeout_s=120)
    try:
        # The router is up before it registered its workers (in the background).
        wait_for_value(
            lambda: r.get("/workers").json()["workers"],
            lambda ws: sorted(w["url"] for w in ws if w["is_healthy"]) == sorted(urls),
            120,
            "both servers registered in the router",
            r.tail,
        )
        yield r
    finally:
        r.stop()


def newest_checkpoint(state_dir: Path) -> int:
    metas = (state_dir / "adapters" / "live").glob("v*/mace.json")
    return max((json.loads(m.read_text())["version"] for m in metas), default=0)


def both(servers: list[Server]) -> list[dict]:
    return [mace_status(s) for s in servers]


def test_the_router_answers_from_both_servers(servers: list[Server], router: Server):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}  # fmt: skip
    with ThreadPoolExecutor(4) as ex:
        codes = list(
            ex.map(lambda _: router.post("/v1/chat/completions", body).status_code, range(8))
        )
    assert codes == [200] * 8
    for s in [*servers, router]:  # servers, their schedulers' gloo, the router: loopback
        for addr in s.listening():
            assert ipaddress.ip_address(addr.ip).is_loopback, addr


def test_feedback_to_either_server_trains_one_adapter_with_no_step_lost(servers: list[Server]):
    a, b = servers
    assert a.post("/mace/feedback", PAIRS).status_code == 200
    assert b.post("/mace/feedback", [{**p, "prompt": p["prompt"] + "?"} for p in PAIRS]).ok

    def settled(ss: list[dict]) -> bool:
        published = sum(s["train_steps"] - s["training"]["rejected_versions"] for s in ss)
        versions = {s["adapter_version"] for s in ss}
        digests = {s["replicas"][0]["adapter_digest"] for s in ss}
        return (
            all(s["queue_depth"] == 0 for s in ss)
            and len(versions) == 1
            and len(digests) == 1
            and published >= 2
            and versions == {published}
        )

    ss = wait_for_value(lambda: both(servers), settled, 300, "one adapter on both", a.tail)
    version = ss[0]["adapter_version"]
    # Each server has that version on its own disk (its state directory), whichever
    # server stepped it: a restart resumes it there.
    newest = wait_for_value(
        lambda: [newest_checkpoint(s.state_dir) for s in servers],
        lambda vs: vs == [version, version],
        60,
        "the newest version checkpointed by both servers",
    )
    assert newest == [version, version]
    # Every published step made a version of its own: no two servers stepped from one
    # version at once (the lease), and each one's version reached the other.
    assert all(s["train_steps"] >= 1 for s in ss), [s["train_steps"] for s in ss]
    for s in ss:
        sync = s["replicas"][0]["sync"]
        assert sync["world"] == 2 and sync["errors"] == [] and sync["send_failures"] == 0
        assert sync["applied"] >= 1  # it installed a version the other published
        assert s["training"]["cluster_lease"]["errors"] == 0


def test_the_router_reads_the_load_each_server_reports(servers: list[Server], router: Server):
    """Requests sent to server A directly (the router forwards none of them) show in the
    router's load of A: it is A's /get_load, not the router's own count. The requests
    would run for minutes on a busy machine: once seen, they are aborted (SGLang's
    /abort_request) and each one's answer must still come back whole."""
    a = servers[0]
    rids = [f"router-load-{uuid.uuid4().hex}" for _ in range(3)]

    def long_request(rid: str) -> requests.Response:
        body = {"text": "count: ", "rid": rid,
                "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}}  # fmt: skip
        return a.post("/generate", body)

    def router_load() -> int:
        loads = router.get("/get_loads").json()["workers"]
        return {w["worker"]: w["load"] for w in loads}[a.url]

    with ThreadPoolExecutor(3) as ex:
        running = [ex.submit(long_request, rid) for rid in rids]
        try:
            seen = wait_for_value(
                router_load, lambda v: v > 0, 60, "A's load in the router", a.tail
            )
        finally:
            # An abort that reaches the server before its request is dropped: repeat
            # until every request has answered.
            deadline = time.monotonic() + 60
            while not all(f.done() for f in running) and time.monotonic() < deadline:
                for rid, f in zip(rids, running, strict=True):
                    if not f.done():
                        a.post("/abort_request", {"rid": rid})  # answered below if not
                wait(running, timeout=0.5)
        assert all(f.done() for f in running), f"aborted requests still running\n{a.tail()}"
        answers = [f.result() for f in running]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    reasons = {r.json()["meta_info"]["finish_reason"]["type"] for r in answers}
    assert reasons <= {"abort", "length"}, reasons
    assert seen > 3  # tokens, not requests


def test_get_load_counts_serving_and_training_tokens(servers: list[Server]):
    for s in servers:
        (load,) = s.get("/get_load").json()
        assert load["dp_rank"] == 0
        assert load["num_tokens"] == load["num_serving_tokens"] + load["num_training_tokens"]
        assert load["num_training_tokens"] >= 0


def adapter_names(server: Server) -> list[str]:
    return sorted(a["name"] for a in server.get("/mace/adapters").json()["adapters"])


def test_a_tenant_created_on_one_server_trains_on_both_and_retires_everywhere(
    servers: list[Server],
):
    """POST /mace/adapters on server 0 creates the tenant on server 1 too (the group's
    tenant log); its feedback given to server 1 trains one adapter both serve; DELETE
    on server 1 retires it on server 0. Purged and created again, it starts at v0 and
    trains again (its lease key is a new generation's, not below the old floor)."""
    a, b = servers
    r = a.post("/mace/adapters", {"name": "team-a"})
    assert r.status_code == 201 and r.json() == {"name": "team-a", "created": True}, r.text
    wait_for_value(lambda: adapter_names(b), lambda ns: "team-a" in ns, 60,
                   "team-a created on server 1", b.tail)  # fmt: skip
    items = [{**p, "prompt": p["prompt"] + " (a)", "adapter": "team-a"} for p in PAIRS]
    assert b.post("/mace/feedback", items).status_code == 200

    def trained(ss: list[dict]) -> bool:
        versions = {s["tenants"]["versions"].get("team-a") for s in ss}
        digests = {s["replicas"][0]["adapter_digests"].get("team-a") for s in ss}
        return (
            all(s["tenants"]["queue_depth"].get("team-a") == 0 for s in ss)
            and len(versions) == 1
            and None not in versions
            and min(versions) >= 1
            and len(digests) == 1
        )

    ss = wait_for_value(lambda: both(servers), trained, 300, "team-a trained on both", b.tail)
    assert all(s["tenant_log"]["errors"] == 0 for s in ss), [s["tenant_log"] for s in ss]
    r = requests.delete(b.url + "/mace/adapters/team-a?purge=true", timeout=60)
    assert r.status_code == 200, r.text
    wait_for_value(lambda: adapter_names(a), lambda ns: "team-a" not in ns, 60,
                   "team-a retired on server 0", a.tail)  # fmt: skip
    # gone everywhere
    assert requests.delete(a.url + "/mace/adapters/team-a", timeout=60).status_code == 404
    r = a.post("/mace/adapters", {"name": "team-a"})
    assert r.status_code == 201, r.text
    wait_for_value(lambda: adapter_names(b), lambda ns: "team-a" in ns, 60,
                   "team-a created again on server 1", b.tail)  # fmt: skip
    # Its new pairs train only once the tenant created again steps (from v0, purged).
    items = [{**p, "prompt": p["prompt"] + " (a, again)", "adapter": "team-a"} for p in PAIRS]
    assert b.post("/mace/feedback", items).status_code == 200
    wait_for_value(lambda: both(servers), trained, 300, "team-a trained again", b.tail)


@pytest.mark.slow
def test_a_server_that_lost_its_newest_checkpoints_resumes_the_groups_newest(
    servers: list[Server], tiny_model_dir: Path, root: Path
):
    """After the test above: both servers stop, server 1 loses every checkpoint past v1
    (as if it died before its writer caught up); restarted, it installs the newest
    version server 0 announces when the group meets, so both serve one adapter."""
    import shutil

    version = mace_status(servers[0])["adapter_version"]
    assert version >= 2
    for s in servers:
        s.stop()
    for d in (root / "state-1" / "adapters" / "live").glob("v*"):
        if d.name not in ("v0", "v1"):
            shutil.rmtree(d)
    assert newest_checkpoint(root / "state-1") < version
    again = start_group(tiny_model_dir, root, "restart")
    try:
        ss = wait_for_value(
            lambda: both(again),
            lambda ss: [s["adapter_version"] for s in ss] == [version, version],
            120,
            "both servers at the group's newest version",
            again[1].tail,
        )
        assert ss[0]["replicas"][0]["adapter_digest"] == ss[1]["replicas"][0]["adapter_digest"]
    finally:
        for s in again:
            s.stop()


def one_adapter(ss: list[dict]) -> bool:
    """Both servers idle at one version with identical weights."""
    return (
        all(s["queue_depth"] == 0 for s in ss)
        and len({s["adapter_version"] for s in ss}) == 1
        and len({s["replicas"][0]["adapter_digest"] for s in ss}) == 1
    )


def kill_after_a_first_version(servers: list[Server], victim: int,
                               last: Callable[[], object] | None = None) -> int:  # fmt: skip
    """Both servers at a first version trained from server 0's feedback; then `last()`,
    at once server `victim` SIGKILLed, and the other one answers a request. Returns that
    version."""
    import os
    import signal

    assert servers[0].post("/mace/feedback", PAIRS[:2]).ok
    ss = wait_for_value(
        lambda: both(servers),
        lambda ss: one_adapter(ss) and ss[0]["adapter_version"] >= 1,
        300, "a first version on both", servers[0].tail,
    )  # fmt: skip
    dead, alive = servers[victim], servers[1 - victim]
    if last is not None:
        last()
    os.killpg(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait(timeout=30)
    dead.log.close()
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}  # fmt: skip
    assert alive.post("/v1/chat/completions", body).status_code == 200
    return ss[0]["adapter_version"]


@pytest.mark.slow
def test_a_killed_server_rejoins_the_group_and_both_train_on(tiny_model_dir: Path, tmp_path: Path):
    """Server 1 SIGKILLed: server 0 serves on, takes feedback and trains on (a step is
    delivered to the members of a generation formed without the dead server, so the
    next step may start); restarted with the same flags, server 1 joins a later
    generation and installs what server 0 published meanwhile; feedback given to the
    restarted server trains both."""
    a, b = start_group(tiny_model_dir, tmp_path, "first")
    servers = [a, b]
    try:
        before = kill_after_a_first_version(servers, 1)
        # Server 0 serves (above) and takes feedback while its peer is down.
        assert a.post("/mace/feedback", PAIRS[2:]).ok
        # Its steps are delivered to a generation without the dead server, and their
        # lease given back: training does not wait for the peer to come back.
        wait_for_value(
            lambda: mace_status(a),
            lambda s: s["adapter_version"] > before
            and s["queue_depth"] == 0
            and s["replicas"][0]["sync"]["members"] == [0]
            and s["training"]["cluster_lease"]["held"] == [],
            300, "server 0 publishes, delivers and frees the lease while its peer is down",
            a.tail,
        )  # fmt: skip
        b = servers[1] = start_rank(tiny_model_dir, tmp_path, a.addr, 1, "again")
        ss = wait_for_value(
            lambda: both(servers),
            lambda ss: one_adapter(ss)
            and all(s["replicas"][0]["sync"]["members"] == [0, 1] for s in ss),
            300, "both servers at one version in one generation", b.tail,
        )  # fmt: skip
        during = ss[0]["adapter_version"]
        assert during > before  # what server 0 published while server 1 was down
        syncs = [s["replicas"][0]["sync"] for s in ss]
        assert syncs[0]["generation"] == syncs[1]["generation"] >= 1
        assert syncs[0]["regroups"] >= 1
        # The restarted server's own feedback trains the adapter both serve.
        assert b.post("/mace/feedback", [{**p, "prompt": p["prompt"] + "!"} for p in PAIRS]).ok
        ss = wait_for_value(
            lambda: both(servers),
            lambda ss: one_adapter(ss) and ss[0]["adapter_version"] > during,
            300, "both servers at a newer version", b.tail,
        )  # fmt: skip
        assert [s["replicas"][0]["sync"]["pending_sends"] for s in ss] == [0, 0]
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_server_0_killed_and_restarted_the_group_trains_on_in_its_fresh_store(
    tiny_model_dir: Path, tmp_path: Path
):
    """Server 0 (it serves the group's store) SIGKILLed: server 1 serves on and keeps
    the feedback it is given, but no step starts without the store; server 0 restarted
    with the same flags serves a fresh store, server 1 follows it there (a new epoch),
    both announce, and server 1's feedback trains the adapter both serve. A tenant that
    server 1 created just before the kill is on server 0 after its restart, and server
    1's outbox empties. (Server 0's follower reads the log every 2 s, so it has almost
    never applied the entry before the kill: server 1 appends it to the fresh log again.
    If it had, server 0 keeps the tenant from its own store: either way, what is
    asserted holds; tests/test_tenant_log.py covers the resend itself.)"""
    a, b = start_group(tiny_model_dir, tmp_path, "first")
    servers = [a, b]

    def create_on_server_1() -> None:
        r = b.post("/mace/adapters", {"name": "team-late"})
        assert r.status_code == 201, r.text

    try:
        before = kill_after_a_first_version(servers, 0, create_on_server_1)
        assert b.post("/mace/feedback", PAIRS[2:]).ok
        a = servers[0] = start_rank(tiny_model_dir, tmp_path, b.addr, 0, "again")
        ss = wait_for_value(
            lambda: both(servers),
            lambda ss: one_adapter(ss)
            and ss[0]["adapter_version"] > before
            and all(s["training"]["cluster_lease"]["ready"] for s in ss)
            and all(s["training"]["cluster_lease"]["held"] == [] for s in ss),
            300, "both servers at a newer version, lease given back, after server 0's restart",
            b.tail,
        )  # fmt: skip
        sync = ss[1]["replicas"][0]["sync"]
        assert sync["store_restarts"] >= 1 and sync["members"] == [0, 1], sync
        assert [s["replicas"][0]["sync"]["pending_sends"] for s in ss] == [0, 0]
        wait_for_value(lambda: adapter_names(a), lambda names: "team-late" in names, 120,
                       "the tenant server 1 created before the kill, on server 0", a.tail)  # fmt: skip
        wait_for_status(b, lambda s: s["tenant_log"]["outbox"] == 0, 60,
                        "server 1's outbox emptied once both applied its entry")  # fmt: skip
        assert adapter_names(b) == adapter_names(a)
    finally:
        for s in servers:
            s.stop()
