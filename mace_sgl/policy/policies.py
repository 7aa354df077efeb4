"""Scheduling policies, chosen by --mace-policy: inference-only, fcfs-reserve, mace (and
synchronous, a baseline for benchmarks).

Each one answers, after every serving iteration, how many seconds of fine-tune work may
run and which units; plain Python on the data in types.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from mace_sgl.policy.cost import Observation
from mace_sgl.policy.packing import best_fit
from mace_sgl.policy.profile import Profile
from mace_sgl.policy.slo import SloController
from mace_sgl.policy.types import IterationView, Plan, Unit


class Policy:
    """Shared parts: the cost model, the SLO controller, observation and status."""

    name: ClassVar[str] = ""
    # Plans per iteration: units finish and expose their successors, so the trainer asks
    # again; bounded against a runaway cost model.
    max_rounds: ClassVar[int] = 64
    # Most floor credit one iteration may spend (seconds): the latency the floor may add
    # to an iteration after a long busy spell, beyond one unit larger than it.
    floor_cap_s: ClassVar[float] = 0.5

    def __init__(self, profile: Profile, reserve_s: float = 0.01, floor: float = 0.0) -> None:
        self.profile = profile
        self.cost = profile.cost
        self.slo = SloController(profile.slo)
        # Fixed seconds per iteration (fcfs-reserve); the trainer keeps it in step with
        # --mace-train-tokens-per-iter times its measured seconds per token.
        self.reserve_s = reserve_s
        self.last_budget_s = 0.0
        # The budget of the last busy iteration's first plan (an idle budget is the room
        # for one unit before a request may arrive, not time added to iterations).
        self.busy_budget_s = 0.0
        # --mace-train-floor: share of busy time that trains whatever the SLO says (0:
        # off). Credit (seconds) accrues with busy time and is spent by units that run.
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"train floor must be a share in [0, 1], got {floor}")
        self.floor = floor
        self.floor_credit = 0.0
        self.floor_at: float | None = None  # when the last busy iteration was planned
        self.floor_units = 0
        # Busy seconds from one iteration's plan to the next (exponential mean): the
        # floor takes `floor` of each, what `training_reserve_s` tells placement.
        self.floor_period_s = 0.0

    def training_reserve_s(self) -> float:
        """Training seconds this replica adds to each busy serving iteration, for
        placement (policy/placement.py): the SLO budget of the last busy iteration (an
        idle replica's budget, a quarter of the TTFT target, read as seconds added to
        every decode step, kept every request off a holder that had gone idle), or the train
        floor's share of an iteration (`floor` of the busy time from one plan to the
        next, training included) when that is more. Counting the budget alone, LeMix
        saw the lease holder of `benchmarks.lemix` as almost as fast as the other
        replica (budget 60-250 ms against 1.4 s iterations) and sent it 43% of the
        prefill (2026-12-04): a floor's share then comes out of those requests' latency
        instead of moving them."""
        budget = self.busy_budget_s if math.isfinite(self.busy_budget_s) else 0.0
        return max(budget, self.floor * self.floor_period_s)

    def plan(self, view: IterationView) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def rank(self, units: Sequence[Unit], now: float) -> list[Unit]:
        """Order in which waiting fine-tune work should start: arrival order."""
        return sorted(units, key=lambda u: u.arrival)

    def charge(self, seconds: float) -> None:
        """Training seconds really spent after this iteration (for policies with credit)."""

    def _floor_plan(self, view: IterationView, plan: Plan) -> Plan:
        """The plan, or the cheapest unit against it when the floor's time share is due.

        Busy time earns `floor` x the seconds since the previous iteration as credit (at
        most `floor_cap_s`; idle time earns none). Units the plan chose anyway spend it
        (the SLO's own budget meets the floor first); while the credit covers the
        cheapest waiting unit, or has reached the cap (a unit larger than it), that unit
        runs against the plan. So training gets about `floor` of busy time, whatever the
        size of its units (a share of iterations, the first form, gave one one-layer
        slice per ten iterations: no SmolLM2 step in 120 s of `benchmarks.lemix`).
        The forced unit is the step's own when a step is in flight: a finished step is
        what the floor is for, and the cheapest unit of all was a reference pass of a
        pair queued behind it (forward slices cost less than the step's backward ones;
        in `benchmarks.lemix` at floor 0.25 on 2026-12-04, 46 s of training in 200 s
        finished two reference jobs and no step)."""
        if not self.floor:
            return plan
        if view.idle:
            self.floor_at = None
            return plan
        if view.spent_s == 0.0:  # first plan after this iteration
            if self.floor_at is not None:
                period = max(view.now - self.floor_at, 0.0)
                self.floor_credit = min(self.floor_credit + self.floor * period, self.floor_cap_s)
                mean = self.floor_period_s
                self.floor_period_s = period if mean == 0.0 else mean + 0.1 * (period - mean)
            self.floor_at = view.now
        if not view.units:
            return plan
        if plan.units:
            self.floor_credit = max(self.floor_credit - plan.predicted_s, 0.0)
            return plan
        forced = self._cheapest(view, plan.budget_s, why=plan.why, step_first=True)
        predicted = self.cost.predict(forced.units[0].kind, forced.units[0].tokens)
        due = predicted if math.isfinite(predicted) else self.floor_cap_s
        if self.floor_credit < min(due, self.floor_cap_s) - 1e-12:
            return plan
        self.floor_credit = max(self.floor_credit - due, 0.0)
        self.floor_units += 1
        return forced

    def _cheapest(
        self, view: IterationView, budget_s: float, why: str = "", step_first: bool = False
    ) -> Plan:
        """A forced plan of the waiting unit predicted cheapest (a non-finite prediction
        reads as 0 s in the plan); with `step_first`, the head of the step in flight
        when there is one."""
        units = [u for u in view.units if u.step] if step_first else []
        unit = min(units or view.units, key=lambda u: self.cost.predict(u.kind, u.tokens))
        predicted = self.cost.predict(unit.kind, unit.tokens)
        return Plan(
            budget_s=budget_s,
            units=(unit,),
            predicted_s=predicted if math.isfinite(predicted) else 0.0,
            why=why,
            forced=True,
        )

    def observe(self, obs: Observation) -> float | None:
        """A measured iteration or unit: corrects the cost model; returns its relative error
        before the correction."""
        return self.cost.observe(obs)

    def status(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            # JSON has no infinity: an unbounded budget (synchronous) reads as null.
            "reserve_ms": 1000.0 * self.last_budget_s
            if math.isfinite(self.last_budget_s)
            else None,
            "slo": self.slo.status(),
            "cost_model": {
                **self.cost.to_dict(),
                "samples": {k: m.count for k, m in self.cost.models.items()},
                "abs_pct_error": dict(self.cost.abs_pct_error),
                "rejected": {k: m.rejected for k, m in self.cost.models.items() if m.rejected},
            },
            "train_floor": self.floor,
            "floor_units": self.floor_units,
            "profile": self.profile.meta.get("source", "built-in defaults"),
        }


class InferenceOnly(Policy):
    """Never trains: feedback is stored, serving is untouched (the baseline)."""

    name = "inference-only"

    def plan(self, view: IterationView) -> Plan:
        self.last_budget_s = 0.0
        return Plan(budget_s=0.0)


class FcfsReserve(Policy):
    """A fixed reserve after every iteration, units in arrival order (naive colocation).

    Unspent reserve accrues as credit (capped at 8 iterations), so a unit longer than one
    iteration's reserve still runs every few iterations. When idle, one unit at a time.
    """

    name = "fcfs-reserve"

    def __init__(self, profile: Profile, reserve_s: float = 0.01, floor: float = 0.0) -> None:
        super().__init__(profile, reserve_s, floor)
        self.credit = 0.0

    def plan(self, view: IterationView) -> Plan:
        if view.idle:
            budget = float("inf")
        else:
            if view.spent_s == 0.0:  # first call after this iteration
                self.credit = min(self.credit + self.reserve_s, 8 * self.reserve_s)
            budget = self.credit - view.spent_s
        self.last_budget_s = self.busy_budget_s = self.reserve_s
        chosen, predicted = [], 0.0
        for u in sorted(view.units, key=lambda u: u.arrival):
            t = self.cost.predict(u.kind, u.tokens)
            if not predicted + t <= budget:  # also stops on a non-finite prediction
                break
            chosen.append(u)
            predicted += t
        why = "" if chosen else "no unit fits the credit of the fixed reserve"
        return self._floor_plan(
            view, Plan(budget_s=budget, units=tuple(chosen), predicted_s=predicted, why=why)
        )

    def charge(self, seconds: float) -> None:
        """Training time actually spent out of the credit."""
        self.credit -= seconds


class Mace(Policy):
    """SLO-controlled budget, DPO-loss priorities and best-fit packing (MACE).

    Busy: each iteration adds factor * inflation * predicted decode iteration to a credit
    (the profile's packing.inflation, default 0.1: on average training adds at most that
    share to serving), and the budget is that credit, capped by the room under the target,
    headroom * TBT target - predicted decode iteration: no single iteration goes over it.
    Units run out of the credit, so a unit larger than one iteration's share still runs
    every few iterations (on CPU a one-layer slice of SmolLM2 costs more than a tenth of a
    decode iteration: without the credit, `benchmarks.align` completed no step in 90 s of
    load). The budget is zero while a prefill waits (serving outranks fine-tune), and the
    credit drops to zero while a tail is at risk (factor 0).
    Idle: a unit may delay a request that arrives meanwhile, so it must fit in
    `idle_share` of the TTFT target (if none does, the cheapest runs: no job stalls).
    """

    name = "mace"
    headroom = 0.9
    idle_share = 0.25

    def __init__(self, profile: Profile, reserve_s: float = 0.01, floor: float = 0.0) -> None:
        super().__init__(profile, reserve_s, floor)
        self.forced_idle_units = 0
        self.credit = 0.0  # seconds of busy-iteration training owed (see the class doc)

    def rank(self, units: Sequence[Unit], now: float) -> list[Unit]:
        """By priority P(t): DPO loss (misaligned first) plus aging."""
        score = self.profile.priorities.score
        return sorted(units, key=lambda u: score("train", now - u.arrival, u.loss), reverse=True)

    def plan(self, view: IterationView) -> Plan:
        targets = self.profile.slo
        why = ""
        if view.idle:
            budget = self.idle_share * targets.ttft_ms / 1000.0
        elif view.waiting:
            budget, why = 0.0, f"{len(view.waiting)} prefill(s) waiting: serving first"
        else:
            serve = self.cost.predict(
                "decode", batch=view.decode_batch, context=view.decode_context,
                lora=view.decode_lora,
            )  # fmt: skip
            room = max(self.headroom * targets.tbt_ms / 1000.0 - serve, 0.0)
            share = self.slo.factor * self.profile.packing.inflation * serve
            if view.spent_s == 0.0 and math.isfinite(share):  # first plan of this iteration
                self.credit = 0.0 if self.slo.factor == 0.0 else self.credit + share
            self.credit = min(self.credit, room)
            # what this iteration may spend in all (spent_s comes off below)
            budget = self.credit if math.isfinite(serve) else math.nan
            if self.slo.factor == 0.0:
                why = self.slo.risk_reason()
            elif room == 0.0:
                why = (
                    f"predicted decode iteration {1000 * serve:.0f} ms leaves no room under "
                    f"{self.headroom:g} x TBT target {targets.tbt_ms:g} ms"
                )
        if not math.isfinite(budget):
            # A broken prediction must never read as unlimited room: no training.
            budget, why = 0.0, "cost model prediction not finite"
        if view.spent_s == 0.0:
            self.last_budget_s = budget
            if not view.idle:
                self.busy_budget_s = budget
        budget -= view.spent_s
        chosen, predicted, scores = best_fit(
            view.units,
            budget,
            view.mem_free_bytes,
            self.cost,
            self.profile.priorities,
            view.now,
            self.profile.packing,
        )
        if view.idle and not chosen and view.units:
            # Nothing fits the idle share, but a job must never stall on a unit that is
            # bigger than every budget (an LM head over a large vocabulary, a publish):
            # while idle, the cheapest head runs anyway.
            self.forced_idle_units += 1
            # through the floor too: idle time earns it no credit
            return self._floor_plan(view, self._cheapest(view, budget))
        if not chosen and view.units and not why:
            why = f"no unit fits the budget of {1000 * max(budget, 0.0):.1f} ms"
        plan = Plan(
            budget_s=budget,
            units=tuple(chosen),
            predicted_s=predicted,
            scores=scores,
            why="" if chosen else why,
        )
        return self._floor_plan(view, plan)

    def charge(self, seconds: float) -> None:
        """Training time a busy iteration really spent, out of the credit."""
        self.credit = max(self.credit - seconds, 0.0)

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "forced_idle_units": self.forced_idle_units,
            "credit_ms": 1000.0 * self.credit,
        }


class Synchronous(Policy):
    """Stop the world: after any iteration, every queued unit runs before serving goes on
    (the drift benchmark's "synchronous" baseline: pause serving, train, resume)."""

    name = "synchronous"
    max_rounds = 1_000_000

    def plan(self, view: IterationView) -> Plan:
        self.last_budget_s = float("inf")
        return Plan(budget_s=float("inf"), units=tuple(sorted(view.units, key=lambda u: u.arrival)))


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (InferenceOnly, FcfsReserve, Mace, Synchronous)
}


def make_policy(name: str, profile: Profile, reserve_s: float = 0.01, floor: float = 0.0) -> Policy:
    """The policy called `name` (see POLICIES); `floor` is --mace-train-floor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return cls(profile, reserve_s, floor)
