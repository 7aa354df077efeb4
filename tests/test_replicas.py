"""Data-parallel pieces without a server: LeMix placement on hand-made loads (plain
Python), a tenant's state packed on one replica and installed on another, the
training slots the controller reads, and two ReplicaSync ends in two processes."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mace_sgl.launcher import free_port
from mace_sgl.policy.placement import DecodeMoments, LemixPlacement, ReplicaLoad, TrainingLoad
from mace_sgl.trainer.replicas import (
    POLL_S,
    STORE_CALL_TIMEOUT_S,
    pack_state,
    state_numel,
    unpack_state,
)


def moments(points: list[tuple[int, float]]) -> DecodeMoments:
    """SGLang's decode sums over (batch, step us) points."""
    n = len(points)
    sb = sum(b for b, _ in points)
    st = sum(t for _, t in points)
    return DecodeMoments(n, sb, st, sum(b * b for b, _ in points), sum(b * t for b, t in points))


def test_decaying_moments_follow_a_device_that_slowed_and_stay_finite():
    """SGLang's sums run from the replica's start: after an hour at 10 ms a step, ten
    minutes at 20 ms barely move their fit; the decaying sums follow the new time within
    a few half-lives, keep at least min_weight steps through hours without decodes,
    and start over when the sums go backwards (the replica restarted)."""
    from mace_sgl.policy.placement import DecayingMoments

    points: list[tuple[int, float]] = []
    decayed = DecayingMoments(half_life_s=120.0, min_weight=32.0)
    now = 0.0
    for _ in range(3600):  # an hour, a step a second at 10 ms
        points.append((2, 10_000.0))
        now += 1.0
        if len(points) % 10 == 0:
            decayed.update(moments(points), now)
    for _ in range(600):  # ten minutes at 20 ms
        points.append((2, 20_000.0))
        now += 1.0
        if len(points) % 10 == 0:
            got = decayed.update(moments(points), now)
    assert moments(points).step_ms(2) == pytest.approx(11.4, abs=0.1)  # the whole run's fit
    assert got.step_ms(2) == pytest.approx(20.0, abs=0.5)
    idle = decayed.update(moments(points), now + 30 * 86400.0)  # a month without decodes
    assert idle.n == pytest.approx(32.0) and idle.step_ms(2) == pytest.approx(got.step_ms(2))
    fresh = moments([(1, 5_000.0)] * 10)  # restarted: fewer steps than before
    assert decayed.update(fresh, now + 30 * 86400.0 + 1) == fresh
    assert decayed.update(None, now) == fresh  # no decode yet in a snapshot: as before


def test_decode_moments_fit_the_step_time_line():
    m = moments([(b, 10_000 + 2_000 * b) for b in (1, 2, 4, 8)])  # 10 ms + 2 ms per request
    assert m.step_ms(1) == pytest.approx(12.0)
    assert m.step_ms(10) == pytest.approx(30.0)
    one_size = moments([(4, 20_000), (4, 22_000)])  # no spread in batch size: the mean
    assert one_size.step_ms(9) == pytest.approx(21.0)
    assert DecodeMoments.from_list(None) is None and DecodeMoments.from_list([0] * 6) is None


def loads(**train: float) -> list[ReplicaLoad]:
    decode = moments([(b, 10_000 + 2_000 * b) for b in (1, 2, 4)])
    return [
        ReplicaLoad(
            0, running_reqs=2, prefill_ms_per_token=1.0, decode=decode, timestamp=1.0, **train
        ),  # fmt: skip
        ReplicaLoad(1, running_reqs=2, prefill_ms_per_token=1.0, decode=decode, timestamp=1.0),
    ]


def test_placement_avoids_the_replica_busy_training():
    placement = LemixPlacement()
    busy = loads(training=True, unit_ms=400.0, reserve_ms=20.0)
    choice = placement.choose(busy, prompt_tokens=50, new_tokens=32)
    assert choice.dp_rank == 1
    # It costs exactly what training adds: the unit in flight and the reserve per step.
    assert choice.predicted_ms[0] - choice.predicted_ms[1] == pytest.approx(400.0 + 32 * 20.0)
    # A replica that trains only when idle (no reserve, short units) and serves less is
    # still the better place: the load counts, not the label.
    lighter = [
        ReplicaLoad(0, running_reqs=0, prefill_ms_per_token=1.0, training=True, unit_ms=5.0),
        ReplicaLoad(1, running_reqs=6, prefill_ms_per_token=1.0),
    ]
    assert placement.choose(lighter, 50, 32).dp_rank == 0


def test_serving_goes_to_a_replica_without_training_while_it_holds_the_slo():
    """With SLO targets known, a replica without training work takes every request it is
    predicted to serve within headroom, even where LeMix's score prefers the trainer;
    past its headroom a trainer that holds the SLO serves the overflow, and only when no
    replica holds it does the score choose among all."""
    decode = DecodeMoments(n=10, sb=10, st=10 * 100_000, sbb=10, sbt=10 * 100_000)  # 100 ms
    slo = {"ttft_ms": 2000.0, "tbt_ms": 500.0}

    def pair(queued: int) -> list[ReplicaLoad]:
        trainer = ReplicaLoad(0, prefill_ms_per_token=1.0, decode=decode, timestamp=1.0,
                              training=True, unit_ms=50.0, reserve_ms=10.0, **slo)  # fmt: skip
        server = ReplicaLoad(1, running_reqs=3, waiting_reqs=1, waiting_uncached_tokens=queued,
                             prefill_ms_per_token=1.0, decode=decode, timestamp=1.0, **slo)  # fmt: skip
        return [trainer, server]

    # LeMix's score alone prefers the idle trainer (idle term 1 against 1/5)...
    assert (
        LemixPlacement().choose([replace(ld, ttft_ms=0.0) for ld in pair(100)], 50, 32).dp_rank == 0
    )
    # ...serving first sends it to the replica that holds the SLO with headroom:
    # 100 ms in flight + (100 + 50) x 1 ms = 250 ms <= 0.5 x 2000 ms, 100 ms <= 0.7 x 500 ms.
    choice = LemixPlacement().choose(pair(100), 50, 32)
    assert (choice.dp_rank, choice.candidates) == (1, (1,))
    # A queue the first token would wait beyond the headroom for: the trainer serves
    # the overflow, its unit in flight counted (50 + 50 ms), while it holds the SLO...
    choice = LemixPlacement().choose(pair(900), 50, 32)  # 100 + 950 ms > 1000 ms
    assert (choice.dp_rank, choice.candidates) == (0, (0,))
    # ...and when neither does, every replica is a candidate and the score chooses.
    long_unit = [replace(ld, unit_ms=2000.0) if ld.training else ld for ld in pair(900)]
    assert LemixPlacement().choose(long_unit, 50, 32).candidates == (0, 1)
    # Slow decode steps break the TBT side the same way (400 ms > 0.7 x 500 ms).
    slow = DecodeMoments(n=10, sb=10, st=10 * 400_000, sbb=10, sbt=10 * 400_000)
    loads = [replace(ld, decode=slow) if ld.dp_rank == 1 else ld for ld in pair(100)]
    assert LemixPlacement().choose(loads, 50, 32).candidates == (0,)
    # So do SGLang's running slots: at --max-running-requests the next request waits
    # for one to finish, however short the queue.
    full = [replace(ld, max_running_reqs=4) if ld.dp_rank == 1 else ld for ld in pair(100)]
    assert LemixPlacement().choose(full, 50, 32).candidates == (0,)
    roomy = [replace(ld, max_running_reqs=5) if ld.dp_rank == 1 else ld for ld in pair(100)]
    assert LemixPlacement().choose(roomy, 50, 32).candidates == (1,)


