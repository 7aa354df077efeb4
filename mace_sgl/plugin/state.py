"""The one object mace-sgl keeps per SGLang scheduler, attached to it by the init hook.

Every scheduler-side hook receives the scheduler and reaches its parts through
`of(scheduler)`: no module globals, so several schedulers in one process tree (data
parallelism) each have their own trainer, monitor and pruner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mace_sgl.config import MaceConfig

ATTR = "_mace_state"


@dataclass
class SchedulerState:
    """mace-sgl's parts in one scheduler; None where a feature is off."""

    cfg: MaceConfig
    trainer: Any = None  # trainer.runtime.MaceTrainer with --mace-train
    monitor: Any = None  # plugin.iteration.IterationMonitor with --mace-train
    pruner: Any = None  # prune.runtime.KvPruner with --mace-kv-prune
    metrics: Any = None  # metrics.TrainerMetrics with --enable-metrics and --mace-train
    trimmer: Any = None  # memstats.Trimmer (--mace-malloc-trim-s; never trims at 0)
    # plugin.placement.TrainingSlots with --dp-size > 1 and --mace-train: where this
    # replica's training state goes for the controller's LeMix placement.
    slots: Any = None
    dp_rank: int = 0


def attach(scheduler: Any, state: SchedulerState) -> SchedulerState:
    """Give `scheduler` its state (once, in the AFTER hook of Scheduler.__init__). Its
    req_to_token pool gets the same state: hooks on a ScheduleBatch reach it from there
    (a batch holds the pool, not the scheduler)."""
    setattr(scheduler, ATTR, state)
    pool = getattr(scheduler, "req_to_token_pool", None)
    if pool is not None:
        setattr(pool, ATTR, state)
    return state


def of(owner: Any) -> SchedulerState | None:
    """The state of a scheduler (or of its req_to_token pool), or None before the init
    hook ran (or without the plugin)."""
    return getattr(owner, ATTR, None)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON (and so /mace/status)
    has no NaN or infinity, and one broken estimate must not make the route fail."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
