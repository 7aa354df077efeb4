"""Soak: one training server for an hour under steady load, feedback, bad input and faults.

    python -m benchmarks.soak [--minutes 60 | --quick] --out DIR [--state-dir S]
                              [--levels 1,2] [--calibrate-s 90] [--slo-tbt-ms 200]
                              [--slo-ttft-ms 2000] [--streams 2] [--think-s 2] [--max-tokens 48]
                              [--feedback-every-s 5] [--bad-every-s 20] [--pause-s 20]

`--quick` is `--minutes 15`. One `mace-sgl serve --mace-train --mace-policy mace` on the
embedded default model (SmolLM2-135M-Instruct), state in DIR/state (emptied first) unless
--state-dir is given; logs DIR/server-0.log and, after the restart, DIR/server-1.log.
Time t = 0 is when the first server answers /health and the load starts; the run lasts M
minutes, or until 60 s after the restart window closes when that is later (short runs).

Calibration first (skipped with --levels ''): the issue asks for a load at which
inference alone meets the SLO, and that level depends on the machine (a decode iteration
of SmolLM2 took ~100 ms on a 2-core EPYC, ~230 ms on a 2-core Xeon @ 2.0 GHz). A server
of its own (DIR/calibrate.log, same flags and state dir, no feedback posted, so nothing
trains) gets two warm-up requests, then --calibrate-s seconds of closed-loop load at
each stream count of --levels (default 1,2); `choose_level` keeps the most streams whose
client TBT and TTFT p99 stay within 80% of the SLO targets (--slo-tbt-ms, default 200,
--slo-ttft-ms, default 2000). If even the lightest level misses them, it keeps that
level and raises the targets to its p99s / 0.8, and the soak's server gets them as
--mace-slo-tbt-ms / --mace-slo-ttft-ms: training would otherwise starve by design. The
levels, the choice and why are in soak.json "calibration". The cost model the
calibration server learned is in the state dir and the soak's server resumes it
(trainer/learned_cost.py).

What runs, all at once:
- load: --streams closed-loop streaming chat clients (OpenAI API, loadgen.stream_chat),
  each sending its next request --think-s seconds after the last one ended (1 s after a
  failure). Every other request names the live adapter (`"lora_path": "live"`), the rest
  the base model; prompts "Tell me about {topic}." over colocate.TOPICS; --max-tokens 48,
  greedy, ignore_eos. The think time leaves idle gaps in which the `mace` policy can
  train; a soak is about staying up, not about capacity.
- feedback: one pair every --feedback-every-s (colocate.pair: chosen = "Certainly! " +
  answer, rejected = the answer), checkable in the live answers (`certainly_share`).
- bad input every --bad-every-s, cycling through malformed /mace/feedback bodies (bad
  JSON, empty list, missing fields, wrong types, a bad role, a bad weight); each must
  get a 4xx.
- faults at shares of M: POST /mace/train/pause at 20% and /mace/train/resume --pause-s
  later; kill -9 of the sidecar (`sidecar.main`) at 40% (the launcher restarts it); at
  80% SIGKILL of the server's whole process group, then a restart on the same state dir.
  The restart window runs from that SIGKILL until /health answers 200 again, plus 30 s.
- sampling every 30 s, and just before each fault action: GET /mace/status (a compact
  copy: counters, scalar training fields such as `paused`, `rollbacks`, `starved_s`, SLO,
  cost-model errors, trainer memory, the scheduler's `memory`: RSS against glibc's heap in
  use and free, mace_sgl/memstats.py) and the RSS of every process of the server tree
  (psutil, the launcher's process and its children, recursively; roles by command line:
  `scheduler` (SGLang titles it `sglang::scheduler...` once the spawned child runs),
  `sidecar.main`, `detokenizer`), and the machine's 1-minute load average: on a shared
  CPU another busy process slows serving far more than its share (2 OpenMP threads
  waiting for a core), so read latency figures against `loadavg_1m`.

Output: DIR/soak.json {"samples": [...], "latency": [per 30 s of request end times:
TTFT/TBT p99], "faults": [...], "restart_window": [start, end], "summary": {...},
"goals": {...}, "settings", "machine", "date"} and DIR/soak.png (scheduler and tree RSS,
client TTFT/TBT p99, adapter version and cumulative train steps over time; faults as
vertical lines, the restart window shaded); a table and the goals are printed at the end.

Definitions (summary):
- requests_ok / requests_failed: streamed requests without / with a client-side error
  (HTTP error, broken stream, refused connection). failed_outside_restart counts failed
  requests whose [sent, end] interval does not overlap the restart window (a request
  cut by the SIGKILL ends after it, so it is inside). At the end the load stops and
  requests in flight get 60 s to finish; any still streaming are not counted
  (`requests_unfinished_at_end`), nor cut by the final SIGTERM.
- status_non_200: status samples that did not get a 200 (a refused connection or a
  timeout counts) and whose [start, end] does not touch the restart window (a request in
  flight at the SIGKILL fails by it).
- feedback_posted: rows acknowledged with a 200 (the ids in the answers);
  feedback_stored: those ids found in DIR's feedback.sqlite3 (read directly after the
  server stopped); feedback_lost = posted - stored.
- bad_input_sent / bad_input_not_4xx: malformed bodies sent outside the restart window,
  and those among them answered with anything but a 4xx (refused connections included).
- train_steps: optimizer steps over the whole run. The server's `train_steps` counter
  restarts at 0 with a new scheduler process, so the samples are cut into segments by
  the scheduler's pid (schedulers[0].pid; a counter that goes down also starts a
  segment), and each segment adds its counter to the steps of the segments before it
  (`cumulative_steps`). Steps between a segment's last sample and the SIGKILL are not
  seen, which is why a sample is taken just before every fault. adapter_version is not
  used: a step the publish guard refuses completes without a version.
- steps_after_each_fault: {pause_resume, sidecar_kill, server_kill}: cumulative steps at
  the end minus those at the last sample taken at or before the fault (for
  pause_resume: before the resume). steps_during_pause: steps between the pause and
  the resume (at most the step in flight should finish).
- cost_model_max_abs_pct_error: the largest running absolute error of the prefill and
  decode cost models (the status reports fractions; here in percent, 25 = 25%) in
  samples taken from minute 5 (min(5, M / 4) when M < 12; `cost_model_error_start_min`)
  and outside the restart window.
- rss_mb_first / rss_mb_last: the scheduler's RSS in the first and last samples that
  have one. rss_growth_mb_per_h_after_10min: slope of the least-squares line through the
  first server's scheduler RSS samples from minute 10 (M / 4 when M < 12;
  `rss_growth_start_min`) until its SIGKILL, in MB per hour; None under 2 samples.
- goals (for a 60-minute run): 0 failed requests outside the restart window, 0 lost
  feedback, 0 non-200 status samples, training steps after every fault, cost model
  error under 30%, scheduler RSS growth under 50 MB/hour after minute 10; each is
  {"value", "target", "met"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks.colocate import TOPICS, pair
from benchmarks.loadgen import percentile_ms, stream_chat
from benchmarks.serve_smoke import machine
from mace_sgl.launcher import Server

FAULTS = ("pause_resume", "sidecar_kill", "server_kill")
RESTART_GRACE_S = 30.0
HEADROOM = 0.8  # calibration: inference alone must stay within this share of the SLO
SAMPLE_EVERY_S = 30.0
BAD_BODIES: list[tuple[str, bytes]] = [
    ("bad_json", b'{"prompt": "hi", "chosen": '),
    ("empty_list", b"[]"),
    ("missing_rejected", json.dumps({"prompt": "Hi.", "chosen": "Hello."}).encode()),
    ("missing_all", b"{}"),
    ("prompt_int", json.dumps({"prompt": 5, "chosen": "a", "rejected": "b"}).encode()),
    ("chosen_list", json.dumps({"prompt": "Hi.", "chosen": ["a"], "rejected": "b"}).encode()),
    (
        "bad_role",
        json.dumps(
            {"prompt": [{"role": "bot", "content": "Hi."}], "chosen": "a", "rejected": "b"}
        ).encode(),
    ),  # fmt: skip
    (
        "weight_str",
        json.dumps({"prompt": "Hi.", "chosen": "a", "rejected": "b", "weight": "heavy"}).encode(),
    ),  # fmt: skip
    ("not_object", b'"just a string"'),
]

Window = tuple[float, float]


# -- pure computations (tests/test_soak.py) ----------------------------------------------


@dataclass
class Done:
    """One finished request, times in seconds since t = 0."""

    sent: float
    end: float
    live: bool
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None


def fault_schedule(total_s: float, pause_s: float) -> list[tuple[float, str]]:
    """(time, action) of the fault actions for a run of total_s seconds."""
    return [
        (0.2 * total_s, "pause"),
        (0.2 * total_s + pause_s, "resume"),
        (0.4 * total_s, "sidecar_kill"),
        (0.8 * total_s, "server_kill"),
    ]


def in_window(t: float, window: Window | None) -> bool:
    """Whether time t lies in the window (ends included); never for no window."""
    return window is not None and window[0] <= t <= window[1]


def overlaps(start: float, end: float, window: Window | None) -> bool:
    """Whether the interval [start, end] touches the window."""
    return window is not None and start <= window[1] and end >= window[0]


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per hour; None under two
    distinct times."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return None
    return 3600.0 * sum((t - mx) * (v - my) for t, v in points) / den


def start_minute(minutes: float, usual: float) -> float:
    """Minute from which a tail measure starts: `usual`, or M / 4 for runs under 12 min."""
    return usual if minutes >= 12 else min(usual, 0.25 * minutes)


def rss_growth(samples: Sequence[dict], start_s: float, end_s: float) -> float | None:
    """MB/hour of the first server's scheduler RSS, samples in [start_s, end_s)."""
    points = [
        (s["t"], s["rss_mb"]["scheduler"])
        for s in samples
        if s.get("generation") == 0
        and start_s <= s["t"] < end_s
        and s.get("rss_mb", {}).get("scheduler") is not None
    ]
    return slope_per_hour(points)


