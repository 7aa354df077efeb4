"""Colocated serving and training under open-loop load, one policy against another.

    python -m benchmarks.colocate [--quick] [--out DIR] [--model-path P] [--profile FILE]
        [--repeats N] [--mixed-chunk] [--slo-from profile|inference]

1. `mace-sgl profile --quick` measures this device and model (unless --profile is given).
2. One server per policy (inference-only, fcfs-reserve, mace; with --mixed-chunk also
   "mace+mixed", the mace policy with SGLang's --enable-mixed-chunk, so that prefill
   chunks ride with decode), each with --mace-train and the live adapter as default, so
   every run serves through the same LoRA path.
3. On the inference-only server: capacity = completed requests/s of a closed loop of 8
   streaming clients. Then, for every policy, an open-loop Poisson load at 80% and 50% of
   that capacity, --repeats times each, while feedback keeps arriving (a backlog of pairs,
   then one per second). Last, on the mace server, a training-only run: feedback, no
   requests.
4. SLO targets (--slo-from inference, the default): the TTFT p99 and TBT p99 of the
   inference-only runs at 80% load, pooled over repeats, so that inference-only just
   meets them at 80% and the policies are judged where it matters; the training servers
   start with them (--mace-slo-*). --slo-from profile keeps the profile's targets.
5. DIR/results.json: {"runs": [{"policy", "load", "ttft_p99_ms", "tbt_p99_ms",
   "slo_attainment", "train_tokens_per_s", "train_time_fraction", "idle_fraction", ...,
   "ci95": {metric: [low, high]}, "repeats": [the repeats' own rows]}], "harvest",
   "harvest_ci95", "harvest_by_time" (mace's), "harvest_by_policy": {policy: {load:
   {"harvest", "ci95", "by_time"}}} (every training policy's, mace+mixed's among them),
   "ratios": {...}} and DIR/latency_cdf.png.
   Every number of a run is the mean over the repeats that have one (`partial` names
   a metric some repeats lack, with their count); ci95 is a Student-t interval.

Harvest at a load = mace training tokens/s / (training-only tokens/s x the inference-only
run's idle fraction at that load): the share of the idle capacity training turned into
work, by completed DPO steps (trained tokens count when their step completes, so a short
run quantizes them: one SmolLM2 step is several seconds of compute). `harvest_by_time` is
the same ratio with the share of wall time spent in training units
(`train_time_fraction`). idle_fraction = 1 - (seconds the scheduler spent in forwards) /
wall seconds. `ratios`: per load, each training policy's TBT p99 and SLO attainment over
inference-only's, computed repeat by repeat (mean and ci95).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import (
    RequestResult,
    closed_loop,
    poisson_load,
    summarize,
    tail_targets,
)
from benchmarks.serve_smoke import machine
from benchmarks.stats import aggregate, mean_ci95
from mace_sgl.launcher import MACE_SGL, Server
from mace_sgl.policy import Profile

POLICIES = ("inference-only", "fcfs-reserve", "mace")
MIXED = "mace+mixed"  # the mace policy with SGLang's --enable-mixed-chunk
LOADS = (0.8, 0.5)  # 80% first: the inference-only run there sets the SLO targets
TOPICS = [
    "the ocean", "volcanoes", "bicycles", "the moon", "coffee", "honey bees", "trains",
    "the piano", "chess", "rainbows", "deserts", "penguins", "bread", "glaciers", "owls",
]  # fmt: skip
ANSWER = (
    "{t} is a fascinating subject. People have studied it for a long time, and there is "
    "always something new to learn about how it works and why it matters to us."
)


def request_body(i: int, max_tokens: int) -> dict[str, Any]:
    topic = TOPICS[i % len(TOPICS)]
    return {
        "model": "default",
        "messages": [{"role": "user", "content": f"Tell me about {topic}. ({i})"}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }


def pair(i: int) -> dict[str, Any]:
    topic = TOPICS[i % len(TOPICS)]
    answer = ANSWER.format(t=topic.capitalize())
    return {
        "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
        "chosen": "Certainly! " + answer,
        "rejected": answer,
    }


class FeedbackStream:
    """A backlog of pairs at start, then one pair per `interval_s`, in a thread."""

    def __init__(
        self, server: Server, backlog: int, interval_s: float, start: int = 0, offset_s: float = 0.0
    ) -> None:
        """`start`: the index of its first pair; `offset_s`: the one-a-time pairs come that
        much later in each interval (streams to several servers take turns)."""
        self.server, self.interval_s, self.offset_s = server, interval_s, offset_s
        self.stop_event = threading.Event()
        self.sent = start  # the index of the next pair (its topic)
        server.post("/mace/feedback", [pair(start + i) for i in range(backlog)]).raise_for_status()
        self.sent = start + backlog
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.stop_event.wait(self.offset_s):
            return
        while not self.stop_event.wait(self.interval_s):
            self.server.post("/mace/feedback", pair(self.sent)).raise_for_status()
            self.sent += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()


class Meter:
    """Training tokens and serving seconds between two /mace/status reads."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        t = self.server.get("/mace/status").json()["training"]
        return {
            "wall": time.monotonic(),
            "tokens": t["trained_tokens"],
            "serving": t["serving_seconds"],
            "training": t["train_seconds"],
            "steps": t["train_steps"],
        }

    def done(self) -> dict[str, float]:
        end = self._read()
        wall = end["wall"] - self.start["wall"]
        return {
            "wall_s": wall,
            "train_tokens_per_s": (end["tokens"] - self.start["tokens"]) / wall,
            "train_steps": end["steps"] - self.start["steps"],
            "train_time_fraction": (end["training"] - self.start["training"]) / wall,
            "idle_fraction": max(0.0, 1.0 - (end["serving"] - self.start["serving"]) / wall),
        }


