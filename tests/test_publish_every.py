"""--mace-publish-every N (runtime._step, on a stand-in trainer): the steps between two
guard checks are reported once the version that holds them is decided: with that
version when it is published, with their losses at the old version when the guard
refuses it (trained, rolled back), and untrained when their training is dropped (a
rollback after an error)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mace_sgl.trainer.runtime import MaceTrainer
from mace_sgl.trainer.sliced import StepResult


def stand_in(verdicts: list[bool]):
    reported: list[tuple[int, float, int]] = []  # (sample id, loss, version)
    rolled: list[str] = []

    def step_slices(pairs, refs):
        return StepResult(losses={p.sample_id: 0.1 * p.sample_id for p in pairs})
        yield  # a generator, as the real one

    def check(version, log):
        published = verdicts.pop(0)
        return SimpleNamespace(published=published, why="" if published else "loops")
        yield

    def publish(t):
        t.version += 1

    def rollback(t, why):
        rolled.append(why)

    tenant = SimpleNamespace(
        name="live", version=0, held_back=[], guard=None,
        stats=SimpleNamespace(train_steps=0, trained_tokens=0, last_loss=None, rejected_versions=0),
    )  # fmt: skip
    fake = SimpleNamespace(
        board=SimpleNamespace(queue=[SimpleNamespace(tenant="live")]),  # more to come
        tenants=SimpleNamespace(activate=lambda t: None, snapshot=lambda t: None,
                                rollback=rollback, publish=publish),
        dpo=SimpleNamespace(step_slices=step_slices, step_tokens=lambda p: 10),
        guard=SimpleNamespace(check=check),
        cfg=SimpleNamespace(publish_every=2),
        totals={"train_steps": 0, "trained_tokens": 0},
        sec_per_token=5e-3, step_seconds=0.0, replicas=None, unreported=set(),
    )  # fmt: skip

    def report(t, pairs, losses, version=None):  # as MaceTrainer._report, to a list
        for p in pairs:
            version_now = t.version if version is None else version
            reported.append((p.sample_id, losses.get(p.sample_id, float("nan")), version_now))
            fake.unreported.discard(p.sample_id)

    fake._report = report
    fake._drop_held_back = lambda t: MaceTrainer._drop_held_back(fake, t)

    def step(*sample_ids: int) -> None:
        queued = [SimpleNamespace(pair=SimpleNamespace(sample_id=i)) for i in sample_ids]
        for _ in MaceTrainer._step(fake, tenant, queued, {}):
            pass

    return fake, tenant, step, reported, rolled


def test_held_back_steps_are_reported_with_the_version_that_holds_them():
    fake, tenant, step, reported, rolled = stand_in([False, True])
    step(1)
    assert reported == [] and len(tenant.held_back) == 1  # no check yet: not reported
    assert fake.unreported == {1}  # still the trainer's: listed in its Ready.held
    step(2)  # checked: refused
    assert [(p, v) for p, _, v in reported] == [(1, 0), (2, 0)] and len(rolled) == 1
    assert all(loss == loss for _, loss, _ in reported)  # trained (losses), not NaN
    step(3)
    step(4)  # checked: published as v1
    assert [(p, v) for p, _, v in reported[2:]] == [(3, 1), (4, 1)] and tenant.version == 1
    step(5)
    MaceTrainer._drop_held_back(fake, tenant)  # as after a failed step's rollback
    p, loss, v = reported[-1]
    assert (p, v) == (5, 1) and loss != loss and tenant.held_back == []  # NaN: untrained


def test_the_last_steps_are_checked_when_no_pair_of_the_tenant_waits():
    """Held back, the pairs of a tenant's last steps would never be reported (nor their
    training served) when no more feedback comes: with its queue empty, a step is
    checked at once."""
    fake, tenant, step, reported, _ = stand_in([True])
    fake.board.queue = []
    step(1)
    assert [(p, v) for p, _, v in reported] == [(1, 1)] and tenant.held_back == []


def test_a_check_that_raises_keeps_the_held_back_steps_for_the_rollback_report():
    fake, tenant, step, reported, _ = stand_in([True])
    step(1)

    def broken(version, log):
        raise RuntimeError("out of memory")
        yield

    fake.guard.check = broken
    with pytest.raises(RuntimeError):  # reaches the job board (_run_unit rolls back)
        step(2)
    assert [[p.sample_id for p in pairs] for pairs, _ in tenant.held_back] == [[1]]  # not lost
    MaceTrainer._drop_held_back(fake, tenant)
    assert [p for p, loss, _ in reported if loss != loss] == [1]


def test_a_tenant_retired_in_its_guard_check_gives_back_the_steps_held_back_before():
    """Retired while a step runs its guard check (the steps held back before it are in
    that check's hands, not on the tenant): every one of their pairs goes back to the
    store, not only the running step's (they stayed in flight until a restart)."""
    fake, tenant, step, reported, _ = stand_in([])
    step(1)  # held back

    def slow_check(version, log):
        yield "a guard slice"
        return SimpleNamespace(published=True, why="")

    fake.guard.check = slow_check
    running = [SimpleNamespace(pair=SimpleNamespace(sample_id=2))]
    gen = MaceTrainer._step(fake, tenant, running, {})
    assert next(gen) == "a guard slice"  # in the check of steps 1 and 2
    assert tenant.held_back == [] and fake.unreported == {1, 2}
    job = SimpleNamespace(gen=gen, pairs=running)

    def drop(keep):  # the retired tenant's job goes, nothing of it was queued
        fake.board.step_job = None
        return []

    released: list[int] = []
    fake.board = SimpleNamespace(step_job=job, drop=drop)
    fake.link = SimpleNamespace(release=released.extend)
    MaceTrainer._release_retired(fake, ["live"], {"live": tenant})
    assert sorted(released) == [1, 2] and fake.unreported == set() and reported == []
    assert tenant.held_back == []
