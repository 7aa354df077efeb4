"""The trainer inside SGLang's scheduler process: feeds, runs and publishes sliced DPO.

Driven by hooks (plugin/train_hooks.py): after every serving iteration the policy
(mace_sgl/policy, chosen by --mace-policy) decides how many seconds of training fit and
which units; when the scheduler would sleep idle it runs one unit instead, so a new
request waits at most one unit. Work is a set of jobs, each a chain of slices: the one
DPO step in progress, and the reference log-probs of pairs queued behind it (computed
ahead so that short units can fill the room an iteration leaves). Pairs arrive from the
sidecar over ZeroMQ; results go back the same way.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import psutil
import torch
import zmq

from mace_sgl.config import MaceConfig
from mace_sgl.ipc import channels
from mace_sgl.ipc.messages import Control, Hello, Ready, Result, Work, decode_to_trainer, encode
from mace_sgl.policy import IterationView, Observation, Profile, Unit, make_policy
from mace_sgl.policy.slo import SloTargets
from mace_sgl.templating import encode_pair
from mace_sgl.trainer import learned_cost
from mace_sgl.trainer.anchor import ANCHOR_PROMPTS, base_anchors
from mace_sgl.trainer.checkpoints import CheckpointWriter, check_compatible, resume
from mace_sgl.trainer.guard import CANARY_PROMPTS, Guard
from mace_sgl.trainer.publish import PoolPublisher, lora_config_dict
from mace_sgl.trainer.shared import attach_lora, build_shared_llama, shares_storage
from mace_sgl.trainer.sliced import Pair, SlicedDPO, SliceSpec

logger = logging.getLogger("mace_sgl.trainer")


@dataclass
class QueuedPair:
    """A pair waiting for its step, with what its priority needs."""

    pair: Pair
    arrival: float  # time.monotonic() it reached the trainer
    loss: float | None  # last DPO loss from the store, if it trained before


@dataclass
class Job:
    """A chain of slices: a DPO step (kind "step") or one pair's reference log-probs."""

    key: int
    kind: str
    gen: Generator[SliceSpec, None, Any]
    pending: SliceSpec | None
    pairs: list[QueuedPair]

    def unit(self) -> Unit:
        first = self.pairs[0]
        return Unit(self.key, self.pending.kind, self.pending.tokens, first.arrival, first.loss)


def load_profile(cfg: MaceConfig) -> Profile:
    """The --mace-profile file (or built-in defaults) with --mace-slo-* flags applied."""
    profile = Profile.load(cfg.cost_profile) if cfg.cost_profile else Profile()
    profile.meta.setdefault("source", cfg.cost_profile or "built-in defaults")
    profile.slo = SloTargets(
        ttft_ms=cfg.slo_ttft_ms or profile.slo.ttft_ms,
        tbt_ms=cfg.slo_tbt_ms or profile.slo.tbt_ms,
    )
    return profile


