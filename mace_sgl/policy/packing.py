"""Best-fit packing of fine-tune units into what one iteration leaves (MACE Algorithm 1).

Candidates are taken by priority; among those within `tie` of the best priority that
still fit the latency budget and the free memory, the one with the smallest
f = l1 * |memory fit| + l2 * |latency fit| is chosen, where a fit is the share of the
budget (memory or time) the unit would leave unused. Repeat until nothing fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from operator import itemgetter
from typing import Any

from mace_sgl.policy.cost import CostModel
from mace_sgl.policy.priority import UNTRAINED_LOSS, Priorities
from mace_sgl.policy.types import Unit


@dataclass(frozen=True)
class PackingParams:
    """Weights of the fit score and the priority window; the profile's `packing` section."""

    l1: float = 0.5  # weight of the memory fit
    l2: float = 1.0  # weight of the latency fit
    tie: float = 0.5  # priorities this close to the best count as equal
    inflation: float = 0.1  # most a busy iteration may grow by training (share of it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackingParams:
        return cls(
            **{k: float(v) for k, v in data.items() if k in ("l1", "l2", "tie", "inflation")}
        )


def best_fit(
    units: Sequence[Unit],
    budget_s: float,
    mem_free: float,
    cost: CostModel,
    priorities: Priorities,
    now: float,
    params: PackingParams,
) -> tuple[list[Unit], float, dict[int, float]]:
    """Units to run, in order, their predicted seconds, and the chosen units' priorities.

    Priorities and costs are computed once; a unit that does not fit is dropped for good
    (the room only shrinks), so a plan costs one sort plus a linear scan.
    """
    if not budget_s > 0.0 or not units:  # NaN budgets too: never "unlimited"
        return [], 0.0, {}
    # Inlined P(t) and linear unit costs: this loop runs over every queued unit, every
    # iteration (benchmarks/sched_overhead.py keeps it well under a millisecond).
    base = priorities.type_weight["train"]
    aging, gamma = priorities.aging, priorities.gamma
    coef = {k: cost.unit_coefficients(k) for k in {u.kind for u in units}}
    rows = []
    for u in units:
        a, b, mem = coef[u.kind]
        loss = UNTRAINED_LOSS if u.loss is None else u.loss
        p = base + aging * max(now - u.arrival, 0.0) + gamma * loss
        rows.append((p, a + b * u.tokens, mem * u.tokens, u))
    rows.sort(key=itemgetter(0), reverse=True)
    ranked = rows
    # Room to share out: none (0, e.g. a GPU reserve that tenants created since filled)
    # leaves no fit to weigh, and units of no memory (opt, publish) still go.
    bounded = 0.0 < mem_free < float("inf")
    chosen: list[Unit] = []
    scores: dict[int, float] = {}
    time_left, mem_left = budget_s, mem_free
    while ranked:
        keep = []
        best = None
        top = None
        for i, row in enumerate(ranked):
            p, t, m, _ = row
            if top is not None and p < top - params.tie:
                keep.extend(ranked[i:])
                break
            if not (t <= time_left and m <= mem_left):
                continue  # and never again: the room only shrinks (NaN never fits)
            keep.append(row)
            if top is None:
                top = p
            mem_fit = (mem_left - m) / mem_free if bounded else 0.0
            f = params.l1 * abs(mem_fit) + params.l2 * abs((time_left - t) / budget_s)
            if best is None or f < best[0]:
                best = (f, row)
        if best is None:
            break
        p, t, m, u = best[1]
        chosen.append(u)
        scores[u.job] = p
        time_left -= t
        mem_left -= m
        ranked = [row for row in keep if row is not best[1]]
    return chosen, budget_s - time_left, scores