def cost_model_max_error(
    samples: Sequence[dict], start_s: float, window: Window | None
) -> float | None:
    """Largest prefill/decode running error, in percent, of samples from start_s outside
    the window; None if there is none."""
    errors = [
        100.0 * err
        for s in samples
        if s["t"] >= start_s and not in_window(s["t"], window)
        for kind, err in (s.get("abs_pct_error") or {}).items()
        if kind in ("prefill", "decode") and err is not None
    ]
    return max(errors) if errors else None


def cumulative_steps(samples: Sequence[dict]) -> list[tuple[float, int]]:
    """(t, steps since the start of the run) for each sample with a status: a new
    scheduler pid, or a counter that went down, starts a new segment on top of the
    steps of the ones before."""
    out: list[tuple[float, int]] = []
    base, last_pid, last_steps = 0, None, 0
    for s in sorted(samples, key=lambda s: s["t"]):
        steps = s.get("train_steps")
        if steps is None:
            continue
        pid = s.get("scheduler_pid")
        if last_pid is not None and (pid != last_pid or steps < last_steps):
            base += last_steps
        last_pid, last_steps = pid, steps
        out.append((s["t"], base + steps))
    return out


def steps_at(cum: Sequence[tuple[float, int]], t: float) -> int:
    """Cumulative steps at the last sample at or before t (0 before any)."""
    seen = [c for ct, c in cum if ct <= t]
    return seen[-1] if seen else 0