def test_a_replica_at_its_running_cap_is_predicted_to_wait_for_a_slot():
    """At --max-running-requests a request waits for running ones to finish: k waiting
    (this one included) wait k x n x step / R; with no replica holding the SLO, a full
    replica loses the score to a trainer it would have beaten without that wait."""
    decode = DecodeMoments(n=10, sb=10, st=10 * 100_000, sbb=10, sbt=10 * 100_000)  # 100 ms
    slo = {"ttft_ms": 500.0, "tbt_ms": 500.0}
    trainer = ReplicaLoad(0, running_reqs=16, prefill_ms_per_token=1.0, decode=decode,
                          timestamp=1.0, max_running_reqs=32, training=True, unit_ms=400.0,
                          reserve_ms=60.0, **slo)  # fmt: skip
    free = ReplicaLoad(1, running_reqs=31, prefill_ms_per_token=1.0, decode=decode,
                       timestamp=1.0, max_running_reqs=32, **slo)  # fmt: skip
    placement = LemixPlacement()
    assert placement.slot_wait_ms(free, 64) == 0.0  # one slot left
    full = replace(free, running_reqs=32, waiting_reqs=10)
    # 11 wait (10 + this one), one of 32 finishes every 64 x 100 ms / 32 = 200 ms.
    assert placement.slot_wait_ms(full, 64) == pytest.approx(11 * 200.0)
    # The trainer's reserve counts in its step.
    at_cap = replace(trainer, running_reqs=33)
    assert placement.slot_wait_ms(at_cap, 64) == pytest.approx(2 * 64 * 160.0 / 32)
    # One slot left: the free replica holds the SLO and takes the request...
    choice = placement.choose([trainer, free], 40, 64)
    assert (choice.candidates, choice.dp_rank) == ((1,), 1)
    # ...full, neither holds it (the trainer's unit is in the way), the wait goes into
    # its predicted response time, and the trainer wins, where the same replica without
    # the wait would still have scored best.
    choice = LemixPlacement().choose([trainer, full], 40, 64)
    assert choice.candidates == (0, 1)
    assert choice.predicted_ms[1] == pytest.approx(2200.0 + 40 + 64 * 100.0)
    assert choice.dp_rank == 0
    no_wait = choice.predicted_ms[1] - 2200.0
    assert LemixPlacement().score(full, 40, no_wait) > choice.scores[0]
    # n is the mean max_new_tokens placed there, once any was: 64 (placed above), not 8.
    # (A fresh snapshot: the request placed above is in it, not counted again.)
    assert placement.slot_wait_ms(replace(full, timestamp=2.0), 8) == pytest.approx(11 * 200.0)
    # The decode step never counts more than the cap in its batch (the rest wait).
    sloped = moments([(b, 10_000 + 1_000 * b) for b in (1, 8, 32)])  # 10 ms + 1 ms each
    deep = replace(full, decode=sloped, waiting_reqs=40)  # 73 waiting or running
    assert LemixPlacement().predict_ms(deep, 40, 64) == pytest.approx(
        41 * 64 * 42.0 / 32 + 40 + 64 * 42.0
    )
    # Prefill stalls slow both: at a prefill share u, every step lasts 1 / (1 - u).
    stalled = LemixPlacement()
    stalled.prefill_share(replace(full, timestamp=100.0, prefill_busy_us=0.0))
    later = replace(full, timestamp=130.0, prefill_busy_us=15e6)  # half the time in prefill
    u = stalled.prefill_share(later)
    assert u == pytest.approx(0.5 * (1 - math.exp(-6.0)))
    assert stalled.slot_wait_ms(later, 64) == pytest.approx(2200.0 / (1 - u))
    assert stalled.predict_ms(later, 40, 64) == pytest.approx((2200.0 + 64 * 100.0) / (1 - u) + 40)


def test_prefill_stalls_count_against_the_time_per_token():
    """Every prefill stalls the running decodes: a replica that spent most of its recent
    time prefilling is predicted slower per token (step / (1 - prefill share))."""
    decode = DecodeMoments(n=10, sb=10, st=10 * 200_000, sbb=10, sbt=10 * 200_000)  # 200 ms
    placement = LemixPlacement()

    def at(t: float, busy_s: float) -> ReplicaLoad:
        return ReplicaLoad(0, running_reqs=2, prefill_ms_per_token=1.0, decode=decode,
                           timestamp=t, prefill_busy_us=busy_s * 1e6, ttft_ms=2000.0,
                           tbt_ms=500.0)  # fmt: skip

    assert placement.holds_slo(at(100.0, 0.0), 10)  # 200 ms <= 0.7 x 500 ms
    assert placement.prefill_share(at(100.0, 0.0)) == 0.0
    # 30 s later, 24 of them in prefill: 0.8 of the time, weighted 1 - e^-6 in.
    share = placement.prefill_share(at(130.0, 24.0))
    assert share == pytest.approx(0.8 * (1 - math.exp(-30.0 / 5.0)))
    assert not placement.holds_slo(at(130.0, 24.0), 10)  # 200 / 0.2 = 1000 ms
    # A restarted replica's counter starts again from zero: no share yet.
    assert placement.prefill_share(at(131.0, 0.5)) == 0.0


