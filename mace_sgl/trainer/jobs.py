"""Training work cut into units: the pairs waiting for a step and the jobs that run.

A job is a chain of slices (a generator that yields a SliceSpec before each slice): the
one DPO step in progress (kind "step"), or one queued pair's reference log-probs (kind
"ref", computed ahead so that short units can fill the room an iteration leaves). Each
job offers its next slice as a policy Unit; `run` executes exactly that slice and
measures it. What runs when is the policy's choice (trainer/runtime.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from mace_sgl.policy import Unit
from mace_sgl.trainer.sliced import Pair, SliceSpec
from mace_sgl.trainer.streams import DeviceStreams

logger = logging.getLogger("mace_sgl.trainer")


@dataclass
class QueuedPair:
    """A pair waiting for its step, with what its priority needs."""

    pair: Pair
    arrival: float  # time.monotonic() it reached the trainer
    loss: float | None  # last DPO loss from the store, if it trained before
    tenant: str  # the adapter it trains


@dataclass
class Job:
    """A chain of slices: a DPO step (kind "step") or one pair's reference log-probs."""

    key: int
    kind: str
    gen: Generator[SliceSpec, None, Any]
    pending: SliceSpec | None
    pairs: list[QueuedPair]

    @property
    def tenant(self) -> str:
        return self.pairs[0].tenant

    def unit(self) -> Unit:
        first = self.pairs[0]
        spec = self.pending
        return Unit(self.key, spec.kind, spec.tokens, first.arrival, first.loss,
                    step=self.kind == "step")  # fmt: skip


# What a slice is for (`work_of`), as /mace/status counts training seconds: a ref job's
# slices are all "ref"; of a step's, the guard check and the publish are their own, and
# every other kind (forwards, backwards, the LM head's chunks, the optimizer step) is
# the DPO step itself.
WORK_OF_SLICE = {"guard": "guard", "publish": "publish"}
WORKS = ("ref", "step", "guard", "publish")


def work_of(job_kind: str, slice_kind: str) -> str:
    """The work (one of WORKS) a slice of kind `slice_kind` in a `job_kind` job does."""
    return "ref" if job_kind == "ref" else WORK_OF_SLICE.get(slice_kind, "step")


@dataclass(frozen=True)
class Ran:
    """What running one slice did."""

    job: Job
    spec: SliceSpec
    seconds: float  # wall seconds: the slice's cost on CPU, only its launch on a GPU
    mem_bytes: float | None
    finished: bool
    on_device: bool = False  # its device span arrives later (JobBoard.drain_device)
    value: Any = None  # the job's return value when it finished
    error: BaseException | None = None
    work: str = "step"  # what it was for (work_of)