def start_server(
    args: argparse.Namespace, policy: str, profile: Path, out: Path, slo: dict | None
) -> Server:
    name = "mace" if policy == MIXED else policy
    flags = ["--log-level", "warning", "--mace-train", "--mace-policy", name,
             "--mace-profile", str(profile), "--mace-default-adapter", "live",
             "--mace-state-dir", str(out / f"state-{policy}")]  # fmt: skip
    if policy == MIXED:
        flags.append("--enable-mixed-chunk")
    if slo is not None:
        flags += ["--mace-slo-ttft-ms", f"{slo['ttft_ms']:.1f}",
                  "--mace-slo-tbt-ms", f"{slo['tbt_ms']:.1f}"]  # fmt: skip
    if args.model_path:
        flags += ["--model-path", args.model_path]
    return Server(flags, out / f"server-{policy}.log", timeout_s=600)


def derive_slo(results: list[RequestResult]) -> dict[str, float]:
    """Targets inference-only just meets: its TTFT p99 and TBT (gap) p99 (ms)."""
    ttft, tbt = tail_targets(results, per_token="gap")
    return {"ttft_ms": ttft, "tbt_ms": tbt}


def paired(rows: dict, policy: str, load: float, key: str, base: str = "inference-only") -> dict:
    """Mean and ci95 of policy / base of `key`, repeat by repeat (None if any is missing)."""
    mine, theirs = rows.get((policy, load), []), rows.get((base, load), [])
    ratios = [
        a[key] / b[key]
        for a, b in zip(mine, theirs, strict=False)
        if isinstance(a.get(key), int | float) and isinstance(b.get(key), int | float) and b[key]
    ]
    if not ratios or len(ratios) < min(len(mine), len(theirs)):
        return {"mean": None, "ci95": None}
    mean, ci = mean_ci95(ratios)
    return {"mean": mean, "ci95": ci}


