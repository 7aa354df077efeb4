"""The soak benchmark's computations: windows, slopes, steps across a restart, summary."""

from __future__ import annotations

import pytest

from benchmarks.soak import (
    Done,
    cost_model_max_error,
    cumulative_steps,
    fault_schedule,
    goals,
    in_window,
    overlaps,
    role_of,
    rss_growth,
    slope_per_hour,
    start_minute,
    steps_after_faults,
    summarize_soak,
)


def sample(t, steps=None, pid=None, code=200, gen=0, sched_mb=None, errors=None, version=None):
    s = {"t": t, "kind": "periodic", "generation": gen, "status_code": code, "rss_mb": {}}
    if code == 200:
        s.update(train_steps=steps, scheduler_pid=pid, adapter_version=version)
        s["abs_pct_error"] = errors or {}
    if sched_mb is not None:
        s["rss_mb"] = {"scheduler": sched_mb, "total": sched_mb + 500}
    return s


def test_fault_schedule_lands_at_fixed_shares():
    assert fault_schedule(240.0, 20.0) == [
        (48.0, "pause"),
        (68.0, "resume"),
        (96.0, "sidecar_kill"),
        (192.0, "server_kill"),
    ]


def test_window_membership_and_overlap():
    w = (100.0, 170.0)
    assert in_window(100.0, w) and in_window(170.0, w) and not in_window(170.1, w)
    assert not in_window(120.0, None)
    # a request cut by the kill (sent before, ended after) is inside; one done before is not
    assert overlaps(95.0, 101.0, w)
    assert not overlaps(90.0, 99.9, w)
    assert overlaps(169.0, 175.0, w) and not overlaps(171.0, 175.0, w)
    assert not overlaps(0.0, 1e9, None)


def test_slope_per_hour_is_least_squares():
    # 1 MB per minute = 60 MB/hour, with noise that cancels
    pts = [(0.0, 101.0), (60.0, 100.0), (120.0, 101.0), (180.0, 104.0)]
    assert slope_per_hour(pts) == pytest.approx(60.0)
    assert slope_per_hour([(0.0, 1.0)]) is None
    assert slope_per_hour([]) is None
    assert slope_per_hour([(5.0, 1.0), (5.0, 9.0)]) is None


def test_rss_growth_uses_first_server_from_start_until_kill():
    samples = [sample(t, sched_mb=1000 + t / 60) for t in range(0, 1800, 30)]  # 60 MB/h
    samples[3]["rss_mb"]["scheduler"] = 9999  # before minute 10: ignored
    samples.append(sample(1900, gen=1, sched_mb=200))  # restarted server: ignored
    samples.append(sample(1850, code=None))  # no status, no RSS
    assert rss_growth(samples, 600, 1700) == pytest.approx(60.0)
    assert rss_growth(samples, 600, 630) is None  # one sample


def test_start_minute_scales_for_short_runs():
    assert start_minute(60, 10.0) == 10.0
    assert start_minute(12, 10.0) == 10.0
    assert start_minute(4, 10.0) == 1.0
    assert start_minute(4, 5.0) == 1.0


def test_cost_model_max_error_in_percent_after_start_outside_window():
    samples = [
        sample(100, errors={"prefill": 0.9, "decode": 0.1}),  # before minute 5
        sample(400, errors={"prefill": 0.2, "decode": 0.25, "fwd": 3.0}),  # fwd not counted
        sample(500, errors={"prefill": 0.8}),  # in the restart window
        sample(600, code=None),
        sample(700, errors={"decode": 0.12}),
    ]
    assert cost_model_max_error(samples, 300, (450, 550)) == pytest.approx(25.0)
    assert cost_model_max_error(samples, 800, None) is None


