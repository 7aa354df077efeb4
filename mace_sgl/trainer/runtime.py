"""The trainer inside SGLang's scheduler process: feeds, runs and publishes sliced DPO.

Driven by hooks (plugin/train_hooks.py): after every serving iteration the policy
(mace_sgl/policy, chosen by --mace-policy) decides how many seconds of training fit and
which units; when the scheduler would sleep idle it runs one unit instead, so a new
request waits at most one unit. The parts, each in its own module:

- trainer/host.py     what the trainer takes from SGLang (model, LoRA manager, config)
- trainer/tenants.py  the tenants: one LoRA, optimizer, version, guard log and
                      checkpoints per adapter name, swapped into the one shared model
- trainer/jobs.py     the pairs waiting for a step and the jobs of slices that run
- trainer/link.py     the sidecar conversation (Work in, Ready and Result out)
- trainer/guard.py    the publish guard; trainer/sliced.py the DPO step in slices

This module joins them: which tenant gets the next step (priority, then a weighted fair
share: policy/fairshare.py), what a finished step does (guard, publish or rollback),
and the status.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from functools import partial
from typing import Any

import psutil
import torch

from mace_sgl.config import MaceConfig
from mace_sgl.gpu_memory import RESIDENT_COPIES
from mace_sgl.policy import IterationView, Observation, Profile, Unit, make_policy
from mace_sgl.policy.fairshare import FairShare
from mace_sgl.policy.placement import TrainingLoad
from mace_sgl.policy.slo import SloTargets
from mace_sgl.templating import encode_pair
from mace_sgl.trainer import learned_cost
from mace_sgl.trainer.anchor import shipped_anchors
from mace_sgl.trainer.checkpoints import keep_lease_generation, read_lease_generation
from mace_sgl.trainer.guard import Guard
from mace_sgl.trainer.host import TrainerHost
from mace_sgl.trainer.jobs import WORKS, JobBoard, QueuedPair, Ran
from mace_sgl.trainer.lease import ClusterLease
from mace_sgl.trainer.link import SidecarLink
from mace_sgl.trainer.publish import lora_config_dict
from mace_sgl.trainer.replicas import (
    RECONNECT_TIMEOUT_S,
    ReplicaSync,
    Update,
    client_store,
    group_store,
    pack_state,
    packable,
    reconnector,
    tenant_key,
)
from mace_sgl.trainer.shared import (
    attach_lora,
    build_shared_llama,
    shares_storage,
    trainer_dtype,
)
from mace_sgl.trainer.sliced import Pair, SlicedDPO, SliceSpec
from mace_sgl.trainer.tenants import Tenant, TenantRegistry, TrainedStep

logger = logging.getLogger("mace_sgl.trainer")

# Seconds a pair may wait for a tenant the trainer does not have (its adapter not loaded
# in SGLang yet, or retired) before it is handed back as not trained.
ORPHAN_AFTER_S = 30.0
# Pairs held behind the running step cover at most about this many seconds of steps
# (pairs_ahead): a pair waits in the trainer not much longer than that before its step,
# so a shift of preference in the feedback reaches training within it.
HOLD_AHEAD_S = 30.0


def pairs_ahead(lookahead: int, pairs_per_step: int, step_wall_s: float | None) -> int:
    """Pairs to hold behind the running step: --mace-lookahead, but no more than the
    steps expected within HOLD_AHEAD_S at the wall time per step (serving included),
    and at least one step's pairs (their reference passes fill spare room before their
    step). Without a measured step yet: one step's pairs (a fast device grows to
    --mace-lookahead after its first step; a slow one takes no more than it can use)."""
    one_step = max(1, min(lookahead, pairs_per_step))
    if step_wall_s is None or step_wall_s <= 0:
        return one_step
    steps = math.ceil(HOLD_AHEAD_S / step_wall_s)
    return max(one_step, min(lookahead, steps * pairs_per_step))


# Seconds between two looks at SGLang's loaded adapters (new or retired tenants).
SYNC_EVERY_S = 0.5


def load_profile(cfg: MaceConfig) -> Profile:
    """The --mace-profile file (or built-in defaults) with --mace-slo-* flags applied."""
    profile = Profile.load(cfg.cost_profile) if cfg.cost_profile else Profile()
    profile.meta.setdefault("source", cfg.cost_profile or "built-in defaults")
    profile.slo = SloTargets(
        ttft_ms=cfg.slo_ttft_ms or profile.slo.ttft_ms,
        tbt_ms=cfg.slo_tbt_ms or profile.slo.tbt_ms,
        tbt_basis=cfg.slo_tbt_basis or profile.slo.tbt_basis,
    )
    return profile


def _wait_or_drop(update: Update, since: float, now: float, keep: list, why: str) -> None:
    """An update this replica cannot install yet waits (into `keep`) for ORPHAN_AFTER_S
    from its arrival; then it is dropped, with a log line."""
    if now - since <= ORPHAN_AFTER_S:
        keep.append((update, since))
    else:
        logger.error("update v%d %s since %.0f s: dropped", update.version, why, now - since)


class MaceTrainer:
    """One trainer per scheduler: the shared-weight LoRA model, its tenants and jobs."""

    def __init__(self, host: TrainerHost) -> None:
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.cfg = host.cfg
        self.host = host
        self.process = psutil.Process()
        rss_before = self.process.memory_info().rss
        self.tokenizer = AutoTokenizer.from_pretrained(host.model_path)
        hf_config = AutoConfig.from_pretrained(host.model_path)
        with torch.inference_mode(False):
            own = trainer_dtype(cfg.train_dtype, next(host.model.parameters()))
            base = build_shared_llama(host.model, hf_config, own)
            self.model = attach_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
            self.dpo = SlicedDPO.for_config(self.model, cfg)
            self.tenants = TenantRegistry(host, self.model, self.dpo)
            self.tenants.sync()  # every tenant resumes before the first request is served
        if cfg.adapter_name not in self.tenants.tenants:
            why = self.tenants.create_failures.get(cfg.adapter_name, "not loaded in SGLang")
            raise RuntimeError(f"the default adapter {cfg.adapter_name!r} has no tenant: {why}")
        self.tenants.activate(self.default)
        self.synced_at = time.monotonic()
        lora_bytes = self.tenants.lora_bytes()
        self.memory = {
            "shares_base_weights": shares_storage(self.model, host.model),
            # --mace-train-dtype: what the trainer computes in (a copy when it differs
            # from the served weights' dtype)
            "train_dtype": str(self.dpo.lm.lm_head.weight.dtype).removeprefix("torch."),
            "base_weight_mb": sum(p.numel() * p.element_size() for p in host.model.parameters())
            / 2**20,
            "lora_mb": lora_bytes / 2**20,
            "adam_state_mb": 2 * lora_bytes / 2**20,  # exp_avg + exp_avg_sq, once stepped
            "rss_before_trainer_mb": rss_before / 2**20,
            "rss_after_trainer_mb": self.process.memory_info().rss / 2**20,
        }
        self.on_cuda = self.dpo.device.type == "cuda"
        self.swap_baseline = None
        if cfg.measure_swap:
            try:
                self.swap_baseline = self._measure_swap_baseline()
            except Exception as e:  # a measurement must never take the server down
                logger.exception("swap measurement failed")
                self.swap_baseline = {"error": f"{type(e).__name__}: {e}"}
        self.streams = host.streams
        self.board = JobBoard(self.streams)
        self.fair = FairShare()
        profile = load_profile(cfg)
        # A restart resumes the cost model learned before it (trainer/learned_cost.py).
        cost_key = learned_cost.key(
            profile.meta["source"], host.model_path, self.dpo.device.type, torch.get_num_threads()
        )
        cost_file = cfg.state_path / learned_cost.FILE
        learned = learned_cost.load(cost_file, cost_key)
        if learned is not None:
            profile.cost = learned
        self.policy = make_policy(cfg.policy, profile, floor=cfg.train_floor)
        self.cost_saver = learned_cost.CostSaver(
            cost_file, cost_key, self.policy.cost, resumed=learned is not None
        )
        self.starvation = Starvation()
        # Seconds of slices per token of trained pairs: converts the token reserve of
        # fcfs-reserve (--mace-train-tokens-per-iter) to time.
        self.sec_per_token = 5e-3
        self.step_seconds = 0.0
        # Wall seconds from a step's start to its end (serving between its slices
        # included), recently: how many pairs are worth holding ahead (pairs_ahead).
        self.step_wall_s: float | None = None
        self.step_started = 0.0
        self.step_paused = False  # a pause came while the running step ran: not measured
        self.unit_s = 0.0
        # This replica's recent idle fraction, set by the scheduler hooks from the
        # iteration monitor; sent with every Ready (the sidecar's lease goes by it).
        self.room = 0.0
        self.idle_refused = 0
        self.orphans_returned = 0
        self.handed_back = 0  # pairs given back untrained when the hold shrank
        self.superseded = 0  # pairs given back for never-trained ones waiting (Newer)
        self.totals = {"train_steps": 0, "trained_tokens": 0, "train_seconds": 0.0}
        # Seconds of training slices (measured), by what they were for (jobs.work_of):
        # where a version's time goes under load (`train_seconds_by_work` in the status).
        self.seconds_by_work = dict.fromkeys(WORKS, 0.0)
        with torch.inference_mode(False):
            self.guard = Guard.for_config(self.dpo, self.tokenizer, cfg)
            if cfg.anchor_alpha:  # answered with the adapter off: the base model's own
                self.dpo.set_anchors(shipped_anchors(self.dpo, self.tokenizer))
        self.link = SidecarLink(cfg.state_path, cfg.adapter_name, host.dp_rank)
        self.session = self.link.session
        self.dp_rank = host.dp_rank
        # With --dp-size > 1 or several servers: the group that keeps every replica's
        # adapters identical, and across servers one step at a time per tenant.
        self.replicas: ReplicaSync | None = None
        self.lease: ClusterLease | None = None
        if cfg.synced:
            store, rank, world = group_store(cfg, host.dp_rank)
            several = cfg.sync_world_size > 1
            self.replicas = ReplicaSync(
                store, rank, world, every_s=cfg.sync_every_s, host=cfg.sync_host,
                rejoin=several, connect=reconnector(cfg, host.dp_rank),
            )  # fmt: skip
            if several:
                # its calls never wait for a key, and each has a deadline (lease.CALL_S):
                # a server 0 that vanished without closing connections stalls no poll
                connect = lambda: client_store(cfg, RECONNECT_TIMEOUT_S)  # noqa: E731
                self.lease = ClusterLease(connect(), rank, world, self._served, connect=connect)
                for tenant in self.tenants.tenants.values():
                    self._lease_created(tenant)
        # The group (ReplicaSync.formed) whose members heard this replica's versions
        # (several servers: announced at start and after a member came back, or after
        # server 0 restarted with a fresh store, where generations count from 0 again).
        self._announced = -1
        # Received and waiting: for this replica's step of that tenant to end, or for a
        # tenant created at run time to reach this replica's registry (when it arrived).
        self._updates: list[tuple[Update, float]] = []
        # Versions stepped here and sent to every peer, served here once they all have
        # them (`_send_step`), by tenant; no step of that tenant starts meanwhile.
        self.unpublished: dict[str, int] = {}
        # Pairs of finished steps not reported yet (held back until a publish, or their
        # version still reaching the peers), by sample id: the trainer still holds them
        # (Ready.held), so a restarted sidecar does not hand them out again.
        self.unreported: set[int] = set()
        logger.info(
            "trainer ready: %d tenant(s), default %s v%d",
            len(self.tenants.tenants),
            cfg.adapter_name,
            self.default.version,
        )

    # -- tenants ---------------------------------------------------------------------------

    @property
    def default(self) -> Tenant:
        """The default tenant (--mace-adapter-name), which always exists."""
        return self.tenants.tenants[self.cfg.adapter_name]

    @property
    def paused(self) -> bool:
        return self.link.paused

    def versions_by_uid(self) -> dict[str, int]:
        """{SGLang lora id: published version} of every tenant (the radix key uses it)."""
        return {t.uid: t.version for t in self.tenants.tenants.values()}

    def _sync_tenants(self) -> None:
        now = time.monotonic()
        if now - self.synced_at < SYNC_EVERY_S:
            return
        self.synced_at = now
        before = dict(self.tenants.tenants)
        with torch.inference_mode(False), self.streams.training_work():
            added, removed = self.tenants.sync()
        for name in removed:
            self.fair.forget(name)
            self.link.required.pop(name, None)  # the old tenant's (the sidecar's go too)
            if self.lease is not None:  # its step in flight, if any, is dropped next
                # (a version sent to the peers may be installed there all the same)
                sent = self.unpublished.get(name, -1)
                self.lease.retire(name, max(before[name].version, sent))
        for name in added:
            self.link.required.pop(name, None)
            if self.lease is not None:
                self._lease_created(self.tenants.tenants[name])
        if removed:
            self._release_retired(removed, before)
        if self.tenants.active is None:
            self.tenants.activate(self.default)

    def _release_retired(self, removed: set[str] | list[str], before: dict[str, Tenant]) -> None:
        """The pairs of retired tenants go back to the store untrained (Release): those
        queued, those of the step in flight (dropped) and those of steps held back for
        a publish that will not come. Trained by
        a tenant created again under the name (the store hands out only existing
        tenants' pairs); unreleased, they stayed in flight until the next restart.
        (A step whose version is still reaching the peers reports its own, untrained.)"""
        step = self.board.step_job
        gone = [q.pair.sample_id for q in self.board.drop(lambda q: q.tenant not in removed)]
        if step is not None and self.board.step_job is None:  # its step, dropped too
            # Closed now, not when collected: a step in its guard check holds the steps
            # held back before it, and puts them back on its tenant as it closes.
            step.gen.close()
            gone += [q.pair.sample_id for q in step.pairs]
        for name in removed:
            for pairs, _ in before[name].held_back:
                gone += [p.sample_id for p in pairs]
            before[name].held_back = []
        for sample_id in gone:
            self.unreported.discard(sample_id)
        if gone:
            self.link.release(gone)

    def _lease_created(self, tenant: Tenant) -> None:
        """Fix the lease key generation `tenant` steps under (trainer/lease.py), kept in
        its adapter directory across restarts (that directory only: the owner id its
        checkpoint writer read, so not one made again after a purge)."""
        kept = read_lease_generation(tenant.adapter_dir)
        keep = partial(keep_lease_generation, tenant.adapter_dir, owner=tenant.writer.owner)
        self.lease.created(tenant.name, kept, keep)

    def _return_orphans(self) -> None:
        """Pairs of tenants the trainer does not have, waiting too long, go back to the
        store untrained (their tenant's adapter never loaded, or was retired)."""
        now = time.monotonic()
        known = self.tenants.tenants
        gone = self.board.drop(lambda q: q.tenant in known or now - q.arrival <= ORPHAN_AFTER_S)
        for q in gone:
            self.link.report(q.pair.sample_id, float("nan"), 0)
        if gone:
            self.orphans_returned += len(gone)
            logger.warning("returned %d pairs of unknown adapters to the store", len(gone))

    def _measure_swap_baseline(self, repeats: int = 5) -> dict[str, float]:
        """Time until new weights are servable: our in-place publish against SGLang's own
        path (load_lora_adapter_from_tensors, then the pool-slot copy its next batch would
        make, then unload), same weights, side by side; medians in milliseconds. Runs at
        start, before serving, on the default tenant; its slot is republished afterwards."""
        import statistics

        from sglang.srt.lora.lora_registry import LoRARef

        tenant = self.default
        publisher = tenant.publisher
        manager = publisher.manager
        pool = manager.memory_pool
        weights = {n.replace(".default", ""): t.clone() for n, t in tenant.weights.items()}
        peft_cfg = self.model.peft_config["default"]
        config = lora_config_dict(peft_cfg.r, peft_cfg.lora_alpha, list(peft_cfg.target_modules))
        publisher.publish_weights(tenant.weights.items())
        slot = pool.uid_to_buffer_id.get(tenant.uid, 0)
        in_place, reload = [], []
        # A start-up measurement, before serving: waiting for the device is allowed here
        # (and needed, or a GPU run would time only the launches).
        settle = torch.cuda.synchronize if self.on_cuda else (lambda: None)
        for _ in range(repeats):
            settle()
            start = time.perf_counter()
            publisher.publish_weights(tenant.weights.items())
            settle()
            in_place.append((time.perf_counter() - start) * 1000)
            ref = LoRARef(lora_name="mace-swap-probe", lora_path="mace-swap-probe", pinned=False)
            start = time.perf_counter()
            loaded = manager.load_lora_adapter_from_tensors(ref, weights, config)
            if not loaded.success:
                raise RuntimeError(f"baseline load failed: {loaded.error_message}")
            pool.load_lora_weight_to_buffer(
                ref.lora_id,
                slot,
                manager.loras[ref.lora_id],
                manager.lora_modules,
                manager.embed_tokens_module,
                manager.lm_head_module,
            )
            settle()
            reload.append((time.perf_counter() - start) * 1000)
            manager.unload_lora_adapter(ref)
        publisher.publish_weights(tenant.weights.items())  # the live weights back in the slot
        return {
            "in_place_ms": statistics.median(in_place),
            "sglang_load_to_slot_ms": statistics.median(reload),
        }

    # -- messages ------------------------------------------------------------------------

    def poll(self) -> None:
        """Take every waiting sidecar message, follow SGLang's adapters, and ask for work
        when too little is queued (link.py says when a Ready goes out)."""
        self.follow_replicas()
        now = time.monotonic()
        for s in self.link.receive():
            self.board.queue.append(QueuedPair(self._pair(s), now, s.loss, s.adapter))
        self._sync_tenants()
        for name, weight in self.link.weights.items():  # the store's, sent with the Work
            if name in self.tenants.tenants:
                self.fair.set_weight(name, weight)
        self._return_orphans()
        self._give_back_superseded()
        self._hand_back_excess()
        self.cost_saver.maybe_save()
        # The sidecar answers only when it has samples; ask again now and then.
        if self.paused and self.board.step_job is not None:
            self.step_paused = True
        want = self._ahead() + self.cfg.pairs_per_step - self.board.pairs_held()
        asking = want > 0 and policy_trains(self.cfg.policy) and not self.paused
        held = [*self.board.held(), *self.unreported]
        self.link.maybe_ready(want, asking, held, self.room)

    def _hand_back_excess(self) -> None:
        """Queued pairs beyond the hold go back to the store untrained (Release; their
        train count unchanged): once steps are measured slower than when they were asked
        for, pairs_ahead shrinks, and a pair would wait here past HOLD_AHEAD_S while the
        store may have newer ones. Goes by the measured wall time per step only (the
        running step's age only stops asking: a long step would otherwise hand pairs
        back and ask for them again after it). Those a step would take last (_ranked) go
        first; with --mace-pick-order oldest, none whose reference pass is done."""
        keep = pairs_ahead(self.cfg.lookahead, self.cfg.pairs_per_step, self.step_wall_s)
        excess = self.board.pairs_held() - keep - self.cfg.pairs_per_step
        if excess <= 0:
            return
        # Newest first: the oldest never-trained go even with their reference pass done
        # (kept, a newer one would go instead, and a Newer would swap them back).
        newest = self.cfg.pick_order == "newest"
        gone = self.board.hand_back(self._ranked(lambda q: True), excess, keep_refs=not newest)
        if gone:
            self.link.release([q.pair.sample_id for q in gone])
            self.handed_back += len(gone)

    def _give_back_superseded(self) -> None:
        """--mace-pick-order newest: queued pairs go back to the store untrained (Release)
        where the sidecar says never-trained pairs of their tenant wait there that a step
        would take first (Newer): of each tenant's queued pairs and the waiting ones
        together, those first in a step's order stay (never-trained before replays, the
        newest first, then the replays in the policy's order: _ranked), as many as were
        queued. The trainer then asks again and
        the store hands out the newest first. So a pair taken before a shift of
        preference, or a replay taken while nothing new waited, does not train after the
        shift while the new preference's pairs wait (drift on 2026-12-07: pairs held
        since the first phase trained in the third; then a held replay trained three
        times while the second phase's pairs waited). Their reference passes, if done,
        are lost: at most one per newer pair posted."""
        newer = self.link.take_newer()
        if not newer or self.cfg.pick_order != "newest":
            return
        # A Newer older than Work that came since may name pairs held now: not waiting.
        held = {*self.board.held(), *self.unreported}
        queue = self.board.queue
        gone: set[int] = set()
        for tenant, ids in newer.items():
            # the tenant's queued pairs in a step's order, the waiting ones merged in
            # among the never-trained (all of them are), where the newest-first order
            # puts them; the replays keep the policy's order after them
            queued = [queue[i].pair for i in self._ranked(lambda q, t=tenant: q.tenant == t)]
            fresh = [p.sample_id for p in queued if p.new] + [i for i in ids if i not in held]
            order = sorted(fresh, reverse=True) + [p.sample_id for p in queued if not p.new]
            stay = set(order[: len(queued)])
            gone.update(p.sample_id for p in queued if p.sample_id not in stay)
        if gone:
            self.board.drop(lambda q: q.pair.sample_id not in gone)
            self.link.release(sorted(gone))
            self.superseded += len(gone)

    def _ahead(self) -> int:
        """pairs_ahead with the wall time per step so far: the recent steps', or the
        running step's age where that is longer. (Not the age alone: a young step says
        nothing of how long steps take, and before one was measured, one step's pairs.)"""
        wall = self.step_wall_s
        if wall is not None and self.board.step_job is not None:
            wall = max(wall, time.monotonic() - self.step_started)
        return pairs_ahead(self.cfg.lookahead, self.cfg.pairs_per_step, wall)

    def _pair(self, s: Any) -> Pair:
        prompt, chosen = encode_pair(self.tokenizer, s.prompt, s.chosen)
        _, rejected = encode_pair(self.tokenizer, s.prompt, s.rejected)
        return Pair(s.id, prompt, chosen, rejected, s.weight, new=s.trained == 0)

    # -- jobs ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        """True when a unit could run now."""
        board = self.board
        return (
            not self.paused and policy_trains(self.cfg.policy) and bool(board.jobs or board.queue)
        )

    def _candidates(self) -> tuple[Unit, ...]:
        """The head unit of every job, after starting the jobs that can start."""
        if self.paused:
            return ()
        if self.board.step_job is None and self.board.queue:
            self._start_step()
        self.board.start_refs(self.dpo.ref_slices)
        return self.board.units()

    def _ranked(self, keep: Callable[[QueuedPair], bool]) -> list[int]:
        """Indices into the queue of the pairs `keep` accepts, in the order a step takes
        them: the policy's (DPO-loss priority, waiting time); with --mace-pick-order
        newest, never-trained pairs first, the newest first, as the store hands them
        out (waiting time would train the oldest held first: the preference before a
        shift), then the others in the policy's order."""
        queue = self.board.queue
        waiting = [Unit(i, "fwd", 0, q.arrival, q.loss) for i, q in enumerate(queue) if keep(q)]
        order = [u.job for u in self.policy.rank(waiting, time.monotonic())]
        if self.cfg.pick_order != "newest":
            return order
        new = sorted(
            (i for i in order if queue[i].pair.new), key=lambda i: -queue[i].pair.sample_id
        )
        return new + [i for i in order if not queue[i].pair.new]

    def _start_step(self) -> None:
        """The next step: the tenant by priority within the fair share, then that tenant's
        highest-priority pairs."""
        queue = self.board.queue
        known = self.tenants.tenants
        required = self.link.required  # versions other replicas published (replicas.py)
        order = self._ranked(
            lambda q: (
                q.tenant in known
                and q.tenant not in self.unpublished  # its last step still reaching the peers
                and known[q.tenant].version >= required.get(q.tenant, -1)
            )
        )
        if not order:
            return
        backlog: dict[str, float] = {}
        for rank, i in enumerate(order):
            backlog.setdefault(queue[i].tenant, -float(rank))
        if self.lease is not None:  # another server steps these (trainer/lease.py)
            backlog = {t: b for t, b in backlog.items() if not self.lease.refused_lately(t)}
            if not backlog:
                return
        name = self.fair.pick(backlog)
        if self.lease is not None and not self.lease.try_acquire(name, known[name].version):
            return  # passed over for RETRY_S: the next poll picks among the others
        picked = [i for i in order if queue[i].tenant == name][: self.cfg.pairs_per_step]
        self.fair.charge(name)
        pairs, refs = self.board.take(picked)
        self.step_started, self.step_paused = time.monotonic(), False
        self.board.start_step(self._step(known[name], pairs, refs), pairs)

    def _run_unit(self, key: int) -> float:
        """Run the head slice of one job; returns the seconds it is charged: its wall time
        on CPU; on a GPU, where it runs on the training stream after the launch returns,
        the predicted time (its device span corrects the cost model once it completed)."""
        storage = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        ran: Ran = self.board.run(key, storage)
        ended = ran.job.kind == "step" and self.board.step_job is not ran.job
        if ended and ran.error is None and not self.step_paused:
            wall = time.monotonic() - self.step_started
            last = self.step_wall_s
            self.step_wall_s = wall if last is None else last + 0.3 * (wall - last)
        if ran.error is not None and ran.job.kind == "step":
            tenant = self.tenants.get(ran.job.tenant)
            if tenant is not None:
                with self.streams.training_work():
                    self.tenants.rollback(tenant, f"{type(ran.error).__name__}: {ran.error}")
                self._drop_held_back(tenant)
                self._report(tenant, [q.pair for q in ran.job.pairs], {})
        if not ran.on_device:
            self._observe_slice(ran.spec, ran.seconds, ran.mem_bytes, ran.work)
            return ran.seconds
        self._observe_device_slices()
        predicted = self.policy.cost.predict(ran.spec.kind, ran.spec.tokens)
        return predicted if math.isfinite(predicted) else ran.seconds

    def _observe_slice(
        self, spec: SliceSpec, seconds: float, mem_bytes: float | None, work: str
    ) -> None:
        """One slice measured (`work`: what it was for, jobs.work_of)."""
        self.policy.observe(
            Observation(spec.kind, seconds, tokens=spec.tokens, mem_bytes=mem_bytes)
        )
        self.totals["train_seconds"] += seconds
        self.seconds_by_work[work] += seconds
        self.step_seconds += seconds
        self.unit_s += 0.2 * (seconds - self.unit_s)  # a unit's length, recently

    def _observe_device_slices(self) -> None:
        """Fold in the device spans of GPU slices that completed (none on CPU)."""
        for spec, seconds, mem_bytes, work in self.board.drain_device():
            self._observe_slice(spec, seconds, mem_bytes, work)

    def iteration_done(self, view: IterationView) -> None:
        """After a serving iteration: the units the policy fits into what it leaves."""
        self.poll()
        self._observe_device_slices()
        if not policy_trains(self.cfg.policy):
            self.policy.slo.update()
            return
        self.policy.reserve_s = self.cfg.train_tokens_per_iter * self.sec_per_token
        self.policy.slo.update()
        spent, ran, why, waiting = 0.0, 0, "", 0
        for _ in range(self.policy.max_rounds):  # re-plan as units finish and expose more
            units = self._candidates()
            if not units:
                break
            waiting = waiting or len(units)
            plan = self.policy.plan(
                replace(view, units=units, spent_s=spent, mem_free_bytes=self._mem_free())
            )
            if not plan.units:
                why = why or plan.why
                break
            for unit in plan.units:
                if unit.job in self.board.jobs:
                    spent += self._run_unit(unit.job)
                    ran += 1
        self.policy.charge(spent)
        self.starvation.iteration(time.monotonic(), waiting, ran, why)

    def run_idle_slice(self) -> None:
        """Nothing to serve: one unit, then back to the loop to look for requests."""
        self.poll()
        self._observe_device_slices()
        units = self._candidates()
        if not units:
            return
        plan = self.policy.plan(
            IterationView(
                now=time.monotonic(), idle=True, units=units, mem_free_bytes=self._mem_free()
            )
        )
        if plan.units:
            self._run_unit(plan.units[0].job)
            self.starvation.iteration(time.monotonic(), len(units), 1, "")
        else:
            self.idle_refused += 1
            self.starvation.iteration(time.monotonic(), len(units), 0, plan.why)

    def _mem_free(self) -> float:
        """Bytes a slice may take: on a GPU the free device memory, capped by the reserve
        SGLang left for training (--mace-train-memory-mb) net of what the trainer holds
        all the time (per tenant: LoRA, gradient, AdamW moments, rollback snapshot), so a
        slice that would spill into serving memory is not planned; on CPU, available RAM."""
        if self.on_cuda:
            return slice_room(
                float(torch.cuda.mem_get_info()[0]),
                self.cfg.train_memory_mb * 2**20,
                RESIDENT_COPIES * self.tenants.lora_bytes() * len(self.tenants.tenants),
            )
        return float(psutil.virtual_memory().available)

    # -- one step, then maybe a publish --------------------------------------------------

    def _step(
        self, tenant: Tenant, queued: list[QueuedPair], refs: dict[int, tuple[float, float]]
    ) -> Generator[SliceSpec, None, None]:
        """One optimizer step on `tenant`'s adapter, then its guard check and publish (or
        rollback). The tenant stays in the model from the first slice to the last: only
        the step job uses the adapter (reference passes run with it disabled)."""
        pairs = [q.pair for q in queued]
        self.tenants.activate(tenant)
        self.tenants.snapshot(tenant)
        result = yield from self.dpo.step_slices(pairs, refs)
        stats = tenant.stats
        if not result.ok:
            self.tenants.rollback(tenant, result.error)
            self._drop_held_back(tenant)
            self._report(tenant, pairs, result.losses)
            return
        stats.train_steps += 1
        self.totals["train_steps"] += 1
        stats.last_loss = sum(result.losses.values()) / len(result.losses)
        logger.info(
            "%s step %d: losses %s margins %s grad norm %.4g",
            tenant.name,
            stats.train_steps,
            result.losses,
            result.margins,
            result.grad_norm,
        )
        self.unreported.update(p.sample_id for p in pairs)
        tokens = sum(self.dpo.step_tokens(p) for p in pairs)
        stats.trained_tokens += tokens
        self.totals["trained_tokens"] += tokens
        self.sec_per_token += 0.3 * (self.step_seconds / tokens - self.sec_per_token)
        self.step_seconds = 0.0
        # Held back until the check (reported with its version), unless none of this
        # tenant's pairs waits: then it is checked now, or its pairs would wait for ever.
        more = any(q.tenant == tenant.name for q in self.board.queue)
        if stats.train_steps % self.cfg.publish_every != 0 and more:
            tenant.held_back.append((pairs, dict(result.losses)))
            return
        steps, tenant.held_back = [*tenant.held_back, (pairs, dict(result.losses))], []
        try:
            reading = yield from self.guard.check(tenant.version + 1, tenant.guard)
            if not reading.published:
                # Trained and refused: reported with their losses, so pairs that drive
                # the model where the guard refuses do not train again and again.
                stats.rejected_versions += 1
                self.tenants.rollback(tenant, f"guard refused v{tenant.version + 1}: {reading.why}")
            else:
                yield SliceSpec("publish", 0)
                if self.replicas is not None:
                    self._send_step(tenant, steps)
                    return
                self.tenants.publish(tenant)
        except BaseException:  # a failed check or publish: _run_unit reports them all
            tenant.held_back = steps[:-1]
            raise
        for step_pairs, losses in steps:
            self._report(tenant, step_pairs, losses)

    def _drop_held_back(self, tenant: Tenant) -> None:
        """The steps held back since the last publish lost their training (a rollback):
        their pairs train again. (No version is installed over them: replicas and
        several servers refuse --mace-publish-every > 1 at start.)"""
        for pairs, _ in tenant.held_back:
            self._report(tenant, pairs, {})
        tenant.held_back = []

    def _send_step(self, tenant: Tenant, steps: list[TrainedStep]) -> None:
        """The step's version to every other replica; the sidecar hears of the step only
        once they all have it (trainer/replicas.py). Every replica switches to it within
        an iteration of the others: the peers install it as it arrives, this replica
        serves it when they all have it (`_publish_delivered`, run by follow_replicas at
        its next poll); published here first, it served 0.6-1.1 s (two to three
        iterations) ahead of the peer (benchmarks.lemix, 2026-12-05, Xeon). With
        --mace-sync-every-s, which delays every peer on purpose, it is served here at
        once (a replica waiting for the period would step once per period)."""
        version = tenant.version + 1
        if self.replicas.every_s <= 0:
            payload = pack_state(tenant.weights, tenant.optimizer)  # may raise: mark after
            self.unpublished[tenant.name] = version
            done = lambda: self._publish_delivered(tenant, steps, version)  # noqa: E731
        else:
            self.tenants.publish(tenant)
            payload = pack_state(tenant.weights, tenant.optimizer)

            def done() -> None:
                for pairs, losses in steps:
                    self._report(tenant, pairs, losses, version)

        self.replicas.send(tenant.name, version, payload, done)

    def _publish_delivered(self, tenant: Tenant, steps: list[TrainedStep], version: int) -> None:
        """Every peer took `version` of `tenant`: serve it here too (which checkpoints
        it), then report its steps. A tenant retired (or retired and created again)
        meanwhile, whose SGLang slot is gone, or a failed publish: the pairs are reported
        untrained at the version before, so nothing names a version no checkpoint here
        holds, and they train again. Already at `version` or past it (another server's
        announcement installed it): reported as trained, nothing to publish."""
        self.unpublished.pop(tenant.name, None)
        trained, at = True, version
        if not self._live(tenant):
            trained, at = False, version - 1
        elif tenant.version < version:
            try:
                with torch.inference_mode(False), self.streams.training_work():
                    self.tenants.publish(tenant)
            except Exception as e:  # serving goes on at the version before
                logger.exception("%s: publishing v%d failed", tenant.name, version)
                with torch.inference_mode(False), self.streams.training_work():
                    self.tenants.rollback(tenant, f"publish of v{version} failed: {e}")
                trained, at = False, tenant.version
        for pairs, losses in steps:
            self._report(tenant, pairs, losses if trained else {}, at)

    def _live(self, tenant: Tenant) -> bool:
        """Whether `tenant` is still the one of its name: in the registry and loaded in
        SGLang (a retire unloads it there up to SYNC_EVERY_S before the registry sees it)."""
        return self.tenants.tenants.get(tenant.name) is tenant and tenant.publisher.loaded()

    def _report(
        self,
        tenant: Tenant,
        pairs: list[Pair],
        losses: dict[int, float],
        version: int | None = None,
    ) -> None:
        """Results to the sidecar: each pair's loss (NaN: not trained) and the version of
        `tenant` after the step (default: its version now)."""
        version = tenant.version if version is None else version
        # A tenant retired meanwhile names no version: the sidecar would take it for that
        # of a tenant created again under the name since.
        live = self._live(tenant)
        if not live and self.tenants.tenants.get(tenant.name) is tenant:
            self.synced_at = float("-inf")  # SGLang unloaded it: retired at the next poll
        for p in pairs:
            loss = losses.get(p.sample_id, float("nan"))
            self.link.report(p.sample_id, loss, version, tenant.name if live else "")
            self.unreported.discard(p.sample_id)
        # The step ended: every peer has `version` (or none). A tenant retired meanwhile
        # gives its key back at its retire (`_sync_tenants`), not one created again since.
        if self.lease is not None and live:
            self.lease.release(tenant.name, version)

    # -- replicas ------------------------------------------------------------------------

    def training_load(self) -> TrainingLoad:
        """What placement needs of this replica's training (policy/placement.py)."""
        work = self.has_work()  # without work, neither budget nor floor takes time
        targets = self.policy.slo.targets
        return TrainingLoad(
            training=work,
            unit_ms=1000.0 * self.unit_s,
            reserve_ms=1000.0 * self.policy.training_reserve_s() if work else 0.0,
            ttft_ms=targets.ttft_ms,
            tbt_ms=targets.tbt_ms,
        )

    def follow_replicas(self) -> None:
        """Install what other replicas published (not while this replica is in a step of
        that tenant; it waits for the next poll), and report the steps every peer took.
        Runs in every poll (after each iteration, and in the idle loop) and before the
        scheduler forms a prefill batch (plugin/train_hooks.py key_by_version), so a
        replica woken by a request installs a version received while it slept first."""
        sync = self.replicas
        if sync is None:
            return
        if self.lease is not None:
            self.lease.renew()
            # Not in the middle of a step: its weights may be ahead of its version.
            busy = self.board.step_job is not None or self.unpublished
            if sync.formed != self._announced and not busy:
                self._announced = sync.formed
                self._announce_versions()
        for done in sync.delivered():
            done()
        now = time.monotonic()
        arrived = sync.received()
        known = {tenant_key(name) for name in self.tenants.tenants} if arrived else set()
        if any(u.key not in known for u in arrived):
            self.synced_at = float("-inf")  # a tenant created meanwhile: look now, once
            self._sync_tenants()
        self._updates.extend((u, now) for u in arrived)
        if not self._updates:
            return
        by_key = {tenant_key(name): t for name, t in self.tenants.tenants.items()}
        step = self.board.step_job
        busy = step.tenant if step is not None else None
        keep = []
        for update, since in self._updates:
            tenant = by_key.get(update.key)
            if tenant is None:
                # Created at run time on every replica, not yet here; or retired.
                _wait_or_drop(update, since, now, keep, "for a tenant this replica lacks")
            elif tenant.name == busy:
                keep.append((update, since))
            elif update.version > tenant.version and not tenant.publisher.loaded():
                # Retired (DELETE unloaded it from SGLang) while another replica's step
                # of it was in flight; this replica's tenant list follows SGLang only
                # every SYNC_EVERY_S. Installing would hit a KeyError that takes the
                # scheduler down (seen once in a fresh clone's run-time tenant test).
                # Look at SGLang's adapters again and keep the update; it is dropped
                # after ORPHAN_AFTER_S like an update for a tenant this replica lacks.
                if since == now:  # once, when it arrives
                    logger.error("tenant %s: adapter %s not in SGLang's LoRA manager; v%d waits",
                                 tenant.name, tenant.publisher.uid, update.version)  # fmt: skip
                    self.synced_at = float("-inf")
                _wait_or_drop(update, since, now, keep, f"for {tenant.name}, not in SGLang")
            elif update.version > tenant.version:
                # From another server: this server's first replica checkpoints it into
                # this server's own state directory, so a restart resumes it here too.
                foreign = update.src // self.cfg.replicas != self.cfg.sync_rank
                with torch.inference_mode(False), self.streams.training_work():
                    self.tenants.install(
                        tenant, update.version, update.payload, foreign and self.dp_rank == 0
                    )
                sync.stats.applied += 1
        self._updates = keep

    def _served(self) -> dict[str, int]:
        """The version this replica serves, by tenant (the lease's floors): not that of a
        tenant it cannot send (resumed without optimizer state, `_announce_versions`),
        which no other server could reach."""
        return {
            name: tenant.version
            for name, tenant in self.tenants.tenants.items()
            if tenant.version == 0 or packable(tenant.optimizer)
        }

    def _announce_versions(self) -> None:
        """Several servers: after a restart each may have resumed a different version
        (one checkpointed the newest, another died first), and a server that was down
        missed what the others published. At start and after every new group generation
        (a member came back), every server's first replica sends each tenant's state; the
        others install what is newer than theirs (follow_replicas), so the group goes on
        from the newest version there is."""
        if self.dp_rank != 0 or self.replicas is None:
            return
        for tenant in self.tenants.tenants.values():
            if tenant.version == 0:
                continue
            if not packable(tenant.optimizer):  # resumed without optimizer state
                logger.warning("tenant %s v%d: no optimizer state to announce", tenant.name,
                               tenant.version)  # fmt: skip
                continue
            payload = pack_state(tenant.weights, tenant.optimizer)
            self.replicas.send(tenant.name, tenant.version, payload, lambda: None)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Plain values for /mace/status: the default tenant's adapter and guard, totals
        over all tenants, and each tenant's own (`tenants`)."""
        secs = self.totals["train_seconds"]
        default = self.default.stats
        tenants = self.tenants.status()
        queued: dict[str, int] = {}
        for q in self.board.queue:
            queued[q.tenant] = queued.get(q.tenant, 0) + 1
        for t in tenants:
            t["queued_in_trainer"] = queued.get(t["name"], 0)
        return {
            **self.totals,
            "rollbacks": sum(t["rollbacks"] for t in tenants),
            "rejected_versions": sum(t["rejected_versions"] for t in tenants),
            "last_loss": default.last_loss,
            "last_swap_ms": default.last_swap_ms,
            "last_error": default.last_error,
            "adapter": self.cfg.adapter_name,
            "adapter_version": self.default.version,
            "paused": self.paused,
            "queued_in_trainer": len(self.board.queue),
            "jobs": len(self.board.jobs),
            "refs_ahead": len(self.board.refs),
            "idle_units_refused": self.idle_refused,
            "train_tokens_per_s": self.totals["trained_tokens"] / secs if secs else 0.0,
            "train_seconds_by_work": dict(self.seconds_by_work),
            "reserve_tokens_per_iter": self.cfg.train_tokens_per_iter,
            **self.policy.status(),
            # What LeMix placement counts per serving iteration of this replica (the
            # larger of the busy budget and the floor's share; 0 without training work),
            # unlike `reserve_ms`, the budget of the last iteration whatever it was.
            "placement_reserve_ms": self.training_load().reserve_ms,
            "memory": {
                **self.memory,
                "rss_now_mb": self.process.memory_info().rss / 2**20,
                "gpu_reserve_mb": self.cfg.train_memory_mb if self.on_cuda else None,
            },
            "device_timing": {
                "slices_in_flight": len(self.streams.slice_timer.pending),
                "timings_dropped": self.streams.slice_timer.dropped
                + self.streams.forward_timer.dropped,
            },
            "swap_baseline": self.swap_baseline,
            "checkpoints": self.default.writer.status(),
            "learned_cost": self.cost_saver.status(),
            "resumed": {
                "version": self.default.resumed.version,
                "optimizer": self.default.resumed.optimizer,
            },
            "starvation": self.starvation.status(time.monotonic()),
            "starved_s": self.starvation.starved_s(time.monotonic()),
            "guard": self.guard.status(self.default.guard),
            "tenants": tenants,
            "tenant_failures": dict(self.tenants.create_failures),
            "fair_share": self.fair.status(),
            "orphans_returned": self.orphans_returned,
            "pairs_handed_back": self.handed_back,
            "pairs_superseded": self.superseded,
            "step_wall_s": self.step_wall_s,
            "pairs_ahead": self._ahead(),
            "dp_rank": self.dp_rank,
            "adapters": {name: t.version for name, t in self.tenants.tenants.items()},
            "adapter_digest": self.default.served_digest,
            "adapter_digests": {n: t.served_digest for n, t in self.tenants.tenants.items()},
            # time.monotonic() (one clock for every process of this machine) when the
            # default adapter's version began serving here: replicas compare theirs.
            "adapter_switched_at": self.default.served_since,
            "replica_sync": self._sync_status(),
            "cluster_lease": self.lease.status() if self.lease is not None else None,
            "training_tokens": self.training_tokens(),
        }

    def _sync_status(self) -> dict[str, Any] | None:
        if self.replicas is None:
            return None
        # versions stepped here, waiting for every peer to take them before serving here
        return {**self.replicas.status(), "unpublished": dict(self.unpublished)}

    def training_tokens(self) -> int:
        """Tokens of the step in flight (SlicedDPO.step_tokens of each pair): the
        training work this replica holds, counted like SGLang counts a request's tokens
        (the server's /get_load adds it to the serving load a router balances by)."""
        step = self.board.step_job
        if step is None:
            return 0
        return sum(self.dpo.step_tokens(q.pair) for q in step.pairs)


class Starvation:
    """Since when training work waits without any unit running, and why (the policy's
    reason of the first refused plan). A unit that runs ends the episode; pause is not
    starvation (the trainer holds no candidates then)."""

    warn_after_s = 60.0

    def __init__(self) -> None:
        self.since: float | None = None
        self.why = ""
        self.waiting = 0
        self.iterations = 0  # iterations of the current episode
        self.episodes = 0
        self.total_s = 0.0  # finished episodes
        self.warned = False

    def iteration(self, now: float, waiting: int, ran: int, why: str) -> None:
        """After one iteration: `waiting` candidate units, `ran` of them ran."""
        if ran or not waiting:
            if self.since is not None:
                self.total_s += now - self.since
                if self.warned:
                    logger.warning("training runs again after %.0f s", now - self.since)
            self.since, self.why, self.iterations, self.warned = None, "", 0, False
            return
        if self.since is None:
            self.since, self.episodes = now, self.episodes + 1
        self.why = why or self.why
        self.waiting = waiting
        self.iterations += 1
        if not self.warned and now - self.since >= self.warn_after_s:
            self.warned = True
            logger.warning(
                "training starved for %.0f s with %d units waiting: %s",
                now - self.since,
                waiting,
                self.why,
            )

    def starved_s(self, now: float) -> float:
        """Seconds of the current episode (0 when training runs or nothing waits)."""
        return now - self.since if self.since is not None else 0.0

    def status(self, now: float) -> dict[str, Any]:
        starved = self.since is not None
        current = self.starved_s(now)
        return {
            "starved": starved,
            "since_s": current,
            "since_unix": time.time() - current if starved else None,
            "reason": self.why or None,
            "waiting_units": self.waiting if starved else 0,
            "iterations": self.iterations,
            "episodes": self.episodes,
            "total_s": self.total_s + current,
        }


def slice_room(device_free: float, reserve_bytes: float, resident_bytes: float) -> float:
    """Memory a GPU slice may take: what is free on the device, and never more than the
    training reserve less the trainer's resident tensors (no reserve given: device free)."""
    if reserve_bytes <= 0:
        return device_free
    return max(0.0, min(device_free, reserve_bytes - resident_bytes))


def policy_trains(name: str) -> bool:
    """False for the inference-only policy: feedback is stored but nothing trains."""
    return name != "inference-only"
