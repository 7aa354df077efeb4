"""GPU stream and timing logic (trainer/streams.py) with the device left out.

Stand-ins for CUDA streams and events log what would be queued where, so the rules are
checked on CPU: forwards are timed on the forward stream (not the current one), training
slices run and are timed on the training stream, a bounded number of slices is in
flight, a publish lands on the forward stream after the training stream without a
device-wide sync, and nothing is read before its end event completed.
"""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mace_sgl.trainer import jobs
from mace_sgl.trainer.jobs import JobBoard, QueuedPair
from mace_sgl.trainer.publish import PoolPublisher
from mace_sgl.trainer.runtime import slice_room
from mace_sgl.trainer.sliced import Pair, SliceSpec
from mace_sgl.trainer.streams import DeviceStreams, EventTimer, forward_stream_of


class Device:
    """The log of everything queued, and which stream is current."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.current: FakeStream | None = None
        self.clock = 0.0


class FakeStream:
    def __init__(self, dev: Device, name: str) -> None:
        self.dev, self.name = dev, name

    def wait_stream(self, other: FakeStream) -> None:
        self.dev.log.append(("wait", self.name, other.name))

    def wait_event(self, event: FakeEvent) -> None:
        self.dev.log.append(("wait-event", self.name, event.stream))

    def __repr__(self) -> str:
        return self.name


class FakeEvent:
    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.stream: str | None = None
        self.done = False
        self.t = 0.0

    def record(self, stream: FakeStream) -> None:
        self.stream = stream.name
        self.dev.clock += 0.5
        self.t = self.dev.clock
        self.dev.log.append(("record", stream.name))

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.dev.log.append(("event-sync", self.stream))
        self.done = True

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1000.0


def fake_streams(max_in_flight: int = 4) -> tuple[DeviceStreams, Device]:
    dev = Device()
    schedule = FakeStream(dev, "schedule")
    dev.current = schedule

    @contextlib.contextmanager
    def stream_context(s: FakeStream):
        before, dev.current = dev.current, s
        dev.log.append(("enter", s.name))
        try:
            yield
        finally:
            dev.current = before

    forward = FakeStream(dev, "forward")
    streams = DeviceStreams(
        forward_of=lambda: forward,
        training=FakeStream(dev, "training"),
        stream_context=stream_context,
        current=lambda: dev.current,
        new_event=lambda: FakeEvent(dev),
        max_in_flight=max_in_flight,
    )
    return streams, dev


def test_forward_is_timed_on_the_forward_stream_after_its_inputs():
    streams, dev = fake_streams()
    result = streams.time_forward(lambda: dev.log.append(("forward",)) or "out", "obs")
    assert result == "out"
    # Waits for the schedule stream, then start and end events on the forward stream:
    # never on the (current) schedule stream, where the forward does not run.
    assert dev.log == [
        ("wait", "forward", "schedule"),
        ("record", "forward"),
        ("forward",),
        ("record", "forward"),
    ]
    assert streams.drain_forwards() == []  # not read before the end event completed
    streams.forward_timer.pending[0].end.done = True
    [(payload, seconds)] = streams.drain_forwards()
    assert payload == "obs" and seconds == pytest.approx(0.5)


def test_the_forward_stream_follows_the_overlap_mode():
    sched = SimpleNamespace(enable_overlap=True, forward_stream="fwd", schedule_stream="sched")
    assert forward_stream_of(sched) == "fwd"
    sched.enable_overlap = False  # --disable-overlap-schedule, or --mace-kv-prune
    assert forward_stream_of(sched) == "sched"


def test_without_overlap_a_forward_is_timed_on_the_schedule_stream_it_runs_on():
    streams, dev = fake_streams()
    sched = SimpleNamespace(enable_overlap=False, forward_stream="unused")
    sched.schedule_stream = dev.current
    streams.forward_of = lambda: forward_stream_of(sched)
    streams.time_forward(lambda: None, "obs")
    # No wait (it is the current stream), both events where the forward runs.
    assert dev.log == [("record", "schedule"), ("record", "schedule")]


def test_training_slices_run_and_are_timed_on_the_training_stream():
    streams, dev = fake_streams()
    seen = []

    def run():
        seen.append(dev.current.name)
        time.sleep(0.02)
        return 7

    value, wall = streams.time_slice(run, "spec")
    assert value == 7 and wall >= 0.02  # the launch's wall time, known at once
    assert seen == ["training"]
    assert dev.current.name == "schedule"  # restored afterwards
    records = [e for e in dev.log if e[0] == "record"]
    assert records == [("record", "training"), ("record", "training")]
    # Ordered after trainer work made on the current stream before the slice.
    assert ("wait", "training", "schedule") in dev.log
    assert streams.drain_slices() == []
    streams.slice_timer.pending[0].end.done = True
    assert streams.drain_slices() == [("spec", pytest.approx(0.5))]


def test_slices_in_flight_are_bounded_by_waiting_on_the_oldest_event_only():
    streams, dev = fake_streams(max_in_flight=2)
    for i in range(3):
        streams.time_slice(lambda: None, i)
    # The third launch waited for the first slice's end event, nothing device-wide.
    syncs = [e for e in dev.log if e[0] == "event-sync"]
    assert syncs == [("event-sync", "training")]
    assert len(streams.slice_timer.pending) == 2
    drained = streams.drain_slices()
    assert [p for p, _ in drained] == [0]  # read while waiting, handed out once
    assert streams.drain_slices() == []


def test_publish_lands_on_the_forward_stream_after_the_training_stream():
    streams, dev = fake_streams()
    loading = FakeEvent(dev)
    loading.record(FakeStream(dev, "lora-loader"))  # SGLang's overlap loader, in flight
    with streams.training_work():
        with streams.publish_point(after=loading):
            dev.log.append(("copy", dev.current.name))
        assert dev.current.name == "training"
    i = dev.log.index(("copy", "forward"))
    assert ("wait", "forward", "training") in dev.log[:i]
    assert ("wait-event", "forward", "lora-loader") in dev.log[:i]


def test_on_cpu_everything_is_synchronous_and_untimed_by_events():
    streams = DeviceStreams.cpu()
    assert not streams.on_device
    value, seconds = streams.time_slice(lambda: time.sleep(0.02) or 3, "spec")
    assert value == 3 and seconds >= 0.02  # the slice's own wall time: its cost on CPU
    with streams.training_work(), streams.publish_point():
        pass
    assert streams.drain_slices() == [] and streams.drain_forwards() == []


def test_an_undrained_timer_stays_bounded():
    dev = Device()
    timer: EventTimer[int] = EventTimer(lambda: FakeEvent(dev), max_pending=3)
    s = FakeStream(dev, "s")
    for i in range(5):
        timer.stop(timer.start(s), s, i)
    assert [p.payload for p in timer.pending] == [2, 3, 4]
    assert timer.dropped == 2


def test_job_board_hands_device_spans_to_the_trainer_later(monkeypatch):
    class NoProbe:  # the CUDA allocator probe, left out
        bytes = 123.0

        def __init__(self, *a: Any) -> None:
            pass

        def __enter__(self) -> NoProbe:
            return self

        def __exit__(self, *a: Any) -> None:
            pass

    monkeypatch.setattr(jobs, "MemoryProbe", NoProbe)
    streams, dev = fake_streams()
    board = JobBoard(streams)
    where = []

    def gen():
        where.append(dev.current.name)  # set-up before the first slice
        yield SliceSpec("fwd", 10)
        where.append(dev.current.name)
        yield SliceSpec("bwd", 10)
        where.append(dev.current.name)
        return "done"

    pair = QueuedPair(Pair(1, [1], [2], [3]), 0.0, None, "live")
    job = board.start_step(gen(), [pair])
    first = board.run(job.key, set())
    assert first.on_device and not first.finished and first.spec.kind == "fwd"
    last = board.run(job.key, set())
    assert last.finished and last.value == "done" and board.step_job is None
    assert where == ["training", "training", "training"]
    assert board.drain_device() == []
    for p in streams.slice_timer.pending:
        p.end.done = True
    spans = board.drain_device()
    assert [(s.kind, m, w) for s, _, m, w in spans] == [("fwd", 123.0, "step"),
                                                         ("bwd", 123.0, "step")]  # fmt: skip
    assert all(sec == pytest.approx(0.5) for _, sec, _, _ in spans)


def test_each_slice_is_counted_as_the_work_it_does():
    """/mace/status's train_seconds_by_work: a ref job's slices are reference passes; a
    step's guard and publish slices are their own; the rest is the DPO step."""
    from mace_sgl.trainer.jobs import WORKS, work_of

    assert work_of("ref", "fwd") == work_of("ref", "head") == "ref"
    assert work_of("step", "guard") == "guard" and work_of("step", "publish") == "publish"
    kinds = ("fwd", "head", "bwd", "head_bwd", "opt")
    assert {work_of("step", k) for k in kinds} == {"step"}
    assert set(WORKS) == {"ref", "step", "guard", "publish"}