def test_a_burst_between_snapshots_is_spread_and_equal_replicas_take_turns():
    placement = LemixPlacement()
    same = loads()
    ranks = [placement.choose(same, 40, 16).dp_rank for _ in range(6)]
    assert sorted(ranks) == [0, 0, 0, 1, 1, 1]  # placed tokens count until the next snapshot
    fresh = [ReplicaLoad(r, timestamp=2.0) for r in (0, 1)]
    assert {placement.choose(fresh, 40, 16).dp_rank for _ in range(2)} == {0, 1}


def adamw_state(seed: int) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    weights = {"a": torch.randn(4, 3), "b": torch.randn(2, 4)}
    params = [torch.nn.Parameter(t) for t in weights.values()]
    weights = {n: p.data for n, p in zip(weights, params, strict=True)}
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    return weights, opt


def test_packed_state_installs_bit_for_bit():
    src_w, src_opt = adamw_state(0)
    dst_w, dst_opt = adamw_state(1)
    payload = pack_state(src_w, src_opt)
    assert payload.numel() == state_numel(src_w, src_opt) == 3 * (12 + 8) + 2
    unpack_state(payload, dst_w, dst_opt)
    for n in src_w:
        assert torch.equal(src_w[n], dst_w[n])
    a, b = src_opt.state_dict()["state"], dst_opt.state_dict()["state"]
    for i in a:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])), (i, k)
    with pytest.raises(ValueError, match="different flags"):
        unpack_state(payload[:-1], dst_w, dst_opt)


def test_training_slots_carry_each_replicas_state(tmp_path: Path):
    from mace_sgl.plugin.placement import WRITE_EVERY_S, TrainingSlots

    writer0, writer1 = TrainingSlots(tmp_path, 2), TrainingSlots(tmp_path, 2)
    reader = TrainingSlots(tmp_path, 2)
    assert reader.read(0) == TrainingLoad()  # never written: no training news
    writer0.write(0, TrainingLoad(True, 120.0, 8.0, 1500.0, 90.0))
    writer1.write(1, TrainingLoad(False, 0.0, 0.0))
    assert reader.read(0) == TrainingLoad(True, 120.0, 8.0, 1500.0, 90.0)
    assert reader.read(1) == TrainingLoad()
    assert (tmp_path / "training.slots").stat().st_mode & 0o777 == 0o600
    # The next write waits WRITE_EVERY_S after the last (judged at given instants, so a
    # busy machine pausing this test cannot turn "just written" into "due").
    written = writer0.written_at
    assert not writer0.due(written + WRITE_EVERY_S / 2)
    assert writer0.due(written + WRITE_EVERY_S)


def test_lemix_dispatch_weighs_each_new_snapshots_decode_steps_once(tmp_path: Path):
    """The controller's dispatch folds each new snapshot's decode sums (by timestamp)
    into the replica's DecayingMoments, and a ReplicaLoad carries those, not the sums
    from the start."""
    from types import SimpleNamespace

    from sglang.srt.managers.load_snapshot import LoadSnapshot

    from mace_sgl.config import MaceConfig
    from mace_sgl.plugin.placement import LemixDispatch

    def snap(ts: float, points: list[tuple[int, float]]) -> LoadSnapshot:
        m = moments(points)
        return LoadSnapshot(timestamp=ts, dp_rank=0,
                            decode_moments=[m.n, m.sb, m.st, m.sbb, m.sbt, 0.0])  # fmt: skip

    reader = SimpleNamespace(snaps=[])
    controller = SimpleNamespace(
        load_snapshot_reader=SimpleNamespace(read_all=lambda: reader.snaps)
    )
    dispatch = LemixDispatch(controller, MaceConfig(replicas=1, replica_store=str(tmp_path)))
    slow = [(2, 10_000.0)] * 1000
    reader.snaps = [snap(1.0, slow)]
    first = dispatch.loads([0])[0].decode
    assert first == moments(slow)
    dispatch.decode[0].at -= 10 * dispatch.decode[0].half_life_s  # as if long ago
    reader.snaps = [snap(2.0, slow + [(2, 20_000.0)] * 100)]
    for _ in range(3):  # read again and again: the same snapshot counts once
        dispatch.read_at = float("-inf")
        got = dispatch.loads([0])[0].decode
    assert got.n == pytest.approx(132.0)  # 1000 steps decayed to the floor of 32, + 100
    assert got.step_ms(2) == pytest.approx((32 * 10 + 100 * 20) / 132, rel=1e-6)


def test_a_replica_load_joins_sglangs_snapshot_and_the_training_slot():
    from types import SimpleNamespace

    from mace_sgl.plugin.placement import replica_load

    training = TrainingLoad(True, 120.0, 8.0)
    empty = replica_load(1, None, training)  # no snapshot from this replica yet
    assert empty == ReplicaLoad(1, training=True, unit_ms=120.0, reserve_ms=8.0)
    snap = SimpleNamespace(
        num_running_reqs=3, num_waiting_reqs=2, num_waiting_uncached_tokens=40,
        num_total_tokens=900, total_prefill_uncached_tokens=100, total_prefill_busy_us=50_000,
        decode_moments=None, timestamp=5.0, max_running_requests=32,
    )  # fmt: skip
    load = replica_load(1, snap, training)
    assert (load.dp_rank, load.running_reqs, load.waiting_reqs, load.total_tokens) == (1, 3, 2, 900)
    assert load.prefill_ms_per_token == 0.5 and load.training and load.unit_ms == 120.0
    assert (load.prefill_busy_us, load.max_running_reqs) == (50_000, 32)