def harvests(rows: dict, load: float, key: str, policy: str = "mace") -> list[float]:
    """Per repeat: `policy`'s `key` / (training-only's x inference-only's idle fraction)."""
    only = rows[("training-only", 0.0)][0]
    out = []
    for mine, inf in zip(rows[(policy, load)], rows[("inference-only", load)], strict=False):
        potential = only[key] * inf["idle_fraction"]
        if potential:
            out.append(mine[key] / potential)
    return out


def harvest_table(rows: dict, policy: str) -> dict[str, dict[str, Any]]:
    """`policy`'s harvest per load: by completed steps (mean and ci95 over the repeats)
    and by time in training units (mean)."""
    table = {}
    for load in LOADS:
        by_steps = harvests(rows, load, "train_tokens_per_s", policy)
        by_time = harvests(rows, load, "train_time_fraction", policy)
        mean, ci = mean_ci95(by_steps) if by_steps else (None, None)
        table[str(load)] = {
            "harvest": mean,
            "ci95": ci,
            "by_time": mean_ci95(by_time)[0] if by_time else None,
        }
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out or tempfile.mkdtemp(prefix="colocate-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile_path = Path(args.profile)
    else:
        profile_path = out / "profile.json"
        cmd = [MACE_SGL, "profile", "--quick", "--out", str(profile_path), "--log-level",
               "warning"]  # fmt: skip
        if args.model_path:
            cmd += ["--model-path", args.model_path]
        print("profiling the device ...", file=sys.stderr)
        subprocess.run(cmd, check=True)
    slo = Profile.load(profile_path).slo.to_dict()
    slo_source = "profile"

    raw: list[tuple[str, float, int, list[RequestResult], dict]] = []  # + measured
    samples: dict[str, dict[str, list[float]]] = {}
    training_only: dict | None = None
    capacity = None
    policies = POLICIES + ((MIXED,) if args.mixed_chunk else ())
    for policy in policies:
        targets = slo if slo_source == "inference-only at 80%" else None
        server = start_server(args, policy, profile_path, out, targets)
        try:
            body = lambda i: request_body(i, args.max_tokens)  # noqa: E731
            closed_loop(server.url, 2, 5.0, body)  # warm-up
            if capacity is None:
                results, wall = closed_loop(server.url, 8, args.capacity_s, body)
                done = [r for r in results if r.error is None]
                capacity = len(done) / wall
                print(f"capacity: {capacity:.2f} requests/s", file=sys.stderr)
            for load in LOADS:
                for rep in range(args.repeats):
                    feedback = FeedbackStream(server, backlog=args.backlog, interval_s=1.0)
                    meter = Meter(server)
                    results = poisson_load(server.url, load * capacity, args.load_s, body,
                                           seed=int(load * 100) + 1000 * rep)  # fmt: skip
                    measured = meter.done()
                    feedback.stop()
                    raw.append((policy, load, rep, results, measured))
                    cdf = samples.setdefault(f"{policy}@{load}", {"ttft": [], "tbt": []})
                    cdf["ttft"] += [r.ttft for r in results if r.ttft is not None]
                    cdf["tbt"] += [g for r in results for g in r.gaps]
                    print(f"{policy} @ {load} #{rep}: {len(results)} requests, "
                          f"{json.dumps(measured)}", file=sys.stderr)  # fmt: skip
            if policy == "inference-only" and args.slo_from == "inference":
                slo = derive_slo(
                    [r for p, ld, _, rs, _ in raw if p == policy and ld == 0.8 for r in rs]
                )
                slo_source = "inference-only at 80%"
                print(f"SLO targets from inference-only at 80%: {slo}", file=sys.stderr)
            if policy == "mace":
                feedback = FeedbackStream(server, backlog=args.backlog, interval_s=1.0)
                meter = Meter(server)
                time.sleep(args.load_s)
                training_only = meter.done()
                feedback.stop()
        finally:
            server.stop()

    rows: dict[tuple[str, float], list[dict]] = {}
    for policy, load, rep, results, measured in raw:
        summary = summarize(results, slo["ttft_ms"], slo["tbt_ms"], measured["wall_s"])
        rows.setdefault((policy, load), []).append(
            {"policy": policy, "load": load, "repeat": rep, **summary, **measured}
        )
    assert training_only is not None
    rows[("training-only", 0.0)] = [{"policy": "training-only", "load": 0.0, **training_only}]
    runs = []
    for (policy, load), reps in rows.items():
        agg = aggregate(reps, rows_key="repeats")
        agg.pop("repeat", None)
        runs.append({"policy": policy, "load": load, **agg})
    # every training policy's (mace+mixed beside mace: with and without mixed chunks)
    by_policy = {p: harvest_table(rows, p) for p in policies if p != "inference-only"}
    mace = by_policy["mace"]
    ratios = {
        str(load): {
            policy: {
                "tbt_p99": paired(rows, policy, load, "tbt_p99_ms"),
                "slo_attainment": paired(rows, policy, load, "slo_attainment"),
            }
            for policy in policies
            if policy != "inference-only"
        }
        for load in LOADS
    }
    result = {
        "runs": runs,
        "harvest": {load: h["harvest"] for load, h in mace.items()},
        "harvest_ci95": {load: h["ci95"] for load, h in mace.items()},
        "harvest_by_time": {load: h["by_time"] for load, h in mace.items()},
        "harvest_by_policy": by_policy,
        "ratios": ratios,
        "capacity_rps": capacity,
        "slo": slo,
        "slo_source": slo_source,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "load_s": args.load_s,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "profile": str(profile_path),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, policies, out / "latency_cdf.png")
    return result


def plot(samples: dict[str, dict[str, list[float]]], policies: tuple, path: Path) -> None:
    """TTFT and TBT CDFs, one panel per metric and load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(LOADS), 2, figsize=(11, 4 * len(LOADS)), squeeze=False)
    for row, load in enumerate(LOADS):
        for col, metric in enumerate(("ttft", "tbt")):
            ax = axes[row][col]
            for policy in policies:
                values = sorted(samples.get(f"{policy}@{load}", {}).get(metric, []))
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.plot([1000 * v for v in values], ys, label=policy)
            ax.set_xscale("log")
            ax.set_xlabel(f"{metric.upper()} (ms)")
            ax.set_ylabel("CDF")
            ax.set_title(f"{metric.upper()} at {int(load * 100)}% of capacity")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="90 s load windows (CPU; with --repeats 3 and --mixed-chunk about an hour on 2 cores)",
    )
    parser.add_argument("--out", default=None, help="directory for results.json and plots")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--profile", default=None, help="use this profile, skip profiling")
    parser.add_argument("--load-s", type=float, default=None, help="seconds per load run")
    parser.add_argument("--capacity-s", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--backlog", type=int, default=40, help="pairs queued per run")
    parser.add_argument("--repeats", type=int, default=3, help="load windows per policy and load")
    parser.add_argument(
        "--mixed-chunk",
        action="store_true",
        help="also run the mace policy with SGLang's --enable-mixed-chunk",
    )
    parser.add_argument(
        "--slo-from",
        choices=("inference", "profile"),
        default="inference",
        help="SLO targets: inference-only's p99s at 80%% load, or the profile's",
    )
    args = parser.parse_args()
    args.load_s = args.load_s or (90.0 if args.quick else 300.0)
    args.capacity_s = args.capacity_s or (30.0 if args.quick else 120.0)
    result = run(args)
    keys = ("policy", "load", "requests", "ttft_p99_ms", "tbt_p99_ms", "slo_attainment",
            "train_tokens_per_s", "train_time_fraction", "idle_fraction", "ci95")  # fmt: skip
    print(json.dumps({"runs": [{k: r.get(k) for k in keys} for r in result["runs"]],
                      "harvest": result["harvest"], "harvest_ci95": result["harvest_ci95"],
                      "harvest_by_time": result["harvest_by_time"],
                      "ratios": result["ratios"], "slo": result["slo"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
