"""benchmarks.lemix's arithmetic, without servers."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from benchmarks.lemix import (
    HELD_GOAL,
    combine,
    held_rate,
    method_flags,
    paired,
    prefill_share,
    rounds,
    skew_summary,
)


def test_switch_skew_counts_only_versions_every_replica_served():
    switches = {
        1: {0: 10.000, 1: 10.004},  # 4 ms apart
        2: {0: 20.000, 1: 20.050},  # 50 ms
        3: {1: 30.000},  # replica 0 never seen serving v3 (superseded between polls)
        4: {0: 40.010, 1: 40.000},  # 10 ms, replica 1 first
    }
    got = skew_summary(switches, replicas=2)
    assert got["versions"] == 3
    assert abs(got["median"] - 10.0) < 1e-6 and abs(got["max"] - 50.0) < 1e-6
    assert skew_summary({}, 2) == {"versions": 0, "median": None, "max": None}


def test_prefill_share_is_each_replicas_part_of_the_tokens_prefilled_meanwhile():
    assert prefill_share([100, 50], [400, 150]) == [0.75, 0.25]
    assert prefill_share([], [1, 2]) is None  # /v1/loads unread at the start
    assert prefill_share([5, 5], [5, 5]) is None  # nothing prefilled


def test_rounds_rotate_the_method_order():
    got = rounds(["a", "b", "c"], 3)
    assert [m for _, m in got] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [k for k, _ in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rounds(["a"], 2) == [(0, "a"), (1, "a")]


def test_combine_means_numbers_keeps_shared_fields_and_the_runs():
    rows = [
        {"slo_attainment": 1.0, "rate_rps": 1.3, "skew": {"max": 3}, "round": 0},
        {"slo_attainment": 0.5, "rate_rps": 1.3, "skew": {"max": 9}, "round": 1},
    ]
    got = combine(rows)
    assert got["slo_attainment"] == pytest.approx(0.75)
    low, high = got["ci95"]["slo_attainment"]
    assert low < 0.5 and high > 1.0  # two runs this far apart: a wide interval
    assert got["rate_rps"] == pytest.approx(1.3) and got["ci95"]["rate_rps"] == [1.3, 1.3]
    assert "skew" not in got  # differs between runs: only in the runs themselves
    assert got["repeats"] == rows
    one = combine(rows[:1])
    assert one["skew"] == {"max": 3} and one["slo_attainment"] == 1.0


def test_paired_differences_are_taken_within_each_round():
    runs = {
        "lemix": [{"round": 0, "slo_attainment": 0.9}, {"round": 1, "slo_attainment": 1.0},
                  {"round": 2, "slo_attainment": 0.8}],
        "rr": [{"round": 1, "slo_attainment": 0.7}, {"round": 0, "slo_attainment": 0.5},
               {"round": 2, "slo_attainment": None}],
    }  # fmt: skip
    got = paired(runs, "lemix")
    assert set(got) == {"rr"}
    att = got["rr"]["slo_attainment"]
    assert att["rounds"] == 2  # round 2 has no figure for rr
    assert att["mean"] == pytest.approx(((0.9 - 0.5) + (1.0 - 0.7)) / 2)
    assert got["rr"]["train_tokens_per_s"] == {"mean": None, "ci95": None, "rounds": 0}


def test_lemix_floor_is_lemix_with_a_training_floor():
    assert method_flags("lemix-floor", 30.0, 0.2) == [
        *method_flags("lemix", 30.0), "--mace-train-floor", "0.2"
    ]  # fmt: skip
    # --floor-all: the co-located baselines get the same floor, separate does not.
    assert method_flags("round-robin", 30.0, 0.2, floor_all=True) == [
        *method_flags("round-robin", 30.0), "--mace-train-floor", "0.2"
    ]  # fmt: skip
    assert method_flags("total-tokens", 30.0, 0.2, True)[-2:] == ["--mace-train-floor", "0.2"]
    assert method_flags("separate", 30.0, 0.2, True) == method_flags("separate", 30.0)
    assert method_flags("lemix-floor", 30.0, 0.2, True) == method_flags("lemix-floor", 30.0, 0.2)


def test_held_rate_bisects_to_the_highest_rate_that_meets_the_goal():
    tried = []

    def attainment(rate: float) -> float:  # a replica that holds up to 1.3 requests/s
        tried.append(rate)
        return 1.0 if rate <= 1.3 else 0.2

    rate, trials = held_rate(attainment, 0.4, 2.0, steps=5)
    assert tried[0] == 2.0 and len(trials) == 5
    assert 1.3 - (2.0 - 0.4) / 2**4 <= rate <= 1.3  # within the last interval, below
    assert all((t["slo_attainment"] >= HELD_GOAL) == (t["rate_rps"] <= 1.3) for t in trials)
    assert held_rate(lambda r: 0.0, 0.4, 2.0, 3)[0] == 0.4  # nothing held: the floor
    assert held_rate(lambda r: 1.0, 0.4, 2.0, 3) == (
        2.0,
        [{"rate_rps": 2.0, "slo_attainment": 1.0}],
    )


class _FakeServer:
    url = "http://127.0.0.1:1"

    def stop(self) -> None:
        pass


def _args(**over):
    import argparse

    base = dict(out=None, methods="lemix,round-robin", rate=None, load_factor=1.2,
                repeats=2, load_s=1.0, capacity_s=1.0, drain_s=1.0, capacity_clients=2,
                sync_every_s=30.0, train_floor=0.1, floor_all=False, max_tokens=8, backlog=0,
                model_path=None, yardstick="held", probe_s=1.0, probe_steps=3)  # fmt: skip
    base.update(over)
    return argparse.Namespace(**base)


def test_run_interleaves_the_methods_and_writes_means_and_paired_differences(tmp_path, monkeypatch):
    """run() without servers: the capacity server's closed loop and held-rate trials and
    each method's run are stand-ins; the order, the rates and results.json are real."""
    import json

    from benchmarks import lemix
    from benchmarks.loadgen import RequestResult

    def result(ok: bool) -> RequestResult:  # TTFT 0.1 s, 10 tokens over 1 s
        return RequestResult(sent=0.0, ttft=0.1 if ok else 9.0, e2e=1.0 if ok else 99.0,
                             tokens=10)  # fmt: skip

    rates = []

    def poisson(url, rate, duration_s, body, seed=0, headers=None, drain_s=None):
        rates.append(rate)
        return [result(rate <= 1.5) for _ in range(10)]  # replica 0 holds up to 1.5

    order = []

    def run_method(args, method, out, slo, rate, body, k):
        order.append((k, method))
        att = {"lemix": 1.0, "lemix-floor": 0.9, "round-robin": 0.5 + 0.25 * k}[method]
        return {"slo_attainment": att, "throughput_tok_s": 10.0, "rate_rps": rate, "round": k}

    monkeypatch.setattr(lemix, "start_server", lambda *a, **k: _FakeServer())
    monkeypatch.setattr(lemix, "closed_loop", lambda *a, **k: ([result(True)] * 4, 2.0))
    monkeypatch.setattr(lemix, "poisson_load", poisson)
    monkeypatch.setattr(lemix, "run_method", run_method)
    got = lemix.run(_args(out=str(tmp_path)))
    assert order == [(0, "lemix"), (0, "round-robin"), (1, "round-robin"), (1, "lemix")]
    assert rates == [2.0, 1.2, 1.6]  # closed loop 2.0/s: trials at 1x, then bisecting
    assert got["held"]["held_rps"] == 1.2 and got["capacity_rps"] == 1.2
    assert got["rate_rps"] == 1.2 * 1.2
    assert got["methods"]["round-robin"]["slo_attainment"] == 0.625
    assert got["paired"]["round-robin"]["slo_attainment"]["mean"] == 0.375
    assert got["slo"]["ttft_ms"] == 300.0  # 3 x the closed loop's TTFT p50
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["lemix"]["repeats"][1]["round"] == 1
    assert (tmp_path / "lemix.png").stat().st_size > 0
    assert saved["paired_ref"] == "lemix"
    # --floor-all: the floored baselines are paired against lemix-floor, lemix or not.
    for methods in ("lemix-floor,round-robin", "lemix,lemix-floor,round-robin"):
        got = lemix.run(_args(out=str(tmp_path), methods=methods, floor_all=True, repeats=1))
        assert got["paired_ref"] == "lemix-floor"
        assert got["paired"]["round-robin"]["slo_attainment"]["mean"] == pytest.approx(0.4)
    # Neither reference ran: no pairs, and no reference named.
    got = lemix.run(_args(out=str(tmp_path), methods="round-robin", repeats=1))
    assert got["paired"] == {} and got["paired_ref"] is None


