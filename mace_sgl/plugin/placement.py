"""LeMix placement inside SGLang's data-parallel controller (--mace-placement lemix).

Two pieces:

- `TrainingSlots`: each scheduler's trainer writes its TrainingLoad (policy/placement.py)
  into its own fixed slot of a small file in the replicas' owner-only directory
  (cfg.replica_store), at most every 20 ms; the controller reads every slot. Plain
  struct-packed floats, nothing pickled; an 8-byte float write is atomic, and a slot
  read between two fields of one write mixes two recent states, which placement
  tolerates.
- `LemixDispatch`: replaces the controller's `dispatching` (AFTER hook on
  DataParallelController.__init__, registered in plugin/__init__.py). Per request it
  reads SGLang's own load snapshots (the controller's `load_snapshot_reader`, at most
  every 20 ms, as SGLang's load-aware methods do) and the training slots, and sends the
  request to the replica LemixPlacement chooses. A request that names its replica
  (`routed_dp_rank`, X-Data-Parallel-Rank) goes there, as with SGLang's methods.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any

from mace_sgl.config import MaceConfig
from mace_sgl.policy.placement import (
    DecayingMoments,
    DecodeMoments,
    LemixPlacement,
    ReplicaLoad,
    TrainingLoad,
)

logger = logging.getLogger(__name__)

SLOTS_FILE = "training.slots"
# written at (unix time), training, unit_ms, reserve_ms, ttft_ms, tbt_ms (SLO targets)
_SLOT = struct.Struct("<dddddd")
WRITE_EVERY_S = 0.02
# A slot older than this is ignored (its scheduler stopped writing: no training news).
STALE_S = 5.0


class TrainingSlots:
    """The slots file of `replicas` replicas in directory `store_dir` (made if absent)."""

    def __init__(self, store_dir: str | Path, replicas: int) -> None:
        self.path = Path(store_dir) / SLOTS_FILE
        size = _SLOT.size * replicas
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.written_at = 0.0

    def due(self, now: float | None = None) -> bool:
        """Whether WRITE_EVERY_S has passed since the last write at `now` (monotonic;
        default: now), checked before the caller builds a TrainingLoad at all."""
        now = time.monotonic() if now is None else now
        # the sum, not the difference: (t + w) - t can fall an ulp short of w
        return now >= self.written_at + WRITE_EVERY_S

    def write(self, dp_rank: int, load: TrainingLoad) -> None:
        self.written_at = time.monotonic()
        at = _SLOT.size * dp_rank
        self.map[at : at + _SLOT.size] = _SLOT.pack(
            time.time(), float(load.training), load.unit_ms, load.reserve_ms,
            load.ttft_ms, load.tbt_ms,
        )  # fmt: skip

    def read(self, dp_rank: int) -> TrainingLoad:
        at = _SLOT.size * dp_rank
        stamp, training, unit_ms, reserve_ms, ttft_ms, tbt_ms = _SLOT.unpack(
            self.map[at : at + _SLOT.size]
        )
        if time.time() - stamp > STALE_S:
            return TrainingLoad()
        return TrainingLoad(bool(training), unit_ms, reserve_ms, ttft_ms, tbt_ms)


def replica_load(
    dp_rank: int,
    snapshot: Any | None,
    training: TrainingLoad,
    decode: DecodeMoments | None = None,
) -> ReplicaLoad:
    """A ReplicaLoad from SGLang's LoadSnapshot of one replica (None before its first
    snapshot: an empty replica) and its training state; `decode`: its decode moments as
    placement should weigh them (DecayingMoments), else the snapshot's own sums."""
    train = {"training": training.training, "unit_ms": training.unit_ms,
             "reserve_ms": training.reserve_ms, "ttft_ms": training.ttft_ms,
             "tbt_ms": training.tbt_ms}  # fmt: skip
    if snapshot is None:
        return ReplicaLoad(dp_rank, **train)
    uncached = snapshot.total_prefill_uncached_tokens or 0
    busy_us = snapshot.total_prefill_busy_us or 0
    return ReplicaLoad(
        dp_rank=dp_rank,
        running_reqs=snapshot.num_running_reqs,
        waiting_reqs=snapshot.num_waiting_reqs,
        waiting_uncached_tokens=snapshot.num_waiting_uncached_tokens,
        total_tokens=snapshot.num_total_tokens,
        prefill_ms_per_token=busy_us / uncached / 1000.0 if uncached > 0 else None,
        prefill_busy_us=float(busy_us),
        max_running_reqs=snapshot.max_running_requests or 0,
        decode=decode or DecodeMoments.from_list(snapshot.decode_moments),
        timestamp=snapshot.timestamp,
        **train,
    )


class LemixDispatch:
    """The controller's `dispatching` under --mace-placement lemix."""

    def __init__(self, controller: Any, cfg: MaceConfig) -> None:
        self.controller = controller
        self.placement = LemixPlacement()
        self.slots = TrainingSlots(cfg.replica_store, cfg.replicas) if cfg.replica_store else None
        self.snapshots: dict[int, Any] = {}
        # per replica: its decode moments, older steps weighing less
        self.decode: dict[int, DecayingMoments] = {}
        self.read_at = 0.0

    def _refresh(self) -> None:
        now = time.perf_counter()
        if now - self.read_at < WRITE_EVERY_S and self.snapshots:
            return
        self.read_at = now
        try:
            for snap in self.controller.load_snapshot_reader.read_all():
                seen = self.snapshots.get(snap.dp_rank)
                self.snapshots[snap.dp_rank] = snap
                if seen is None or snap.timestamp != seen.timestamp:  # a new snapshot
                    moments = DecodeMoments.from_list(snap.decode_moments)
                    self.decode.setdefault(snap.dp_rank, DecayingMoments()).update(moments, now)
        except Exception as e:  # placement degrades to the last view, never fails a request
            logger.warning("load snapshot read failed: %s", e)

    def loads(self, ranks: list[int]) -> list[ReplicaLoad]:
        self._refresh()
        return [
            replica_load(
                r,
                self.snapshots.get(r),
                self.slots.read(r) if self.slots is not None else TrainingLoad(),
                self.decode[r].sums if r in self.decode else None,
            )
            for r in ranks
        ]

    def __call__(self, req: Any) -> None:
        from sglang.srt.managers.data_parallel_controller import sock_send

        ctl = self.controller
        if ctl.maybe_external_dp_rank_routing(req):
            return
        active = [r for r in ctl._active_workers if ctl.status[r]]
        if not active:
            raise RuntimeError("No active DP workers are available for routing.")
        prompt = len(getattr(req, "input_ids", None) or ())
        choice = self.placement.choose(self.loads(active), prompt, new_tokens(req))
        sock_send(ctl.workers[choice.dp_rank], req)


def new_tokens(req: Any) -> int:
    """The request's max_new_tokens (128 when it names none)."""
    params = getattr(req, "sampling_params", None)
    n = getattr(params, "max_new_tokens", None)
    if n is None and isinstance(params, dict):
        n = params.get("max_new_tokens")
    return int(n) if n else 128


class PlacementHooks:
    """Hooks of placement, bound to the config (registered in plugin/__init__.py)."""

    def __init__(self, cfg: MaceConfig) -> None:
        self.cfg = cfg

    def install_dispatch(self, result: Any, controller: Any, *args: Any, **kwargs: Any) -> None:
        """AFTER DataParallelController.__init__: LeMix placement replaces its dispatch."""
        controller.dispatching = LemixDispatch(controller, self.cfg)
        logger.info("mace-sgl: LeMix placement over %d replicas", self.cfg.replicas)
