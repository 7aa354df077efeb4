"""The mace-sgl SGLang plugin: register() is the one place that lists every SGLang hook.

SGLang runs `load_plugins()` in each process it starts (launcher, scheduler, detokenizer)
and calls `register()` there through the `sglang.srt.plugins` entry point, so a hook
registered here reaches the scheduler although that process is spawned, not forked.

Hooks (target -> why -> how):

- CPU only, every process: `vllm._custom_ops` stub -> SGLang's RotaryEmbedding imports the
  vllm fallback kernel on an unknown platform -> an in-memory module (plugin/cpu.py).
- `sglang.srt.distributed.parallel_state.init_distributed_environment` BEFORE -> torch's
  TCPStore listens on every interface although SGLang asks for 127.0.0.1 -> a
  single-rank engine rendezvouses through a file store instead (plugin/loopback.py).
- `sglang.srt.managers.scheduler.Scheduler.get_internal_state` AFTER -> /mace/status must
  show state that lives in the scheduler process (and prove the plugin runs there) ->
  add a `mace` entry to the dict SGLang already sends back over its own msgpack channel
  (plugin/scheduler.py).
- Launcher (HTTP) process only: `/mace/*` routes added to SGLang's FastAPI `app` before it
  starts, so SGLang's --api-key middleware covers them like its own routes (plugin/routes.py).
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Entry point for `sglang.srt.plugins`; idempotent and cheap when called again."""
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from mace_sgl.plugin import cpu, loopback, scheduler

    if cpu.on_cpu():
        cpu.install()

    HookRegistry.register(
        "sglang.srt.distributed.parallel_state.init_distributed_environment",
        loopback.file_store_for_single_rank,
        HookType.BEFORE,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
        scheduler.add_mace_state,
        HookType.AFTER,
    )

    # SGLang spawns its workers; only the launcher, which has no parent, serves HTTP.
    # Importing the FastAPI app elsewhere would only slow the workers' start.
    if multiprocessing.parent_process() is None:
        from mace_sgl.plugin import routes

        routes.install()
    logger.info("mace-sgl plugin registered (cpu shims: %s)", cpu.INSTALLED or "none")
