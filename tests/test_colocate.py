"""benchmarks.colocate's arithmetic: derived SLO targets, paired ratios, harvest."""

from __future__ import annotations

import pytest

from benchmarks.colocate import LOADS, derive_slo, harvest_table, harvests, paired
from benchmarks.loadgen import RequestResult


def test_targets_are_inference_only_p99s():
    results = [RequestResult(sent=0, ttft=0.1 * (i + 1), gaps=[0.01 * (i + 1)]) for i in range(100)]
    results.append(RequestResult(sent=0, error="HTTPError: 500"))  # failures do not count
    assert derive_slo(results) == {"ttft_ms": pytest.approx(9900.0), "tbt_ms": pytest.approx(990.0)}
    with pytest.raises(RuntimeError, match="no request"):
        derive_slo([RequestResult(sent=0, error="x")])


def test_ratios_pair_repeats_and_carry_their_spread():
    rows = {
        ("inference-only", 0.5): [{"tbt_p99_ms": 100.0}, {"tbt_p99_ms": 200.0}],
        ("mace", 0.5): [{"tbt_p99_ms": 110.0}, {"tbt_p99_ms": 220.0}],
        ("fcfs-reserve", 0.5): [{"tbt_p99_ms": None}, {"tbt_p99_ms": 300.0}],
    }
    r = paired(rows, "mace", 0.5, "tbt_p99_ms")
    assert r["mean"] == pytest.approx(1.1) and r["ci95"] == pytest.approx([1.1, 1.1])
    assert paired(rows, "fcfs-reserve", 0.5, "tbt_p99_ms") == {"mean": None, "ci95": None}


def test_harvest_is_per_repeat_share_of_idle_capacity():
    rows = {
        ("training-only", 0.0): [{"train_tokens_per_s": 10.0}],
        ("inference-only", 0.5): [{"idle_fraction": 0.5}, {"idle_fraction": 0.4}],
        ("mace", 0.5): [{"train_tokens_per_s": 2.5}, {"train_tokens_per_s": 4.0}],
    }
    assert harvests(rows, 0.5, "train_tokens_per_s") == pytest.approx([0.5, 1.0])


def test_every_training_policy_gets_its_harvest_mixed_chunks_too():
    rows = {
        ("training-only", 0.0): [{"train_tokens_per_s": 10.0, "train_time_fraction": 1.0}],
        **{("inference-only", load): [{"idle_fraction": 0.5}] * 2 for load in LOADS},
        **{("mace", load): [{"train_tokens_per_s": 1.0, "train_time_fraction": 0.1}] * 2
           for load in LOADS},
        **{("mace+mixed", load): [{"train_tokens_per_s": 2.0, "train_time_fraction": 0.2},
                                  {"train_tokens_per_s": 4.0, "train_time_fraction": 0.3}]
           for load in LOADS},
    }  # fmt: skip
    mixed = harvest_table(rows, "mace+mixed")
    assert set(mixed) == {str(load) for load in LOADS}
    for h in mixed.values():
        assert h["harvest"] == pytest.approx(0.6) and h["by_time"] == pytest.approx(0.5)
        lo, hi = h["ci95"]
        assert lo < 0.6 < hi
    assert harvest_table(rows, "mace")[str(LOADS[0])]["harvest"] == pytest.approx(0.2)
