"""mace_sgl.metrics: gauges set from a trainer status, feedback counters, the multiprocess
files SGLang's /metrics reads, and no exception ever reaching the caller."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mace_sgl.metrics import FeedbackMetrics, TrainerMetrics

STATUS = {
    "adapter": "live",
    "adapter_version": 7,
    "train_steps": 12,
    "rollbacks": 2,
    "rejected_versions": 1,
    "queued_in_trainer": 3,
    "paused": False,
    "last_loss": 0.5,
    "reserve_ms": 4.0,
    "starved_s": 12.5,
    "cost_model": {"abs_pct_error": {"prefill": 0.25, "dpo_step": 0.5}, "samples": {}},
    "memory": {"rss_now_mb": 100.0},
}

LIVE = {"adapter": "live"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_update_sets_every_gauge_from_the_status(registry: CollectorRegistry):
    metrics = TrainerMetrics("live", registry=registry)
    metrics.update(STATUS)
    value = registry.get_sample_value
    assert value("mace_adapter_version", LIVE) == 7
    assert value("mace_train_steps", LIVE) == 12
    assert value("mace_rollbacks", LIVE) == 2
    assert value("mace_rejected_versions", LIVE) == 1
    assert value("mace_queued_in_trainer", LIVE) == 3
    assert value("mace_training_paused", LIVE) == 0
    assert value("mace_last_loss", LIVE) == 0.5
    assert value("mace_reserve_seconds", LIVE) == pytest.approx(0.004)
    assert value("mace_starved_seconds", LIVE) == 12.5
    assert value("mace_cost_model_abs_pct_error", {**LIVE, "kind": "prefill"}) == 25.0
    assert value("mace_cost_model_abs_pct_error", {**LIVE, "kind": "dpo_step"}) == 50.0


def test_unbounded_reserve_not_starved_and_unknown_loss(registry: CollectorRegistry):
    metrics = TrainerMetrics("live", registry=registry)
    metrics.update(STATUS)
    metrics.update({**STATUS, "reserve_ms": None, "starved_s": None, "last_loss": None})
    value = registry.get_sample_value
    # None is what the synchronous policy reports: its budget has no bound.
    assert value("mace_reserve_seconds", LIVE) == math.inf
    assert value("mace_starved_seconds", LIVE) == 0.0
    assert value("mace_last_loss", LIVE) == 0.5  # unknown keeps the last known value


def test_a_rollback_lowers_the_version_gauge(registry: CollectorRegistry):
    metrics = TrainerMetrics("live", registry=registry)
    metrics.update(STATUS)
    metrics.update({**STATUS, "adapter_version": 6, "rollbacks": 3})
    assert registry.get_sample_value("mace_adapter_version", LIVE) == 6
    assert registry.get_sample_value("mace_rollbacks", LIVE) == 3


def test_a_broken_status_is_logged_once_and_never_raised(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
):
    metrics = TrainerMetrics("live", registry=registry)
    with caplog.at_level(logging.WARNING, logger="mace_sgl.metrics"):
        metrics.update({"train_steps": "many"})
        metrics.update({"cost_model": {"abs_pct_error": {"prefill": "bad"}}})
        metrics.update(None)  # type: ignore[arg-type]
    assert len([r for r in caplog.records if "update failed" in r.message]) == 1
    metrics.update(STATUS)  # still working after failures
    assert registry.get_sample_value("mace_train_steps", LIVE) == 12


def test_metrics_that_cannot_be_created_are_a_no_op(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
):
    TrainerMetrics("live", registry=registry)
    FeedbackMetrics("live", registry=registry)
    with caplog.at_level(logging.WARNING, logger="mace_sgl.metrics"):
        # The same names again in one registry: prometheus_client refuses duplicates.
        trainer = TrainerMetrics("live", registry=registry)
        feedback = FeedbackMetrics("live", registry=registry)
    assert len([r for r in caplog.records if "disabled" in r.message]) == 2
    trainer.update(STATUS)
    feedback.rows_stored(["live"])
    feedback.queue_depth(4)
    assert registry.get_sample_value("mace_train_steps", LIVE) is None


def test_feedback_rows_and_queue_depth(registry: CollectorRegistry):
    metrics = FeedbackMetrics("live", registry=registry)
    metrics.rows_stored(["live", "live", "someone-elses", "x"])
    metrics.queue_depth(9)
    metrics.queue_depth(4)
    value = registry.get_sample_value
    assert value("mace_feedback_rows_stored_total", LIVE) == 2
    # Client-chosen adapter names share one label value: the series stay bounded.
    assert value("mace_feedback_rows_stored_total", {"adapter": "other"}) == 2
    assert value("mace_feedback_queue_depth", LIVE) == 4


WRITER = textwrap.dedent(
    """
    import sys
    from mace_sgl.metrics import FeedbackMetrics, TrainerMetrics

    status = {"adapter_version": int(sys.argv[1]), "train_steps": 5, "reserve_ms": 2.0,
              "cost_model": {"abs_pct_error": {"decode": 0.1}}}
    TrainerMetrics("live").update(status)
    FeedbackMetrics("live").rows_stored(["live"] * int(sys.argv[2]))
    """
)


def test_multiprocess_files_are_what_sglang_metrics_route_reads(tmp_path: Path):
    """Two processes write in PROMETHEUS_MULTIPROC_DIR, as SGLang's scheduler and HTTP
    processes do; SGLang's /metrics reads the files with a MultiProcessCollector."""
    from prometheus_client import multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for version, rows in (("3", "2"), ("2", "1")):
        subprocess.run(
            [sys.executable, "-c", WRITER, version, rows], env=env, check=True, timeout=60
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    value = registry.get_sample_value
    # Gauges: the most recent write wins (the second process rolled back to v2).
    assert value("mace_adapter_version", LIVE) == 2
    assert value("mace_train_steps", LIVE) == 5
    assert value("mace_reserve_seconds", LIVE) == pytest.approx(0.002)
    assert value("mace_cost_model_abs_pct_error", {**LIVE, "kind": "decode"}) == 10.0
    # Counters: summed over processes.
    assert value("mace_feedback_rows_stored_total", LIVE) == 3