class _StatusServer:
    """A server whose /mace/status and /v1/loads are canned, one scheduler per entry."""

    def __init__(self, schedulers: list[dict], prefill: list[int]) -> None:
        self.schedulers, self.prefill = schedulers, prefill

    def get(self, path: str):
        if path == "/v1/loads":
            loads = [{"dp_rank": r, "total_prefill_uncached_tokens": p}
                     for r, p in enumerate(self.prefill)]  # fmt: skip
            return SimpleNamespace(json=lambda: {"loads": loads})
        return SimpleNamespace(json=lambda: {"schedulers": self.schedulers})


def _sched(rank: int, version: int, tokens: int, switched_at: float | None) -> dict:
    trainer = {"adapter_version": version, "trained_tokens": tokens, "serving_seconds": 0.0,
               "train_seconds": 0.0, "train_steps": version, "adapter_switched_at": switched_at}  # fmt: skip
    return {"dp_rank": rank, "trainer": trainer}


def test_the_poller_joins_the_replicas_of_several_servers():
    """`servers`: each server has one replica; the poller counts both servers' trained
    tokens and prefill, and how far apart the two servers began serving a version."""
    from benchmarks.lemix import Poller

    a = _StatusServer([_sched(0, 0, 0, None)], [100])
    b = _StatusServer([_sched(0, 0, 0, None)], [50])
    poller = Poller([a, b], every_s=3600.0)
    a.schedulers = [_sched(0, 1, 300, 10.000)]
    b.schedulers = [_sched(0, 1, 200, 10.250)]
    a.prefill, b.prefill = [400], [150]
    got = poller.done()
    assert got["versions"] == [1, 1]
    assert got["version_switch_skew_ms"]["versions"] == 1
    assert got["version_switch_skew_ms"]["max"] == pytest.approx(250.0)
    assert got["train_tokens_per_s"] == pytest.approx(500 / got["wall_s"])
    assert got["prefill_share"] == [0.75, 0.25]
    assert got["train_steps"] == 2
    assert got["threads"] == [None, None] and got["cores_shared"] is None  # not reported