def test_steps_survive_restart_and_count_after_each_fault():
    faults = [
        {"name": "pause_resume", "t": 60, "t_resume": 80},
        {"name": "sidecar_kill", "t": 120},
        {"name": "server_kill", "t": 240},
    ]
    samples = [
        sample(0, 0, pid=11),
        sample(30, 2, pid=11),
        sample(60, 3, pid=11),  # just before the pause
        sample(80, 4, pid=11),  # just before the resume: one step finished in flight
        sample(120, 6, pid=11),
        sample(240, 9, pid=11),  # just before the SIGKILL
        sample(250, code=None),  # server down
        sample(300, 1, pid=22),  # restarted: counter from 0
        sample(330, 5, pid=22),
    ]
    assert [c for _, c in cumulative_steps(samples)] == [0, 2, 3, 4, 6, 9, 10, 14]
    assert steps_after_faults(samples, faults) == {
        "pause_resume": 10,
        "sidecar_kill": 8,
        "server_kill": 5,
    }
    # same pid but a counter that went down also starts a segment
    assert [c for _, c in cumulative_steps([sample(0, 4, pid=1), sample(9, 1, pid=1)])] == [4, 5]


def test_summary_and_goals():
    window = (240.0, 330.0)
    faults = [
        {"name": "pause_resume", "t": 60, "t_resume": 80},
        {"name": "sidecar_kill", "t": 120},
        {"name": "server_kill", "t": 240, "restart_s": 60.0},
    ]
    samples = [
        sample(0, 0, pid=1, sched_mb=1000, errors={"decode": 0.5}, version=0),
        sample(60, 1, pid=1, sched_mb=1001, errors={"decode": 0.1}),
        sample(80, 1, pid=1, sched_mb=1002),
        sample(120, 2, pid=1, sched_mb=1003, errors={"prefill": 0.2}),
        sample(200, code=503, sched_mb=1004),  # outside the window: counts
        sample(240, 3, pid=1, sched_mb=1005),
        sample(260, code=None),  # inside the window: does not count
        {**sample(239.9, code=None), "t_end": 240.3},  # in flight at the kill: inside
        sample(360, 2, pid=2, gen=1, sched_mb=800, version=7),
    ]
    done = [
        Done(0, 5, live=False, ttft=0.1, gaps=[0.1], text="The ocean"),
        Done(5, 10, live=True, ttft=0.1, gaps=[0.1], text="Certainly! The moon"),
        Done(100, 101, live=True, error="HTTPError: 500"),  # outside: counts
        Done(235, 241, live=True, error="ChunkedEncodingError"),  # cut by the kill
        Done(300, 300.1, live=False, error="ConnectionError"),  # while down
        Done(350, 355, live=True, ttft=0.2, gaps=[0.1], text="Certainly! Bees"),
    ]
    bad = [(30.0, "bad_json", 400), (50.0, "missing_all", 200), (90.0, "x", None),
           (250.0, "bad_json", None)]  # fmt: skip
    s = summarize_soak(samples, done, [1, 2, 3, 4], [1, 2, 4, 5], bad, faults, window, 6, 400)
    assert s["requests_ok"] == 3 and s["requests_failed"] == 3
    assert s["failed_outside_restart"] == 1
    assert s["status_non_200"] == 1
    assert (s["feedback_posted"], s["feedback_stored"], s["feedback_lost"]) == (4, 3, 1)
    assert s["bad_input_sent"] == 3 and s["bad_input_not_4xx"] == 2
    assert s["train_steps"] == 5
    assert s["steps_after_each_fault"] == {"pause_resume": 4, "sidecar_kill": 3, "server_kill": 2}
    assert s["steps_during_pause"] == 0
    assert s["adapter_version_last"] == 7
    # M = 6: errors from minute 1.5 (90 s): the 0.5 at t=0 is left out
    assert s["cost_model_max_abs_pct_error"] == pytest.approx(20.0)
    assert s["rss_mb_first"] == 1000 and s["rss_mb_last"] == 800
    # from minute 1.5 (90 s) until the kill at 240 s: 1003 and 1004 MB at 120 and 200 s (the
    # sample at the kill itself is not before it)
    assert s["rss_growth_start_min"] == 1.5
    assert s["rss_growth_mb_per_h_after_10min"] == pytest.approx(3600 / 80)
    assert s["certainly_share"]["base"] == 0.0
    assert s["certainly_share"]["live_last_20pct"] == 1.0
    assert s["restart_s"] == 60.0

    g = goals(s)
    assert not g["no_failed_requests_outside_restart"]["met"]
    assert not g["no_lost_feedback"]["met"] and g["no_lost_feedback"]["value"] == 1
    assert not g["no_status_non_200"]["met"]
    assert g["training_steps_after_every_fault"]["met"]
    assert g["cost_model_error_under_30pct"]["met"]
    assert g["scheduler_rss_growth_under_50mb_per_h"]["met"]
    assert set(g["cost_model_error_under_30pct"]) == {"value", "target", "met"}