def steps_after_faults(samples: Sequence[dict], faults: Sequence[dict]) -> dict[str, int]:
    """Steps completed after each fault (for pause_resume: after the resume)."""
    cum = cumulative_steps(samples)
    final = cum[-1][1] if cum else 0
    return {f["name"]: final - steps_at(cum, f.get("t_resume", f["t"])) for f in faults}


def latency_series(done: Sequence[Done], end_s: float, bucket_s: float) -> list[dict]:
    """Per bucket of request end times: TTFT/TBT p99 (ms) and counts."""
    out = []
    t = 0.0
    while t < end_s:
        rows = [d for d in done if t <= d.end < t + bucket_s]
        ok = [d for d in rows if d.error is None]
        out.append(
            {
                "t": t + bucket_s,
                "requests": len(rows),
                "failed": len(rows) - len(ok),
                "ttft_p99_ms": percentile_ms([d.ttft for d in ok if d.ttft is not None], 99),
                "tbt_p99_ms": percentile_ms([g for d in ok for g in d.gaps], 99),
            }
        )
        t += bucket_s
    return out


def certainly_share(done: Sequence[Done], start_s: float, end_s: float, live: bool) -> float | None:
    """Share of successful answers ending in [start_s, end_s) on the live adapter (or the
    base model) that open with "Certainly"."""
    texts = [
        d.text for d in done if d.error is None and d.live == live and start_s <= d.end < end_s
    ]
    return sum(t.lstrip().startswith("Certainly") for t in texts) / len(texts) if texts else None