def test_cores_shared_says_whether_two_replicas_may_run_on_one_core():
    from benchmarks.lemix import cores_shared

    def t(*cores):
        return {"cores": list(cores), "torch_threads": len(cores)}

    assert cores_shared([t(0), t(1)]) is False
    assert cores_shared([t(0, 1), t(1)]) is True
    assert cores_shared([t(0, 1), t(2, 3), t(3)]) is True
    assert cores_shared([t(0), None]) is None and cores_shared([t(0)]) is None


def test_the_servers_method_loads_the_router_and_feeds_each_server_its_share(monkeypatch):
    """`servers`: the load goes to the router; each server gets half of the backlog and
    every other one-a-second pair (offset by a second); the router stops before its
    servers, also when the run fails."""
    from benchmarks import lemix

    stopped: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name, self.url = name, f"http://{name}"

        def stop(self) -> None:
            stopped.append(self.name)

    a, b, router = Named("a"), Named("b"), Named("router")
    streams: list[tuple] = []

    class Stream:
        def __init__(self, server, backlog, interval_s, start=0, offset_s=0.0):
            streams.append((server.name, backlog, interval_s, offset_s))

        def stop(self) -> None:
            stopped.append("feedback")

    loaded: list[str] = []
    monkeypatch.setattr(lemix, "start_servers", lambda *a_, **k: ([a, b], router))
    monkeypatch.setattr(lemix, "closed_loop", lambda *a_, **k: ([], 1.0))
    monkeypatch.setattr(lemix, "FeedbackStream", Stream)
    monkeypatch.setattr(lemix, "Poller", lambda servers: SimpleNamespace(
        done=lambda: {"wall_s": 1.0, "replicas": [s.name for s in servers]}))  # fmt: skip
    monkeypatch.setattr(lemix, "poisson_load", lambda url, *a_, **k: loaded.append(url) or [])
    monkeypatch.setattr(lemix, "summarize", lambda *a_, **k: {"slo_attainment": 1.0})
    slo = {"ttft_ms": 1.0, "tbt_ms": 1.0}
    got = lemix.run_method(_args(backlog=41), "servers", None, slo, 1.0, None, 0)
    assert loaded == ["http://router"] and got["replicas"] == ["a", "b"]
    assert streams == [("a", 21, 2.0, 0.0), ("b", 20, 2.0, 1.0)]
    assert stopped == ["feedback", "feedback", "router", "a", "b"]

    stopped.clear()
    monkeypatch.setattr(lemix, "poisson_load", lambda *a_, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        lemix.run_method(_args(), "servers", None, slo, 1.0, None, 1)
    assert stopped == ["feedback", "feedback", "router", "a", "b"]


def test_a_server_that_fails_to_start_stops_its_peers_start_at_once(tmp_path, monkeypatch):
    """`servers`: a server of the sync group that fails stops the other's start (a real
    process, never healthy), which would wait for it in the group's rendezvous up to its
    900 s timeout; the cause is what the caller sees, and no process is left running."""
    from benchmarks import lemix
    from mace_sgl.launcher import Server

    started: list[Server] = []

    def start_server(args, method, out, slo, name, dp_size, extra, env, abort):
        if name.endswith("-1"):
            time.sleep(1.0)  # the peer is already waiting
            raise RuntimeError("rank 1 failed")
        server = object.__new__(Server)
        started.append(server)  # its process, to check it is gone afterwards
        Server.__init__(server, [], tmp_path / f"{name}.log", cmd=["sh", "-c", "sleep 600"],
                        timeout_s=300, abort=abort)  # fmt: skip
        return server

    monkeypatch.setattr(lemix, "start_server", start_server)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        lemix.start_servers(_args(), tmp_path, None, "servers")
    assert time.monotonic() - t < 30
    (peer,) = started
    assert peer.proc.poll() is not None  # killed, not left waiting
