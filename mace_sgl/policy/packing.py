"""Best-fit packing of fine-tune units into what one iteration leaves (MACE Algorithm 1).

Candidates are taken by priority; among those within `tie` of the best priority that
still fit the latency budget and the free memory, the one with the smallest
f = l1 * |memory fit| + l2 * |latency fit| is chosen, where a fit is the share of the
budget (memory or time) the unit would leave unused. Repeat until nothing fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mace_sgl.policy.cost import CostModel
from mace_sgl.policy.priority import Priorities
from mace_sgl.policy.types import Unit


@dataclass(frozen=True)
class PackingParams:
    """Weights of the fit score and the priority window; the profile's `packing` section."""

    l1: float = 0.5  # weight of the memory fit
    l2: float = 1.0  # weight of the latency fit
    tie: float = 0.5  # priorities this close to the best count as equal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackingParams:
        return cls(**{k: float(v) for k, v in data.items() if k in ("l1", "l2", "tie")})


def best_fit(
    units: Sequence[Unit],
    budget_s: float,
    mem_free: float,
    cost: CostModel,
    priorities: Priorities,
    now: float,
    params: PackingParams,
) -> tuple[list[Unit], float, dict[int, float]]:
    """Units to run, in order, their predicted seconds, and every candidate's priority."""
    if budget_s <= 0.0 or not units:
        return [], 0.0, {}
    ranked = sorted(
        ((priorities.score("train", now - u.arrival, u.loss), u) for u in units),
        key=lambda pu: pu[0],
        reverse=True,
    )
    scores = {u.job: p for p, u in ranked}
    chosen: list[Unit] = []
    time_left, mem_left = budget_s, mem_free
    used: set[int] = set()
    while True:
        best: tuple[float, Unit, float, float] | None = None
        top: float | None = None
        for p, u in ranked:
            if u.job in used:
                continue
            if top is not None and p < top - params.tie:
                break
            t = cost.predict(u.kind, u.tokens)
            m = cost.memory(u.kind, u.tokens)
            if t > time_left or m > mem_left:
                continue
            if top is None:
                top = p
            lat_fit = (time_left - t) / budget_s
            mem_fit = (mem_left - m) / mem_free if mem_free != float("inf") else 0.0
            f = params.l1 * abs(mem_fit) + params.l2 * abs(lat_fit)
            if best is None or f < best[0]:
                best = (f, u, t, m)
        if best is None:
            return chosen, budget_s - time_left, scores
        _, u, t, m = best
        chosen.append(u)
        used.add(u.job)
        time_left -= t
        mem_left -= m
