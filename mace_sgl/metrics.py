"""Prometheus metrics of mace-sgl (prefix `mace_`), served by SGLang's /metrics route."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

# prometheus_client is imported inside the constructors, never at module import: it picks
# its value backend (in-process, or the mmap files of PROMETHEUS_MULTIPROC_DIR that SGLang's
# /metrics reads) when first imported, and SGLang sets that variable only while launching.
#
# Every gauge uses multiprocess_mode="mostrecent", as SGLang's own scheduler gauges do: the
# value is the state its one writer last reported. Counts the trainer keeps (steps,
# rollbacks, refusals) are mirrored as gauges, because the trainer owns them and a Counter
# could only replay deltas; "max" would be wrong for the adapter version, which a rollback
# may lower, and the "live*" modes need mark_process_dead() calls that SGLang never makes.
MODE = "mostrecent"

# (status key, gauge name, help) of the trainer's plain numbers, mirrored as they are.
_PLAIN = (
    ("adapter_version", "mace_adapter_version", "Version of the live adapter being served."),
    ("train_steps", "mace_train_steps", "Optimizer steps since the trainer started."),
    ("rollbacks", "mace_rollbacks", "Training steps rolled back since the trainer started."),
    (
        "rejected_versions",
        "mace_rejected_versions",
        "Adapter versions the publish guard refused since the trainer started.",
    ),
    ("queued_in_trainer", "mace_queued_in_trainer", "Feedback pairs queued in the trainer."),
    ("paused", "mace_training_paused", "1 while training is paused (POST /mace/train/pause)."),
    ("last_loss", "mace_last_loss", "DPO loss of the last training step."),
)


class TrainerMetrics:
    """Gauges of one trainer, set from its status dict; built in the scheduler process.

    Never raises into its caller: a failure to build leaves it a no-op, a failed update
    is logged once.
    """

    def __init__(self, adapter: str, registry: Any = None) -> None:
        self.adapter = adapter
        self._gauges: dict[str, Any] | None = None
        self._warned = False
        try:
            from prometheus_client import REGISTRY, Gauge

            reg = REGISTRY if registry is None else registry

            def gauge(name: str, doc: str, *labels: str) -> Any:
                return Gauge(name, doc, ["adapter", *labels], registry=reg, multiprocess_mode=MODE)

            gauges = {key: gauge(name, doc) for key, name, doc in _PLAIN}
            gauges["reserve_s"] = gauge(
                "mace_reserve_seconds",
                "Time the policy reserves for training per iteration (+Inf: unbounded).",
            )
            gauges["starved_s"] = gauge(
                "mace_starved_seconds",
                "Seconds since training last ran while work waited (0: not starved).",
            )
            gauges["cost_error"] = gauge(
                "mace_cost_model_abs_pct_error",
                "Running mean absolute error of the cost model, percent, per kind of work.",
                "kind",
            )
            self._gauges = gauges
        except Exception:
            logger.warning("mace trainer metrics disabled: could not create them", exc_info=True)

    def update(self, status: Mapping[str, Any]) -> None:
        """Set every gauge from MaceTrainer.status(); missing keys leave theirs unchanged."""
        if self._gauges is None:
            return
        try:
            self._update(status)
        except Exception:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "mace trainer metrics update failed (later failures are not logged)",
                    exc_info=True,
                )

    def _update(self, status: Mapping[str, Any]) -> None:
        g, a = self._gauges, self.adapter
        for key, _, _ in _PLAIN:
            value = status.get(key)
            if value is not None:
                g[key].labels(a).set(float(value))
        if "reserve_ms" in status:
            # None: the policy's budget is unbounded (synchronous), which +Inf says exactly.
            ms = status["reserve_ms"]
            g["reserve_s"].labels(a).set(math.inf if ms is None else float(ms) / 1000.0)
        g["starved_s"].labels(a).set(float(status.get("starved_s") or 0.0))
        errors = (status.get("cost_model") or {}).get("abs_pct_error") or {}
        for kind, fraction in errors.items():
            if fraction is not None:
                g["cost_error"].labels(a, str(kind)).set(100.0 * float(fraction))


class FeedbackMetrics:
    """Feedback counters of the HTTP process: rows stored and the store's queue depth.

    Rows are labelled with the trained adapter's name or "other": clients choose adapter
    names, and a label per name would let them grow the series without bound.
    """

    def __init__(self, adapter: str, registry: Any = None) -> None:
        self.adapter = adapter
        self._rows: Any = None
        self._queue: Any = None
        self._warned = False
        try:
            from prometheus_client import REGISTRY, Counter, Gauge

            reg = REGISTRY if registry is None else registry
            self._rows = Counter(
                "mace_feedback_rows_stored",
                "Feedback pairs stored durably by POST /mace/feedback.",
                ["adapter"],
                registry=reg,
            )
            self._queue = Gauge(
                "mace_feedback_queue_depth",
                "Stored pairs of the trained adapter that never trained (as of the last "
                "/metrics scrape, /mace/status or feedback post).",
                ["adapter"],
                registry=reg,
                multiprocess_mode=MODE,
            )
        except Exception:
            logger.warning("mace feedback metrics disabled: could not create them", exc_info=True)

    def rows_stored(self, adapters: Iterable[str]) -> None:
        """Count stored rows, given the adapter each one names."""
        if self._rows is None:
            return
        try:
            for name in adapters:
                self._rows.labels(name if name == self.adapter else "other").inc()
        except Exception:
            self._warn()

    def queue_depth(self, untrained: int) -> None:
        """Set the never-trained rows of the trained adapter."""
        if self._queue is None:
            return
        try:
            self._queue.labels(self.adapter).set(float(untrained))
        except Exception:
            self._warn()

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "mace feedback metrics update failed (later failures are not logged)",
                exc_info=True,
            )