REPLICA = """
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
from mace_sgl.trainer.replicas import ReplicaSync, group_store

rank, store_dir, addr = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if addr:  # two servers of one replica each, meeting at a TCPStore on addr
    cfg = SimpleNamespace(replicas=1, replica_store="", sync_world_size=2, sync_rank=rank,
                          sync_addr=addr)
    store, grank, world = group_store(cfg, 0)
else:  # one server's two replicas, meeting in a FileStore
    cfg = SimpleNamespace(replicas=2, replica_store=store_dir, sync_world_size=1)
    store, grank, world = group_store(cfg, rank)
assert (grank, world) == (rank, 2)
sync = ReplicaSync(store, grank, world, timeout_s=60)
deadline = time.monotonic() + 60
if rank == 0:
    sync.send("live", 7, torch.arange(10, dtype=torch.float32), lambda: None)
    while not sync.delivered():
        assert time.monotonic() < deadline, "not delivered"
        time.sleep(0.01)
    print(json.dumps({"sent": sync.status()["sent"]}), flush=True)
    time.sleep(1)  # the peer reads before this end goes away
else:
    got = []
    while not got:
        assert time.monotonic() < deadline, "nothing received"
        got = sync.received()
        time.sleep(0.01)
    (u,) = got
    print(json.dumps({"version": u.version, "src": u.src, "payload": u.payload.tolist()}))
# Leave without interpreter teardown: the sync's daemon threads wait inside gloo calls,
# and tearing down under them aborted (exit -6) one run in a few. An assertion above
# fails the script before this line.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("servers", [1, 2])
def test_two_replicas_sync_over_a_loopback_gloo_group(tmp_path: Path, servers: int):
    """Two replicas of one server (FileStore), or two one-replica servers (TCPStore on
    --mace-sync-addr, served by rank 0 on loopback only)."""
    addr = f"127.0.0.1:{free_port()}" if servers == 2 else ""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, str(rank), str(tmp_path), addr],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    sender = json.loads(outs[0][0].strip().splitlines()[-1])
    receiver = json.loads(outs[1][0].strip().splitlines()[-1])
    assert sender == {"sent": 1}
    assert receiver == {"version": 7, "src": 0, "payload": [float(i) for i in range(10)]}


def test_server_load_adds_each_replicas_training_step_to_its_serving_tokens():
    from mace_sgl.plugin.routes import server_loads

    reports = [
        {"dp_rank": 1, "load": 300, "trainer": {"training_tokens": 0}},
        None,  # a scheduler without our state (not up yet)
        {"dp_rank": 0, "load": None, "trainer": {"training_tokens": 120}},
    ]
    assert server_loads(reports) == [
        {"dp_rank": 0, "num_tokens": 120, "num_serving_tokens": 0, "num_training_tokens": 120},
        {"dp_rank": 1, "num_tokens": 300, "num_serving_tokens": 300, "num_training_tokens": 0},
    ]


REJOIN = """
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
from mace_sgl.trainer.replicas import ReplicaSync, group_store

rank, addr, tmp, mode = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
killed, got8 = tmp / "killed", tmp / "got8"
cfg = SimpleNamespace(replicas=1, replica_store="", sync_world_size=2, sync_rank=rank,
                      sync_addr=addr)
store, grank, world = group_store(cfg, 0)
sync = ReplicaSync(store, grank, world, timeout_s=60, rejoin=True, rejoin_wait_s=5,
                   join_wait_s=3, form_timeout_s=5)
deadline = time.monotonic() + 240

def delivered():
    while not sync.delivered():
        assert time.monotonic() < deadline, "not delivered: " + json.dumps(sync.status())
        time.sleep(0.05)

if rank == 0:  # the store's server: lives through the peer's death
    sync.send("live", 7, torch.arange(10, dtype=torch.float32), lambda: None)
    delivered()
    while not killed.exists():  # the test killed the peer
        assert time.monotonic() < deadline, "no kill"
        time.sleep(0.05)
    if mode == "quiet":  # nothing sent while the peer is down: the restarted peer moves
        while sync.generation < 1:  # the counter on
            assert time.monotonic() < deadline, "no regroup"
            time.sleep(0.05)
    # Published while the peer is down (or once it is back): sent again if it failed, in
    # a generation without the peer if it is not back within join_wait_s.
    v8 = torch.full((10,), 8.0)
    sync.send("live", 8, v8, lambda: None)
    delivered()
    print(json.dumps(sync.status()), flush=True)
    # As the trainer does (runtime._announce_versions, keyed on `formed`; within one store
    # the generation does as well): each new generation with the peer in it hears the
    # newest version, until the peer says it has it.
    announced = sync.generation if 1 in sync.members else -1
    while not got8.exists():
        assert time.monotonic() < deadline, "v8 never reached the peer: " + json.dumps(sync.status())
        if sync.generation != announced and 1 in sync.members:
            announced = sync.generation
            sync.send("live", 8, v8, lambda: None)
        time.sleep(0.05)
    if mode in ("long", "dies-forming"):  # generation 2 or later formed: 0's keys deleted
        while sync.stats.pruned_keys == 0:
            assert time.monotonic() < deadline, "nothing pruned: " + json.dumps(sync.status())
            time.sleep(0.05)
    print(json.dumps(sync.status()), flush=True)
    time.sleep(2)  # the peer reads before the store goes away
    os._exit(0)  # not a teardown under gloo's threads: see the end of REPLICA
else:
    while True:
        for u in sync.received():
            print(json.dumps({"version": u.version, "src": u.src, "payload": u.payload.tolist(),
                              "generation": sync.generation}), flush=True)
            if u.version == 8:
                got8.touch()
                sys.stdout.flush()
                os._exit(0)  # not sys.exit: see the end of REPLICA
        assert time.monotonic() < deadline, "nothing received"
        time.sleep(0.01)
"""


def _line(proc: subprocess.Popen, timeout_s: float) -> dict:
    """The next JSON line of proc's stdout, within timeout_s."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    assert sel.select(timeout_s), f"no line in {timeout_s} s"
    line = proc.stdout.readline()
    assert line, f"exited: {proc.wait()} {proc.stderr.read()[-2000:]}"
    return json.loads(line)


