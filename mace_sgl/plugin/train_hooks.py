"""Scheduler- and tokenizer-side glue of continuous training (registered in plugin/__init__)."""

from __future__ import annotations

import functools
import logging
from typing import Any

from mace_sgl.config import MaceConfig

logger = logging.getLogger("mace_sgl.trainer")

# The trainer of this scheduler process, once Scheduler.__init__ has run, and the monitor
# that measures iterations for its policy.
TRAINER: Any = None
MONITOR: Any = None


def start_trainer(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER Scheduler.__init__: build the trainer on the weights SGLang just loaded."""
    global TRAINER, MONITOR
    cfg = MaceConfig.from_env()
    if not cfg.train or TRAINER is not None:
        return
    from mace_sgl.plugin.iteration import IterationMonitor
    from mace_sgl.trainer.runtime import MaceTrainer

    TRAINER = MaceTrainer(scheduler, cfg)
    MONITOR = IterationMonitor(TRAINER.policy, TRAINER.on_cuda)
    sleeper = getattr(scheduler, "idle_sleeper", None)
    if sleeper is not None and hasattr(sleeper, "poller"):
        import zmq

        # An idle scheduler sleeps in poll(); sidecar messages must wake it too.
        sleeper.poller.register(TRAINER.pull, zmq.POLLIN)


def timed_forward(original: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND Scheduler.run_batch: every forward's time feeds the policy's cost model."""
    if MONITOR is None or batch is None:
        return original(scheduler, batch, *args, **kwargs)
    return MONITOR.timed_forward(original, scheduler, batch, *args, **kwargs)


def train_after_iteration(result: Any, scheduler: Any, batch: Any, *args: Any, **kw: Any) -> None:
    """AFTER Scheduler.process_batch_result: record latencies, then the training units the
    policy fits into what this iteration leaves."""
    if TRAINER is not None:
        TRAINER.iteration_done(MONITOR.results(scheduler, batch))


def train_or_sleep(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND Scheduler.maybe_sleep_on_idle: with training work, one unit instead of sleep."""
    if TRAINER is not None:
        MONITOR.idle()
        TRAINER.poll()
        if TRAINER.has_work():
            TRAINER.run_idle_slice()
            return None
    return original(scheduler, *args, **kwargs)


def on_generate_request(scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE Scheduler.handle_generate_request: note the arrival (TTFT), and never share
    KV across adapter versions.

    SGLang keys a LoRA request's radix prefix by extra_key + lora_id; the live adapter's
    weights change in place, so the version joins the key. Base-model requests keep theirs.
    """
    if MONITOR is not None:
        MONITOR.arrived(recv_req.rid)
    if TRAINER is not None and getattr(recv_req, "lora_id", None) == TRAINER.lora_uid:
        suffix = f"mace-v{TRAINER.version}"
        recv_req.extra_key = f"{recv_req.extra_key}|{suffix}" if recv_req.extra_key else suffix


@functools.lru_cache(maxsize=1)
def _config() -> MaceConfig:
    # Exported by the launcher before SGLang started; parsed once, not per request.
    return MaceConfig.from_env()


def default_adapter(tm: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE TokenizerManager.generate_request: requests naming no adapter get the default."""
    name = _config().default_adapter
    if name and hasattr(obj, "lora_path") and obj.lora_path is None:
        obj.lora_path = name


def trainer_status() -> dict[str, Any] | None:
    """The trainer's status in this process, or None without one."""
    if TRAINER is None:
        return None
    return {**TRAINER.status(), **MONITOR.status()}
