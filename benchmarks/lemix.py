"""Several replicas that serve and train: LeMix placement against its baselines.

    python -m benchmarks.lemix [--quick] [--out DIR] [--model-path P] [--load-s S]
        [--load-factor F | --rate R] [--sync-every-s T] [--methods a,b,...] [--repeats N]
        [--yardstick closed|held]

Every method is one `mace-sgl serve --dp-size 2 --mace-train` on this machine (2
replicas). On CPU each replica's scheduler runs on its half of the cores
(SGLANG_CPU_OMP_THREADS_BIND "0|1" on 2 cores; the plugin pins the scheduler's threads
there and sets torch's thread count to match, plugin/cpu.py bind_threads), while the HTTP,
controller, detokenizer and sidecar processes and this load generator float over all cores:

- `lemix`: `--mace-placement lemix` (the default): placement by predicted response time,
  serving first (replicas without training work while they hold the SLO, then a trainer
  that holds it), training leased to one replica at a time, every publish synced to the
  other at once;
- `round-robin`: `--mace-placement sglang --load-balance-method round_robin` (NaiveMix);
- `total-tokens`: `--mace-placement sglang --load-balance-method total_tokens`;
- `separate`: replica 0 only serves (every request carries `X-Data-Parallel-Rank: 0`),
  replica 1 only trains (`--mace-train-ranks 1`), and the adapter reaches replica 0 at
  most every --sync-every-s seconds (`--mace-sync-every-s`);
- `servers` (only when named in --methods): two `mace-sgl serve --dp-size 1` servers of
  one adapter group (`--mace-sync-addr` on loopback, `--mace-sync-world-size 2`), each
  scheduler on its half of the cores as with `--dp-size 2`, behind `mace-sgl router
  --policy power_of_two` (SGLang's router, which reads each server's /get_load, training
  work included); the load goes to the router, the feedback half to each server. The
  same two replicas as `lemix`, but as servers that sync over the group's store (its
  lease per tenant, trainer/lease.py) instead of one server's controller and sidecar.
- `lemix-floor` (only when named in --methods): `lemix` with `--mace-train-floor F`
  (--train-floor, default 0.1): a share of busy time that trains even when the SLO
  controller allows none. On 2 cores, at a load one replica cannot hold, the controller
  alone left co-located training no room in any run (README, 2026-12-03): this method
  shows what such a share costs in latency. With --floor-all, `round-robin` and
  `total-tokens` train with the same floor, so that placement alone differs from
  `lemix-floor`, and `paired` is taken against `lemix-floor` (also when `lemix` is not
  run; `paired_ref` names it).

First, on a `separate` server of its own, the capacity of ONE replica: completed
requests/s of a closed loop of --capacity-clients (default 16) streaming clients pinned
to replica 0 while replica 1 trains (on CPU a replica's step time barely grows with its
batch, so 8 clients measured well below what one replica holds). Its TTFT p50 and mean
time per output token (TPOT) p50 x 3 become the SLO targets (a replica under saturating
load, with slack), the same for every method and handed to every method's servers
(`--mace-slo-ttft-ms`, `--mace-slo-tbt-ms`) so their training reserve answers to them.
With --yardstick held, the same server then searches for the highest Poisson rate
replica 0 holds at those targets (attainment >= 0.9; --probe-steps trials of --probe-s
seconds, bisecting between 0.2x and 1x the closed-loop figure), and that rate is the
capacity: the closed loop measured 0.80-2.14 requests/s in four runs here, and one
replica then failed 1.3 requests/s open-loop after its closed loop did 2.14.
Then each method runs an open-loop Poisson load at --load-factor (default 1.2) x that
capacity (or --rate requests/s), a rate one replica alone cannot hold (`separate`'s
attainment shows whether it did), while feedback keeps arriving (a backlog, then one
pair per second), and /mace/status is polled every 0.5 s. A request still
running --drain-s after the last arrival counts as unfinished (an error, SLO missed), so
an overloaded method cannot stretch the run.

--repeats N runs every method N times, interleaved: round k runs the methods in an
order rotated by k (so no method always runs first, or after the same neighbour, on a
machine whose speed drifts) with Poisson seed 7 + k, each on a fresh server, against the
one capacity and SLO measured first. Each method's figures are then the means over its
runs, with `ci95` ([low, high], Student t) and its runs under `repeats`; `paired` gives,
for every other method, lemix's figure minus that method's within each round (runs
minutes apart share the machine's state), mean and ci95. One run per method was within
the run-to-run spread here: lemix vs round-robin attainment 0.89/0.06 and 1.00/1.00 in
two runs of the same command (README, 2026-12-03).

DIR/results.json: {"methods": {NAME: {"throughput_tok_s", "slo_attainment",
"ttft_p99_ms", "tbt_p99_ms", "train_tokens_per_s", "idle_fraction",
"adapter_staleness_s", ...}}, "capacity_rps", "slo", "machine", ...} and DIR/lemix.png.
train_tokens_per_s counts the tokens of completed DPO steps on both replicas;
idle_fraction is the mean over replicas of 1 - (serving + training seconds) / wall
seconds (each replica's own: `idle_by_replica`, and `train_share_by_replica`);
version_switch_skew_ms: for every version all replicas served, how far apart they began
serving it (each replica reports its time.monotonic() of the switch), median and max;
adapter_staleness_s is, averaged over the polls, how long the replica furthest behind
has been serving an older version than the newest one any replica published (0 when
all serve the newest). `threads`: each replica's cores and torch threads as its
scheduler reports them (/mace/status), and `cores_shared`: whether two replicas (with
`servers`, the two servers' schedulers) may run on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.colocate import FeedbackStream, request_body
from benchmarks.loadgen import closed_loop, percentile_ms, poisson_load, summarize
from benchmarks.serve_smoke import machine
from benchmarks.stats import aggregate, mean_ci95
from mace_sgl.cli import split_evenly
from mace_sgl.launcher import MACE_SGL, Server, free_port

METHODS = ("lemix", "round-robin", "total-tokens", "separate")
OPTIONAL = ("lemix-floor", "servers")  # run only when named in --methods
PAIRED = ("slo_attainment", "throughput_tok_s", "train_tokens_per_s", "tbt_p99_ms")
PIN = {"X-Data-Parallel-Rank": "0"}  # `separate`: requests go to the serving replica


def method_flags(
    method: str, sync_every_s: float, train_floor: float = 0.1, floor_all: bool = False
) -> list[str]:
    """`mace-sgl serve` flags of a method (besides the common ones). `floor_all`: the
    co-located baselines (round-robin, total-tokens) train with the same floor as
    `lemix-floor`, so that placement is the only difference between them."""
    if floor_all and method in ("round-robin", "total-tokens"):
        return [*method_flags(method, sync_every_s), "--mace-train-floor", str(train_floor)]
    return {
        "lemix": ["--mace-placement", "lemix"],
        "lemix-floor": ["--mace-placement", "lemix", "--mace-train-floor", str(train_floor)],
        "round-robin": ["--mace-placement", "sglang", "--load-balance-method", "round_robin"],
        "total-tokens": ["--mace-placement", "sglang", "--load-balance-method", "total_tokens"],
        "servers": [],  # one replica each: start_servers adds the group's flags
        "separate": [
            "--mace-placement",
            "sglang",
            "--mace-train-ranks",
            "1",
            "--mace-sync-every-s",
            str(sync_every_s),
        ],  # fmt: skip
    }[method]


def start_server(
    args: argparse.Namespace,
    method: str,
    out: Path,
    slo: dict[str, float] | None,
    name: str,
    dp_size: int = 2,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    abort: threading.Event | None = None,
) -> Server:
    """`slo`: the targets every method is judged by, handed to the server's MACE policy
    (`--mace-slo-*`) so its training reserve answers to the same targets, on the same
    basis: requests' mean time per output token (`--mace-slo-tbt-basis request`), as
    summarize() judges. Held to single-gap p99, the controller refused all training while
    every request met its SLO (README, 2026-12-03)."""
    flags = ["--log-level", "warning", "--dp-size", str(dp_size), "--mace-train", *(extra or []),
             "--mace-default-adapter", "live", "--mace-state-dir", str(out / f"state-{name}"),
             *method_flags(method, args.sync_every_s, args.train_floor,
                           args.floor_all)]  # fmt: skip
    if slo is not None:
        flags += ["--mace-slo-ttft-ms", f"{slo['ttft_ms']:.1f}",
                  "--mace-slo-tbt-ms", f"{slo['tbt_ms']:.1f}",
                  "--mace-slo-tbt-basis", "request"]  # fmt: skip
    if args.model_path:
        flags += ["--model-path", args.model_path]
    return Server(flags, out / f"server-{name}.log", env=env, timeout_s=900, abort=abort)


def start_servers(
    args: argparse.Namespace, out: Path, slo: dict[str, float] | None, name: str
) -> tuple[list[Server], Server]:
    """`servers`: two one-replica servers of one adapter group, each scheduler bound to
    its half of the cores (the split `--dp-size 2` makes), started together (each waits
    in the group's rendezvous for the other), and the router in front of them. One that
    fails stops the other's start at once: it would wait in the rendezvous for its
    peer up to its whole start timeout."""
    addr = f"127.0.0.1:{free_port()}"
    halves = split_evenly(sorted(os.sched_getaffinity(0)), 2)
    abort = threading.Event()
    first: list[BaseException] = []  # the failure that set `abort`: the cause

    def one(rank: int) -> Server:
        sync = ["--mace-sync-addr", addr, "--mace-sync-world-size", "2",
                "--mace-sync-rank", str(rank)]  # fmt: skip
        cores = {"SGLANG_CPU_OMP_THREADS_BIND": ",".join(map(str, halves[rank]))}
        try:
            return start_server(args, "servers", out, slo, f"{name}-{rank}", 1, sync, cores,
                                abort)  # fmt: skip
        except BaseException as e:
            if not abort.is_set():
                first.append(e)
            abort.set()
            raise

    try:
        with ThreadPoolExecutor(2) as ex:
            futures = [ex.submit(one, rank) for rank in (0, 1)]
    except BaseException:  # e.g. Ctrl-C while they start: stop both starts
        abort.set()
        raise
    servers = [f.result() for f in futures if f.exception() is None]
    failed = first or [f.exception() for f in futures if f.exception() is not None]
    router = None
    try:
        if failed:
            raise failed[0]
        router = start_router([s.url for s in servers], out / f"router-{name}.log")
    finally:
        if router is None:
            for s in servers:
                s.stop()
    return servers, router


def start_router(urls: list[str], log: Path, timeout_s: float = 120.0) -> Server:
    """`mace-sgl router --policy power_of_two` over `urls`, once every one is registered
    and healthy (the router registers its workers in the background after it is up)."""
    args = ["--policy", "power_of_two", "--prometheus-port", str(free_port()),
            "--worker-urls", *urls]  # fmt: skip
    router = Server(args, log, cmd=[MACE_SGL, "router"], timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            workers = router.get("/workers").json()["workers"]
            if sorted(w["url"] for w in workers if w["is_healthy"]) == sorted(urls):
                return router
        except Exception:  # not answering yet: the same bounded wait
            pass
        if time.monotonic() > deadline:
            router.stop()
            raise RuntimeError(f"the router did not register {urls} in {timeout_s} s")
        time.sleep(1.0)


def measure_capacity(
    args: argparse.Namespace, out: Path, body: Callable[[int], dict[str, Any]]
) -> tuple[float, dict[str, float], dict[str, Any] | None]:
    """ONE replica's capacity and the SLO targets, on a `separate` server of its own
    (replica 1 trains meanwhile): a closed loop of --capacity-clients pinned to replica 0.
    With --yardstick held, then, on the same server: the highest Poisson rate replica 0
    holds at those targets (`held_rate`), which becomes the capacity the load is scaled
    by; its trials come back as the third value (None with --yardstick closed)."""
    server = start_server(args, "separate", out, None, "capacity")
    held = None
    try:
        closed_loop(server.url, 2, 5.0, body, PIN)  # warm-up
        results, wall = closed_loop(server.url, args.capacity_clients, args.capacity_s, body, PIN)
        ok = [r for r in results if r.error is None and r.ttft is not None]
        capacity = len(ok) / wall
        slo = {
            "ttft_ms": 3 * percentile_ms([r.ttft for r in ok], 50),
            # Mean time per output token of each request, as summarize() judges it: single
            # gaps are no target, since under load the HTTP process delivers tokens in
            # bursts (a first run here saw a gap p50 of 0.02 ms).
            "tbt_ms": 3 * percentile_ms([r.tpot for r in ok if r.tpot is not None], 50),
        }
        if args.yardstick == "held":

            def attainment(rate: float) -> float:
                t0 = time.monotonic()
                got = poisson_load(server.url, rate, args.probe_s, body, seed=3,
                                   headers=PIN, drain_s=args.probe_s)  # fmt: skip
                wall_s = time.monotonic() - t0
                judged = summarize(got, slo["ttft_ms"], slo["tbt_ms"], wall_s)
                return judged["slo_attainment"] or 0.0  # None: nothing finished

            rate, trials = held_rate(attainment, 0.2 * capacity, capacity, args.probe_steps)
            held = {"closed_loop_rps": capacity, "held_rps": rate, "trials": trials,
                    "goal": HELD_GOAL, "probe_s": args.probe_s}  # fmt: skip
            capacity = rate
    finally:
        server.stop()
    return capacity, slo, held


HELD_GOAL = 0.9  # SLO attainment a rate must reach to count as held


def held_rate(
    attainment: Callable[[float], float], low: float, high: float, steps: int
) -> tuple[float, list[dict[str, float]]]:
    """The highest rate in [low, high] whose `attainment(rate)` reaches HELD_GOAL, by
    bisection over `steps` trials (the first at `high`; attainment is taken to fall as
    the rate rises); `low` when no trial reaches it. Returns it and the trials."""
    trials: list[dict[str, float]] = []
    held, rate = low, high
    for _ in range(steps):
        got = attainment(rate)
        trials.append({"rate_rps": rate, "slo_attainment": got})
        if got >= HELD_GOAL:
            held = max(held, rate)
            low = rate
        else:
            high = rate
        if low >= high:
            break
        rate = (low + high) / 2
    return held, trials


class Poller:
    """/mace/status every `every_s` in a thread: per-replica trained tokens, serving
    seconds and adapter versions, for training throughput, idle and staleness."""

    def __init__(self, servers: list[Server], every_s: float = 0.5) -> None:
        self.servers, self.every_s = servers, every_s
        self.samples: list[tuple[float, list[dict[str, Any]]]] = []
        self.stop_event = threading.Event()
        self.first_seen: dict[int, float] = {}  # version -> when a replica first served it
        # version -> {replica: its time.monotonic() when it began serving that version}
        self.switches: dict[int, dict[int, float]] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        # each replica's cores and torch threads, from the first poll (in replica order)
        self.threads: list[dict[str, Any] | None] | None = None
        self.prefill_at_start = self._prefill_tokens()
        self._poll()
        self.thread.start()

    def _prefill_tokens(self) -> list[int]:
        """Each replica's prefilled (uncached) tokens so far, from SGLang's /v1/loads
        (the servers' replicas in server order)."""
        tokens: list[int] = []
        for server in self.servers:
            try:
                loads = server.get("/v1/loads").json()["loads"]
            except Exception:
                return []
            ordered = sorted(loads, key=lambda x: x["dp_rank"])
            tokens += [int(x.get("total_prefill_uncached_tokens") or 0) for x in ordered]
        return tokens

    def _poll(self) -> None:
        ordered = []
        for server in self.servers:
            try:
                s = server.get("/mace/status").json()
            except Exception:  # a missed poll is a gap, not a failed benchmark
                return
            # By dp_rank: the list comes in the order the schedulers answered (servers
            # before 2026-12-05 did not sort it), and deltas between polls pair replicas.
            ordered += sorted(s["schedulers"], key=lambda x: (x or {}).get("dp_rank") or 0)
        now = time.monotonic()
        if self.threads is None:
            self.threads = [(sched or {}).get("threads") for sched in ordered]
        reps = []
        for sched in ordered:
            t = (sched or {}).get("trainer") or {}
            reps.append(
                {
                    "version": t.get("adapter_version", 0),
                    "tokens": t.get("trained_tokens", 0),
                    "serving": t.get("serving_seconds", 0.0),
                    "training": t.get("train_seconds", 0.0),
                    "steps": t.get("train_steps", 0),
                    "switched_at": t.get("adapter_switched_at"),
                }
            )
        for r in reps:
            self.first_seen.setdefault(r["version"], now)
        for rank, r in enumerate(reps):
            if r["version"] > 0 and r["switched_at"]:
                self.switches.setdefault(r["version"], {})[rank] = r["switched_at"]
        self.samples.append((now, reps))

    def _run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            self._poll()

    def done(self) -> dict[str, Any]:
        self.stop_event.set()
        self.thread.join()
        self._poll()
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        wall = t1 - t0
        tokens = sum(b["tokens"] - a["tokens"] for a, b in zip(first, last, strict=True))
        trained = [(b["training"] - a["training"]) / wall for a, b in zip(first, last, strict=True)]
        idle = [
            max(0.0, 1.0 - (b["serving"] - a["serving"]) / wall - share)
            for a, b, share in zip(first, last, trained, strict=True)
        ]
        stale = []
        for now, reps in self.samples:
            newest = max(r["version"] for r in reps)
            behind = min(r["version"] for r in reps)
            # Since the first version newer than what the furthest-behind replica serves
            # appeared anywhere (versions superseded between two polls are never seen).
            newer = [t for v, t in self.first_seen.items() if behind < v <= newest]
            stale.append(now - min(newer) if newer else 0.0)
        return {
            "wall_s": wall,
            "train_tokens_per_s": tokens / wall if wall else 0.0,
            "train_steps": sum(b["steps"] - a["steps"] for a, b in zip(first, last, strict=True)),
            "idle_fraction": sum(idle) / len(idle),
            "adapter_staleness_s": sum(stale) / len(stale),
            "version_switch_skew_ms": skew_summary(self.switches, len(last)),
            "versions": [r["version"] for r in last],
            # Where the requests went: each replica's share of the tokens prefilled
            # during the run, each replica's own idle fraction and its share of the
            # wall time in training units.
            "prefill_share": prefill_share(self.prefill_at_start, self._prefill_tokens()),
            "idle_by_replica": idle,
            "train_share_by_replica": trained,
            # where each replica's scheduler ran (servers: each server's own), and
            # whether two replicas shared a core (they should not: plugin/cpu.py)
            "threads": self.threads,
            "cores_shared": cores_shared(self.threads or []),
        }


def cores_shared(threads: list[dict[str, Any] | None]) -> bool | None:
    """Whether any two replicas' schedulers may run on one core (None: one replica, or
    a replica that did not report its cores)."""
    cores = [set(t["cores"]) for t in threads if t and t.get("cores")]
    if len(cores) < 2 or len(cores) != len(threads):
        return None
    return any(a & b for i, a in enumerate(cores) for b in cores[i + 1 :])


def prefill_share(start: list[int], end: list[int]) -> list[float] | None:
    """Each replica's share of the tokens prefilled between two /v1/loads readings."""
    if not start or len(start) != len(end):
        return None
    done = [b - a for a, b in zip(start, end, strict=True)]
    total = sum(done)
    return [d / total for d in done] if total > 0 else None


def skew_summary(switches: dict[int, dict[int, float]], replicas: int) -> dict[str, Any]:
    """How far apart the replicas began serving each version all of them served (ms):
    median and max over those versions, and how many there were."""
    skews = sorted(
        1000.0 * (max(at.values()) - min(at.values()))
        for at in switches.values()
        if len(at) == replicas
    )
    if not skews:
        return {"versions": 0, "median": None, "max": None}
    return {"versions": len(skews), "median": skews[len(skews) // 2], "max": skews[-1]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out or tempfile.mkdtemp(prefix="lemix-"))
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS) - set(OPTIONAL)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS + OPTIONAL}")
    body = lambda i: request_body(i, args.max_tokens)  # noqa: E731
    capacity, slo, held = measure_capacity(args, out, body)
    print(f"one replica: {capacity:.3f} requests/s; SLO {slo}; held {held}", file=sys.stderr)
    rate = args.rate or args.load_factor * capacity
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for k, method in rounds(methods, args.repeats):
        runs[method].append(run_method(args, method, out, slo, rate, body, k))
        print(f"{method} (round {k}): {json.dumps(runs[method][-1])}", file=sys.stderr)
    measured = {m: combine(rows) for m, rows in runs.items()}
    # paired differences against lemix, or against lemix-floor where it differs from the
    # baselines by placement alone (--floor-all) or lemix did not run
    floored = "lemix-floor" in runs and (args.floor_all or "lemix" not in runs)
    ref = "lemix-floor" if floored else "lemix"
    pairs = paired(runs, ref) if ref in runs and len(runs) > 1 else {}
    result = {
        "methods": measured,
        "paired": pairs,
        "paired_ref": ref if pairs else None,
        "train_floor": args.train_floor,
        "floor_all": args.floor_all,
        "repeats": args.repeats,
        "capacity_rps": capacity,
        "yardstick": args.yardstick,
        "held": held,
        "load_factor": args.load_factor if not args.rate else rate / capacity,
        "rate_rps": rate,
        "capacity_clients": args.capacity_clients,
        "slo": slo,
        "load_s": args.load_s,
        "drain_s": args.drain_s,
        "max_tokens": args.max_tokens,
        "sync_every_s": args.sync_every_s,
        "threads": "2 replicas: SGLANG_CPU_OMP_THREADS_BIND splits the cores in halves; "
        "HTTP, controller, detokenizer, sidecar and the load generator share them",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(measured, out / "lemix.png")
    return result


def rounds(methods: list[str], repeats: int) -> list[tuple[int, str]]:
    """(round, method) in the order they run: round k rotates the methods by k."""
    n = len(methods)
    return [(k, methods[(k + i) % n]) for k in range(repeats) for i in range(n)]


def run_method(
    args: argparse.Namespace,
    method: str,
    out: Path,
    slo: dict[str, float],
    rate: float,
    body: Callable[[int], dict[str, Any]],
    k: int,
) -> dict[str, Any]:
    """One method's run on a fresh server: Poisson load (seed 7 + k) plus feedback."""
    name = method if k == 0 else f"{method}-r{k}"
    if method == "servers":
        servers, front = start_servers(args, out, slo, name)
    else:
        servers = [start_server(args, method, out, slo, name)]
        front = servers[0]
    feedback: list[FeedbackStream] = []
    try:
        headers = PIN if method == "separate" else None
        closed_loop(front.url, 2, 5.0, body, headers)  # warm-up
        # The same pairs per second in all: with `servers`, each server gets its share
        # of the backlog, and the one-a-second pairs go to the servers in turn.
        n = len(servers)
        for r, s in enumerate(servers):
            feedback.append(FeedbackStream(s, backlog=args.backlog // n + (r < args.backlog % n),
                                           interval_s=1.0 * n, start=r * args.backlog,
                                           offset_s=1.0 * r))  # fmt: skip
        poller = Poller(servers)
        results = poisson_load(front.url, rate, args.load_s, body, seed=7 + k,
                               headers=headers, drain_s=args.drain_s)  # fmt: skip
        stats = poller.done()
        summary = summarize(results, slo["ttft_ms"], slo["tbt_ms"], stats["wall_s"])
        return {**summary, **stats, "rate_rps": rate, "round": k}
    finally:
        for f in feedback:
            f.stop()
        if front is not servers[0]:
            front.stop()  # the router, before its servers
        for s in servers:
            s.stop()


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One method over its runs: every number's mean and ci95 (benchmarks.stats), the
    runs under `repeats`, and each other field where every run has the same value."""
    out = aggregate(rows, "repeats")
    for key, value in rows[0].items():
        if key not in out and key != "ci95" and all(r.get(key) == value for r in rows):
            out[key] = value
    return out


def paired(runs: dict[str, list[dict[str, Any]]], ref: str) -> dict[str, Any]:
    """For every method but `ref`: `ref`'s figure minus the method's, round by round, for
    each PAIRED metric: {"mean", "ci95", "rounds"} (None where a round lacks one)."""
    out: dict[str, Any] = {}
    by_round = {m: {r["round"]: r for r in rows} for m, rows in runs.items()}
    for method in runs:
        if method == ref:
            continue
        shared = sorted(set(by_round[ref]) & set(by_round[method]))
        out[method] = {}
        for key in PAIRED:
            diffs = [
                by_round[ref][k][key] - by_round[method][k][key]
                for k in shared
                if isinstance(by_round[ref][k].get(key), int | float)
                and isinstance(by_round[method][k].get(key), int | float)
            ]
            mean, ci = mean_ci95(diffs) if diffs else (None, None)
            out[method][key] = {"mean": mean, "ci95": ci, "rounds": len(diffs)}
    return out


def plot(measured: dict[str, dict[str, Any]], path: Path) -> None:
    """One bar panel per headline metric, one bar per method (ci95 whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("slo_attainment", "throughput_tok_s", "train_tokens_per_s", "tbt_p99_ms")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    names = list(measured)
    for ax, key in zip(axes, keys, strict=True):
        means = [measured[n].get(key) or 0.0 for n in names]
        ci = [
            measured[n].get("ci95", {}).get(key) or [m, m]
            for n, m in zip(names, means, strict=True)
        ]
        err = [[m - c[0] for m, c in zip(means, ci, strict=True)],
               [c[1] - m for m, c in zip(means, ci, strict=True)]]  # fmt: skip
        ax.bar(names, means, yerr=err, capsize=3)
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (CPU, < 30 min)")
    parser.add_argument("--out", default=None, help="directory for results.json and the PNG")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--load-s", type=float, default=None, help="seconds of load per method")
    parser.add_argument("--capacity-s", type=float, default=None)
    parser.add_argument(
        "--drain-s", type=float, default=None, help="longest wait for requests after the load"
    )
    parser.add_argument("--load-factor", type=float, default=1.2, help="x one replica's capacity")
    parser.add_argument(
        "--rate", type=float, default=None,
        help="requests/s of the Poisson load, instead of --load-factor x the capacity "
        "measured (that measure varied from 0.80 to 2.14 requests/s between runs here)",
    )  # fmt: skip
    parser.add_argument("--capacity-clients", type=int, default=16, help="closed-loop clients")
    parser.add_argument(
        "--yardstick", choices=("closed", "held"), default="closed",
        help="capacity the load is scaled by: the closed loop's requests/s, or the highest "
        "Poisson rate one replica holds at the SLO (bisection after the closed loop)",
    )  # fmt: skip
    parser.add_argument("--probe-s", type=float, default=30.0, help="seconds per held trial")
    parser.add_argument("--probe-steps", type=int, default=4, help="held trials")
    parser.add_argument("--sync-every-s", type=float, default=30.0, help="`separate` only")
    parser.add_argument(
        "--train-floor",
        type=float,
        default=0.1,
        help="--mace-train-floor of `lemix-floor` (and the baselines with --floor-all)",
    )
    parser.add_argument(
        "--floor-all", action="store_true",
        help="round-robin and total-tokens train with --train-floor too (placement alone "
        "differs from lemix-floor; paired against lemix-floor when lemix is not run)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--backlog", type=int, default=40, help="pairs queued per run")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="runs per method, interleaved (round k rotates the order by k; seed 7 + k)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.load_s = args.load_s or (180.0 if args.quick else 600.0)
    args.capacity_s = args.capacity_s or (60.0 if args.quick else 180.0)
    args.drain_s = args.drain_s or (90.0 if args.quick else 300.0)
    result = run(args)
    print(json.dumps(result["methods"], indent=2))


if __name__ == "__main__":
    main()
