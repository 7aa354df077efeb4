"""Where serving and training work runs on a GPU, and how long it took there.

On CPU every forward and training slice runs synchronously in the scheduler's thread:
the wall clock times it, and no ordering is needed. On a GPU three things differ:

- With overlap scheduling (SGLang's default on a GPU) each forward runs on the
  scheduler's *forward stream* (`Scheduler.forward_stream`), not on the current (schedule)
  stream; without it (`--disable-overlap-schedule`, implied by `--mace-kv-prune`) it runs
  on the schedule stream itself. `forward_stream_of` says which, asked at each use. A
  forward is timed with CUDA events recorded on that stream, after it waits for the
  schedule stream as SGLang's run_batch does anyway, so the span is the forward's own
  (including any time the GPU waits for the CPU to launch its kernels).
- Training slices run on a *training stream* of their own: they read only the frozen
  base weights and the trainer's tensors, so a serving forward never waits behind them
  (on the schedule stream it would: SGLang's forward waits for that stream). A slice is
  timed with events on the training stream; the CPU time of its launch is not its cost.
  At most `max_in_flight` timed slices are queued ahead of the device: past that the
  oldest one's end event is waited for (that event only, never the device).
- A publish writes the trainer's weights into SGLang's LoRA pool slot. The slot copy is
  queued on the forward stream after that stream waits for the training stream: every
  forward queued before reads the old weights, every one after the new. There is no
  device-wide `torch.cuda.synchronize()`: the host waits only where it copies the new
  weights into SGLang's CPU copy of the adapter, for the training stream that wrote them.

Times are read when their end event has completed (`drain`), never waited for; the
deques are bounded, so an estimator that stops draining cannot grow memory.
The device is reached through `torch.cuda` only in `DeviceStreams.for_scheduler` and
`cuda_events`; everything else takes stream and event objects, so tests run it on CPU
with stand-ins.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")  # what a timing is about (an Observation, a slice spec)


@dataclass
class Pending(Generic[P]):
    start: Any
    end: Any
    payload: P


class EventTimer(Generic[P]):
    """Spans of device work between two events recorded on the stream that runs it."""

    def __init__(self, new_event: Callable[[], Any], max_pending: int = 256) -> None:
        self.new_event = new_event
        self.pending: deque[Pending[P]] = deque()
        self.max_pending = max_pending
        self.dropped = 0  # timings given up because too many were pending

    def start(self, stream: Any) -> Any:
        ev = self.new_event()
        ev.record(stream)
        return ev

    def stop(self, start: Any, stream: Any, payload: P) -> None:
        end = self.new_event()
        end.record(stream)
        if len(self.pending) >= self.max_pending:
            self.pending.popleft()  # bounded: an undrained timer forgets its oldest
            self.dropped += 1
        self.pending.append(Pending(start, end, payload))

    def drain(self) -> list[tuple[P, float]]:
        """(payload, seconds) of every span whose end completed, oldest first; stops at
        the first one still running (spans on one stream complete in order)."""
        done = []
        while self.pending and self.pending[0].end.query():
            p = self.pending.popleft()
            done.append((p.payload, p.start.elapsed_time(p.end) / 1000.0))
        return done

    def wait_oldest(self) -> None:
        """Block until the oldest pending span ended (its event only)."""
        if self.pending:
            self.pending[0].end.synchronize()


def cuda_events() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)


@dataclass
class DeviceStreams:
    """The streams of one scheduler process: None on CPU (work is synchronous there)."""

    # The stream SGLang's forwards run on, asked at each use (it depends on the overlap
    # mode, and SGLang may replace its schedule stream when its event loop starts).
    forward_of: Callable[[], Any] | None = None
    training: Any = None  # ours
    # Torch's stream API, given so tests can stand in for it: stream_context(s) makes s
    # current; current() is the current stream.
    stream_context: Callable[[Any], Any] | None = None
    current: Callable[[], Any] | None = None
    new_event: Callable[[], Any] = cuda_events
    max_in_flight: int = 4
    slice_timer: EventTimer[Any] = field(init=False)
    forward_timer: EventTimer[Any] = field(init=False)
    # device spans read while waiting for room (time_slice), handed out by drain_slices
    pending_slices: list[tuple[Any, float]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.slice_timer = EventTimer(self.new_event)
        self.forward_timer = EventTimer(self.new_event)

    @classmethod
    def cpu(cls) -> DeviceStreams:
        return cls()

    @classmethod
    def for_scheduler(cls, scheduler: Any, device: Any) -> DeviceStreams:
        """The forward stream SGLang's run_batch uses, and a new training stream; CPU
        streams when the model is not on CUDA."""
        if str(getattr(device, "type", device)).split(":")[0] != "cuda":  # "cuda:1" too
            return cls.cpu()
        import torch

        return cls(
            forward_of=lambda: forward_stream_of(scheduler),
            training=torch.cuda.Stream(device=device),
            stream_context=torch.cuda.stream,
            current=torch.cuda.current_stream,
        )

    @property
    def on_device(self) -> bool:
        return self.training is not None

    @property
    def forward(self) -> Any:
        return self.forward_of() if self.forward_of is not None else None

    def settle_start_up(self) -> None:
        """Once, before serving starts: all work queued so far (the trainer's set-up, the
        first slot writes) completes, so no stream reads it half done. Never while
        serving."""
        if self.on_device:
            import torch

            torch.cuda.synchronize()

    # -- forwards ----------------------------------------------------------------------

    def time_forward(self, run: Callable[[], Any], payload: Any) -> Any:
        """Run one forward launch and time it on the forward stream (GPU only)."""
        here, forward = self.current(), self.forward
        if here != forward:
            # run_batch makes the forward stream wait for the schedule stream first
            # thing; waiting here instead puts the start event after the inputs are ready.
            forward.wait_stream(here)
        start = self.forward_timer.start(forward)
        result = run()
        self.forward_timer.stop(start, forward, payload)
        return result

    # -- training ----------------------------------------------------------------------

    @contextlib.contextmanager
    def training_work(self) -> Iterator[None]:
        """Make the training stream current (a no-op on CPU). It first waits for the
        stream that was current (the schedule stream), so trainer work queued there
        before is ordered before it. Under overlap SGLang makes the schedule stream wait
        for the forward in flight (its WAR barrier), so slices run after that forward on
        the device rather than beside it; the next forward never waits for them."""
        if not self.on_device:
            yield
            return
        self.training.wait_stream(self.current())
        with self.stream_context(self.training):
            yield

    def time_slice(self, run: Callable[[], Any], payload: Any) -> tuple[Any, float]:
        """Run one training slice; returns (its result, seconds known now): wall seconds
        on CPU, where that is the slice's cost; on a GPU the launch's wall seconds, and
        the device span arrives later through drain_slices()."""
        if not self.on_device:
            t0 = time.perf_counter()
            result = run()
            return result, time.perf_counter() - t0
        while len(self.slice_timer.pending) >= self.max_in_flight:
            self.slice_timer.wait_oldest()
            self.pending_slices.extend(self.slice_timer.drain())
        t0 = time.perf_counter()
        with self.training_work():
            start = self.slice_timer.start(self.training)
            result = run()
            self.slice_timer.stop(start, self.training, payload)
        return result, time.perf_counter() - t0

    def drain_slices(self) -> list[tuple[Any, float]]:
        """(payload, device seconds) of training slices that completed since last asked."""
        done, self.pending_slices = self.pending_slices, []
        return done + self.slice_timer.drain()

    def drain_forwards(self) -> list[tuple[Any, float]]:
        return self.forward_timer.drain()

    # -- publish -----------------------------------------------------------------------

    @contextlib.contextmanager
    def publish_point(self, after: Any = None) -> Iterator[None]:
        """Writes into the pool made here land between two forwards: after every forward
        queued before, before every one queued after, and after the training stream's
        work (the weights being published) and the event `after` (a load of the same
        adapter still in flight on another stream). A no-op on CPU."""
        if not self.on_device:
            yield
            return
        forward = self.forward
        forward.wait_stream(self.training)
        if after is not None:
            forward.wait_event(after)
        with self.stream_context(forward):
            yield


def forward_stream_of(scheduler: Any) -> Any:
    """The stream SGLang 0.5.23's run_batch runs a forward on: the forward stream under
    overlap scheduling, else the schedule stream (current in its event loop)."""
    if getattr(scheduler, "enable_overlap", False):
        return scheduler.forward_stream
    return scheduler.schedule_stream
