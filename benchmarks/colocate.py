"""Colocated serving and training under open-loop load, one policy against another.

    python -m benchmarks.colocate [--quick] [--out DIR] [--model-path P] [--profile FILE]

1. `mace-sgl profile --quick` measures this device and model (unless --profile is given);
   its SLO targets hold for every run.
2. One server per policy (inference-only, fcfs-reserve, mace), each with --mace-train
   and the live adapter as default, so every run serves through the same LoRA path.
3. On the inference-only server: capacity = completed requests/s of a closed loop of 8
   streaming clients. Then, for every policy, an open-loop Poisson load at 50% and 80%
   of that capacity, while feedback keeps arriving (a backlog of pairs, then one per
   second). Last, on the mace server, a training-only run: feedback, no requests.
4. DIR/results.json: {"runs": [{"policy", "load", "ttft_p99_ms", "tbt_p99_ms",
   "slo_attainment", "train_tokens_per_s", "idle_fraction", ...}], "harvest": {...}} and
   DIR/latency_cdf.png (TTFT and TBT CDFs per policy and load).

Harvest at a load = mace training tokens/s / (training-only tokens/s x the inference-only
run's idle fraction at that load): the share of the idle capacity training turned into
work. idle_fraction = 1 - (seconds the scheduler spent in forwards) / wall seconds.
Training tokens count when their DPO step completes, so a short run on a slow device
quantizes them (one SmolLM2 step is several seconds of compute); `harvest_by_time` is the
same ratio with the share of wall time spent in training units (`train_time_fraction`).
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

from benchmarks.loadgen import closed_loop, poisson_load, summarize
from benchmarks.serve_smoke import machine
from mace_sgl.launcher import MACE_SGL, Server
from mace_sgl.policy import Profile

POLICIES = ("inference-only", "fcfs-reserve", "mace")
LOADS = (0.5, 0.8)
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

    def __init__(self, server: Server, backlog: int, interval_s: float) -> None:
        self.server, self.interval_s = server, interval_s
        self.stop_event = threading.Event()
        self.sent = 0
        server.post("/mace/feedback", [pair(i) for i in range(backlog)]).raise_for_status()
        self.sent = backlog
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
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


def start_server(args: argparse.Namespace, policy: str, profile: Path, out: Path) -> Server:
    flags = ["--log-level", "warning", "--mace-train", "--mace-policy", policy,
             "--mace-profile", str(profile), "--mace-default-adapter", "live",
             "--mace-state-dir", str(out / f"state-{policy}")]  # fmt: skip
    if args.model_path:
        flags += ["--model-path", args.model_path]
    return Server(flags, out / f"server-{policy}.log", timeout_s=600)


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
    slo = Profile.load(profile_path).slo
    print(f"SLO targets: TTFT {slo.ttft_ms} ms, TBT {slo.tbt_ms} ms", file=sys.stderr)

    runs: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}
    capacity = None
    for policy in POLICIES:
        server = start_server(args, policy, profile_path, out)
        try:
            body = lambda i: request_body(i, args.max_tokens)  # noqa: E731
            closed_loop(server.url, 2, 5.0, body)  # warm-up
            if capacity is None:
                results, wall = closed_loop(server.url, 8, args.capacity_s, body)
                done = [r for r in results if r.error is None]
                capacity = len(done) / wall
                print(f"capacity: {capacity:.2f} requests/s", file=sys.stderr)
            for load in LOADS:
                feedback = FeedbackStream(server, backlog=args.backlog, interval_s=1.0)
                meter = Meter(server)
                results = poisson_load(server.url, load * capacity, args.load_s, body,
                                       seed=int(load * 100))  # fmt: skip
                measured = meter.done()
                feedback.stop()
                summary = summarize(results, slo.ttft_ms, slo.tbt_ms, measured["wall_s"])
                row = {"policy": policy, "load": load, **summary, **measured}
                runs.append(row)
                samples[f"{policy}@{load}"] = {
                    "ttft": [r.ttft for r in results if r.ttft is not None],
                    "tbt": [g for r in results for g in r.gaps],
                }
                print(json.dumps(row), file=sys.stderr)
            if policy == "mace":
                feedback = FeedbackStream(server, backlog=args.backlog, interval_s=1.0)
                meter = Meter(server)
                time.sleep(args.load_s)
                measured = meter.done()
                feedback.stop()
                row = {"policy": "training-only", "load": 0.0, "ttft_p99_ms": None,
                       "tbt_p99_ms": None, "slo_attainment": None, **measured}  # fmt: skip
                runs.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            server.stop()

    by = {(r["policy"], r["load"]): r for r in runs}
    only = by[("training-only", 0.0)]
    harvest, harvest_by_time = {}, {}
    for load in LOADS:
        idle = by[("inference-only", load)]["idle_fraction"]
        mace = by[("mace", load)]
        potential = only["train_tokens_per_s"] * idle
        harvest[str(load)] = mace["train_tokens_per_s"] / potential if potential else None
        potential = only["train_time_fraction"] * idle
        harvest_by_time[str(load)] = mace["train_time_fraction"] / potential if potential else None
    result = {
        "runs": runs,
        "harvest": harvest,
        "harvest_by_time": harvest_by_time,
        "capacity_rps": capacity,
        "slo": slo.to_dict(),
        "max_tokens": args.max_tokens,
        "load_s": args.load_s,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "profile": str(profile_path),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, out / "latency_cdf.png")
    return result


def plot(samples: dict[str, dict[str, list[float]]], path: Path) -> None:
    """TTFT and TBT CDFs, one panel per metric and load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(LOADS), 2, figsize=(11, 4 * len(LOADS)), squeeze=False)
    for row, load in enumerate(LOADS):
        for col, metric in enumerate(("ttft", "tbt")):
            ax = axes[row][col]
            for policy in POLICIES:
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
    parser.add_argument("--quick", action="store_true", help="short runs (CPU, < 20 min)")
    parser.add_argument("--out", default=None, help="directory for results.json and plots")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--profile", default=None, help="use this profile, skip profiling")
    parser.add_argument("--load-s", type=float, default=None, help="seconds per load run")
    parser.add_argument("--capacity-s", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--backlog", type=int, default=40, help="pairs queued per run")
    args = parser.parse_args()
    args.load_s = args.load_s or (90.0 if args.quick else 300.0)
    args.capacity_s = args.capacity_s or (30.0 if args.quick else 120.0)
    result = run(args)
    keys = ("policy", "load", "ttft_p99_ms", "tbt_p99_ms", "slo_attainment",
            "train_tokens_per_s", "train_time_fraction", "idle_fraction")  # fmt: skip
    print(json.dumps({"runs": [{k: r.get(k) for k in keys} for r in result["runs"]],
                      "harvest": result["harvest"],
                      "harvest_by_time": result["harvest_by_time"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