def summarize_soak(
    samples: Sequence[dict],
    done: Sequence[Done],
    acked_ids: Iterable[int],
    stored_ids: Iterable[int],
    bad: Sequence[tuple[float, str, int | None]],
    faults: Sequence[dict],
    window: Window | None,
    minutes: float,
    end_s: float,
) -> dict[str, Any]:
    """The summary of soak.json from what the run recorded (see the module docstring)."""
    acked, stored = set(acked_ids), set(stored_ids)
    failed = [d for d in done if d.error is not None]
    kill = next((f["t"] for f in faults if f["name"] == "server_kill"), end_s)
    status_bad = [
        s
        for s in samples
        if s["status_code"] != 200 and not overlaps(s["t"], s.get("t_end", s["t"]), window)
    ]
    bad_outside = [b for b in bad if not in_window(b[0], window)]
    rss = [s["rss_mb"]["scheduler"] for s in samples if s["rss_mb"].get("scheduler") is not None]
    cum = cumulative_steps(samples)
    rss_start, cost_start = start_minute(minutes, 10.0), start_minute(minutes, 5.0)
    pause = next((f for f in faults if f["name"] == "pause_resume"), None)
    q = end_s / 5
    return {
        "requests_ok": len(done) - len(failed),
        "requests_failed": len(failed),
        "failed_outside_restart": sum(not overlaps(d.sent, d.end, window) for d in failed),
        "failed_error_samples": sorted({d.error for d in failed})[:5],
        "status_samples": len(samples),
        "status_non_200": len(status_bad),
        "feedback_posted": len(acked),
        "feedback_stored": len(acked & stored),
        "feedback_lost": len(acked - stored),
        "bad_input_sent": len(bad_outside),
        "bad_input_not_4xx": sum(not (c is not None and 400 <= c < 500) for _, _, c in bad_outside),
        "train_steps": cum[-1][1] if cum else 0,
        "steps_after_each_fault": steps_after_faults(samples, faults),
        "steps_during_pause": (
            steps_at(cum, pause["t_resume"]) - steps_at(cum, pause["t"]) if pause else None
        ),
        "adapter_version_last": next(
            (
                s["adapter_version"]
                for s in reversed(samples)
                if s.get("adapter_version") is not None
            ),
            None,
        ),
        "cost_model_max_abs_pct_error": cost_model_max_error(samples, 60 * cost_start, window),
        "cost_model_error_start_min": cost_start,
        "rss_mb_first": rss[0] if rss else None,
        "rss_mb_last": rss[-1] if rss else None,
        "rss_growth_mb_per_h_after_10min": _round(rss_growth(samples, 60 * rss_start, kill)),
        "rss_growth_start_min": rss_start,
        "certainly_share": {
            "base": certainly_share(done, 0, end_s, live=False),
            "live_first_20pct": certainly_share(done, 0, q, live=True),
            "live_last_20pct": certainly_share(done, end_s - q, end_s, live=True),
        },
        "restart_s": next((f.get("restart_s") for f in faults if f["name"] == "server_kill"), None),
        "duration_s": end_s,
    }


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def goals(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The soak issue's goals for a 60-minute run: value, target, met."""

    def goal(value: Any, target: Any, met: bool) -> dict[str, Any]:
        return {"value": value, "target": target, "met": bool(met)}

    steps = summary["steps_after_each_fault"]
    cost = summary["cost_model_max_abs_pct_error"]
    rss = summary["rss_growth_mb_per_h_after_10min"]
    return {
        "no_failed_requests_outside_restart": goal(
            summary["failed_outside_restart"], 0, summary["failed_outside_restart"] == 0
        ),
        "no_lost_feedback": goal(summary["feedback_lost"], 0, summary["feedback_lost"] == 0),
        "no_status_non_200": goal(summary["status_non_200"], 0, summary["status_non_200"] == 0),
        "training_steps_after_every_fault": goal(
            steps, "> 0 after each", all(steps.get(f, 0) > 0 for f in FAULTS)
        ),
        "cost_model_error_under_30pct": goal(cost, "< 30", cost is not None and cost < 30),
        "scheduler_rss_growth_under_50mb_per_h": goal(rss, "< 50", rss is not None and rss < 50),
    }


def role_of(cmdline: str, is_root: bool) -> str:
    """Which part of the server a process is, from its command line (process title)."""
    if is_root:
        return "launcher"
    if "sidecar.main" in cmdline:
        return "sidecar"
    if "scheduler" in cmdline:
        return "scheduler"
    if "detokenizer" in cmdline:
        return "detokenizer"
    return "other"


def choose_level(levels: Sequence[dict], tbt_ms: float, ttft_ms: float) -> dict[str, Any]:
    """The soak's load level and SLO targets from the inference-only calibration.

    levels: [{"streams", "tbt_p99_ms", "ttft_p99_ms"}] in rising load. The most streams
    whose p99s stay within HEADROOM of the targets (so that inference alone meets the
    SLO and the `mace` policy has room to train); if even the lightest level misses the
    targets on this machine, that level with the targets raised to its p99s / HEADROOM
    (rounded up to 10 ms / 100 ms): a soak is about staying up, and a target that
    inference alone misses starves training by design."""
    fits = [
        lv
        for lv in levels
        if lv["tbt_p99_ms"] is not None
        and lv["ttft_p99_ms"] is not None
        and lv["tbt_p99_ms"] <= HEADROOM * tbt_ms
        and lv["ttft_p99_ms"] <= HEADROOM * ttft_ms
    ]
    if fits:
        best = max(fits, key=lambda lv: lv["streams"])
        return {
            "streams": best["streams"],
            "slo_tbt_ms": tbt_ms,
            "slo_ttft_ms": ttft_ms,
            "why": f"most streams whose inference-only p99s are within {HEADROOM:.0%} of "
            "the default targets",
        }
    low = levels[0]
    tbt = max(tbt_ms, 10.0 * math.ceil((low["tbt_p99_ms"] or tbt_ms) / HEADROOM / 10.0))
    ttft = max(ttft_ms, 100.0 * math.ceil((low["ttft_p99_ms"] or ttft_ms) / HEADROOM / 100.0))
    return {
        "streams": low["streams"],
        "slo_tbt_ms": tbt,
        "slo_ttft_ms": ttft,
        "why": f"even {low['streams']} stream(s) miss the default targets with inference "
        f"alone on this machine: targets raised to its p99s / {HEADROOM}",
    }


def chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    """The i-th request of the load: odd ones on the live adapter, greedy, ignore_eos."""
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if i % 2 == 1:
        body["lora_path"] = "live"
    return body


def measure_level(url: str, streams: int, think_s: float, max_tokens: int, seconds: float) -> dict:
    """Closed-loop load of `streams` clients for `seconds`: client TTFT/TBT p99 (ms)."""
    stop = threading.Event()
    results: list[Any] = []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            results.append(stream_chat(url, chat_body(i, max_tokens)))
            i += streams
            stop.wait(think_s)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(streams)]
    for th in threads:
        th.start()
    stop.wait(seconds)
    stop.set()
    for th in threads:
        th.join(timeout=120)
    ok = [r for r in results if r.error is None]
    gaps = [g for r in ok for g in r.gaps]
    return {
        "streams": streams,
        "seconds": seconds,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "gaps": len(gaps),
        "tbt_p99_ms": percentile_ms(gaps, 99),
        "tbt_p50_ms": percentile_ms(gaps, 50),
        "ttft_p99_ms": percentile_ms([r.ttft for r in ok if r.ttft is not None], 99),
    }