def test_goal_for_steps_needs_every_fault():
    s = {
        "failed_outside_restart": 0,
        "feedback_lost": 0,
        "status_non_200": 0,
        "steps_after_each_fault": {"pause_resume": 3, "sidecar_kill": 1},  # no server kill
        "cost_model_max_abs_pct_error": None,
        "rss_growth_mb_per_h_after_10min": 49.0,
    }
    g = goals(s)
    assert not g["training_steps_after_every_fault"]["met"]
    assert not g["cost_model_error_under_30pct"]["met"]  # never measured
    assert g["scheduler_rss_growth_under_50mb_per_h"]["met"]
    assert g["no_lost_feedback"]["met"] and g["no_status_non_200"]["met"]


def test_process_roles_from_titles():
    assert role_of("python mace-sgl serve --port 1", is_root=True) == "launcher"
    assert role_of("sglang::scheduler_TP0", is_root=False) == "scheduler"
    assert role_of("sglang::detokenizer", is_root=False) == "detokenizer"
    assert role_of("python -m sidecar.main --state-dir /x/scheduler", is_root=False) == "sidecar"
    assert role_of("python -c resource_tracker", is_root=False) == "other"


def test_choose_level_takes_most_streams_within_headroom():
    from benchmarks.soak import choose_level

    levels = [
        {"streams": 1, "tbt_p99_ms": 120.0, "ttft_p99_ms": 300.0},
        {"streams": 2, "tbt_p99_ms": 150.0, "ttft_p99_ms": 500.0},
        {"streams": 3, "tbt_p99_ms": 170.0, "ttft_p99_ms": 600.0},  # over 0.8 x 200
    ]
    choice = choose_level(levels, 200.0, 2000.0)
    assert (choice["streams"], choice["slo_tbt_ms"], choice["slo_ttft_ms"]) == (2, 200.0, 2000.0)


def test_choose_level_raises_targets_when_inference_alone_misses_them():
    from benchmarks.soak import choose_level

    levels = [
        {"streams": 1, "tbt_p99_ms": 233.0, "ttft_p99_ms": 900.0},
        {"streams": 2, "tbt_p99_ms": 480.0, "ttft_p99_ms": 1300.0},
    ]
    choice = choose_level(levels, 200.0, 2000.0)
    # 233 / 0.8 = 291.25 -> 300 ms; TTFT 900 / 0.8 = 1125 stays under the default 2000
    assert (choice["streams"], choice["slo_tbt_ms"], choice["slo_ttft_ms"]) == (1, 300.0, 2000.0)
    assert "miss" in choice["why"]


def test_tree_rss_sums_roles_and_notes_every_process_seen():
    import os

    from benchmarks.soak import tree_rss

    seen: dict[int, float] = {}
    rss, pids = tree_rss(os.getpid(), seen)
    assert pids["launcher"] == [os.getpid()] and os.getpid() in seen
    assert rss["total"] == pytest.approx(sum(v for k, v in rss.items() if k != "total"), abs=0.2)
    assert rss["launcher"] > 0
    assert tree_rss(2**22 + 12345) == ({}, {})  # no such process: the server is down
