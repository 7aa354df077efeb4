"""The plain data the scheduler glue hands to a policy, and the plan it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Unit:
    """The next piece of one fine-tune job, as a candidate for this iteration.

    A job is a chain of units that must run in order (one DPO step, or the reference
    log-probs of one queued pair); only the head of each job is a candidate.
    """

    job: int  # the job this unit heads (its key in the trainer)
    kind: str  # fwd | head | bwd | opt (see cost.py)
    tokens: int
    arrival: float  # monotonic seconds the job's pair arrived (aging)
    loss: float | None = None  # last DPO loss of the job's pair, if it trained before
    step: bool = False  # heads the DPO step in flight (not a reference pass ahead)


@dataclass(frozen=True, slots=True)
class WaitingPrefill:
    """A request in SGLang's waiting queue."""

    tokens: int  # prompt tokens still to prefill
    arrival: float  # monotonic seconds it entered the scheduler


@dataclass(frozen=True, slots=True)
class IterationView:
    """What the scheduler looks like after one serving iteration, before training runs."""

    now: float
    decode_batch: int = 0  # running requests
    decode_context: int = 0  # sum of their KV lengths, tokens
    decode_lora: int = 0  # running requests that run an adapter
    waiting: tuple[WaitingPrefill, ...] = ()
    units: tuple[Unit, ...] = ()
    mem_free_bytes: float = float("inf")
    # Training seconds already spent after this iteration (a plan may be asked again
    # after its first units ran and their real cost is known).
    spent_s: float = 0.0
    idle: bool = False  # nothing to serve: the device is ours until a request arrives


@dataclass(frozen=True, slots=True)
class Plan:
    """A policy's decision for one iteration."""

    budget_s: float  # training seconds allowed after this iteration
    units: tuple[Unit, ...] = ()  # chosen in order; predicted to fit the budget
    predicted_s: float = 0.0  # predicted seconds of the chosen units
    scores: dict[int, float] = field(default_factory=dict)  # job -> priority (debug)
    # Why no unit was chosen while some waited (SLO at risk, a prefill waiting, ...):
    # the trainer reports it as the cause of starvation. Empty when units were chosen.
    why: str = ""
    forced: bool = False  # a unit chosen against the budget (idle progress or the floor)