class JobBoard:
    """The queue of pairs without a step yet, the jobs, and reference log-probs ahead."""

    def __init__(self, streams: DeviceStreams | None = None) -> None:
        self.streams = streams or DeviceStreams.cpu()
        self.queue: deque[QueuedPair] = deque()
        self.jobs: dict[int, Job] = {}
        self.step_job: Job | None = None
        self.refs: dict[int, tuple[float, float]] = {}  # sample id -> reference log-probs
        self.next_key = 0

    def held(self) -> list[int]:
        """Sample ids the trainer holds: queued, or in the step in progress."""
        held = [q.pair.sample_id for q in self.queue]
        if self.step_job is not None:
            held += [q.pair.sample_id for q in self.step_job.pairs]
        return held

    def pairs_held(self) -> int:
        return len(self.queue) + (len(self.step_job.pairs) if self.step_job else 0)

    def _new_job(self, kind: str, gen: Generator[SliceSpec, None, Any], pairs: list) -> Job:
        self.next_key += 1
        job = Job(self.next_key, kind, gen, None, pairs)
        with self.streams.training_work():
            job.pending = next(gen)  # runs only the set-up before the first slice
        self.jobs[job.key] = job
        return job

    def take(self, picked: list[int]) -> tuple[list[QueuedPair], dict[int, tuple[float, float]]]:
        """Remove queue entries `picked` (indices) for a step: the pairs and the reference
        log-probs computed ahead for them (ref jobs still running for them are dropped:
        their reference pass finishes inside the step)."""
        chosen = set(picked)
        pairs = [self.queue[i] for i in sorted(chosen)]
        self.queue = deque(q for i, q in enumerate(self.queue) if i not in chosen)
        taken = {q.pair.sample_id for q in pairs}
        for job in [j for j in self.jobs.values() if j.pairs[0].pair.sample_id in taken]:
            del self.jobs[job.key]
        refs = {
            q.pair.sample_id: self.refs.pop(q.pair.sample_id)
            for q in pairs
            if q.pair.sample_id in self.refs
        }
        return pairs, refs

    def start_step(self, gen: Generator[SliceSpec, None, Any], pairs: list[QueuedPair]) -> Job:
        self.step_job = self._new_job("step", gen, pairs)
        return self.step_job

    def start_refs(self, ref_slices: Any) -> None:
        """A reference job for every queued pair without its log-probs yet."""
        ahead = {j.pairs[0].pair.sample_id for j in self.jobs.values() if j.kind == "ref"}
        for q in self.queue:
            sid = q.pair.sample_id
            if sid not in self.refs and sid not in ahead:
                self._new_job("ref", ref_slices(q.pair), [q])

    def units(self) -> tuple[Unit, ...]:
        return tuple(job.unit() for job in self.jobs.values())

    def hand_back(self, ranked: list[int], n: int, keep_refs: bool = True) -> list[QueuedPair]:
        """Remove up to `n` queued pairs for the store to take back, the last of `ranked`
        (queue indices in the order a step would take them) first; with `keep_refs`, none
        whose reference log-probs are computed (that work would be lost); returns them."""
        ids = [self.queue[i].pair.sample_id for i in reversed(ranked)]
        gone = set([i for i in ids if not keep_refs or i not in self.refs][:n])
        return self.drop(lambda q: q.pair.sample_id not in gone)

    def drop(self, keep: Callable[[QueuedPair], bool]) -> list[QueuedPair]:
        """Remove every queued pair, and every job, whose (first) pair keep() refuses
        (a retired tenant's); returns the queued pairs removed."""
        gone = [q for q in self.queue if not keep(q)]
        self.queue = deque(q for q in self.queue if keep(q))
        for job in [j for j in self.jobs.values() if not keep(j.pairs[0])]:
            del self.jobs[job.key]
            if job is self.step_job:
                self.step_job = None
        for q in gone:
            self.refs.pop(q.pair.sample_id, None)
        return gone

    def run(self, key: int, param_storage: set[int]) -> Ran:
        """Run the head slice of job `key` (serving must go on whatever it raises)."""
        job = self.jobs[key]
        spec = job.pending
        work = work_of(job.kind, spec.kind)
        mem = MemoryProbe(self.streams.on_device, param_storage)

        def run_slice() -> tuple[bool, Any, BaseException | None]:
            try:
                with torch.inference_mode(False), mem:
                    job.pending = next(job.gen)
            except StopIteration as stop:
                return True, stop.value, None
            except Exception as e:  # OOM or anything else
                logger.exception("training slice failed (%s job)", job.kind)
                return True, None, e
            return False, None, None

        # On a GPU on the training stream, timed there (trainer/streams.py).
        (finished, value, error), elapsed = self.streams.time_slice(run_slice, (spec, mem, work))
        if finished:
            self.jobs.pop(job.key, None)
            if job is self.step_job:
                self.step_job = None
            elif job.kind == "ref" and value is not None:
                self.refs[job.pairs[0].pair.sample_id] = value
        on_cuda = self.streams.on_device
        return Ran(job, spec, elapsed, mem.bytes, finished, on_cuda, value=value, error=error,
                   work=work)  # fmt: skip

    def drain_device(self) -> list[tuple[SliceSpec, float, float | None, str]]:
        """(spec, device seconds, peak bytes, work) of GPU slices that completed since the
        last call; always empty on CPU, where run() measured them."""
        return [(spec, s, mem.bytes, work) for (spec, mem, work), s in self.streams.drain_slices()]


class MemoryProbe:
    """Peak extra bytes a slice held: CUDA's allocator peak on a GPU; on CPU the bytes
    autograd saved for backward (the activation memory of a backward slice; no-grad
    slices report None and keep the profile's figure)."""

    def __init__(self, on_cuda: bool, param_storage: set[int]) -> None:
        self.on_cuda = on_cuda
        self.param_storage = param_storage  # weights saved for backward are not new memory
        self.bytes: float | None = None
        self._saved = 0
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self.param_storage:
            self._saved += t.numel() * t.element_size()
        return t

    def __enter__(self) -> MemoryProbe:
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on_cuda:
            self.bytes = float(torch.cuda.max_memory_allocated() - self._base)
        else:
            self._hooks.__exit__(*exc)
            self.bytes = float(self._saved) if self._saved else None
