"""Scheduler- and tokenizer-side glue of continuous training (registered in plugin/__init__).

The hooks are methods of one `TrainHooks` built by register() from the config the
launcher exported, so no hook re-reads or caches the config; scheduler-side hooks find
that scheduler's trainer and monitor on its state (plugin/state.py).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from mace_sgl import memstats
from mace_sgl.config import MaceConfig
from mace_sgl.plugin import state

logger = logging.getLogger("mace_sgl.trainer")

# Seconds between two refreshes of the Prometheus gauges from the trainer's status.
METRICS_EVERY_S = 1.0


class TrainHooks:
    """The hooks of continuous training, bound to one config."""

    def __init__(self, cfg: MaceConfig) -> None:
        self.cfg = cfg

    def attach_state(self, result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        """AFTER Scheduler.__init__: give the scheduler its state; with --mace-train build
        the trainer on the weights SGLang just loaded, and the monitor of its policy."""
        if state.of(scheduler) is not None:
            return
        st = state.attach(scheduler, state.SchedulerState(self.cfg))
        st.trimmer = memstats.Trimmer(self.cfg.malloc_trim_s)
        runner = scheduler.tp_worker.model_runner
        st.pruner = getattr(getattr(runner, "attn_backend", None), "pruner", None)
        if not self.cfg.train:
            return
        from mace_sgl.plugin.iteration import IterationMonitor
        from mace_sgl.trainer.host import TrainerHost
        from mace_sgl.trainer.runtime import MaceTrainer
        from mace_sgl.trainer.streams import DeviceStreams

        streams = DeviceStreams.for_scheduler(scheduler, runner.device)
        host = TrainerHost.from_model_runner(runner, self.cfg, streams, dp_rank(scheduler))
        with streams.training_work():  # its tensors belong to the training stream
            st.trainer = MaceTrainer(host)
        streams.settle_start_up()
        st.monitor = IterationMonitor(st.trainer.policy, streams)
        st.dp_rank = host.dp_rank
        if self.cfg.replicas > 1 and self.cfg.replica_store:
            from mace_sgl.plugin.placement import TrainingSlots

            st.slots = TrainingSlots(self.cfg.replica_store, self.cfg.replicas)
        if getattr(scheduler.server_args, "enable_metrics", False):
            from mace_sgl.metrics import TrainerMetrics

            st.metrics = TrainerMetrics(self.cfg.adapter_name)
            st.metrics_at = 0.0
        sleeper = getattr(scheduler, "idle_sleeper", None)
        if sleeper is not None and hasattr(sleeper, "poller"):
            import zmq

            # An idle scheduler sleeps in poll(); sidecar messages must wake it too.
            sleeper.poller.register(st.trainer.link.pull, zmq.POLLIN)

    def timed_forward(self, original: Any, scheduler: Any, batch: Any, *a: Any, **kw: Any) -> Any:
        """AROUND Scheduler.run_batch: every forward's time feeds the policy's cost model."""
        st = state.of(scheduler)
        if st is None or st.monitor is None or batch is None:
            return original(scheduler, batch, *a, **kw)
        return st.monitor.timed_forward(original, scheduler, batch, *a, **kw)

    def after_iteration(self, result: Any, scheduler: Any, batch: Any, *a: Any, **kw: Any) -> None:
        """AFTER Scheduler.process_batch_result: record latencies, then the training units
        the policy fits into what this iteration leaves."""
        st = state.of(scheduler)
        if st is None or st.trainer is None:
            return
        st.trainer.room = st.monitor.recent_idle()
        st.trainer.iteration_done(st.monitor.results(scheduler, batch))
        _refresh_metrics(st)
        _publish_training_load(st)

    def train_or_sleep(self, original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        """AROUND Scheduler.maybe_sleep_on_idle: with training work, one unit instead of
        sleep; an idle scheduler also gives free heap back (--mace-malloc-trim-s)."""
        st = state.of(scheduler)
        if st is not None and st.trimmer is not None:
            st.trimmer.maybe_trim()
        if st is not None and st.trainer is not None:
            st.monitor.idle()
            st.trainer.room = st.monitor.recent_idle()
            st.trainer.poll()
            _refresh_metrics(st)
            _publish_training_load(st)
            if st.trainer.has_work():
                st.trainer.run_idle_slice()
                return None
        return original(scheduler, *args, **kwargs)

    def on_generate_request(self, scheduler: Any, recv_req: Any, *a: Any, **kw: Any) -> None:
        """BEFORE Scheduler.handle_generate_request: note the arrival (TTFT)."""
        st = state.of(scheduler)
        if st is not None and st.monitor is not None:
            st.monitor.arrived(recv_req.rid, scheduler)

    def key_by_version(self, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        """BEFORE the scheduler builds a prefill batch: every waiting request's radix key
        names its adapter and that adapter's version, in a form no request can forge.

        SGLang joins a request's extra_key and its lora_id by plain concatenation
        (SGLang #24638), so a base-model request whose extra_key ends with an adapter's
        id would share that adapter's cached KV; and a tenant's weights change in place,
        so its version must join the key too. The key is set here, when prefix matching
        is about to run, not on arrival: a request that waited across a publish runs its
        prefill under the new weights and must store that KV under the new version.
        """
        st = state.of(scheduler)
        if st is None:
            return
        if st.trainer is not None and scheduler.waiting_queue:
            # A version another replica published while this one slept serves from the
            # first prefill on (replicas switch within an iteration of each other).
            st.trainer.follow_replicas()
        versions = st.trainer.versions_by_uid() if st.trainer is not None else {}
        for req in scheduler.waiting_queue:
            set_radix_key(req, versions)

    def default_adapter(self, tm: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
        """BEFORE TokenizerManager.generate_request: requests naming no adapter get the
        default."""
        name = self.cfg.default_adapter
        if name and hasattr(obj, "lora_path") and obj.lora_path is None:
            obj.lora_path = name


KEY_PREFIX = "mace:"


def radix_key(client: str | None, lora_id: str | None, version: int | None) -> str | None:
    """The radix namespace of a request: its client's own extra_key, its adapter's id and
    that adapter's version, JSON-encoded (so no client key can spell another request's).
    None only for a base-model request without a client key, as SGLang has it."""
    if client is None and lora_id is None:
        return None
    return KEY_PREFIX + json.dumps([client, lora_id, version], separators=(",", ":"))


def set_radix_key(req: Any, versions: dict[str, int]) -> None:
    """Key `req` by radix_key(); the client's part is recovered from SGLang's concatenated
    key the first time (and kept on the request, so a later version replaces only ours)."""
    uid = getattr(req, "lora_id", None)
    if not hasattr(req, "_mace_client_key"):
        key = req.extra_key
        if uid is not None and key is not None and key.endswith(uid):
            key = key[: -len(uid)] or None  # SGLang appended the lora id
        req._mace_client_key = key
    req.extra_key = radix_key(req._mace_client_key, uid, versions.get(uid) if uid else None)


def dp_rank(scheduler: Any) -> int:
    """The data-parallel rank of this scheduler (0 without data parallelism)."""
    from sglang.srt.runtime_context import get_parallel

    rank = get_parallel().dp_rank
    return int(rank) if rank is not None else 0


def _publish_training_load(st: state.SchedulerState) -> None:
    """This replica's training state for the controller's placement (at most every 20 ms)."""
    if st.slots is not None and st.slots.due():
        st.slots.write(st.dp_rank, st.trainer.training_load())


def _refresh_metrics(st: state.SchedulerState) -> None:
    if st.metrics is None:
        return
    now = time.monotonic()
    if now - st.metrics_at >= METRICS_EVERY_S:
        st.metrics_at = now
        st.metrics.update(st.trainer.status())


def trainer_status(scheduler: Any) -> dict[str, Any] | None:
    """The trainer's status in this scheduler, or None without one."""
    st = state.of(scheduler)
    if st is None or st.trainer is None:
        return None
    return {**st.trainer.status(), **st.monitor.status()}
