"""Scheduler-side glue on hand-made scheduler objects: per-scheduler state, the version
key set at prefill time, bounded request tables, JSON-safe status, starvation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mace_sgl.config import MaceConfig
from mace_sgl.plugin import iteration, state
from mace_sgl.plugin.iteration import IterationMonitor
from mace_sgl.plugin.train_hooks import KEY_PREFIX, TrainHooks, radix_key
from mace_sgl.policy import Profile, make_policy
from mace_sgl.trainer.runtime import Starvation

LIVE = "uid-live"


def req(rid: str, lora_id: str | None = None, extra_key: str | None = None):
    return SimpleNamespace(rid=rid, lora_id=lora_id, extra_key=extra_key, origin_input_ids=[1, 2])


def scheduler_with(trainer=None, monitor=None, waiting=()):
    sched = SimpleNamespace(
        waiting_queue=list(waiting), running_batch=SimpleNamespace(reqs=[]), chunked_req=None
    )
    state.attach(sched, state.SchedulerState(MaceConfig(), trainer=trainer, monitor=monitor))
    return sched


def test_each_scheduler_has_its_own_state():
    a, b = scheduler_with(trainer="A"), scheduler_with(trainer="B")
    assert state.of(a).trainer == "A" and state.of(b).trainer == "B"
    assert state.of(SimpleNamespace()) is None


def sglang_req(rid: str, lora_id: str | None = None, extra_key: str | None = None):
    """A request as SGLang's Req.__init__ leaves it: lora_id appended to the extra_key."""
    if lora_id is not None:
        extra_key = (extra_key or "") + lora_id
    return req(rid, lora_id, extra_key)


def test_version_key_is_set_when_prefill_is_scheduled_not_on_arrival():
    versions = {LIVE: 3}
    trainer = SimpleNamespace(versions_by_uid=lambda: dict(versions), follow_replicas=lambda: None)
    queued = sglang_req("a", LIVE)
    client = sglang_req("b", LIVE, extra_key="tenant-salt")
    base = sglang_req("c", None, extra_key="x")
    plain = sglang_req("d")
    sched = scheduler_with(trainer=trainer, waiting=[queued, client, base, plain])
    hooks = TrainHooks(MaceConfig(train=True))
    hooks.key_by_version(sched)
    assert queued.extra_key == radix_key(None, LIVE, 3)
    assert client.extra_key == radix_key("tenant-salt", LIVE, 3)
    assert base.extra_key == radix_key("x", None, None)
    assert plain.extra_key is None  # base model, no client key: SGLang's own namespace
    assert len({queued.extra_key, client.extra_key, base.extra_key}) == 3
    # A publish while they wait: the next prefill batch keys them by the new version,
    # the client's own part of the key kept.
    versions[LIVE] = 4
    hooks.key_by_version(sched)
    assert queued.extra_key == radix_key(None, LIVE, 4)
    assert client.extra_key == radix_key("tenant-salt", LIVE, 4)
    # Another replica published v5 while this one slept: the hook installs it before it
    # keys the prefill (follow_replicas), so the first batch after waking serves v5.
    trainer.follow_replicas = lambda: versions.update({LIVE: 5})
    hooks.key_by_version(sched)
    assert queued.extra_key == radix_key(None, LIVE, 5)


@pytest.mark.parametrize("train", [True, False])
def test_no_client_key_reaches_an_adapters_namespace(train: bool):
    """SGLang #24638: a base request whose extra_key spells what SGLang makes of an
    adapter request's key (extra_key + lora_id) shared that adapter's cached KV. Every
    such forgery now lands in a namespace of its own, with or without training."""
    other = "uid-other"  # a static --lora-paths adapter: uuid5(name, path), computable
    trainer = (
        SimpleNamespace(versions_by_uid=lambda: {LIVE: 2}, follow_replicas=lambda: None)
        if train
        else None
    )
    victims = [sglang_req("v1", LIVE), sglang_req("v2", LIVE, "salt"), sglang_req("v3", other)]
    sched = scheduler_with(trainer=trainer, waiting=list(victims))
    hooks = TrainHooks(MaceConfig(train=train))
    hooks.key_by_version(sched)
    taken = {v.extra_key for v in victims}
    forged_keys = [
        LIVE,  # SGLang's own key of v1
        "salt" + LIVE,
        other,
        f"{LIVE}|mace-v2",  # the key the previous mace-sgl gave v1
        *taken,  # the keys victims carry now, sent verbatim
        *(k.removeprefix(KEY_PREFIX) for k in taken),
    ]
    forged = [sglang_req(f"f{i}", None, k) for i, k in enumerate(forged_keys)]
    sched.waiting_queue = forged
    hooks.key_by_version(sched)
    for f in forged:
        assert f.extra_key not in taken, f.rid


def test_request_tables_forget_aborted_requests():
    monitor = IterationMonitor(make_policy("mace", Profile()))
    for i in range(1000):
        monitor.arrived(f"gone-{i}")  # aborted before running: no finish ever comes
    monitor.arrived("alive")
    sched = scheduler_with(monitor=monitor, waiting=[req("alive")])
    monitor.swept_at = -1e9  # due now
    monitor.results(sched, None)
    assert set(monitor.arrivals) == {"alive"}
    assert monitor.status()["swept_requests"] == 1000


