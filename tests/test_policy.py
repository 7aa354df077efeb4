"""Scheduling policy on hand-made inputs: cost model, priorities, packing, SLO control."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from mace_sgl.policy import IterationView, Profile, Unit, WaitingPrefill, make_policy
from mace_sgl.policy.cost import (
    CostModel,
    Observation,
    features,
    fit_least_squares,
    fit_nonnegative,
)
from mace_sgl.policy.packing import PackingParams, best_fit
from mace_sgl.policy.priority import Priorities
from mace_sgl.policy.slo import SloController, SloTargets, percentile

TRUE = {
    "prefill": [0.01, 5e-4, 2e-5, 3e-4],
    "decode": [0.02, 4e-3, 1e-3, 0.05],
    "fwd": [2e-3, 1e-4],
    "head": [1e-3, 8e-4],
    "bwd": [4e-3, 3e-4],
    "opt": [0.02],
    "publish": [0.01],
}


def exact_cost() -> CostModel:
    """A cost model that predicts exactly TRUE (forgetting 1: no drift in tests)."""
    return CostModel(weights={k: list(v) for k, v in TRUE.items()}, forgetting=1.0)


def true_seconds(
    kind: str, tokens: int = 0, batch: int = 0, context: int = 0, lora: int = 0
) -> float:
    return sum(
        w * x for w, x in zip(TRUE[kind], features(kind, tokens, batch, context, lora), strict=True)
    )


# -- cost model ---------------------------------------------------------------------------


def test_least_squares_recovers_a_linear_model():
    rng = random.Random(0)
    rows = [(rng.randint(1, 512), rng.randint(0, 4096), rng.randint(0, 64)) for _ in range(40)]
    xs = [features("prefill", t, context=c, lora=k) for t, c, k in rows]
    ys = [true_seconds("prefill", t, context=c, lora=k) for t, c, k in rows]
    assert fit_least_squares(xs, ys) == pytest.approx(TRUE["prefill"], rel=1e-6)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_online_correction_converges_from_a_foreign_profile(scale: float):
    start = {k: [w * scale for w in v] for k, v in TRUE.items()}
    model = CostModel(weights=start)
    rng = random.Random(1)
    shapes = [(rng.randint(1, 32), rng.randint(16, 8192)) for _ in range(60)]
    first_err = None
    for batch, ctx in shapes:
        y = true_seconds("decode", batch=batch, context=ctx) * rng.uniform(0.98, 1.02)
        predicted = model.predict("decode", batch=batch, context=ctx)
        first_err = first_err if first_err is not None else abs(predicted - y) / y
        model.observe(Observation("decode", y, batch=batch, context=ctx))
    assert first_err > 0.5  # it really started wrong
    for batch, ctx in [(1, 100), (8, 2000), (32, 8000)]:
        assert model.predict("decode", batch=batch, context=ctx) == pytest.approx(
            true_seconds("decode", batch=batch, context=ctx), rel=0.05
        )
    assert model.abs_pct_error["decode"] < 0.1


def test_cost_profile_round_trip_and_validation():
    model = CostModel.fit(
        [
            Observation("bwd", true_seconds("bwd", t), tokens=t, mem_bytes=1000.0 * t)
            for t in (16, 64, 128, 256)
        ]
    )
    again = CostModel.from_dict(model.to_dict())
    assert again.predict("bwd", 100) == pytest.approx(true_seconds("bwd", 100), rel=1e-6)
    assert again.memory("bwd", 10) == pytest.approx(10_000.0)
    with pytest.raises(ValueError, match="decode"):
        CostModel.from_dict({"weights": {"decode": [1.0]}})
    with pytest.raises(ValueError, match="unknown kind"):
        features("spin", 1)


# -- priorities ---------------------------------------------------------------------------


def test_priorities_order_types_and_age():
    p = Priorities(aging=2.0, gamma=1.0)
    assert p.score("decode", 0) > p.score("prefill", 0) > p.score("train", 0, 0.0)
    # a prefill that waited (3 - 2) / aging seconds catches up with a fresh decode
    assert p.score("prefill", 0.51) > p.score("decode", 0)
    # misaligned pairs (high DPO loss) train first; an untrained pair counts as log 2
    assert p.score("train", 0, 2.0) > p.score("train", 0, None) > p.score("train", 0, 0.1)


# -- best-fit packing ---------------------------------------------------------------------


def unit(job: int, kind: str, tokens: int, arrival: float = 0.0, loss: float | None = None):
    return Unit(job=job, kind=kind, tokens=tokens, arrival=arrival, loss=loss)


def test_best_fit_prefers_the_tightest_fit_among_equal_priorities():
    cost = exact_cost()
    small = unit(1, "fwd", 10)  # 3 ms
    big = unit(2, "fwd", 40)  # 6 ms
    chosen, predicted, _ = best_fit(
        [small, big], 0.0065, float("inf"), cost, Priorities(), 0.0, PackingParams()
    )
    assert [u.job for u in chosen] == [2]
    assert predicted == pytest.approx(0.006)
    # with room for both, both go, tightest first
    chosen, _, _ = best_fit(
        [small, big], 0.01, float("inf"), cost, Priorities(), 0.0, PackingParams()
    )
    assert [u.job for u in chosen] == [2, 1]


def test_best_fit_respects_priority_memory_and_budget():
    cost = exact_cost()
    cost.mem_per_token["bwd"] = 1000.0
    urgent = unit(1, "fwd", 10, loss=3.0)  # high loss: priority well above the rest
    snug = unit(2, "fwd", 40, loss=0.1)
    chosen, _, scores = best_fit(
        [snug, urgent], 0.0065, float("inf"), cost, Priorities(), 0.0, PackingParams()
    )
    assert [u.job for u in chosen] == [1]  # priority first, fit only among near-equals
    assert list(scores) == [1] and scores[1] > Priorities().score("train", 0, 0.1)
    heavy = unit(3, "bwd", 10)  # 7 ms, 10 kB
    chosen, _, _ = best_fit([heavy], 1.0, 5_000.0, cost, Priorities(), 0.0, PackingParams())
    assert chosen == []  # does not fit in memory
    chosen, _, _ = best_fit([heavy], 0.006, 1e9, cost, Priorities(), 0.0, PackingParams())
    assert chosen == []  # does not fit in time
    # no memory room at all (a GPU reserve filled by tenants created since): units of no
    # memory still go (it divided 0 by 0 and raised in the scheduler's hook before)
    step_end = unit(6, "opt", 0)
    chosen, _, _ = best_fit([heavy, step_end], 1.0, 0.0, cost, Priorities(), 0.0, PackingParams())
    assert [u.job for u in chosen] == [6]
    # aging: an old unit outranks a fresh one with a higher loss
    old, fresh = unit(4, "fwd", 10, arrival=-5.0, loss=0.1), unit(5, "fwd", 10, loss=2.0)
    chosen, _, _ = best_fit([fresh, old], 0.004, 1e9, cost, Priorities(), 0.0, PackingParams())
    assert [u.job for u in chosen] == [4]


# -- SLO control --------------------------------------------------------------------------


def test_percentile_nearest_rank():
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 99) == 99.0
    assert percentile(values, 50) == 50.0
    assert percentile([7.0], 99) == 7.0


def test_slo_controller_drops_to_zero_at_risk_and_grows_with_slack():
    slo = SloController(SloTargets(ttft_ms=1000, tbt_ms=100), window=50, step=0.1)
    for _ in range(50):
        slo.record_tbt(0.040)
    factors = [slo.update() for _ in range(10)]
    assert factors[-1] == 1.0 and factors == sorted(factors)
    slo.record_tbt(0.095)  # one gap near the target is in the p99 of 51
    assert slo.update() == 0.0
    for _ in range(60):
        slo.record_tbt(0.040)  # the slow gap leaves the window
    assert slo.update() > 0.0
    slo.record_request(0.5, 0.05)
    slo.record_request(1.5, 0.05)  # TTFT missed
    slo.record_request(0.5, 0.2)  # TBT missed
    assert slo.status()["slo_attainment"] == pytest.approx(1 / 3)


def test_slo_controller_on_request_basis_holds_requests_tpot_not_single_gaps():
    targets = SloTargets(ttft_ms=1000, tbt_ms=100, tbt_basis="request")
    slo = SloController(targets, window=64, step=0.1)
    for _ in range(50):
        slo.record_tbt(0.040)
    slo.record_tbt(0.500)  # one prefill stall: the gap p99 is far over the target ...
    for _ in range(16):
        slo.record_request(0.2, 0.050)  # ... but every request's TPOT has slack
    assert slo.status()["tbt_p99_ms"] == pytest.approx(500.0)
    assert slo.update() > 0.5 and slo.risk() == pytest.approx(0.5)  # TPOT 50 of 100 ms
    slo.record_request(0.2, 0.095)  # one request's TPOT near its target
    assert slo.update() == 0.0
    assert "request TPOT p99 95 ms" in slo.risk_reason()
    with pytest.raises(ValueError, match="tbt_basis"):
        SloTargets(tbt_basis="token")
    assert SloTargets.from_dict(targets.to_dict()) == targets
    with pytest.raises(ValueError, match="unknown slo keys"):
        SloTargets.from_dict({"ttft_ms": 100, "tbt": 5})  # a typo is an error


# -- policies -----------------------------------------------------------------------------


def profile(ttft_ms: float = 1000.0, tbt_ms: float = 100.0) -> Profile:
    return Profile(cost=exact_cost(), slo=SloTargets(ttft_ms=ttft_ms, tbt_ms=tbt_ms))


def test_inference_only_never_trains():
    policy = make_policy("inference-only", profile())
    plan = policy.plan(IterationView(now=0.0, idle=True, units=(unit(1, "fwd", 1),)))
    assert plan.budget_s == 0.0 and plan.units == ()


def test_fcfs_reserve_runs_in_arrival_order_and_accrues_credit():
    policy = make_policy("fcfs-reserve", profile(), reserve_s=0.004)
    late, early = unit(1, "fwd", 10, arrival=2.0), unit(2, "bwd", 10, arrival=1.0)  # 3, 7 ms
    runs = []
    for _ in range(3):
        plan = policy.plan(IterationView(now=3.0, decode_batch=1, units=(late, early)))
        runs.append([u.job for u in plan.units])
        policy.charge(plan.predicted_s)
    # the oldest unit (7 ms) waits for two iterations of 4 ms credit, then both run
    assert runs == [[], [2], []] or runs == [[], [2, 1], []]
    assert make_policy("fcfs-reserve", profile()).plan(
        IterationView(now=0.0, idle=True, units=(early,))
    ).units == (early,)


def test_mace_budget_follows_tbt_room_waiting_prefills_and_risk():
    policy = make_policy("mace", profile(tbt_ms=100.0))
    policy.slo.factor = 1.0
    units = tuple(unit(i, "fwd", i) for i in range(1, 6))  # 2.1 .. 2.5 ms
    light = policy.plan(IterationView(now=0.0, decode_batch=1, decode_context=100, units=units))
    heavy = policy.plan(IterationView(now=0.0, decode_batch=16, decode_context=4000, units=units))
    # the smaller of 0.9 * 100 ms - the predicted decode iteration and 10% of it
    d_light = true_seconds("decode", batch=1, context=100)
    assert light.budget_s == pytest.approx(min(0.09 - d_light, 0.1 * d_light))
    d_heavy = true_seconds("decode", batch=16, context=4000)  # 0.088 s: 2 ms of room left
    assert heavy.budget_s == pytest.approx(0.09 - d_heavy)
    assert heavy.budget_s < light.budget_s
    assert light.predicted_s <= light.budget_s and light.units
    waiting = policy.plan(
        IterationView(now=0.0, decode_batch=1, waiting=(WaitingPrefill(50, 0.0),), units=units)
    )
    assert waiting.budget_s == 0.0 and waiting.units == ()
    idle = policy.plan(IterationView(now=0.0, idle=True, units=units))
    assert idle.budget_s == pytest.approx(0.25)  # a quarter of the TTFT target
    # a unit bigger than any budget still runs when idle, so its job cannot stall
    huge = unit(9, "head", 10**6)
    busy = policy.plan(IterationView(now=0.0, decode_batch=1, units=(huge,)))
    assert busy.units == ()
    assert policy.plan(IterationView(now=0.0, idle=True, units=(huge,))).units == (huge,)
    for _ in range(20):
        policy.slo.record_tbt(0.099)
    policy.slo.update()
    assert policy.plan(IterationView(now=0.0, decode_batch=1, units=units)).units == ()


def test_mace_credit_runs_units_larger_than_one_iterations_share():
    """A unit costs 2.5 iterations' share of training time: it runs every 2-3 iterations,
    never past the room under the TBT target, and the credit is gone once a tail is at
    risk."""
    policy = make_policy("mace", profile(tbt_ms=100.0))
    policy.slo.factor = 1.0
    view = IterationView(now=0.0, decode_batch=1, decode_context=100, units=())
    serve = true_seconds("decode", batch=1, context=100)
    share, room = 0.1 * serve, 0.09 - serve
    tokens = round((2.5 * share - TRUE["fwd"][0]) / TRUE["fwd"][1])  # fwd: 2 ms + 0.1 ms/token
    big = unit(1, "fwd", tokens)
    cost = true_seconds("fwd", tokens=tokens)
    assert share < cost < room
    ran = 0
    for _ in range(40):
        plan = policy.plan(replace(view, units=(big,)))
        assert plan.budget_s <= room + 1e-12
        if plan.units:
            ran += 1
            policy.charge(plan.predicted_s)
    assert ran == pytest.approx(40 * share / cost, abs=1)
    for _ in range(20):
        policy.slo.record_tbt(0.099)
    policy.slo.update()
    assert policy.slo.factor == 0.0
    assert policy.plan(replace(view, units=(big,))).units == () and policy.credit == 0.0


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="inference-only, fcfs-reserve, mace, synchronous"):
        make_policy("lottery", profile())


def test_profile_file_round_trip(tmp_path: Path):
    p = profile()
    p.meta["device"] = "test"
    path = tmp_path / "p.json"
    p.save(path)
    loaded = Profile.load(path)
    assert loaded.meta == {"device": "test"}
    assert loaded.slo == p.slo
    assert loaded.cost.predict("head", 100) == pytest.approx(true_seconds("head", 100))
    path.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="mace-sgl-profile/1"):
        Profile.load(path)


def test_costs_never_predict_negative_terms():
    # A noisy prefill sweep where the quadratic term fits negative: it counts as zero.
    xs = [features("prefill", t, context=t) for t in (16, 64, 256, 512)]
    ys = [0.010, 0.012, 0.030, 0.040]
    w = fit_least_squares(xs, ys)
    assert w[2] < 0  # the unconstrained fit extrapolates longer prompts as cheaper
    assert min(fit_nonnegative(xs, ys)) >= 0.0
    model = CostModel.fit(
        [
            Observation("prefill", y, tokens=t, context=t)
            for t, y in zip((16, 64, 256, 512), ys, strict=True)
        ]
    )
    assert model.predict("prefill", 4096, context=4096) > model.predict("prefill", 512, context=512)


def test_synchronous_runs_everything_at_once():
    policy = make_policy("synchronous", profile())
    units = (unit(1, "bwd", 500, arrival=2.0), unit(2, "head", 10**5, arrival=1.0))
    plan = policy.plan(IterationView(now=3.0, decode_batch=8, units=units))
    assert [u.job for u in plan.units] == [2, 1] and policy.max_rounds > 10**5
    # /mace/status is JSON: no infinity in it (a first drift run crashed the route)
    json.dumps(policy.status(), allow_nan=False)


# -- long runs: bounded estimator, no training on broken numbers, starvation, floor --------


@pytest.mark.parametrize("forgetting", [0.99, 0.97, 0.9])
def test_steady_load_never_winds_the_cost_model_up(forgetting: float):
    # A steady load repeats one feature vector: unbounded RLS covariance blew up here
    # (0.10 s after 1,000 updates, 4.7e61 s after 5,000, NaN after 20,000).
    model = CostModel(forgetting=forgetting)
    rng = random.Random(2)
    for i in range(20_000):
        y = 0.1 + rng.gauss(0.0, 0.005)
        model.observe(Observation("decode", y, batch=8, context=2048))
        if i % 1000 == 999:
            assert model.predict("decode", batch=8, context=2048) == pytest.approx(0.1, rel=0.1)
    assert all(math.isfinite(w) for w in model.models["decode"].w)
    assert model.abs_pct_error["decode"] < 0.2
    # After the long steady stretch it still follows a changed device (e.g. a slower one).
    for _ in range(300):
        model.observe(Observation("decode", 0.3, batch=8, context=2048))
    assert model.predict("decode", batch=8, context=2048) == pytest.approx(0.3, rel=0.1)


def test_cost_model_ignores_non_finite_observations():
    model = exact_cost()
    before = model.predict("decode", batch=4, context=512)
    for bad in (float("nan"), float("inf"), -1.0):
        model.observe(Observation("decode", bad, batch=4, context=512))
    assert model.predict("decode", batch=4, context=512) == before


def test_non_finite_predictions_mean_no_training():
    for name in ("mace", "fcfs-reserve"):
        policy = make_policy(name, profile(tbt_ms=100.0))
        policy.slo.factor = 1.0
        policy.cost.models["decode"].w = [float("nan")] * 4
        policy.cost.models["fwd"].w = [float("nan")] * 2
        units = (unit(1, "fwd", 4), unit(2, "fwd", 8))
        plan = policy.plan(IterationView(now=0.0, decode_batch=2, decode_context=64, units=units))
        assert plan.units == (), name
        assert plan.why, name
    # best_fit on its own: a NaN budget is no budget, a NaN unit cost never fits
    cost = exact_cost()
    assert (
        best_fit(units, float("nan"), float("inf"), cost, Priorities(), 0.0, PackingParams())[0]
        == []
    )
    cost.models["fwd"].w = [float("nan")] * 2
    assert best_fit(units, 1.0, float("inf"), cost, Priorities(), 0.0, PackingParams())[0] == []


def test_mace_says_why_it_trains_nothing():
    policy = make_policy("mace", profile(tbt_ms=100.0))
    units = (unit(1, "fwd", 4),)
    for _ in range(50):
        policy.slo.record_tbt(0.150)  # p99 150 ms against a 100 ms target
    policy.slo.update()
    plan = policy.plan(IterationView(now=0.0, decode_batch=2, decode_context=64, units=units))
    assert plan.units == () and "TBT p99 150 ms" in plan.why
    waiting = policy.plan(
        IterationView(now=0.0, decode_batch=1, waiting=(WaitingPrefill(9, 0.0),), units=units)
    )
    assert "prefill" in waiting.why


def _overloaded(floor: float):
    policy = make_policy("mace", profile(tbt_ms=100.0), floor=floor)
    for _ in range(50):
        policy.slo.record_tbt(0.5)  # far over target: the SLO controller says zero
    return policy


def _busy_iterations(policy, units, n: int, period_s: float = 0.1, now: float = 0.0):
    """n busy iterations `period_s` apart, each re-planned as units run (as the trainer
    does); returns the predicted seconds of forced units and the time after them."""
    forced = 0.0
    for _ in range(n):
        now += period_s
        policy.slo.update()
        spent = 0.0
        for _ in range(policy.max_rounds):
            view = IterationView(now=now, decode_batch=8, decode_context=4096, units=units,
                                 spent_s=spent)  # fmt: skip
            plan = policy.plan(view)
            if not plan.units:
                break
            assert plan.forced
            spent += plan.predicted_s
        forced += spent
    return forced, now


def test_train_floor_trains_a_share_of_busy_time_under_overload():
    small = (unit(1, "bwd", 8),)  # 6.4 ms, under one iteration's credit at 0.1
    for floor in (0.0, 0.1, 0.25):
        forced, now = _busy_iterations(_overloaded(floor), small, 100)
        # 10 s of busy time: floor x the time since the first iteration, within one unit
        assert forced == pytest.approx(floor * (now - 0.1), abs=0.0065), floor
    # A unit larger than the cap (0.5 s) still runs, once the credit reaches the cap.
    big = (unit(1, "bwd", 2653),)  # 0.8 s
    policy = _overloaded(0.25)
    forced, _ = _busy_iterations(policy, big, 45)  # 0.25 x 0.1 s: the cap after 20
    assert forced == pytest.approx(2 * 0.8, rel=1e-3) and policy.floor_units == 2
    # Idle time earns nothing: the first busy iteration after it starts from zero.
    policy = _overloaded(0.1)
    policy.plan(IterationView(now=0.0, idle=True, units=small))
    forced, _ = _busy_iterations(policy, small, 1, period_s=60.0)
    assert forced == 0.0
    with pytest.raises(ValueError, match="share"):
        make_policy("mace", profile(), floor=1.5)


def test_placement_sees_the_floors_share_of_each_busy_iteration():
    """With the SLO budget at zero (overloaded), the training time a replica reports for
    placement is the floor's share of its busy iterations, so LeMix places a request on
    the replica that is not training."""
    from mace_sgl.policy.placement import DecodeMoments, LemixPlacement, ReplicaLoad

    reserve = {}
    for floor in (0.0, 0.25, 0.5):
        policy = _overloaded(floor)
        _busy_iterations(policy, (unit(1, "bwd", 8),), 30, period_s=1.4)
        assert policy.last_budget_s == 0.0
        reserve[floor] = policy.training_reserve_s()
        assert reserve[floor] == pytest.approx(floor * 1.4, rel=1e-9), floor
        # Gone idle, the policy's budget is the room for one unit before a request may
        # arrive, not time added to each iteration: what placement sees stays.
        policy.plan(IterationView(now=100.0, idle=True, units=(unit(1, "bwd", 8),)))
        assert policy.last_budget_s > 0.0  # the idle budget (0.25 s here)
        assert policy.training_reserve_s() == pytest.approx(floor * 1.4, rel=1e-9), floor
    steps = DecodeMoments(n=10, sb=10, st=10 * 1_000_000.0, sbb=10, sbt=10 * 1_000_000.0)
    both = dict(decode=steps, prefill_ms_per_token=1.0, timestamp=1.0)  # 1 s decode steps
    other = ReplicaLoad(1, running_reqs=2, **both)
    holder = ReplicaLoad(0, running_reqs=1, training=True, **both)
    # The holder serves fewer requests: without the floor's time it is the better place;
    # with the floor at 0.5 (0.7 s more per 1.4 s iteration), the other replica is.
    assert LemixPlacement().choose([holder, other], 40, 64).dp_rank == 0
    floored = replace(holder, reserve_ms=1000 * reserve[0.5])
    assert LemixPlacement().choose([floored, other], 40, 64).dp_rank == 1


def _forced_jobs(units: tuple[Unit, ...], n: int = 60) -> list[int]:
    """The jobs of the units the floor forced in n overloaded iterations 0.1 s apart."""
    policy, jobs = _overloaded(0.25), []
    for i in range(1, n + 1):
        policy.slo.update()
        view = IterationView(now=0.1 * i, decode_batch=8, decode_context=4096, units=units)
        jobs += [u.job for u in policy.plan(view).units]
    return jobs


def test_train_floor_advances_the_step_in_flight_before_references_ahead():
    """Forced by the floor: the step's own unit, though a reference pass of a queued pair
    is cheaper (the step is what publishes a version); without a step, the cheapest."""
    ref = unit(1, "fwd", 146)
    step = Unit(job=2, kind="bwd", tokens=146, arrival=0.0, step=True)
    jobs = _forced_jobs((ref, step))
    assert len(jobs) >= 3 and set(jobs) == {2}
    jobs = _forced_jobs((ref, replace(step, step=False)))
    assert len(jobs) >= 3 and set(jobs) == {1}


def test_recent_attainment_shows_the_rate_now_not_since_start():
    slo = SloController(SloTargets(ttft_ms=1000.0, tbt_ms=100.0), window=10)
    for _ in range(10):
        slo.record_request(0.1, 0.05)  # the first, unloaded requests meet the SLO
    for _ in range(30):
        slo.record_request(0.1, 0.25)  # then a steady load that misses it
    status = slo.status()
    assert status["slo_attainment"] == 0.25  # 10 of 40 since start: looks like drift
    assert status["slo_attainment_recent"] == 0.0  # the rate now


def test_decode_cost_learns_what_adapter_rows_add():
    """One stream alternating adapter and base requests: the cost is bimodal in the rows
    that run an adapter, which the LoRA term captures (without it the running error sat
    near 100% in the soak)."""
    model = CostModel()
    rng = random.Random(3)
    for i in range(400):
        lora = (i // 40) % 2  # requests of 40 tokens, every other one on the adapter
        y = true_seconds("decode", batch=1, context=200 + i % 40, lora=lora)
        model.observe(Observation("decode", y * rng.uniform(0.97, 1.03), batch=1,
                                  context=200 + i % 40, lora=lora))  # fmt: skip
    for lora in (0, 1):
        assert model.predict("decode", batch=1, context=220, lora=lora) == pytest.approx(
            true_seconds("decode", batch=1, context=220, lora=lora), rel=0.1
        )
    assert model.abs_pct_error["decode"] < 0.1


def test_profiles_from_before_the_lora_term_still_load():
    old = CostModel.from_dict(
        {"weights": {"decode": [0.02, 4e-3, 1e-3], "prefill": [0.01, 5e-4, 2e-5]}}
    )
    assert old.predict("decode", batch=1) == pytest.approx(0.024)
    assert old.predict("decode", batch=1, lora=1) > old.predict("decode", batch=1)


def test_prefill_cost_fits_nonnegative_weights_not_clipped_ones():
    """Short, mostly cached prompts as in the soak (extends of 1 to 36 tokens behind a
    ~30-token cached prefix) with a cost concave in the tokens: the unconstrained fit pairs
    a large tokens weight with a negative tokens x context one. Predicting with the
    negative weight clipped to zero over-predicted long extends 2-3x (the running error
    climbed to 149% in the soak); the non-negative fit predicts each shape within 25%."""
    model = CostModel()
    rng = random.Random(5)
    shapes = [(1, 30, 0), (8, 30, 0), (9, 30, 9), (36, 0, 0), (35, 0, 35), (1, 36, 1)]

    def cost(t: int, lora: int) -> float:
        return 0.22 + 0.025 * t - 0.0004 * t * t + 0.006 * lora

    for i in range(300):
        t, prefix, lora = shapes[i % len(shapes)]
        y = cost(t, lora) * rng.uniform(0.9, 1.1)
        model.observe(Observation("prefill", y, tokens=t, context=prefix + t, lora=lora))
    assert min(model.models["prefill"].weights) >= 0.0
    for t, prefix, lora in shapes:
        predicted = model.predict("prefill", tokens=t, context=prefix + t, lora=lora)
        assert predicted == pytest.approx(cost(t, lora), rel=0.25), (t, prefix, lora)
    assert model.abs_pct_error["prefill"] < 0.25
