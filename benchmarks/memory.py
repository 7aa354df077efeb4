"""Memory: where the scheduler's RSS goes under steady load, training off against on.

    python -m benchmarks.memory --out DIR [--minutes-per-phase 8] [--streams 1]
                                [--think-s 3] [--max-tokens 48] [--feedback-every-s 5]
                                [--trim-s 0]

One `mace-sgl serve --mace-train --mace-policy mace` on the embedded default model, state
in DIR/state (emptied first). The same load runs for the whole run: --streams
closed-loop streaming chat clients (half the requests on the live adapter, greedy,
ignore_eos) and one feedback pair every --feedback-every-s. Two phases of the same
length in the same server process, so that only training differs:
- `off`: training paused (POST /mace/train/pause before the load starts); feedback
  queues up, no training unit runs: the training-off control;
- `on`: POST /mace/train/resume; the trainer works through the queue and what keeps
  arriving (the think time leaves idle gaps, so steps complete whatever the SLO says).

Every 15 s it reads the scheduler's `memory` from /mace/status (mace_sgl/memstats.py:
RSS, glibc heap in use and free, Python blocks, GC-tracked objects) and the RSS of every
process of the server tree. --trim-s passes --mace-malloc-trim-s (0 = never trim).

Output: DIR/memory.json {"samples", "phases": {off|on: {"minutes", "train_steps",
"slope_mb_per_h": {rss_mb, heap_in_use_mb, heap_free_mb}, "slope_per_h": {python_blocks,
gc_objects}, "first", "last"}}, "settings", "machine", "date"}. Slopes are least-squares
lines through the samples from the phase's second minute (the first minute of `off` also
holds the server's warm-up) to its end. A leak or an unbounded cache shows as a growing
`heap_in_use_mb` (with `gc_objects` when it is Python objects), fragmentation as a
growing `heap_free_mb` with a flat `heap_in_use_mb`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.colocate import pair
from benchmarks.loadgen import stream_chat
from benchmarks.serve_smoke import machine
from benchmarks.soak import chat_body, slope_per_hour, tree_rss
from mace_sgl.launcher import Server

SAMPLE_EVERY_S = 15.0
SKIP_S = 60.0  # start of each phase left out of its slopes
MB_KEYS = ("rss_mb", "heap_in_use_mb", "heap_free_mb")
COUNT_KEYS = ("python_blocks", "gc_objects")


def phase_summary(samples: list[dict], phase: str, start_s: float, end_s: float) -> dict:
    """Slopes (per hour) and first/last values of the scheduler's memory in one phase."""
    rows = [
        s
        for s in samples
        if s["phase"] == phase and start_s + SKIP_S <= s["t"] <= end_s and s.get("memory")
    ]

    def slope(key: str) -> float | None:
        pts = [(s["t"], s["memory"][key]) for s in rows if s["memory"].get(key) is not None]
        value = slope_per_hour(pts)
        return None if value is None else round(value, 1)

    steps = [s["train_steps"] for s in samples if s["phase"] == phase and "train_steps" in s]
    return {
        "minutes": round((end_s - start_s) / 60.0, 2),
        "samples": len(rows),
        "train_steps": (max(steps) - min(steps)) if steps else None,
        "slope_mb_per_h": {k: slope(k) for k in MB_KEYS},
        "slope_per_h": {k: slope(k) for k in COUNT_KEYS},
        "first": rows[0]["memory"] if rows else None,
        "last": rows[-1]["memory"] if rows else None,
    }


class MemoryRun:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.stop = threading.Event()
        self.phase = "off"
        self.samples: list[dict] = []
        self.requests = {"ok": 0, "failed": 0}
        self.server: Server | None = None
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _client(self, k: int) -> None:
        i = k
        while not self.stop.is_set():
            assert self.server is not None
            r = stream_chat(self.server.url, chat_body(i, self.args.max_tokens))
            self.requests["failed" if r.error else "ok"] += 1
            i += self.args.streams
            self.stop.wait(self.args.think_s)

    def _feedback(self) -> None:
        k = 0
        while not self.stop.wait(self.args.feedback_every_s):
            assert self.server is not None
            try:
                requests.post(self.server.url + "/mace/feedback", json=pair(k), timeout=60)
            except requests.RequestException:
                pass
            k += 1

    def sample(self) -> None:
        assert self.server is not None
        rec: dict[str, Any] = {"t": round(self.now(), 1), "phase": self.phase}
        try:
            body = requests.get(self.server.url + "/mace/status", timeout=30).json()
            sched = next(s for s in body.get("schedulers") or [] if s)
            rec["memory"] = sched.get("memory")
            rec["train_steps"] = body.get("train_steps")
            rec["queue_depth"] = body.get("queue_depth")
        except (requests.RequestException, ValueError, StopIteration) as e:
            rec["error"] = type(e).__name__
        rec["rss_mb"], _ = tree_rss(self.server.proc.pid)
        self.samples.append(rec)
        m = rec.get("memory") or {}
        print(
            f"[{rec['t']:7.1f} s] {self.phase:3s} rss {m.get('rss_mb', 0):7.1f} MB "
            f"in use {m.get('heap_in_use_mb', 0):7.1f} free {m.get('heap_free_mb', 0):6.1f} "
            f"gc {m.get('gc_objects', 0)} steps {rec.get('train_steps')}",
            flush=True,
        )

    def run(self) -> dict[str, Any]:
        args = self.args
        state = self.out / "state"
        shutil.rmtree(state, ignore_errors=True)
        flags = ["--log-level", "warning", "--mace-train", "--mace-policy", "mace",
                 "--mace-state-dir", str(state), "--mace-malloc-trim-s", str(args.trim_s)]  # fmt: skip
        self.server = Server(flags, self.out / "server.log", timeout_s=600)
        try:
            requests.post(self.server.url + "/mace/train/pause", json={}, timeout=60)
            self.t0 = time.monotonic()
            threads = [threading.Thread(target=self._client, args=(k,), daemon=True)
                       for k in range(args.streams)]  # fmt: skip
            threads.append(threading.Thread(target=self._feedback, daemon=True))
            for th in threads:
                th.start()
            phase_s = 60.0 * args.minutes_per_phase
            bounds = {"off": (0.0, phase_s), "on": (phase_s, 2 * phase_s)}
            k = 0
            while self.now() < 2 * phase_s:
                if self.phase == "off" and self.now() >= phase_s:
                    self.phase = "on"
                    requests.post(self.server.url + "/mace/train/resume", json={}, timeout=60)
                self.sample()
                k += 1
                self.stop.wait(max(0.0, k * SAMPLE_EVERY_S - self.now()))
            self.stop.set()
            for th in threads:
                th.join(timeout=60)
        finally:
            self.stop.set()
            self.server.stop()
        phases = {p: phase_summary(self.samples, p, *b) for p, b in bounds.items()}
        return {
            "samples": self.samples,
            "phases": phases,
            "requests": self.requests,
            "settings": vars(args),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes-per-phase", type=float, default=8.0)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--think-s", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--feedback-every-s", type=float, default=5.0)
    parser.add_argument("--trim-s", type=float, default=0.0, help="--mace-malloc-trim-s")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = MemoryRun(args, out).run()
    (out / "memory.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"phases": result["phases"], "requests": result["requests"]}, indent=1))


if __name__ == "__main__":
    main()
