"""Weighted fair share of optimizer steps between tenants (plain Python).

Each tenant (a live adapter, trainer/tenants.py) has a virtual time: the steps it got,
divided by its weight. When the trainer starts a step it asks `pick` which tenant gets
it, given each tenant with queued feedback and the priority of its best queued pair
(policy/priority.py: DPO loss with aging). Only tenants within `window` steps of the
least-served backlogged tenant may be picked, and among those the highest priority
wins. So priority orders the work while one tenant flooding the queue can take at most
`window` steps more than any other tenant that waits: with window 1 and equal weights,
a waiting tenant gets at least every second step.

A tenant that had nothing queued and comes back starts at the virtual time of the
least-served tenant still waiting (start-time fair queueing): being idle banks no credit
that it could later spend starving the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# A tenant's weight, its share of samples and steps: the route refuses one outside this
# range, and what comes from elsewhere (a store written before the range, a peer's tenant
# log) is clamped into it (tenant_weight). An infinite or tiny weight made a virtual time
# infinite, and `pick` copies the start time to every tenant that joins after it.
TENANT_WEIGHTS = (1e-3, 1e3)


def weight_problem(weight: object) -> str | None:
    """Why `weight` is no tenant weight (not a number within TENANT_WEIGHTS), or None: a
    route and a peer's tenant log refuse it (not finite, or tiny: the fair share's
    virtual time, steps / weight, would reach infinity and stay there for every tenant
    that joins after)."""
    low, high = TENANT_WEIGHTS
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not low <= weight <= high:
        return f"a tenant weight is a number from {low:g} to {high:g} (its share of steps)"
    return None


def tenant_weight(weight: float) -> float:
    """`weight` clamped into TENANT_WEIGHTS (NaN: the default, 1)."""
    if math.isnan(weight):
        return 1.0
    low, high = TENANT_WEIGHTS
    return min(max(float(weight), low), high)


class FairShare:
    """Picks the tenant of the next optimizer step (see the module docstring)."""

    def __init__(self, window: float = 1.0) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = window
        self.vtime: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self._waiting: set[str] = set()  # the backlog `pick` saw last

    def set_weight(self, tenant: str, weight: float) -> None:
        """A tenant's share relative to the others (default 1), within TENANT_WEIGHTS."""
        if not weight > 0:
            raise ValueError(f"weight of {tenant!r} must be > 0, got {weight}")
        self.weights[tenant] = tenant_weight(weight)

    def forget(self, tenant: str) -> None:
        """A retired tenant: its history no longer counts."""
        for d in (self.vtime, self.weights, self.steps):
            d.pop(tenant, None)
        self._waiting.discard(tenant)

    def pick(self, backlog: Mapping[str, float]) -> str | None:
        """The tenant of the next step; backlog maps each tenant with queued pairs to the
        priority of its best one (higher first). None with nothing queued."""
        if not backlog:
            self._waiting = set()
            return None
        staying = [self.vtime.get(t, 0.0) for t in backlog if t in self._waiting]
        if staying:
            start = min(staying)
        else:  # everyone arrives now: nobody is behind anybody
            start = max(self.vtime.get(t, 0.0) for t in backlog)
        for t in backlog:
            if t not in self._waiting:
                self.vtime[t] = max(self.vtime.get(t, 0.0), start)
        self._waiting = set(backlog)
        least = min(self.vtime[t] for t in backlog)
        # Eligible: the least-served, and whoever stays within `window` of it after this
        # step.
        eligible = [
            t
            for t in backlog
            if self.vtime[t] <= least
            or self.vtime[t] + 1.0 / self.weights.get(t, 1.0) <= least + self.window + 1e-9
        ]
        return max(eligible, key=lambda t: (backlog[t], -self.vtime[t], t))

    def charge(self, tenant: str, steps: float = 1.0) -> None:
        """`tenant` got `steps` optimizer steps."""
        self.vtime[tenant] = self.vtime.get(tenant, 0.0) + steps / self.weights.get(tenant, 1.0)
        self.steps[tenant] = self.steps.get(tenant, 0) + int(steps)

    def status(self) -> dict[str, dict[str, float]]:
        return {
            t: {"steps": self.steps.get(t, 0), "weight": self.weights.get(t, 1.0)}
            for t in sorted(set(self.vtime) | set(self.weights))
        }
