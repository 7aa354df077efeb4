"""Decision time of the mace policy per iteration, at growing queue sizes.

    python -m benchmarks.sched_overhead [--json] [--iterations 2000]

Each iteration is what the scheduler does after a serving iteration: the SLO controller's
update, then plan() over N queued fine-tune units (varied kinds, sizes, DPO losses and
ages) with decodes running and no prefill waiting: the case where the policy must pack
(a waiting prefill makes the mace budget zero at once). Same CostModel, Priorities and
best-fit packing as the server. Plain Python, one core.
Prints {"queued": {"1": {"p50_us": .., "p99_us": ..}, "64": {..}, "512": {..}}}.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from mace_sgl.policy import IterationView, Profile, Unit, make_policy
from mace_sgl.policy.slo import percentile

KINDS = ("fwd", "head", "bwd")


def view(n: int, rng: random.Random, now: float) -> IterationView:
    units = tuple(
        Unit(
            i,
            rng.choice(KINDS),
            rng.randint(16, 512),
            now - rng.uniform(0, 30),
            rng.choice([None, rng.uniform(0, 3)]),
        )
        for i in range(n)
    )
    return IterationView(
        now=now,
        decode_batch=rng.randint(1, 8),
        decode_context=rng.randint(100, 4000),
        units=units,
    )


def measure(n: int, iterations: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    policy = make_policy("mace", Profile())
    policy.slo.factor = 1.0
    for _ in range(200):
        policy.slo.record_tbt(rng.uniform(0.02, 0.08))
    views = [view(n, rng, 1000.0 + i) for i in range(64)]
    times: list[float] = []
    chosen: list[int] = []
    for i in range(iterations):
        v = views[i % len(views)]
        start = time.perf_counter()
        policy.slo.update()
        plan = policy.plan(v)
        times.append((time.perf_counter() - start) * 1e6)
        chosen.append(len(plan.units))
    assert sum(chosen) > 0, "the benchmark never packed a unit: it would time nothing"
    return {"p50_us": round(percentile(times, 50), 1), "p99_us": round(percentile(times, 99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    result = {"queued": {str(n): measure(n, args.iterations) for n in (1, 64, 512)}}
    if args.json:
        print(json.dumps(result))
        return
    for n, r in result["queued"].items():
        print(f"queued {n:>4}: p50 {r['p50_us']:8.1f} us   p99 {r['p99_us']:8.1f} us")


if __name__ == "__main__":
    main()
