"""Operating a training server on the tiny model: only --admin-api-key set, and
--enable-metrics putting mace_* series on SGLang's own /metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import tiny_serve_args

from mace_sgl.launcher import Server

ADMIN_KEY = "admin-only-789"
PAIRS = [
    {"prompt": f"Question {i}: say something", "chosen": "Certainly!", "rejected": f"no {i}"}
    for i in range(3)
]
LIVE = {"adapter": "live"}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(
        tiny_serve_args(
            tiny_model_dir,
            "--mace-train",
            "--mace-state-dir",
            str(tmp_path_factory.mktemp("ops-state")),
            "--enable-metrics",
            "--admin-api-key",
            ADMIN_KEY,
        ),
        tmp_path_factory.mktemp("logs") / "ops-server.log",
    )
    yield srv
    srv.stop()


def metrics(server: Server) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics (which needs no key), by name and labels."""
    r = requests.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def sample(samples: dict, name: str, labels: dict[str, str] = LIVE) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_with_only_an_admin_key_the_controls_need_it(server: Server):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for method, path in [
        ("POST", "/mace/train/pause"),
        ("POST", "/mace/train/resume"),
        ("GET", "/mace/adapters"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.request(method, server.url + path, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
        r = requests.request(method, server.url + path, headers=admin, timeout=30)
        assert r.status_code == 200, (path, r.text)
    # SGLang's NORMAL level: without --api-key, status (and feedback) need no key.
    r = requests.get(server.url + "/mace/status", timeout=30)
    assert r.status_code == 200 and r.json()["training"]["enabled"] is True


def test_metrics_count_stored_feedback_rows(server: Server):
    before = sample(metrics(server), "mace_feedback_rows_stored_total") or 0.0
    r = requests.post(server.url + "/mace/feedback", json=PAIRS[:2], timeout=60)
    assert r.status_code == 200, r.text
    after = metrics(server)
    assert sample(after, "mace_feedback_rows_stored_total") == before + 2
    # Refreshed by the scrape itself; the trainer may already have taken some rows.
    assert 0 <= sample(after, "mace_feedback_queue_depth") <= before + 2


def test_metrics_mirror_the_trainer(server: Server):
    r = requests.post(server.url + "/mace/feedback", json=PAIRS, timeout=60)
    assert r.status_code == 200, r.text
    # The scheduler refreshes its gauges about once a second; training the tiny model's
    # first step takes seconds.
    # Wait for both gauges asserted below: a step whose version the publish guard refuses
    # counts in train_steps without raising the version.
    deadline = time.monotonic() + 180
    while True:
        samples = metrics(server)
        steps = sample(samples, "mace_train_steps")
        version = sample(samples, "mace_adapter_version")
        if steps is not None and steps >= 1 and version is not None and version >= 1:
            break
        assert time.monotonic() < deadline, f"no step and version >= 1:\n{server.tail()}"
        time.sleep(1.0)
    status = requests.get(server.url + "/mace/status", timeout=30).json()
    assert 1 <= sample(samples, "mace_adapter_version") <= status["adapter_version"]
    assert steps <= status["train_steps"]
    for name in (
        "mace_rollbacks",
        "mace_rejected_versions",
        "mace_queued_in_trainer",
        "mace_training_paused",
        "mace_reserve_seconds",
        "mace_starved_seconds",
    ):
        assert sample(samples, name) is not None, name
    errors = {
        dict(labels)["kind"]: value
        for (name, labels), value in samples.items()
        if name == "mace_cost_model_abs_pct_error"
    }
    assert errors and all(v >= 0 for v in errors.values()), errors
    assert set(errors) <= set(status["training"]["cost_model"]["abs_pct_error"])