@pytest.mark.parametrize("mode", ["publish", "quiet", "long", "dies-forming"])
def test_a_server_killed_and_restarted_rejoins_the_group(tmp_path: Path, mode: str):
    """Two one-replica servers over a TCPStore: the second is SIGKILLed after taking a
    version, and restarted joins a later generation of the group. The first publishes
    while it is down ("publish": its send fails, it moves the generation on, and the
    version goes again, not lost), or stays quiet ("quiet": it noticed nothing; the
    restarted one moves the generation on after `rejoin_wait_s`, the first follows by
    polling), or publishes and the peer stays down ("long": the new generation goes on
    without it after `join_wait_s`, the version is delivered to the members there are,
    and the peer, back later, is taken into the next generation and hears it there), or
    does so after the peer "died while the group formed" ("dies-forming": its mark in
    the next generation is there, so that generation is sealed with it and gloo waits
    for it; the first gives that generation up after `form_timeout_s` and goes on alone
    in the one after)."""
    addr, killed = f"127.0.0.1:{free_port()}", tmp_path / "killed"

    def start(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", REJOIN, str(rank), addr, str(tmp_path), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    first, peer = start(0), start(1)
    procs = [first, peer]
    try:
        got = _line(peer, 120)
        assert (got["version"], got["generation"]) == (7, 0)
        peer.kill()
        peer.wait(timeout=30)
        if mode == "dies-forming":  # as if the peer marked itself in, then died
            from torch.distributed import PrefixStore, TCPStore

            host, port = addr.rsplit(":", 1)
            client = TCPStore(host, int(port), 2, False, datetime.timedelta(seconds=30))
            # in the generation the first's failed send opens, as ReplicaSync._form keys it
            PrefixStore("mace/sync/1/", client).set("in/1", "1")
        killed.touch()
        if mode in ("long", "dies-forming"):  # v8 goes while the peer is down: the group went on
            alone = _line(first, 120)
            assert alone["members"] == [0] and alone["generation"] >= 1, alone
            assert alone["send_failures"] > 0
            if mode == "dies-forming":  # generation 1 was given up, not formed
                assert alone["generation"] >= 2, alone
        else:
            time.sleep(2)  # the first is publishing v8 to a dead peer now (unless quiet)
        again = start(1)
        procs.append(again)
        got = _line(again, 180)
        assert (got["version"], got["src"]) == (8, 0) and got["generation"] >= 1
        assert got["payload"] == [8.0] * 10
        if mode not in ("long", "dies-forming"):
            _line(first, 60)  # v8 delivered (with the peer or without it)
        status = _line(first, 60)
        assert status["members"] == [0, 1] and status["regroups"] >= 1, status
        assert status["sent"] >= 2  # v7 once, v8 at least once (again after the regroup)
        assert (status["send_failures"] > 0) == (mode != "quiet")
        if mode in ("long", "dies-forming"):  # generation 2 or later: 0's keys deleted
            assert status["pruned_keys"] > 0, status
        assert first.wait(timeout=30) == 0 and again.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_regroup_deletes_the_keys_of_generations_every_member_left():
    """Server 0's store holds each generation's keys (gloo addresses, marks, the sealed
    members) under mace/sync/<g>/; the lowest member of a new generation g deletes those
    of generations before g - 1 and nothing else, and a member that seals a deleted
    generation late (a list of its own over the deleted keys) is told it is not in it."""
    from torch.distributed import PrefixStore, TCPStore

    from mace_sgl.trainer.replicas import GEN_KEY, MEMBER_KEY, NotAMember, ReplicaSync, SyncStats

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store = TCPStore("127.0.0.1", server.port, is_master=False,
                     timeout=datetime.timedelta(seconds=10))  # fmt: skip
    for g in range(4):
        gen = PrefixStore(f"mace/sync/{g}/", store)
        for key in ("in/0", "in/1", "members", "rank_0", "rank_1"):
            gen.set(key, "0,1" if key == "members" else "1")
    others = [GEN_KEY, MEMBER_KEY.format(rank=0), "mace/tenants/n", "mace/tenants/3"]
    for key in others:
        store.set(key, "3")
    keys = set(store.list_keys())
    sync = object.__new__(ReplicaSync)  # the store side only: no gloo group, no threads
    sync.store, sync._connect, sync.rejoin, sync.rank, sync.world = store, None, True, 0, 2
    sync.join_wait_s, sync.stats, sync._error = 0.5, SyncStats(), pytest.fail
    sync._prune(1)  # nothing before generation 0
    assert set(store.list_keys()) == keys
    sync._prune(3)
    left = set(store.list_keys())
    gone = {k for k in keys if k.startswith(("mace/sync/0/", "mace/sync/1/"))}
    assert len(gone) == 10 and left == keys - gone
    assert sync.stats.pruned_keys == 10
    # A member that read the counter at 1 long ago (it is at 3 now) forms 1 now: out.
    with pytest.raises(NotAMember):
        sync._members(PrefixStore("mace/sync/1/", store), 1, store)
    assert sync._members(PrefixStore("mace/sync/3/", store), 3, store) == (0, 1)


def test_the_stepping_replica_serves_its_version_once_every_peer_took_it():
    """runtime._publish_delivered, on a stand-in trainer: the deferred version is served
    and reported when the peers took it, unless the tenant was retired (or another
    version came) meanwhile; the step is reported either way."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from mace_sgl.trainer.runtime import MaceTrainer

    published, reported = [], []

    def trainer_with(tenant):
        def publish(t):
            published.append(t.version)
            t.version += 1

        fake = SimpleNamespace(
            unpublished={"live": tenant.version + 1},
            tenants=SimpleNamespace(tenants={"live": tenant}, publish=publish),
            streams=SimpleNamespace(training_work=nullcontext),
            # (version, pairs trained): the losses name the trained pairs
            _report=lambda t, pairs, losses, version: reported.append((version, len(losses))),
        )
        fake._live = lambda t: MaceTrainer._live(fake, t)
        return fake

    def tenant_at(version: int, loaded: bool = True) -> SimpleNamespace:
        return SimpleNamespace(
            name="live", version=version, publisher=SimpleNamespace(loaded=lambda: loaded)
        )

    tenant = tenant_at(4)
    fake = trainer_with(tenant)
    MaceTrainer._publish_delivered(fake, tenant, [([], {1: 0.5})], 5)
    assert (published, reported, tenant.version, fake.unpublished) == ([4], [(5, 1)], 5, {})
    # Retired meanwhile (SGLang no longer holds it): nothing published; the pairs go
    # back untrained at the version before (no checkpoint holds v5 here).
    gone = tenant_at(4, loaded=False)
    fake = trainer_with(gone)
    MaceTrainer._publish_delivered(fake, gone, [([], {1: 0.5})], 5)
    assert (published, reported[-1], gone.version, fake.unpublished) == ([4], (4, 0), 4, {})
    # Retired and created again under the same name: the new tenant is not published.
    old, new = tenant_at(4), tenant_at(0)
    fake = trainer_with(new)
    MaceTrainer._publish_delivered(fake, old, [([], {1: 0.5})], 5)
    assert (published, reported[-1], old.version, new.version) == ([4], (4, 0), 4, 0)
    # Already at v6 (another server's announcement): trained, nothing published.
    moved = tenant_at(6)
    MaceTrainer._publish_delivered(trainer_with(moved), moved, [([], {1: 0.5})], 5)
    assert (published, reported[-1], moved.version) == ([4], (5, 1), 6)
    # A publish that fails rolls back and reports the pairs untrained; serving goes on.
    broken = tenant_at(4)
    fake = trainer_with(broken)
    rolled = []

    def fail(t):
        raise RuntimeError("slot write failed")

    fake.tenants.publish = fail
    fake.tenants.rollback = lambda t, why: rolled.append(why)
    MaceTrainer._publish_delivered(fake, broken, [([], {1: 0.5})], 5)
    assert rolled and "v5" in rolled[0] and reported[-1] == (4, 0) and fake.unpublished == {}


def test_no_step_of_a_tenant_starts_while_its_last_version_reaches_the_peers():
    """runtime._start_step, on a stand-in trainer: a tenant in `unpublished` (its step's
    version sent, not yet served here) gets no new step, another tenant's pairs do; once
    it is served the tenant steps again. A step on an unpublished version would be
    trained on weights the peers may not hold yet."""
    from types import SimpleNamespace

    from mace_sgl.policy.fairshare import FairShare
    from mace_sgl.trainer.jobs import QueuedPair
    from mace_sgl.trainer.runtime import MaceTrainer

    started: list[str] = []

    def fake_with(queue, unpublished, required=None):
        taken: list[int] = []

        def take(picked):
            taken.extend(picked)
            return [queue[i] for i in picked], {}

        fake = SimpleNamespace(
            board=SimpleNamespace(
                queue=queue, take=take, start_step=lambda gen, pairs: started.append(gen)
            ),
            tenants=SimpleNamespace(
                tenants={
                    "live": SimpleNamespace(name="live", version=5),
                    "other": SimpleNamespace(name="other", version=2),
                }
            ),
            link=SimpleNamespace(required=required or {}),
            unpublished=unpublished,
            policy=SimpleNamespace(rank=lambda units, now: sorted(units, key=lambda u: u.arrival)),
            fair=FairShare(),
            lease=None,
            cfg=SimpleNamespace(pairs_per_step=1, pick_order="oldest"),  # by arrival
            _step=lambda tenant, pairs, refs: tenant.name,
        )
        fake._ranked = lambda keep: MaceTrainer._ranked(fake, keep)
        return fake

    def queued(tenant: str, arrival: float) -> QueuedPair:
        return QueuedPair(pair=None, arrival=arrival, loss=None, tenant=tenant)

    # live's pair is older (first in line), but live's v6 is still on its way
    queue = [queued("live", 1.0), queued("other", 2.0)]
    MaceTrainer._start_step(fake_with(queue, {"live": 6}))
    assert started == ["other"]
    MaceTrainer._start_step(fake_with([queued("live", 1.0)], {"live": 6}))
    assert started == ["other"]  # nothing else waits: no step at all
    MaceTrainer._start_step(fake_with([queued("live", 1.0)], {}))
    assert started == ["other", "live"]  # served: it steps again
    # behind a version another replica published (link.required): no step either
    MaceTrainer._start_step(fake_with([queued("live", 1.0)], {}, {"live": 7}))
    assert started == ["other", "live"]


def test_a_tenant_another_server_steps_holds_up_no_other_tenant():
    """runtime._start_step with the lease across servers: the first in line ("live") is
    held by another server, so its try is refused; the next poll passes it over and
    steps "other" instead of trying "live" again at every poll."""
    from types import SimpleNamespace

    from torch.distributed import HashStore

    from mace_sgl.policy.fairshare import FairShare
    from mace_sgl.trainer.jobs import QueuedPair
    from mace_sgl.trainer.lease import ClusterLease
    from mace_sgl.trainer.runtime import MaceTrainer

    store, now = HashStore(), [1000.0]  # a hand-driven clock: the two polls are
    versions = {"live": 5, "other": 2}  # within RETRY_S of each other however slow
    other_server = ClusterLease(store, 1, 2, lambda: dict(versions), lambda: now[0])
    lease = ClusterLease(store, 0, 2, lambda: dict(versions), lambda: now[0])
    lease.renew()
    assert other_server.try_acquire("live", 5)  # the other server steps live
    started: list[str] = []
    queue = [
        QueuedPair(pair=None, arrival=1.0, loss=None, tenant="live"),
        QueuedPair(pair=None, arrival=2.0, loss=None, tenant="other"),
    ]
    fake = SimpleNamespace(
        board=SimpleNamespace(
            queue=queue,
            take=lambda picked: ([queue[i] for i in picked], {}),
            start_step=lambda gen, pairs: started.append(gen),
        ),
        tenants=SimpleNamespace(
            tenants={n: SimpleNamespace(name=n, version=v) for n, v in versions.items()}
        ),
        link=SimpleNamespace(required={}),
        unpublished={},
        policy=SimpleNamespace(rank=lambda units, now: sorted(units, key=lambda u: u.arrival)),
        fair=FairShare(),
        lease=lease,
        cfg=SimpleNamespace(pairs_per_step=1, pick_order="oldest"),  # by arrival
        _step=lambda tenant, pairs, refs: tenant.name,
    )
    fake._ranked = lambda keep: MaceTrainer._ranked(fake, keep)
    MaceTrainer._start_step(fake)
    assert started == [] and lease.refusals == 1  # live first: refused
    MaceTrainer._start_step(fake)
    assert started == ["other"] and lease.refusals == 1
    now[0] += 0.5  # RETRY_S later: live is tried again (still held: refused)
    MaceTrainer._start_step(fake)
    assert lease.refusals == 2


def test_an_update_for_a_tenant_sglang_unloaded_waits_then_is_dropped(monkeypatch):
    """runtime.follow_replicas, on a stand-in trainer: another replica's version of a
    tenant that DELETE unloaded from SGLang here (this replica's tenant list follows
    SGLang only every SYNC_EVERY_S) is not installed (that took a scheduler down once),
    SGLang's adapters are looked at again at once, and the update waits; it is dropped
    after ORPHAN_AFTER_S. A loaded tenant's update installs."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from mace_sgl.trainer import runtime
    from mace_sgl.trainer.replicas import SyncStats, Update, tenant_key
    from mace_sgl.trainer.runtime import ORPHAN_AFTER_S, MaceTrainer

    clock = [1000.0]
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    installed: list[tuple[str, int]] = []
    inbox: list[Update] = []

    def tenant(name: str, loaded: bool) -> SimpleNamespace:
        return SimpleNamespace(
            name=name, version=3,
            publisher=SimpleNamespace(loaded=lambda: loaded, uid=f"uid-{name}"),
        )  # fmt: skip

    def install(t, version, payload, checkpoint):
        installed.append((t.name, version))
        t.version = version

    synced: list[float] = []
    fake = SimpleNamespace(
        replicas=SimpleNamespace(
            delivered=lambda: [], received=lambda: [inbox.pop() for _ in list(inbox)],
            stats=SyncStats(),
        ),
        lease=None,
        tenants=SimpleNamespace(
            tenants={"gone": tenant("gone", False), "kept": tenant("kept", True)},
            install=install,
        ),
        board=SimpleNamespace(step_job=None),
        streams=SimpleNamespace(training_work=nullcontext),
        cfg=SimpleNamespace(replicas=2, sync_rank=0),
        dp_rank=0,
        _updates=[],
        synced_at=clock[0],
        _sync_tenants=lambda: synced.append(clock[0]),
    )  # fmt: skip
    payload = torch.zeros(1)
    inbox += [Update(tenant_key("gone"), 4, payload, 1), Update(tenant_key("kept"), 4, payload, 1)]
    MaceTrainer.follow_replicas(fake)
    assert installed == [("kept", 4)]
    assert fake.synced_at == float("-inf")  # look at SGLang's adapters at the next poll
    assert [(u.key, u.version) for u, _ in fake._updates] == [(tenant_key("gone"), 4)]
    clock[0] += ORPHAN_AFTER_S / 2
    MaceTrainer.follow_replicas(fake)
    assert installed == [("kept", 4)] and len(fake._updates) == 1  # still waiting
    clock[0] += ORPHAN_AFTER_S
    MaceTrainer.follow_replicas(fake)
    assert installed == [("kept", 4)] and fake._updates == []  # dropped
    assert fake.replicas.stats.applied == 1


STORE_RESTART = """
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
from mace_sgl.trainer.replicas import ReplicaSync, group_store, reconnector

rank, addr, tmp = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
restarted = rank == 0 and (tmp / "killed").exists()
cfg = SimpleNamespace(replicas=1, replica_store="", sync_world_size=2, sync_rank=rank,
                      sync_addr=addr)
store, grank, world = group_store(cfg, 0)
sync = ReplicaSync(store, grank, world, timeout_s=60, rejoin=True, rejoin_wait_s=5,
                   join_wait_s=3, form_timeout_s=5, connect=reconnector(cfg, 0))
deadline = time.monotonic() + 240

def delivered():
    while not sync.delivered():
        assert time.monotonic() < deadline, "not delivered: " + json.dumps(sync.status())
        time.sleep(0.05)

def status():
    print(json.dumps({**sync.status(), "epoch": sync.epoch,
                      "store_timeout_s": sync.store.timeout.total_seconds()}), flush=True)

if rank == 0 and not restarted:  # serves the store; the test kills it
    sync.send("live", 7, torch.arange(10, dtype=torch.float32), lambda: None)
    delivered()
    time.sleep(600)
elif rank == 0:  # server 0 again, with a fresh store: hears the survivor's version
    while True:
        for u in sync.received():
            print(json.dumps({"version": u.version, "src": u.src, "payload": u.payload.tolist(),
                              "generation": sync.generation, "epoch": sync.epoch}), flush=True)
            os._exit(0)  # not sys.exit: see the end of REPLICA
        assert time.monotonic() < deadline, "nothing received: " + json.dumps(sync.status())
        time.sleep(0.01)
else:  # the survivor: never restarted
    while not sync.received():
        assert time.monotonic() < deadline, "v7 never came"
        time.sleep(0.01)
    status()
    while not (tmp / "killed").exists():  # server 0 is dead
        assert time.monotonic() < deadline, "no kill"
        time.sleep(0.05)
    # published while server 0 is down: the send fails, is kept, and goes in the group
    # this member forms with the restarted server 0 in its fresh store
    sync.send("live", 8, torch.full((10,), 8.0), lambda: None)
    delivered()
    status()
    time.sleep(2)  # server 0 reads before this member goes
    os._exit(0)
"""


def test_the_group_follows_server_0_into_its_fresh_store_after_a_restart(tmp_path: Path):
    """Two one-replica servers: server 0 (whose first scheduler serves the group's
    TCPStore) is SIGKILLed and restarted with a fresh store; the other server, never
    restarted, connects again, sees the store's new epoch, forms generation 0 there with
    server 0, and the version it published while server 0 was down (its send failed)
    reaches the restarted server 0."""
    addr = f"127.0.0.1:{free_port()}"

    def start(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", STORE_RESTART, str(rank), addr, str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    server0, survivor = start(0), start(1)
    procs = [server0, survivor]
    try:
        before = _line(survivor, 120)  # v7 arrived over the first store's group
        assert before["generation"] == 0 and before["store_restarts"] == 0, before
        # formed: its calls wait at most STORE_CALL_TIMEOUT_S (a vanished host is noticed)
        assert before["store_timeout_s"] == STORE_CALL_TIMEOUT_S, before
        server0.kill()
        server0.wait(timeout=30)
        (tmp_path / "killed").touch()
        time.sleep(3)  # the survivor's store calls fail meanwhile
        again = start(0)
        procs.append(again)
        got = _line(again, 180)
        assert (got["version"], got["src"], got["payload"]) == (8, 1, [8.0] * 10), got
        assert got["generation"] == 0 and got["epoch"] not in ("", before["epoch"]), got
        after = _line(survivor, 60)
        assert after["store_restarts"] == 1 and after["members"] == [0, 1], after
        assert after["epoch"] == got["epoch"] and after["generation"] == 0, after
        # generation 0 again, but a group formed after the first: the failed send waited
        # for it (not for a generation number above the one that failed)
        assert after["formed"] == 1 and after["send_failures"] >= 1, after
        assert survivor.wait(timeout=30) == 0 and again.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@contextlib.contextmanager
def _script(text: str):
    """A Python process running `text` from the checkout root (killed on the way out)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", text], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


# Server 0's store, and a member's connection to it through a proxy that can stop
# answering (its host vanished); `direct`: a new connection, once the old one is given up;
# wait(cond, what): until cond(), or the member's status and exit 1 after LIMIT_S.
BEHIND_A_PROXY = """
import datetime, json, os, sys, time
from torch.distributed import PrefixStore, TCPStore
from mace_sgl.trainer import replicas
from mace_sgl.trainer.replicas import EPOCH_KEY, GEN_KEY, ReplicaSync
from tests.blackhole import BlackHole

replicas.POLL_CALL_S = 1.0  # the deadline of the group thread's polls

master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # server 0's
master.set(EPOCH_KEY, "first")
proxy = BlackHole(master.port)
client = TCPStore("127.0.0.1", proxy.port, is_master=False,
                  timeout=datetime.timedelta(seconds=120))
direct = lambda: TCPStore("127.0.0.1", master.port, is_master=False,
                          timeout=datetime.timedelta(seconds=5))

def wait(cond, what):
    while not cond():
        if time.monotonic() - started > LIMIT_S:
            print(json.dumps({"timeout": what, **sync.status()}), flush=True)
            os._exit(1)
        time.sleep(0.05)
"""

VANISHED = (
    BEHIND_A_PROXY
    + """
LIMIT_S = 30
sync = ReplicaSync(client, 0, 1, rejoin=True, rejoin_wait_s=1, join_wait_s=1,
                   form_timeout_s=5, connect=direct)
proxy.silence()  # the host vanished: the connection answers nothing, closes nothing
started = time.monotonic()
wait(lambda: sync.store is not client, "a new connection")
connected = time.monotonic() - started
master.add(GEN_KEY, 1)  # the group moved on meanwhile (another member failed)
wait(lambda: sync.generation == 1, "the next generation")
print(json.dumps({"connected_s": connected, **sync.status()}), flush=True)
os._exit(0)  # not sys.exit: see the end of REPLICA
"""
)


def test_the_group_thread_follows_a_store_whose_host_vanished():
    """Server 0's host vanishes without closing connections: the group thread's poll
    of the store gives up after its deadline (POLL_CALL_S) and connects again, so it
    follows the group (here: forms the generation the counter moved to) within seconds,
    not when TCP gives up on the silent connection (many minutes)."""
    with _script(VANISHED) as proc:
        got = _line(proc, 90)
        assert "timeout" not in got, got
        assert got["connected_s"] < 1.0 + POLL_S + 5.0, got
        assert got["generation"] == 1 and got["formed"] == 1, got
        assert any("no answer within 1 s" in e for e in got["errors"]), got
        assert proc.wait(timeout=30) == 0


VANISHED_REGROUP = (
    BEHIND_A_PROXY
    + """
LIMIT_S = 60
master.add(GEN_KEY, 1)  # past the first generation: rank 1 of 2 is down
sync = ReplicaSync(client, 0, 2, rejoin=True, rejoin_wait_s=1, join_wait_s=3,
                   form_timeout_s=5, connect=direct)
assert sync.generation == 1 and sync.members == (0,), sync.status()
started = time.monotonic()

master.add(GEN_KEY, 1)  # the group moved on: rank 0 forms generation 2
marks = PrefixStore("mace/sync/2/", master)
wait(lambda: marks.check(["in/0"]), "rank 0 marked in")
proxy.silence()  # the host vanished while rank 0 waits for rank 1 to mark in
silenced, sealed = time.monotonic(), marks.check(["members"])
wait(lambda: sync.store is not client, "a new connection")
connected = time.monotonic() - silenced
wait(lambda: sync.generation == 3, "the generation after the one given up")
print(json.dumps({"sealed_at_silence": sealed, "connected_s": connected,
                  "limit_s": sync.form_limit_s(), **sync.status()}), flush=True)
os._exit(0)  # not sys.exit: see the end of REPLICA
"""
)


def test_a_regroup_whose_store_host_vanished_is_given_up_and_formed_again():
    """Server 0's host vanishes in the middle of a regroup (rank 0 marked itself in and
    waits for its peer): the regroup is given up after the longest it takes with a store
    that answers (form_limit_s), the group thread connects again, moves past the
    generation it gave up (its prefix holds marks of then) and forms the next one,
    instead of waiting in the regroup until TCP gives up on the silent connection."""
    with _script(VANISHED_REGROUP) as proc:
        got = _line(proc, 120)
        assert "timeout" not in got, got
        assert got["sealed_at_silence"] is False, got  # it came within the members' wait
        assert got["connected_s"] < got["limit_s"] + POLL_S, got
        assert got["generation"] == 3 and got["members"] == [0], got
        assert any("did not form within" in e for e in got["errors"]), got
        assert proc.wait(timeout=30) == 0


def test_sends_waiting_for_the_sender_hold_each_tenants_newest_state_only():
    """While the sending thread is held up (a send that waits for the group to form
    again), a step's state per tenant waits, not one per step: a long wait must not hold
    every version's weights and optimizer moments. Every send's `done` is still
    delivered, by the newest state, once it reaches the peers."""
    import queue
    import threading

    import torch
    from waits import wait_until

    from mace_sgl.trainer.replicas import ReplicaSync, SyncStats, tenant_key

    sync = object.__new__(ReplicaSync)
    sync._pending, sync._pending_done = {}, []
    sync._pending_cv = threading.Condition()
    sync._done, sync.stats, sync.every_s = queue.Queue(), SyncStats(), 0.0
    held_up, sent = threading.Event(), []

    def send_all(newest):
        held_up.wait(30)
        sent.append({k: v for k, (v, _) in newest.items()})
        return True

    sync._send_all = send_all
    threading.Thread(target=sync._send_loop, daemon=True).start()
    done = []
    sync.send("live", 1, torch.zeros(4), lambda: done.append(1))
    wait_until(lambda: not sync._pending_done, 10, "the sender took v1 (and is held up)")
    for v in range(2, 7):  # five more steps while it waits
        sync.send("live", v, torch.full((4,), float(v)), lambda v=v: done.append(v))
    sync.send("other", 3, torch.zeros(2), lambda: done.append("other"))
    assert {k: v for k, (v, _) in sync._pending.items()} == {
        tenant_key("live"): 6,
        tenant_key("other"): 3,
    }
    assert len(sync._pending_done) == 6
    held_up.set()
    wait_until(lambda: sync._done.qsize() == 7, 10, "every send delivered")
    for callback in [sync._done.get() for _ in range(7)]:
        callback()
    assert sorted(done, key=str) == [1, 2, 3, 4, 5, 6, "other"]
    assert sent == [{tenant_key("live"): 1}, {tenant_key("live"): 6, tenant_key("other"): 3}]