class MaceTrainer:
    """Owns the shared-weight LoRA model, the step in progress and the live adapter."""

    def __init__(self, model_runner: Any, cfg: MaceConfig) -> None:
        """model_runner: SGLang's ModelRunner of this scheduler (its model, model config
        and LoRA manager are what training shares)."""
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.process = psutil.Process()
        rss_before = self.process.memory_info().rss
        model_path = model_runner.model_config.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        hf_config = AutoConfig.from_pretrained(model_path)
        with torch.inference_mode(False):
            base = build_shared_llama(model_runner.model, hf_config)
            self.model = attach_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
            self.dpo = SlicedDPO(
                self.model,
                beta=cfg.beta,
                lr=cfg.lr,
                rpo_alpha=cfg.rpo_alpha,
                head_chunks=cfg.head_chunks,
                anchor_alpha=cfg.anchor_alpha,
            )
            check_compatible(cfg.adapter_dir, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
            resumed = resume(cfg.adapter_dir, self.model, self.dpo.optimizer)
            self.version = resumed.version
        lora_bytes = sum(p.numel() * p.element_size() for p in self._lora_params().values())
        self.memory = {
            "shares_base_weights": shares_storage(self.model, model_runner.model),
            "base_weight_mb": sum(
                p.numel() * p.element_size() for p in model_runner.model.parameters()
            )
            / 2**20,
            "lora_mb": lora_bytes / 2**20,
            "adam_state_mb": 2 * lora_bytes / 2**20,  # exp_avg + exp_avg_sq, once stepped
            "rss_before_trainer_mb": rss_before / 2**20,
            "rss_after_trainer_mb": self.process.memory_info().rss / 2**20,
        }
        self.publisher = PoolPublisher(model_runner.lora_manager, cfg.adapter_name)
        self.lora_uid = self.publisher.uid
        self.publisher.publish(self.model)
        self.good_state = self._snapshot()
        self.swap_baseline = None
        if cfg.measure_swap:
            try:
                self.swap_baseline = self._measure_swap_baseline()
            except Exception as e:  # a measurement must never take the server down
                logger.exception("swap measurement failed")
                self.swap_baseline = {"error": f"{type(e).__name__}: {e}"}
        self.writer = CheckpointWriter(cfg.adapter_dir, cfg.keep_versions)
        self.resumed = {"version": resumed.version, "optimizer": resumed.optimizer}
        self.session = uuid.uuid4().hex
        self.queue: deque[QueuedPair] = deque()  # pairs without a step yet
        self.jobs: dict[int, Job] = {}
        self.step_job: Job | None = None
        self.refs: dict[int, tuple[float, float]] = {}  # sample id -> reference log-probs
        self.next_key = 0
        profile = load_profile(cfg)
        # A restart resumes the cost model learned before it (trainer/learned_cost.py).
        cost_key = learned_cost.key(
            profile.meta["source"], model_path, self.dpo.device.type, torch.get_num_threads()
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
        self.on_cuda = self.dpo.device.type == "cuda"
        self.param_storage = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        # Seconds of slices per token of trained pairs: converts the token reserve of
        # fcfs-reserve (--mace-train-tokens-per-iter) to time.
        self.sec_per_token = 5e-3
        self.step_seconds = 0.0
        self.paused = False
        self.asked_at = 0.0
        # The sidecar process whose Work we take (messages.py), set by its Control.
        self.sidecar_id = ""
        self.idle_refused = 0
        self.stats = {
            "train_steps": 0,
            "rollbacks": 0,
            "rejected_versions": 0,
            "last_loss": None,
            "trained_tokens": 0,
            "train_seconds": 0.0,
            "last_swap_ms": None,
            "last_error": None,
        }
        with torch.inference_mode(False):
            self.guard = Guard(
                self.dpo,
                [encode_pair(self.tokenizer, m, "")[0] for m in CANARY_PROMPTS],
                self.tokenizer.eos_token_id,
                self.tokenizer.decode,
                cfg.guard_max_kl,
                cfg.guard_tokens,
                cfg.guard_min_keep,
            )
            if cfg.anchor_alpha:  # answered with the adapter off: the base model's own
                self.dpo.set_anchors(
                    base_anchors(
                        self.dpo,
                        [encode_pair(self.tokenizer, m, "")[0] for m in ANCHOR_PROMPTS],
                        self.tokenizer.eos_token_id,
                    )
                )
        ctx = zmq.Context.instance()
        self.push, self.pull = channels.connect_trainer(ctx, cfg.state_path / "run")
        self.push.send(encode(Hello(self.session, cfg.adapter_name)))
        logger.info("trainer ready: adapter %s v%d", cfg.adapter_name, self.version)

    # -- state ---------------------------------------------------------------------------

    def _lora_params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def _snapshot(self) -> dict[str, Any]:
        return {
            "weights": {n: p.detach().clone() for n, p in self._lora_params().items()},
            "optimizer": copy.deepcopy(self.dpo.optimizer.state_dict()),
        }

    def _rollback(self, why: str) -> None:
        with torch.no_grad():
            for n, p in self._lora_params().items():
                p.copy_(self.good_state["weights"][n])
        self.dpo.optimizer.load_state_dict(copy.deepcopy(self.good_state["optimizer"]))
        self.stats["rollbacks"] += 1
        self.stats["last_error"] = why
        logger.warning("training step rolled back to v%d: %s", self.version, why)

    def _checkpoint(self) -> None:
        """Write the version just published (peft format + optimizer) off the serving
        thread; good_state is a private copy that nothing changes afterwards."""
        weights = {n.replace(".default", ""): t for n, t in self.good_state["weights"].items()}
        meta = {
            "version": self.version,
            "time": time.time(),
            "train_steps": self.stats["train_steps"],
            "loss": self.stats["last_loss"],
        }
        config = self.model.peft_config["default"].to_dict()
        self.writer.submit(self.version, weights, config, meta, self.good_state["optimizer"])

    def _measure_swap_baseline(self, repeats: int = 5) -> dict[str, float]:
        """Time until new weights are servable: our in-place publish against SGLang's own
        path (load_lora_adapter_from_tensors, then the pool-slot copy its next batch would
        make, then unload), same weights, side by side; medians in milliseconds. Runs at
        start, before serving; the live slot is republished afterwards."""
        import statistics

        from sglang.srt.lora.lora_registry import LoRARef

        manager = self.publisher.manager
        pool = manager.memory_pool
        weights = {
            n.replace(".default", ""): p.detach().clone() for n, p in self._lora_params().items()
        }
        peft_cfg = self.model.peft_config["default"]
        config = lora_config_dict(peft_cfg.r, peft_cfg.lora_alpha, list(peft_cfg.target_modules))
        self.publisher.publish(self.model)
        slot = pool.uid_to_buffer_id.get(self.lora_uid, 0)
        in_place, reload = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            self.publisher.publish(self.model)
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
            reload.append((time.perf_counter() - start) * 1000)
            manager.unload_lora_adapter(ref)
        self.publisher.publish(self.model)  # the live weights back into the slot
        return {
            "in_place_ms": statistics.median(in_place),
            "sglang_load_to_slot_ms": statistics.median(reload),
        }

    # -- messages ------------------------------------------------------------------------

    def poll(self) -> None:
        """Take every waiting sidecar message; ask for work when too little is queued, and
        say Ready every 2 s even when not (paused, full), so a restarted sidecar learns of
        this session, sends it the pause state and requeues what it will never get."""
        sidecar = self.sidecar_id
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode_to_trainer(data)
            except msgspec.DecodeError as e:  # garbage, or a ValidationError (a subclass)
                logger.error("dropped a malformed sidecar message (%d bytes): %s", len(data), e)
                continue
            if isinstance(msg, Work) and msg.session == self.session and msg.sidecar == sidecar:
                self.asked_at = 0.0
                now = time.monotonic()
                for s in msg.samples:
                    self.queue.append(QueuedPair(self._pair(s), now, s.loss))
            elif isinstance(msg, Control) and msg.session in ("", self.session):
                self.paused = msg.paused
                sidecar = self.sidecar_id = msg.sidecar
                self.asked_at = 0.0  # name it in a Ready at once: it sends no Work before
        self.cost_saver.maybe_save()
        # The sidecar answers only when it has samples; ask again now and then.
        want = self.cfg.lookahead + self.cfg.pairs_per_step - len(self.queue)
        if self.step_job is not None:
            want -= len(self.step_job.pairs)
        now = time.monotonic()
        asking = want > 0 and policy_trains(self.cfg.policy) and not self.paused
        if (asking and now - self.asked_at > 0.5) or now - self.asked_at > 2.0:
            held = [q.pair.sample_id for q in self.queue]
            if self.step_job is not None:
                held += [q.pair.sample_id for q in self.step_job.pairs]
            ready = Ready(self.session, want if asking else 0, held, sidecar)
            try:
                # Never block the scheduler: with the sidecar down for long the queue fills.
                self.push.send(encode(ready), zmq.NOBLOCK)
            except zmq.Again:
                pass
            self.asked_at = now

    def _pair(self, s: Any) -> Pair:
        prompt, chosen = encode_pair(self.tokenizer, s.prompt, s.chosen)
        _, rejected = encode_pair(self.tokenizer, s.prompt, s.rejected)
        return Pair(s.id, prompt, chosen, rejected, s.weight)

    # -- jobs ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        """True when a unit could run now."""
        return not self.paused and policy_trains(self.cfg.policy) and bool(self.jobs or self.queue)

    def _new_job(self, kind: str, gen: Generator[SliceSpec, None, Any], pairs: list) -> Job:
        self.next_key += 1
        job = Job(self.next_key, kind, gen, None, pairs)
        job.pending = next(gen)  # runs only the set-up before the first slice
        self.jobs[job.key] = job
        return job

    def _candidates(self) -> tuple[Unit, ...]:
        """The head unit of every job, after starting the jobs that can start."""
        if self.paused:
            return ()
        if self.step_job is None and self.queue:
            waiting = [Unit(i, "fwd", 0, q.arrival, q.loss) for i, q in enumerate(self.queue)]
            order = [u.job for u in self.policy.rank(waiting, time.monotonic())]
            picked = set(order[: self.cfg.pairs_per_step])
            step_pairs = [self.queue[i] for i in sorted(picked)]
            self.queue = deque(q for i, q in enumerate(self.queue) if i not in picked)
            taken = {q.pair.sample_id for q in step_pairs}
            for job in [j for j in self.jobs.values() if j.pairs[0].pair.sample_id in taken]:
                del self.jobs[job.key]  # its reference pass finishes inside the step
            refs = {
                q.pair.sample_id: self.refs.pop(q.pair.sample_id)
                for q in step_pairs
                if q.pair.sample_id in self.refs
            }
            self.step_job = self._new_job("step", self._step(step_pairs, refs), step_pairs)
        ahead = {j.pairs[0].pair.sample_id for j in self.jobs.values() if j.kind == "ref"}
        for q in self.queue:
            sid = q.pair.sample_id
            if sid not in self.refs and sid not in ahead:
                self._new_job("ref", self.dpo.ref_slices(q.pair), [q])
        return tuple(job.unit() for job in self.jobs.values())

    def _run_unit(self, key: int) -> float:
        """Run the head slice of one job; returns the seconds it took."""
        job = self.jobs[key]
        spec = job.pending
        mem = _MemoryProbe(self.on_cuda, self.param_storage)
        start = time.perf_counter()
        try:
            with torch.inference_mode(False), mem:
                job.pending = next(job.gen)
        except StopIteration as stop:
            self._finish(job, stop.value)
        except Exception as e:  # OOM or anything else: serving must go on
            logger.exception("training slice failed (%s job)", job.kind)
            self._finish(job, None)
            if job.kind == "step":
                self._rollback(f"{type(e).__name__}: {e}")
                self._report([q.pair for q in job.pairs], {}, self.version)
        elapsed = time.perf_counter() - start
        self.policy.observe(
            Observation(spec.kind, elapsed, tokens=spec.tokens, mem_bytes=mem.bytes)
        )
        self.stats["train_seconds"] += elapsed
        self.step_seconds += elapsed
        return elapsed

    def _finish(self, job: Job, value: Any) -> None:
        del self.jobs[job.key]
        if job.kind == "step":
            self.step_job = None
        elif value is not None:
            self.refs[job.pairs[0].pair.sample_id] = value

    def iteration_done(self, view: IterationView) -> None:
        """After a serving iteration: the units the policy fits into what it leaves."""
        self.poll()
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
                if unit.job in self.jobs:
                    spent += self._run_unit(unit.job)
                    ran += 1
        self.policy.charge(spent)
        self.starvation.iteration(time.monotonic(), waiting, ran, why)

    def run_idle_slice(self) -> None:
        """Nothing to serve: one unit, then back to the loop to look for requests."""
        self.poll()
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
        if self.on_cuda:
            return float(torch.cuda.mem_get_info()[0])
        return float(psutil.virtual_memory().available)

    # -- one step, then maybe a publish --------------------------------------------------

    def _step(
        self, queued: list[QueuedPair], refs: dict[int, tuple[float, float]]
    ) -> Generator[SliceSpec, None, None]:
        pairs = [q.pair for q in queued]
        result = yield from self.dpo.step_slices(pairs, refs)
        if not result.ok:
            self._rollback(result.error)
            self._report(pairs, result.losses, self.version)
            return
        self.stats["train_steps"] += 1
        self.stats["last_loss"] = sum(result.losses.values()) / len(result.losses)
        logger.info(
            "step %d: losses %s margins %s grad norm %.4g",
            self.stats["train_steps"],
            result.losses,
            result.margins,
            result.grad_norm,
        )
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        self.stats["trained_tokens"] += tokens
        self.sec_per_token += 0.3 * (self.step_seconds / tokens - self.sec_per_token)
        self.step_seconds = 0.0
        if self.stats["train_steps"] % self.cfg.publish_every == 0:
            reading = yield from self.guard.check(self.version + 1)
            if not reading.published:
                self.stats["rejected_versions"] += 1
                self._rollback(f"guard refused v{self.version + 1}: {reading.why}")
            else:
                yield SliceSpec("publish", 0)
                self._publish()
        self._report(pairs, result.losses, self.version)

    def _publish(self) -> None:
        start = time.perf_counter()
        self.publisher.publish(self.model)
        self.stats["last_swap_ms"] = (time.perf_counter() - start) * 1000
        self.version += 1
        self.good_state = self._snapshot()
        self._checkpoint()
        logger.info(
            "published %s v%d (loss %.4f, swap %.1f ms)",
            self.cfg.adapter_name,
            self.version,
            self.stats["last_loss"],
            self.stats["last_swap_ms"],
        )

    def _report(self, pairs: list[Pair], losses: dict[int, float], version: int) -> None:
        for p in pairs:
            loss = losses.get(p.sample_id, float("nan"))
            self.push.send(encode(Result(self.session, p.sample_id, loss, version)))

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Plain values for /mace/status."""
        secs = self.stats["train_seconds"]
        return {
            **self.stats,
            "adapter": self.cfg.adapter_name,
            "adapter_version": self.version,
            "paused": self.paused,
            "queued_in_trainer": len(self.queue),
            "jobs": len(self.jobs),
            "refs_ahead": len(self.refs),
            "idle_units_refused": self.idle_refused,
            "train_tokens_per_s": self.stats["trained_tokens"] / secs if secs else 0.0,
            "reserve_tokens_per_iter": self.cfg.train_tokens_per_iter,
            **self.policy.status(),
            "memory": {**self.memory, "rss_now_mb": self.process.memory_info().rss / 2**20},
            "swap_baseline": self.swap_baseline,
            "checkpoints": self.writer.status(),
            "learned_cost": self.cost_saver.status(),
            "resumed": self.resumed,
            "starvation": self.starvation.status(time.monotonic()),
            "starved_s": self.starvation.starved_s(time.monotonic()),
            "guard": self.guard.status(),
        }


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


def policy_trains(name: str) -> bool:
    """False for the inference-only policy: feedback is stored but nothing trains."""
    return name != "inference-only"


class _MemoryProbe:
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

    def __enter__(self) -> _MemoryProbe:
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
