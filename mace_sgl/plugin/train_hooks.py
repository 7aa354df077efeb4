"""Scheduler- and tokenizer-side glue of continuous training (registered in plugin/__init__).

The hooks are methods of one `TrainHooks` built by register() from the config the
launcher exported, so no hook re-reads or caches the config; scheduler-side hooks find
that scheduler's trainer and monitor on its state (plugin/state.py).
"""

from __future__ import annotations

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
        from mace_sgl.trainer.runtime import MaceTrainer

        st.trainer = MaceTrainer(runner, self.cfg)
        st.monitor = IterationMonitor(st.trainer.policy, st.trainer.on_cuda)
        if getattr(scheduler.server_args, "enable_metrics", False):
            from mace_sgl.metrics import TrainerMetrics

            st.metrics = TrainerMetrics(self.cfg.adapter_name)
            st.metrics_at = 0.0
        sleeper = getattr(scheduler, "idle_sleeper", None)
        if sleeper is not None and hasattr(sleeper, "poller"):
            import zmq

            # An idle scheduler sleeps in poll(); sidecar messages must wake it too.
            sleeper.poller.register(st.trainer.pull, zmq.POLLIN)

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
        st.trainer.iteration_done(st.monitor.results(scheduler, batch))
        _refresh_metrics(st)

    def train_or_sleep(self, original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        """AROUND Scheduler.maybe_sleep_on_idle: with training work, one unit instead of
        sleep; an idle scheduler also gives free heap back (--mace-malloc-trim-s)."""
        st = state.of(scheduler)
        if st is not None and st.trimmer is not None:
            st.trimmer.maybe_trim()
        if st is not None and st.trainer is not None:
            st.monitor.idle()
            st.trainer.poll()
            _refresh_metrics(st)
            if st.trainer.has_work():
                st.trainer.run_idle_slice()
                return None
        return original(scheduler, *args, **kwargs)

    def on_generate_request(self, scheduler: Any, recv_req: Any, *a: Any, **kw: Any) -> None:
        """BEFORE Scheduler.handle_generate_request: note the arrival (TTFT)."""
        st = state.of(scheduler)
        if st is not None and st.monitor is not None:
            st.monitor.arrived(recv_req.rid)

    def key_by_version(self, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        """BEFORE the scheduler builds a prefill batch: never share KV across adapter
        versions.

        SGLang keys a LoRA request's radix prefix by extra_key + lora_id, and the live
        adapter's weights change in place, so the version joins the key. It is set here,
        when prefix matching is about to run, not on arrival: a request that waited in
        the queue across a publish runs its prefill under the new weights and must store
        that KV under the new version. Base-model requests keep their key.
        """
        st = state.of(scheduler)
        if st is None or st.trainer is None:
            return
        uid, suffix = st.trainer.lora_uid, f"mace-v{st.trainer.version}"
        for req in scheduler.waiting_queue:
            if getattr(req, "lora_id", None) == uid:
                set_version_key(req, suffix)

    def default_adapter(self, tm: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
        """BEFORE TokenizerManager.generate_request: requests naming no adapter get the
        default."""
        name = self.cfg.default_adapter
        if name and hasattr(obj, "lora_path") and obj.lora_path is None:
            obj.lora_path = name


def set_version_key(req: Any, suffix: str) -> None:
    """Key `req` by the adapter version `suffix`, after the client's own extra_key (kept
    on the request the first time, so a later version replaces only our part)."""
    client = getattr(req, "_mace_client_key", None)
    if client is None:
        client = req.extra_key or ""
        req._mace_client_key = client
    req.extra_key = f"{client}|{suffix}" if client else suffix


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