def test_slice_room_keeps_training_inside_its_reserve():
    assert slice_room(50e9, 0, 1e9) == 50e9  # no reserve: what the device has free
    assert slice_room(50e9, 6e9, 1e9) == 5e9  # the reserve less the resident state
    assert slice_room(2e9, 6e9, 1e9) == 2e9  # never more than is free
    assert slice_room(50e9, 1e9, 2e9) == 0.0


class _Layer:
    def __init__(self) -> None:
        self.weights = {"model.layers.0.self_attn.o_proj.lora_A.weight": torch.zeros(2, 4)}
        self.pinned_weights: dict = {}


class _Pool:
    dtype = torch.float32

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.uid_to_buffer_id = {"uid": 0}

    def load_lora_weight_to_buffer(self, uid, buffer_id, adapter, *a) -> None:  # noqa: ANN001
        self.dev.log.append(("slot-copy", self.dev.current.name, uid, buffer_id))


class _Manager:
    def __init__(self, dev: Device) -> None:
        ref = type("Ref", (), {"lora_name": "live"})()
        self.lora_refs = {"uid": ref}
        self.loras = {"uid": type("Adapter", (), {"layers": [_Layer()]})()}
        self.memory_pool = _Pool(dev)
        self.lora_modules = self.embed_tokens_module = self.lm_head_module = None
        self.notified: list = []

    def _notify_lora_slots_updated(self, slots: set[int]) -> None:
        self.notified.append(slots)


def test_pool_publish_writes_the_slot_at_the_publish_point_without_a_device_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device-wide sync"))
    streams, dev = fake_streams()
    manager = _Manager(dev)
    publisher = PoolPublisher(manager, "live", streams)
    weight = torch.arange(8.0).reshape(2, 4)
    with streams.training_work():
        publisher.publish_weights(
            [("base_model.model.layers.0.self_attn.o_proj.lora_A.default.weight", weight)]
        )
    layer = manager.loras["uid"].layers[0]
    assert torch.equal(layer.weights["model.layers.0.self_attn.o_proj.lora_A.weight"], weight)
    copy = dev.log.index(("slot-copy", "forward", "uid", 0))
    assert ("wait", "forward", "training") in dev.log[:copy]
    assert manager.notified == [{0}]
