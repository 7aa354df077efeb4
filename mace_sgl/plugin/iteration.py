"""What the scheduler did each iteration, measured for the policy (scheduler process).

Times every forward (prefill or decode) for the cost model, and every first token, gap
between outputs and finished request for the SLO controller, then describes the
scheduler as an IterationView. Hooks in plugin/train_hooks.py call it.
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter, deque
from typing import Any

from mace_sgl.policy import IterationView, Observation, WaitingPrefill
from mace_sgl.trainer.streams import DeviceStreams

# recent_idle's window: marks a second or more apart, so about the last 10 s.
IDLE_WINDOW_MARKS = 11


class IterationMonitor:
    """Per-request timing and per-forward cost observations.

    Per-request entries leave when the request finishes; a sweep every `sweep_every_s`
    drops those of requests the scheduler no longer holds (aborted before or while
    running, or refused by SGLang on arrival), so the maps stay bounded by the requests
    in flight over days. Sweeps run after a batch and on an arrival, so a scheduler that
    gets only requests it refuses (no batch ever runs) sweeps too.
    """

    sweep_every_s = 10.0
    outlier_error = 1.0  # a forward the cost model missed by more than 100% is kept
    outliers_kept = 16

    def __init__(self, policy: Any, streams: DeviceStreams | None = None) -> None:
        self.policy = policy
        self.streams = streams or DeviceStreams.cpu()
        self.arrivals: dict[str, float] = {}  # rid -> monotonic() it reached the scheduler
        self.first_token: dict[str, float] = {}
        self.swept_at = time.monotonic()
        self.swept = 0  # entries dropped by sweeps (aborted requests)
        self.last_output: float | None = None  # end of the last iteration with outputs
        self.serving_seconds = 0.0  # forward time, for the idle fraction
        self.unmodelled_forwards = 0  # timed for serving_seconds, not fitted (mixed)
        self.started = time.monotonic()
        # (time, serving_seconds) at least a second apart, for recent_idle's window.
        self.idle_marks: deque[tuple[float, float]] = deque(maxlen=IDLE_WINDOW_MARKS)
        self.forward_end: float | None = None  # when the last timed forward ended
        # Forwards the cost model missed badly, newest last (bounded): what ran, how long,
        # how much CPU this process got meanwhile (about 2 x wall when its threads had both
        # cores of a 2-core machine, less when something else ran) and whether Python's
        # garbage collector ran inside. What an operator reads to tell a device disturbed
        # by something else from work the model does not describe.
        self.outliers: deque[dict[str, Any]] = deque(maxlen=self.outliers_kept)
        self.outlier_counts: Counter[str] = Counter()

    # -- requests --------------------------------------------------------------------------

    def arrived(self, rid: str, scheduler: Any = None) -> None:
        """A request reached `scheduler` (before SGLang handles it: it may refuse it)."""
        now = time.monotonic()
        if scheduler is not None and now - self.swept_at >= self.sweep_every_s:
            self.sweep(_live_rids(scheduler, None), now)
        self.arrivals[rid] = now

    def idle(self) -> None:
        """No batch ran: the next output gap is not a time between tokens."""
        self.last_output = None

    # -- forwards --------------------------------------------------------------------------

    def observation(self, batch: Any) -> Observation | None:
        """The shape of one batch as cost-model input (seconds filled in later)."""
        mode = batch.forward_mode
        if mode.is_decode():
            return Observation(
                "decode", 0.0, batch=len(batch.reqs), context=_context(batch),
                lora=_lora_rows(batch.reqs),
            )  # fmt: skip
        if mode.is_extend() and not mode.is_mixed() and batch.extend_lens:
            tokens = int(sum(batch.extend_lens))
            context = int(sum(batch.prefix_lens or [])) + tokens
            lora = int(sum(n for r, n in zip(batch.reqs, batch.extend_lens, strict=False)
                           if getattr(r, "lora_id", None)))  # fmt: skip
            return Observation(
                "prefill", 0.0, tokens=tokens, batch=len(batch.reqs), context=context, lora=lora
            )
        return None

    def timed_forward(self, original: Any, scheduler: Any, batch: Any, *a: Any, **kw: Any) -> Any:
        """Run SGLang's run_batch and time it: wall clock on CPU (forwards are synchronous
        there); on a GPU, CUDA events on the forward stream the batch runs on (with overlap
        scheduling not the current stream), read once they completed, never waited for."""
        obs = self.observation(batch)
        if self.streams.on_device:
            if obs is None:  # no shape to time it for: untimed on a GPU
                return original(scheduler, batch, *a, **kw)
            return self.streams.time_forward(lambda: original(scheduler, batch, *a, **kw), obs)
        t0, cpu0, gc0 = time.monotonic(), time.process_time(), _gc_collections()
        result = original(scheduler, batch, *a, **kw)
        t1 = time.monotonic()
        if obs is None:
            # A forward the cost model has no shape for (a mixed prefill-and-decode
            # batch, whose decode rows torch_native attention runs as padded extends): its
            # wall time still counts as serving (the idle fraction, the trainer's recent
            # idle share), without an observation to fit.
            self.serving_seconds += t1 - t0
            self.unmodelled_forwards += 1
        else:
            obs.seconds = t1 - t0
            err = self._observe(obs)
            if err is not None and err > self.outlier_error:  # gap_s: since forward_end
                self._outlier(obs, err, t0, time.process_time() - cpu0, _gc_collections() - gc0)
        self.forward_end = t1
        return result

    def _observe(self, obs: Observation) -> float | None:
        self.serving_seconds += obs.seconds
        return self.policy.observe(obs)

    def _outlier(self, obs: Observation, err: float, t0: float, cpu_s: float, gcs: int) -> None:
        self.outlier_counts[obs.kind] += 1
        self.outliers.append(
            {
                "t_s": round(t0 - self.started, 3),
                "kind": obs.kind,
                "batch": obs.batch,
                "tokens": obs.tokens,
                "context": obs.context,
                "lora": obs.lora,
                "seconds": round(obs.seconds, 4),
                "abs_pct_error": round(err, 3),
                "cpu_s": round(cpu_s, 4),
                "gc_collections": gcs,
                "gap_s": round(t0 - self.forward_end, 4) if self.forward_end else None,
                "loadavg_1m": os.getloadavg()[0],
            }
        )

    def _drain_cuda(self) -> None:
        for obs, seconds in self.streams.drain_forwards():
            obs.seconds = seconds
            self._observe(obs)

    # -- results ---------------------------------------------------------------------------

    def results(self, scheduler: Any, batch: Any) -> IterationView:
        """After SGLang processed a batch's results: record latencies, describe the state."""
        self._drain_cuda()
        now = time.monotonic()
        slo = self.policy.slo
        if batch is not None and batch.forward_mode.is_decode() and self.last_output:
            slo.record_tbt(now - self.last_output)
        for req in batch.reqs if batch is not None else ():
            rid = req.rid
            if rid not in self.first_token and req.output_ids and rid in self.arrivals:
                self.first_token[rid] = now
                slo.record_ttft(now - self.arrivals[rid])
            if req.finished() and rid in self.first_token:
                first = self.first_token.pop(rid)
                arrival = self.arrivals.pop(rid)
                n = len(req.output_ids)
                tpot = (now - first) / (n - 1) if n > 1 else None
                slo.record_request(first - arrival, tpot)
            elif req.finished():
                self.arrivals.pop(rid, None)
        self.last_output = now
        if now - self.swept_at >= self.sweep_every_s:
            self.sweep(_live_rids(scheduler, batch), now)
        running = scheduler.running_batch
        reqs = running.reqs if running is not None else []
        waiting = [
            WaitingPrefill(len(r.origin_input_ids), self.arrivals.get(r.rid, now))
            for r in scheduler.waiting_queue[:8]
        ]
        return IterationView(
            now=time.monotonic(),
            decode_batch=len(reqs),
            decode_context=_context(running) if reqs else 0,
            decode_lora=_lora_rows(reqs),
            waiting=tuple(waiting),
        )

    def recent_idle(self, now: float | None = None) -> float:
        """The fraction of the last ~10 s this scheduler spent outside forwards: its room
        for training without touching serving (the lifetime figure until a second has
        passed)."""
        now = time.monotonic() if now is None else now
        if not self.idle_marks or now - self.idle_marks[-1][0] >= 1.0:
            self.idle_marks.append((now, self.serving_seconds))
        t0, served0 = self.idle_marks[0]
        if now - t0 < 1.0:
            t0, served0 = self.started, 0.0
        wall = now - t0
        if wall <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - (self.serving_seconds - served0) / wall))

    def sweep(self, live: set[str], now: float) -> None:
        """Forget requests the scheduler no longer holds (aborted: no finish reaches us)."""
        self.swept_at = now
        for table in (self.arrivals, self.first_token):
            gone = [rid for rid in table if rid not in live]
            for rid in gone:
                del table[rid]
            self.swept += len(gone)

    def status(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        return {
            "serving_seconds": self.serving_seconds,
            "idle_fraction": max(0.0, 1.0 - self.serving_seconds / wall) if wall else None,
            "unmodelled_forwards": self.unmodelled_forwards,
            "tracked_requests": len(self.arrivals),
            "swept_requests": self.swept,
            "cost_outliers": {"count": dict(self.outlier_counts), "last": list(self.outliers)},
        }


def _live_rids(scheduler: Any, batch: Any) -> set[str]:
    """Requests the scheduler holds: waiting, in the running batch, in `batch` (the one
    whose results are processed), in the last batch (a prefill's requests join the
    running batch only when the next batch is chosen) and in batches whose results are
    still to come (overlap scheduling), chunked, or in the grammar manager's queue
    (waiting for its grammar to compile)."""
    live: set[str] = set()
    queued = [b for b, _ in getattr(scheduler, "result_queue", None) or ()]
    grammar = getattr(scheduler, "grammar_manager", None)  # structured output compiling
    for group in (
        scheduler.waiting_queue,
        getattr(scheduler.running_batch, "reqs", None) or (),
        getattr(batch, "reqs", None) or (),
        getattr(getattr(scheduler, "last_batch", None), "reqs", None) or (),
        *(getattr(b, "reqs", None) or () for b in queued),
        getattr(grammar, "grammar_queue", None) or (),
    ):
        live.update(r.rid for r in group)
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        live.add(chunked.rid)
    return live


def _gc_collections() -> int:
    """Collections Python's garbage collector has run so far, all generations."""
    return sum(g["collections"] for g in gc.get_stats())


def _lora_rows(reqs: Any) -> int:
    """Requests that run an adapter (SGLang sets lora_id for those only)."""
    return sum(1 for r in reqs if getattr(r, "lora_id", None))


def _context(batch: Any) -> int:
    """Sum of a batch's KV lengths (SGLang recomputes seq_lens_sum lazily; the CPU copy of
    seq_lens is always current)."""
    lens = getattr(batch, "seq_lens_cpu", None)
    if lens is not None:
        return int(lens.sum())
    return int(batch.seq_lens_sum or 0)