# -- the run -----------------------------------------------------------------------------


def server_tree(root: int) -> list[tuple[psutil.Process, str]]:
    """The processes of the server started as `root`, with their roles."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            out.append((p, role_of(" ".join(p.cmdline()) + " " + p.name(), p.pid == root)))
        except psutil.Error:
            continue
    return out


def tree_rss(
    root: int, seen: dict[int, float] | None = None
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """RSS in MB per role of the server tree started as `root` (with their "total"; empty
    while the server is down) and the pids per role; `seen` collects pid -> create_time
    of every process met, for the final reap."""
    rss: dict[str, float] = {}
    pids: dict[str, list[int]] = {}
    for p, role in server_tree(root):
        try:
            mb = p.memory_info().rss / 2**20
            if seen is not None:
                seen.setdefault(p.pid, p.create_time())
        except psutil.Error:  # a process that just exited
            continue
        rss[role] = rss.get(role, 0.0) + mb
        pids.setdefault(role, []).append(p.pid)
    if rss:
        rss["total"] = sum(rss.values())
    return {k: round(v, 1) for k, v in rss.items()}, pids


def compact_status(body: dict[str, Any]) -> dict[str, Any]:
    """What a sample keeps of /mace/status: counters and the scalar training fields."""
    training = body.get("training") or {}
    schedulers = [s for s in body.get("schedulers") or [] if s]
    cost = training.get("cost_model") or {}
    return {
        "feedback_count": body.get("feedback_count"),
        "queue_depth": body.get("queue_depth"),
        "adapter_version": body.get("adapter_version"),
        "train_steps": body.get("train_steps"),
        "scheduler_pid": schedulers[0].get("pid") if schedulers else None,
        "training": {
            k: v for k, v in training.items() if v is None or isinstance(v, (int, float, str))
        },
        "slo": training.get("slo"),
        "abs_pct_error": cost.get("abs_pct_error"),
        "cost_outliers": training.get("cost_outliers"),
        "trainer_memory": training.get("memory"),
        # the scheduler's RSS against glibc's heap (mace_sgl/memstats.py)
        "memory": schedulers[0].get("memory") if schedulers else None,
    }


class Soak:
    """One soak run: the server, the load threads, the samples and the faults."""

    def __init__(self, args: argparse.Namespace, out: Path, state: Path) -> None:
        self.args, self.out, self.state = args, out, state
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.generation = 0
        self.server: Server | None = None
        self.done: list[Done] = []
        self.samples: list[dict] = []
        self.acked: list[int] = []
        self.feedback_errors: list[tuple[float, str]] = []
        self.bad: list[tuple[float, str, int | None]] = []
        self.faults: list[dict] = []
        self.window: Window | None = None
        self.seen: dict[int, float] = {}  # pid -> create_time of every server process seen
        self.threads: list[threading.Thread] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def start_server(self, log_name: str | None = None) -> Server:
        flags = ["--log-level", "warning", "--mace-train", "--mace-policy", "mace",
                 "--mace-state-dir", str(self.state)]  # fmt: skip
        if self.args.model_path:
            flags += ["--model-path", self.args.model_path]
        if self.args.slo_tbt_ms:
            flags += ["--mace-slo-tbt-ms", str(self.args.slo_tbt_ms)]
        if self.args.slo_ttft_ms:
            flags += ["--mace-slo-ttft-ms", str(self.args.slo_ttft_ms)]
        log = self.out / (log_name or f"server-{self.generation}.log")
        return Server(flags, log, timeout_s=600)

    def calibrate(self) -> dict[str, Any]:
        """Inference alone (no feedback posted yet, so nothing to train) at each level of
        --levels, on a server of its own (DIR/calibrate.log) on the same state dir: sets
        --streams and the SLO targets (choose_level). The cost model it learns is kept
        in the state dir and resumed by the soak's server (trainer/learned_cost.py)."""
        args = self.args
        server = self.start_server("calibrate.log")
        try:
            for i in range(2):  # warm-up, not measured
                stream_chat(server.url, chat_body(i, args.max_tokens))
            levels = [
                measure_level(server.url, n, args.think_s, args.max_tokens, args.calibrate_s)
                for n in args.levels
            ]
        finally:
            server.stop()
        choice = choose_level(levels, args.slo_tbt_ms or 200.0, args.slo_ttft_ms or 2000.0)
        args.streams = choice["streams"]
        args.slo_tbt_ms, args.slo_ttft_ms = choice["slo_tbt_ms"], choice["slo_ttft_ms"]
        return {"levels": levels, "headroom": HEADROOM, **choice}

    # -- background threads

    def _client(self, k: int) -> None:
        i = k
        while not self.stop.is_set():
            live = i % 2 == 1
            r = stream_chat(self.url, chat_body(i, self.args.max_tokens))
            d = Done(r.sent - self.t0, self.now(), live, r.ttft, r.gaps, r.text, r.error)
            with self.lock:
                self.done.append(d)
            i += self.args.streams
            self.stop.wait(self.args.think_s if r.error is None else 1.0)

    def _feedback(self) -> None:
        k = 0
        while not self.stop.wait(self.args.feedback_every_s):
            t = self.now()
            try:
                r = requests.post(self.url + "/mace/feedback", json=pair(k), timeout=60)
                if r.status_code == 200:
                    with self.lock:
                        self.acked.extend(r.json()["ids"])
                else:
                    self.feedback_errors.append((t, f"HTTP {r.status_code}: {r.text[:200]}"))
            except requests.RequestException as e:
                self.feedback_errors.append((t, f"{type(e).__name__}"))
            k += 1

    def _bad_input(self) -> None:
        k = 0
        while not self.stop.wait(self.args.bad_every_s):
            name, data = BAD_BODIES[k % len(BAD_BODIES)]
            t, code = self.now(), None
            try:
                code = requests.post(
                    self.url + "/mace/feedback",
                    data=data,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                ).status_code
            except requests.RequestException:
                pass
            self.bad.append((t, name, code))
            k += 1

    def _sampler(self) -> None:
        k = 0
        while not self.stop.is_set():
            delay = k * SAMPLE_EVERY_S - self.now()
            if delay > 0 and self.stop.wait(delay):
                return
            self.sample("periodic")
            k += 1

    def start_threads(self) -> None:
        targets = [(self._client, (k,)) for k in range(self.args.streams)]
        targets += [(self._feedback, ()), (self._bad_input, ()), (self._sampler, ())]
        for fn, a in targets:
            th = threading.Thread(target=fn, args=a, daemon=True)
            th.start()
            self.threads.append(th)

    def stop_threads(self, timeout_s: float = 60.0) -> int:
        """Stop the load, feedback and sampling; returns the threads still running (a
        request still streaming) after timeout_s."""
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for th in self.threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        return sum(th.is_alive() for th in self.threads)

    # -- samples and faults

    def sample(self, kind: str) -> dict:
        assert self.server is not None
        server, t = self.server, self.now()
        rec: dict[str, Any] = {"t": round(t, 2), "kind": kind, "generation": self.generation}
        # the machine is shared: a loaded CPU explains latency that the server does not
        rec["loadavg_1m"] = os.getloadavg()[0]
        try:
            r = requests.get(server.url + "/mace/status", timeout=30)
            rec["status_code"] = r.status_code
            if r.status_code == 200:
                rec.update(compact_status(r.json()))
        except requests.RequestException as e:
            rec["status_code"] = None
            rec["status_error"] = type(e).__name__
        # a request in flight when the server is killed fails by the kill: it belongs to
        # the restart window though it started just before it
        rec["t_end"] = round(self.now(), 2)
        rec["rss_mb"], rec["pids"] = tree_rss(server.proc.pid, self.seen)
        with self.lock:
            self.samples.append(rec)
        return rec

    def post(self, path: str) -> int | None:
        try:
            return requests.post(self.url + path, json={}, timeout=60).status_code
        except requests.RequestException:
            return None

    def fault(self, action: str) -> None:
        self.sample(f"before_{action}")
        t = self.now()
        if action == "pause":
            self.faults.append(
                {"name": "pause_resume", "t": t, "pause_code": self.post("/mace/train/pause")}
            )
        elif action == "resume":
            f = next(f for f in self.faults if f["name"] == "pause_resume")
            f.update(t_resume=t, resume_code=self.post("/mace/train/resume"))
        elif action == "sidecar_kill":
            self.faults.append({"name": "sidecar_kill", "t": t, **self.kill_sidecar()})
        elif action == "server_kill":
            self.faults.append({"name": "server_kill", "t": t, **self.kill_server()})

    def kill_sidecar(self) -> dict[str, Any]:
        assert self.server is not None
        old = [p.pid for p, role in server_tree(self.server.proc.pid) if role == "sidecar"]
        if not old:
            return {"error": "no sidecar process found"}
        os.kill(old[0], signal.SIGKILL)
        start = time.monotonic()
        while time.monotonic() - start < 60:
            new = [p.pid for p, r in server_tree(self.server.proc.pid) if r == "sidecar"]
            if new and new[0] not in old:
                return {"pid": old[0], "new_pid": new[0], "restart_s": time.monotonic() - start}
            time.sleep(0.5)
        return {"pid": old[0], "error": "no new sidecar within 60 s"}

    def kill_server(self) -> dict[str, Any]:
        assert self.server is not None
        old = self.server
        t_kill = self.now()
        os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait()
        old.log.close()
        self.window = (t_kill, float("inf"))
        self.generation += 1
        try:
            new = self.start_server()
        except Exception as e:  # the run ends; what it recorded is still the result
            return {"error": f"restart failed: {type(e).__name__}: {str(e)[-2000:]}"}
        self.server = new
        healthy = self.now()
        self.window = (t_kill, healthy + RESTART_GRACE_S)
        return {"healthy_t": healthy, "restart_s": healthy - t_kill, "startup_s": new.startup_s}

    def reap(self) -> list[int]:
        """SIGKILL any process of ours still alive after the stop; returns their pids."""
        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
                    p.kill()
            except psutil.Error:
                continue
        return left

    # -- the whole run

    def run(self) -> dict[str, Any]:
        args = self.args
        total_s = 60.0 * args.minutes
        calibration = None
        if args.levels:
            calibration = self.calibrate()
            print(f"calibration: {json.dumps(calibration)}", flush=True)
        self.server = self.start_server()
        self.t0 = time.monotonic()
        startup_s = self.server.startup_s
        self.start_threads()
        end_s = total_s
        aborted = None
        try:
            for t, action in fault_schedule(total_s, args.pause_s):
                if self.stop.wait(max(0.0, t - self.now())):
                    break
                print(f"[{self.now():7.1f} s] {action}", flush=True)
                self.fault(action)
                if self.faults[-1].get("error"):
                    print(f"  {self.faults[-1]['error'][:500]}", flush=True)
                if self.window is not None and self.window[1] == float("inf"):
                    aborted = "restart failed"
                    break
            if aborted is None:
                if self.window is not None:
                    end_s = max(total_s, self.window[1] + 60.0)
                self.stop.wait(max(0.0, end_s - self.now()))
                self.sample("final")
        finally:
            end_s = self.now()
            unfinished = self.stop_threads()
            with self.lock:  # requests cut by our own stop below are not results
                done, samples = list(self.done), list(self.samples)
            if self.server is not None:
                self.server.stop()
            leftover = self.reap()
        stored = read_store_ids(self.state / "feedback.sqlite3")
        summary = summarize_soak(samples, done, self.acked, stored, self.bad, self.faults,
                                 self.window, args.minutes, end_s)  # fmt: skip
        loads = [x["loadavg_1m"] for x in samples]
        summary.update(
            startup_s=startup_s,
            requests_unfinished_at_end=unfinished,
            loadavg_1m_max=max(loads) if loads else None,
            loadavg_1m_mean=sum(loads) / len(loads) if loads else None,
            feedback_post_errors_outside_restart=sum(
                not in_window(t, self.window) for t, _ in self.feedback_errors
            ),
            feedback_error_samples=[e for _, e in self.feedback_errors[:5]],
            store_rows_total=len(stored),
            server_log_tracebacks={
                p.name: p.read_text(errors="replace").count("Traceback")
                for p in sorted(self.out.glob("server-*.log"))
            },
            leftover_processes=leftover,
            aborted=aborted,
        )
        for x in samples:
            x["in_restart_window"] = overlaps(x["t"], x["t_end"], self.window)
        return {
            "samples": samples,
            "latency": latency_series(done, end_s, SAMPLE_EVERY_S),
            "faults": self.faults,
            # JSON has no infinity: a window that never closed (failed restart) ends in null
            "restart_window": (
                [w if w != float("inf") else None for w in self.window] if self.window else None
            ),
            "bad_input": [{"t": round(t, 1), "body": n, "status": c} for t, n, c in self.bad],
            "calibration": calibration,
            "summary": summary,
            "goals": goals(summary),
            "settings": {k: v for k, v in vars(args).items()},
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }


def read_store_ids(path: Path) -> set[int]:
    """Ids of every feedback row in the SQLite store (read after the server stopped)."""
    if not path.is_file():
        return set()
    conn = sqlite3.connect(str(path))
    try:
        return {row[0] for row in conn.execute("SELECT id FROM feedback")}
    finally:
        conn.close()


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS, latency p99 and adapter version / train steps over time, faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    samples = result["samples"]
    minutes = [s["t"] / 60 for s in samples]

    def series(get: Any) -> list[float]:  # NaN where a sample has no value: breaks the line
        values = [get(s) for s in samples]
        return [nan if v is None else v for v in values]

    fig, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    for role in ("scheduler", "total", "sidecar"):
        axes[0].plot(minutes, series(lambda s, r=role: s["rss_mb"].get(r)), marker=".",
                     label=f"{role} RSS")  # fmt: skip
    axes[0].set_ylabel("MB")
    for key, label in (("ttft_p99_ms", "TTFT p99"), ("tbt_p99_ms", "TBT p99")):
        pts = [(b["t"] / 60, b[key]) for b in result["latency"]]
        axes[1].plot([t for t, _ in pts], [nan if v is None else v for _, v in pts],
                     marker=".", label=f"{label}, client, per 30 s")  # fmt: skip
        axes[1].plot(minutes, series(lambda s, k=key: (s.get("slo") or {}).get(k)),
                     linestyle="--", label=f"{label}, server's running")  # fmt: skip
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms")
    axes[2].step(minutes, series(lambda s: s.get("adapter_version")), where="post",
                 label="adapter version")  # fmt: skip
    cum = cumulative_steps(samples)
    axes[2].step([t / 60 for t, _ in cum], [c for _, c in cum], where="post",
                 label="train steps (cumulative)")  # fmt: skip
    axes[2].set_ylabel("count")
    axes[2].set_xlabel("minutes")
    window = result["restart_window"]
    for ax in axes:
        for f in result["faults"]:
            ax.axvline(f["t"] / 60, color="red", linestyle="--", linewidth=0.9)
            if "t_resume" in f:
                ax.axvline(f["t_resume"] / 60, color="green", linestyle=":", linewidth=0.9)
        if window and window[1] is not None:
            ax.axvspan(window[0] / 60, window[1] / 60, color="grey", alpha=0.15)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    for f in result["faults"]:
        axes[0].annotate(f" {f['name']}", (f["t"] / 60, 0.02), xycoords=("data", "axes fraction"),
                         fontsize=8, rotation=90, va="bottom", ha="right")  # fmt: skip
    fig.suptitle("soak: faults dashed red (resume dotted green), restart window shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    keys = ("requests_ok", "requests_failed", "failed_outside_restart", "status_non_200",
            "feedback_posted", "feedback_stored", "feedback_lost", "bad_input_sent",
            "bad_input_not_4xx", "train_steps", "steps_after_each_fault", "steps_during_pause",
            "cost_model_max_abs_pct_error", "rss_mb_first", "rss_mb_last",
            "rss_growth_mb_per_h_after_10min", "restart_s", "startup_s", "certainly_share",
            "requests_unfinished_at_end", "loadavg_1m_mean", "leftover_processes")  # fmt: skip
    for k in keys:
        v = s.get(k)
        print(f"{k:34} {round(v, 2) if isinstance(v, float) else v}")
    print("goals (60-minute run):")
    for name, g in result["goals"].items():
        v = g["value"]
        print(
            f"  {'met ' if g['met'] else 'MISS'} {name:40} {round(v, 2) if isinstance(v, float) else v} (target {g['target']})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="--minutes 15")
    parser.add_argument("--out", required=True, help="folder for soak.json, soak.png, logs")
    parser.add_argument("--state-dir", default=None, help="default: DIR/state, emptied first")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--streams", type=int, default=2,
                        help="closed-loop chat clients (set by the calibration unless --levels '')")  # fmt: skip
    parser.add_argument("--levels", default="1,2",
                        help="stream counts the inference-only calibration tries; '' skips it")  # fmt: skip
    parser.add_argument("--calibrate-s", type=float, default=90.0, help="seconds per level")
    parser.add_argument("--slo-tbt-ms", type=float, default=None, help="default: SGLang-side 200")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="default: 2000")
    parser.add_argument("--think-s", type=float, default=2.0, help="pause between requests")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--feedback-every-s", type=float, default=5.0)
    parser.add_argument("--bad-every-s", type=float, default=20.0)
    parser.add_argument("--pause-s", type=float, default=20.0, help="resume this long after")
    args = parser.parse_args()
    if args.quick:
        args.minutes = 15.0
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.state_dir:
        state = Path(args.state_dir)
    else:
        state = out / "state"
        shutil.rmtree(state, ignore_errors=True)
    result = Soak(args, out, state).run()
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "soak.png")
    print_table(result)
    print(json.dumps({"goals": result["goals"]}, indent=1))


if __name__ == "__main__":
    main()