def test_a_scheduler_that_refuses_every_request_still_forgets_them():
    """Requests SGLang refuses on arrival never run, so no batch's results sweep their
    marks: the arrival hook sweeps too (when due), and keeps those the scheduler holds,
    the last prefill batch's (not yet in the running batch) and the overlap queue's
    included."""
    monitor = IterationMonitor(make_policy("mace", Profile()))
    sched = scheduler_with(monitor=monitor)
    sched.last_batch = SimpleNamespace(reqs=[req("prefilled")])
    sched.result_queue = [(SimpleNamespace(reqs=[req("in-flight")]), None)]
    sched.grammar_manager = SimpleNamespace(grammar_queue=[req("compiling")])  # SGLang's
    hooks = TrainHooks(MaceConfig(train=True))
    live = ("prefilled", "in-flight", "compiling")
    for rid in live:
        hooks.on_generate_request(sched, SimpleNamespace(rid=rid))
    for i in range(1000):  # each refused: never in a queue or a batch
        hooks.on_generate_request(sched, SimpleNamespace(rid=f"refused-{i}"))
    assert len(monitor.arrivals) == 1003  # no sweep due yet
    monitor.swept_at = -1e9  # due now
    hooks.on_generate_request(sched, SimpleNamespace(rid="next"))
    assert set(monitor.arrivals) == {*live, "next"}
    assert monitor.status()["swept_requests"] == 1000


def test_status_is_json_safe():
    report = state.json_safe(
        {"err": float("nan"), "p": [float("inf"), 1.0], "nested": {"x": -float("inf")}}
    )
    assert json.loads(json.dumps(report, allow_nan=False)) == {
        "err": None,
        "p": [None, 1.0],
        "nested": {"x": None},
    }


def test_starvation_reports_since_when_and_why():
    s = Starvation()
    s.iteration(100.0, waiting=3, ran=0, why="SLO at risk: TBT p99 290 ms")
    s.iteration(130.0, waiting=3, ran=0, why="")
    status = s.status(160.0)
    assert status["starved"] and status["since_s"] == 60.0
    assert status["reason"] == "SLO at risk: TBT p99 290 ms"
    assert status["waiting_units"] == 3 and status["iterations"] == 2
    s.iteration(170.0, waiting=3, ran=1, why="")
    assert s.status(171.0)["starved"] is False and s.starved_s(171.0) == 0.0
    assert s.status(171.0)["total_s"] == 70.0 and s.episodes == 1
    s.iteration(200.0, waiting=0, ran=0, why="")  # nothing waiting is not starvation
    assert s.starved_s(300.0) == 0.0


def test_forwards_the_cost_model_missed_are_kept_bounded_with_their_context(monkeypatch):
    monkeypatch.setattr(IterationMonitor, "outliers_kept", 4)
    now = [0.0]  # a fake clock for the monitor's timings
    monkeypatch.setattr(iteration.time, "monotonic", lambda: now[0])
    monitor = IterationMonitor(make_policy("mace", Profile()))
    decode = SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode=lambda: True),
        reqs=[req("a"), req("b", LIVE)],
        seq_lens_cpu=None,
        seq_lens_sum=300,
    )
    # 40 ordinary 20 ms decode forwards, then 8 times a 1 s one followed by 30 ordinary
    plan = [0.02] * 40 + ([1.0] + [0.02] * 30) * 8
    for took in plan:
        now[0] += 0.01  # a 10 ms gap between forwards

        def run(scheduler, batch, took=took):
            now[0] += took

        monitor.timed_forward(run, None, decode)
    out = monitor.status()["cost_outliers"]
    assert set(out["count"]) == {"decode"} and out["count"]["decode"] >= 8  # each slow one
    assert len(out["last"]) == 4  # only the newest kept
    assert all(o["abs_pct_error"] > 1.0 for o in out["last"])
    last = out["last"][-1]  # after a slow one, ordinary ones are missed too for a while
    assert last["kind"] == "decode" and last["batch"] == 2 and last["lora"] == 1
    assert last["t_s"] > 40 * 0.03  # not among the first, well-predicted ones
    assert last["gap_s"] == 0.01 and last["cpu_s"] >= 0 and last["gc_collections"] >= 0
    json.dumps(out, allow_nan=False)


def test_a_mixed_batch_counts_as_serving_time_without_a_cost_observation(monkeypatch):
    """SGLang's --enable-mixed-chunk runs prefill and decode rows as one batch, which the
    cost model has no shape for: its time must still count as serving (the idle fraction
    and the training budget read it), or a mixed server looks idle while it serves."""
    now = [100.0]
    monkeypatch.setattr(iteration.time, "monotonic", lambda: now[0])
    monitor = IterationMonitor(make_policy("mace", Profile()))
    observed = []
    monkeypatch.setattr(monitor.policy, "observe", lambda obs: observed.append(obs))
    mixed = SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode=lambda: False, is_extend=lambda: True,
                                     is_mixed=lambda: True),
        extend_lens=[5, 1], prefix_lens=[0, 40], reqs=[req("a"), req("b")],
    )  # fmt: skip

    def run(scheduler, batch):
        now[0] += 0.25
        return "result"

    assert monitor.timed_forward(run, None, mixed) == "result"
    assert monitor.serving_seconds == pytest.approx(0.25) and monitor.forward_end == 100.25
    assert observed == [] and monitor.status()["unmodelled_forwards"] == 1


def test_recent_idle_follows_the_last_seconds_not_the_whole_life():
    monitor = IterationMonitor(make_policy("mace", Profile()))
    t0 = monitor.started
    assert monitor.recent_idle(t0) == 1.0  # nothing served, no time passed
    # 20 s fully busy, one mark per second: recent and lifetime idle are both 0.
    for i in range(1, 21):
        monitor.serving_seconds = float(i)
        assert monitor.recent_idle(t0 + i) == 0.0
    # Then 10 s idle: the window (about 10 s) forgets the busy time, the lifetime does not.
    for i in range(21, 31):
        monitor.recent_idle(t0 + i)
    assert monitor.recent_idle(t0 + 31) >= 0.9
    assert monitor.status()["idle_fraction"] < 0.5
